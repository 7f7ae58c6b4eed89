"""timm-splat: vision(-language) models that read 2D Gaussian splats instead of pixels."""

from .codec import decode, encode
from .fitting import FitConfig, FitResult, fit_splats, psnr
from .ops import render_splats
from .splats import (
    DEFAULT_NUM_SPLATS,
    compression_ratio,
    from_fp16_bytes,
    load_splats,
    luminance,
    pad_splats,
    save_splats,
    splat_count,
    splat_mask,
    to_fp16_bytes,
)
from .version import __version__

__all__ = [
    "DEFAULT_NUM_SPLATS",
    "FitConfig",
    "FitResult",
    "__version__",
    "compression_ratio",
    "decode",
    "encode",
    "fit_splats",
    "from_fp16_bytes",
    "load_splats",
    "luminance",
    "pad_splats",
    "psnr",
    "render_splats",
    "save_splats",
    "splat_count",
    "splat_mask",
    "to_fp16_bytes",
]

try:  # the models register themselves in timm (and open_clip) on import
    from .augment import SplatAugment, SplatMixup
    from .models import (
        SplatVisionTransformer,
        create_model_and_transforms,
        freeze,
        from_rgb,
        load_classifier,
        load_clip,
    )
    from .transforms import SplatTransform

    __all__ += [
        "SplatAugment",
        "SplatMixup",
        "SplatTransform",
        "SplatVisionTransformer",
        "create_model_and_transforms",
        "freeze",
        "from_rgb",
        "load_classifier",
        "load_clip",
    ]
except ModuleNotFoundError as error:  # fitting and the kernels need torch alone
    if (error.name or "").split(".")[0] not in ("timm", "torchvision"):
        raise
