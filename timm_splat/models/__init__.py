"""Splat ViTs registered in timm (``splat_vit_*``) and, when open_clip is installed, open_clip
configs (``splat-ViT-*``); importing :mod:`timm_splat` registers both."""

from . import rgb  # noqa: F401  (registers the RGB twins in timm)
from .clip import register_open_clip_configs, splat_trunk
from .convert import (
    STAGES,
    copy_rgb_weights,
    freeze,
    from_rgb,
    set_local_latents,
    set_quick_gelu,
    uses_local_latents,
    uses_quick_gelu,
)
from .factory import (
    create_model_and_transforms,
    load_classifier,
    load_clip,
    model_task,
    pixel_config,
    pixel_transform,
    resolve_run,
)
from .splat_vit import SplatVisionTransformer
from .stem import GSStem, PerceiverResampler, SplatFeatures

register_open_clip_configs()

__all__ = [
    "STAGES",
    "GSStem",
    "PerceiverResampler",
    "SplatFeatures",
    "SplatVisionTransformer",
    "copy_rgb_weights",
    "create_model_and_transforms",
    "load_classifier",
    "freeze",
    "from_rgb",
    "load_clip",
    "model_task",
    "pixel_config",
    "pixel_transform",
    "resolve_run",
    "set_local_latents",
    "set_quick_gelu",
    "splat_trunk",
    "uses_local_latents",
    "uses_quick_gelu",
]
