"""torch Datasets and loaders over the data sources: training samples (image folders, streamed
sources, pre-fitted splats with captions) and labelled evaluation batches."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..splats import check_splats
from .collate import collate_prefit
from .shards import load_prefit
from .sources import open_source


def is_image_folder(path) -> bool:
    """A local folder without parquet shards (a pre-fitted dataset has them)."""
    folder = Path(path)
    return folder.is_dir() and not any(folder.rglob("*.parquet"))


# -- training ---------------------------------------------------------------------------------


def _sample(item, class_names) -> dict:
    """A training sample of a source item; the image decodes later, in the collate step, for
    the samples this process trains on only."""
    caption = item.caption
    if caption is None and class_names and item.label is not None and item.label >= 0:
        caption = f"a photo of a {class_names[item.label].replace('_', ' ')}"
    return {"image": item.image, "caption": caption or "", "id": item.source_id}


class FolderImages(Dataset):
    """A local image folder (captions from ``.txt`` files beside the images, else "a photo of a
    <class folder>"), read through the sources; map-style, so it shuffles per epoch."""

    def __init__(self, source):
        self.items = list(source.items())  # file paths and captions, nothing decoded
        self.class_names = source.class_names

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return _sample(self.items[index], self.class_names)


class PrefitSplats(Dataset):
    """A pre-fitted splat dataset (``timm-splat prefit`` output or its Hub copy) with captions."""

    def __init__(self, path: str, split: str):
        self.data = load_prefit(path, split)
        if "caption" not in self.data.column_names:
            raise ValueError(f"{path} has no caption column: contrastive training needs captions")

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
        return {"splats": row["splats"].float(), "caption": row["caption"], "id": row["source_id"]}


class StreamedImages(IterableDataset):
    """Images streamed from a source (webdataset tars as img2dataset writes them, HF datasets,
    image / caption parquet), in order."""

    def __init__(self, source):
        self.source = source
        self.num_items = source.num_items

    def __iter__(self):
        for item in self.source.items():
            yield _sample(item, self.source.class_names)


def open_train_data(path: str, split: str) -> Dataset | IterableDataset:
    """Pre-fitted splats, a local image folder (shuffled each epoch), or a streamed source."""
    if not is_image_folder(path):
        try:
            return PrefitSplats(path, split)
        except (ValueError, FileNotFoundError) as error:
            if "no caption column" in str(error):
                raise
    source = open_source(path, split)
    return FolderImages(source) if source.kind == "imagefolder" else StreamedImages(source)


# -- evaluation -------------------------------------------------------------------------------


class FitBatches:
    """Batches of an image folder's loader, each fitted in one :meth:`SplatTransform.collate`
    call in this process: workers only decode, resize and crop (a fit on the GPU cannot run in
    forked workers)."""

    def __init__(self, loader, transform):
        self.loader, self.transform = loader, transform

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            yield self.transform.collate(batch)


def _samples(batch):
    return batch


def labelled_loader(
    data,
    *,
    split: str = "validation",
    batch_size: int = 64,
    transform=None,
    num_splats: int | None = None,
    workers: int = 0,
    limit: int | None = None,
):
    """``(loader of (splats [B, N, 8], labels [B]), class_names)`` for a pre-fitted dataset or
    an image folder; ``class_names``: the folder's class folders, or a pre-fitted dataset's
    ``ClassLabel`` names, else None.
    ``transform``: the :class:`SplatTransform` that fits an image folder (each batch in one
    call); ``num_splats`` pads pre-fitted rows; ``limit``: first N samples."""
    from torch.utils.data import Subset

    if is_image_folder(data):
        from torchvision.datasets import ImageFolder

        if transform is None:
            raise ValueError("an image folder needs a SplatTransform to fit its images")
        dataset = ImageFolder(str(data), transform=transform.image_transform)
        classes = list(dataset.classes)
        if limit:
            dataset = Subset(dataset, range(min(limit, len(dataset))))
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=_samples
        )
        return FitBatches(loader, transform), classes
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
