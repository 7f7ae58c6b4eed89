"""Splat ViTs registered in timm (``splat_vit_*``) and, when open_clip is installed, open_clip
configs (``splat-ViT-*``); importing :mod:`timm_splat` registers both."""

from .clip import create_model_and_transforms, register_open_clip_configs
from .convert import freeze, from_rgb
from .splat_vit import SplatVisionTransformer
from .stem import GSStem, PerceiverResampler, SplatFeatures

register_open_clip_configs()

__all__ = [
    "GSStem",
    "PerceiverResampler",
    "SplatFeatures",
    "SplatVisionTransformer",
    "create_model_and_transforms",
    "freeze",
    "from_rgb",
]
