"""DataLoader collate functions: pre-fitted rows into padded splat batches, and the training
batches of both stages (student splats, teacher pixels, caption tokens)."""

from __future__ import annotations

import torch

from ..splats import check_splats, pad_splats


def collate_prefit(batch: list[dict], target: str = "auto", num_splats: int | None = None):
    """DataLoader ``collate_fn`` for :func:`~timm_splat.data.load_prefit` rows.

    Returns ``(splats float32 [B, N, 8], labels int64 [B])`` for ``target="label"`` or
    ``(splats, captions list[str | None])`` for ``target="caption"``. ``"auto"`` picks captions
    when every row has one and none has a label (a captioned dataset), else labels; pass the
    target explicitly (``functools.partial``) where a batch could be ambiguous. Rows of
    different lengths are padded with zero rows to ``num_splats`` (else the longest row)."""
    if not batch:
        raise ValueError("collate_prefit takes a non-empty list of rows")
    if target not in ("auto", "label", "caption"):
        raise ValueError(f"target must be 'auto', 'label' or 'caption', got {target!r}")
    for row in batch:  # rows come from files: check them before they reach a model
        check_splats(torch.as_tensor(row["splats"]), f"splats of row {row.get('source_id', '?')}")
    splats = pad_splats([row["splats"] for row in batch], num_splats)
    labels = [int(row.get("label", -1)) for row in batch]
    captions = [row.get("caption") for row in batch]
    if target == "auto":
        labelled = any(label >= 0 for label in labels)
        target = "caption" if not labelled and all(c is not None for c in captions) else "label"
    if target == "caption":
        return splats, captions
    return splats, torch.tensor(labels, dtype=torch.int64)


class TrainingCollate:
    """Training batches: student splats (pre-fitted, or all images of the batch fitted in one
    :meth:`SplatTransform.collate` call; none without a ``splat_transform``; each through
    ``splat_augment`` when given), pixels through ``pixel_preprocess`` (stage 1's teacher, or an
    RGB model), caption tokens (with a ``tokenizer``) and class labels (``labels=True``)."""

    def __init__(
        self,
        splat_transform=None,
        pixel_preprocess=None,
        tokenizer=None,
        labels: bool = False,
        splat_augment=None,
    ):
        self.splat_transform = splat_transform
        self.pixel_preprocess = pixel_preprocess
        self.tokenizer = tokenizer
        self.labels = labels
        self.splat_augment = splat_augment

    def __call__(self, rows):
        batch = {}
        for row in rows:  # streamed sources decode here, for this process's samples only
            if callable(row.get("image")):
                row["image"] = row["image"]().convert("RGB")
        transform = self.splat_transform
        if transform is not None and "splats" in rows[0]:
            batch["splats"] = torch.stack([transform.image_transform(r["splats"]) for r in rows])
        elif transform is not None:
            batch["splats"] = transform.collate(
                [transform.image_transform(r["image"]) for r in rows]
            )
        if self.splat_augment is not None and "splats" in batch:
            # Draws from each sample's own seed: a resumed run augments as the first run did.
            augmented = []
            for splats, row in zip(batch["splats"], rows):
                self.splat_augment.generator = torch.Generator().manual_seed(row.get("seed", 0))
                augmented.append(self.splat_augment(splats))
            batch["splats"] = torch.stack(augmented)
        if self.pixel_preprocess is not None:
            if "image" not in rows[0]:
                raise ValueError(
                    "this stage reads pixels (distillation's teacher, or an RGB CLIP): train "
                    "on an image source, or on splats pre-fitted with --keep-images"
                )
            batch["pixels"] = torch.stack([self.pixel_preprocess(r["image"]) for r in rows])
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer([r["caption"] for r in rows])
        if self.labels:
            unlabelled = [r["id"] for r in rows if r.get("label") is None or r["label"] < 0]
            if unlabelled:
                raise ValueError(
                    f"sample {unlabelled[0]} has no class label: a classifier trains on "
                    "labelled data (class folders, a label column)"
                )
            batch["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.int64)
        batch["ids"] = [r["id"] for r in rows]  # last: accelerate sizes batches by the first
        return batch
