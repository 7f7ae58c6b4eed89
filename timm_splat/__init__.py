"""timm-splat: vision(-language) models that read 2D Gaussian splats instead of pixels."""

from .fitting import FitConfig, FitResult, fit_splats, psnr
from .ops import render_splats
from .splats import (
    compression_ratio,
    from_fp16_bytes,
    load_splats,
    luminance,
    save_splats,
    splat_count,
    splat_mask,
    to_fp16_bytes,
)
from .transforms import SplatTransform
from .models import SplatVisionTransformer, create_model_and_transforms, freeze, from_rgb

__version__ = "0.1.0"
