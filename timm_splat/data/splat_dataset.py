"""Reading pre-fitted splat datasets (written by ``timm_splat.prefit``) back for training."""

from __future__ import annotations

from pathlib import Path

import torch

from ..splats import SPLAT_CHANNELS


def load_prefit(path_or_repo: str | Path, split: str | None = None, **load_kwargs):
    """A pre-fitted dataset as a ``datasets.Dataset`` in torch format.

    ``path_or_repo``: an ``--out`` folder or a Hub dataset id (with ``HF_HUB_OFFLINE=1``, read
    from the Hub cache, e.g. after ``huggingface_hub.snapshot_download``). ``split`` may be left
    out when there is only one. ``load_kwargs`` go to ``datasets.load_dataset`` (``cache_dir``,
    ``revision``, ``streaming``, ...).

    Rows: ``splats`` is a float16 tensor ``[N, 8]``; ``label`` (int, -1 for none),
    ``caption`` (str or None), ``source_id`` (str) and ``psnr`` (float) are Python values.
    With ``streaming=True`` an ``IterableDataset`` comes back, whose splats are float32.
    """
    from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset

    path = Path(path_or_repo).expanduser()
    name = str(path_or_repo)
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise FileNotFoundError(f"no pre-fitted dataset at {name}: no such folder")
        snapshot = _offline_snapshot(name, load_kwargs.get("revision"))
        if snapshot is not None:
            load_kwargs.pop("revision", None)  # the snapshot is that revision
        path = snapshot or name
    ds = load_dataset(str(path), split=split, **load_kwargs)
    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        if len(ds) != 1:
            raise ValueError(f"{name} has splits {sorted(ds)}: pass split=")
        ds = next(iter(ds.values()))
    if "splats" not in (ds.features or {}):
        raise ValueError(f"{name} is not a pre-fitted splat dataset (no 'splats' column)")
    if isinstance(ds, IterableDataset):
        return ds.with_format("torch")
    # dtype applies to every tensor column, so only splats become tensors; the rest stay Python.
    return ds.with_format("torch", columns=["splats"], output_all_columns=True,
                          dtype=torch.float16)


def _offline_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """Offline, the repo's files in the Hub cache (``snapshot_download`` put them there):
    ``datasets`` alone only finds what it prepared itself while online."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", revision=revision,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        return None  # load_dataset may still have its own cached copy


def collate_prefit(batch: list[dict], target: str = "auto"):
    """DataLoader ``collate_fn`` for :func:`load_prefit` rows.

    Returns ``(splats float32 [B, N, 8], labels int64 [B])`` for ``target="label"`` or
    ``(splats, captions list[str | None])`` for ``target="caption"``. ``"auto"`` picks captions
    when every row has one and none has a label (a captioned dataset), else labels; pass the
    target explicitly (``functools.partial``) where a batch could be ambiguous."""
    if not batch:
        raise ValueError("collate_prefit takes a non-empty list of rows")
    if target not in ("auto", "label", "caption"):
        raise ValueError(f"target must be 'auto', 'label' or 'caption', got {target!r}")
    splats = torch.stack([torch.as_tensor(row["splats"]) for row in batch]).float()
    if splats.dim() != 3 or splats.shape[-1] != SPLAT_CHANNELS:
        raise ValueError(
            f"expected splats [N, {SPLAT_CHANNELS}] per row, got {tuple(splats.shape[1:])}"
        )
    labels = [int(row.get("label", -1)) for row in batch]
    captions = [row.get("caption") for row in batch]
    if target == "auto":
        labelled = any(label >= 0 for label in labels)
        target = "caption" if not labelled and all(c is not None for c in captions) else "label"
    if target == "caption":
        return splats, captions
    return splats, torch.tensor(labels, dtype=torch.int64)
