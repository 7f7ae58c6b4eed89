"""open_clip integration: the ``splat-ViT-*`` model configs (registered through
``open_clip.add_model_config`` when :mod:`timm_splat` is imported) use open_clip's
``timm_model_name`` route, so the vision tower is a ``splat_vit_*`` trunk plus open_clip's linear
projection and the text tower is open_clip's own."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
# open_clip's config file in a Hub repo folder (timm_splat.hub writes it beside timm's).
OPEN_CLIP_CONFIG = "open_clip_config.json"
_registered = False


def register_open_clip_configs() -> bool:
    """Add the ``splat-ViT-*`` configs to open_clip's registry (once); False without open_clip."""
    global _registered
    if _registered:
        return True
    try:
        import open_clip
    except ImportError:
        return False
    open_clip.add_model_config(CONFIG_DIR)
    _registered = True
    return True


def splat_trunk(model):
    """The :class:`SplatVisionTransformer` inside a timm model or an open_clip CLIP, else None."""
    from .splat_vit import SplatVisionTransformer

    if isinstance(model, SplatVisionTransformer):
        return model
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    return trunk if isinstance(trunk, SplatVisionTransformer) else None
