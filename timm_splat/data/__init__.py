"""Datasets of splats: image sources, the pre-fitted parquet format (reader and writer), the
resumable pre-fit run, torch datasets and collate functions."""

from .card import write_card
from .collate import TrainingCollate, collate_prefit
from .datasets import (
    FolderImages,
    LabelledImages,
    PrefitSplats,
    StreamedImages,
    caption_of,
    is_image_folder,
    is_image_source,
    labelled_loader,
    open_train_data,
)
from .journal import Journal, PrefitError, Stats
from .prefit import prefit
from .shards import load_prefit, prefit_features
from .sources import MNIST, MNIST_M, Item, Source, SourceError, iter_images, open_source

__all__ = [
    "MNIST",
    "MNIST_M",
    "FolderImages",
    "Item",
    "Journal",
    "LabelledImages",
    "PrefitError",
    "PrefitSplats",
    "Source",
    "SourceError",
    "Stats",
    "StreamedImages",
    "TrainingCollate",
    "caption_of",
    "collate_prefit",
    "is_image_folder",
    "is_image_source",
    "iter_images",
    "labelled_loader",
    "load_prefit",
    "open_source",
    "open_train_data",
    "prefit",
    "prefit_features",
    "write_card",
]
