"""Real photos for demos, tests and benchmarks: the samples bundled with scikit-image (offline)."""

from __future__ import annotations

import numpy as np
from PIL import Image

# The colour photos of skimage.data, by the name of their loader. The fitter was tuned on these.
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "retina", "ihc")
# Held out of the fitter's tuning, to check its quality on photos it never saw: more photos that
# ship offline with scikit-image (grey ones made RGB) and matplotlib.
HELDOUT_PHOTOS = (
    "hubble_deep_field",
    "motorcycle_right",
    "grace_hopper",
    "camera",
    "coins",
    "grass",
    "brick",
)


def _load(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError as exc:
        raise ImportError(
            "the sample photos come from scikit-image: pip install 'timm-splat[dev]' "
            "(or pip install scikit-image)"
        ) from exc
    loaders = {
        "motorcycle_left": lambda: data.stereo_motorcycle()[0],
        "motorcycle_right": lambda: data.stereo_motorcycle()[1],
        "ihc": data.immunohistochemistry,
        "grace_hopper": _grace_hopper,
    }
    if name not in SAMPLE_PHOTOS + HELDOUT_PHOTOS:
        raise ValueError(
            f"unknown sample photo {name!r}; choose from {SAMPLE_PHOTOS + HELDOUT_PHOTOS}"
        )
    return loaders.get(name, getattr(data, name, None))()


def _grace_hopper() -> np.ndarray:
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as file:
        return np.asarray(Image.open(file).convert("RGB"))


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The largest centred square, resized to ``size`` x ``size`` (bicubic, antialiased)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize(
        (size, size), Image.Resampling.BICUBIC, reducing_gap=None
    )


def sample_photos(size: int | None = 224, names=SAMPLE_PHOTOS) -> dict[str, Image.Image]:
    """``{name: RGB PIL image}``, centre-cropped and resized to ``size`` (None: as shipped)."""
    photos = {}
    for name in names:
        image = Image.fromarray(_load(name)).convert("RGB")
        photos[name] = center_crop_resize(image, size) if size else image
    return photos
