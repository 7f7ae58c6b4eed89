"""Datasets of splats: image sources, the resumable pre-fit writer and the pre-fitted reader."""

from .prefit import (
    DirectoryUploader,
    HubUploader,
    PrefitError,
    Stats,
    prefit,
    prefit_features,
    write_card,
)
from .sources import Item, Source, SourceError, iter_images, open_source
from .splat_dataset import collate_prefit, load_prefit

__all__ = [
    "DirectoryUploader",
    "HubUploader",
    "Item",
    "PrefitError",
    "Source",
    "SourceError",
    "Stats",
    "collate_prefit",
    "iter_images",
    "load_prefit",
    "open_source",
    "prefit",
    "prefit_features",
    "write_card",
]
