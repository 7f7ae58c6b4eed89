"""open_clip integration: the ``splat-ViT-*`` model configs (registered through
``open_clip.add_model_config`` when :mod:`timm_splat` is imported) use open_clip's
``timm_model_name`` route, so the vision tower is a ``splat_vit_*`` trunk plus open_clip's linear
projection and the text tower is open_clip's own."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "open_clip_configs"
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


def create_model_and_transforms(model_name: str, pretrained: str | None = None, **kwargs):
    """``open_clip.create_model_and_transforms`` whose preprocess is a :class:`SplatTransform`
    (the same for training and evaluation: splats need no pixel augmentation here).

    ``num_splats`` (optional) overrides the budget of the model's cfg; the rest goes to
    open_clip. Returns ``(model, preprocess_train, preprocess_val)``."""
    import open_clip

    from ..transforms import SplatTransform

    register_open_clip_configs()
    num_splats = kwargs.pop("num_splats", None)
    model = open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    trunk = splat_trunk(model)
    if trunk is None:
        raise ValueError(f"{model_name!r} is not a splat model: use a splat-ViT-* config")
    if num_splats:
        trunk.num_splats = trunk.pretrained_cfg["num_splats"] = int(num_splats)
    preprocess = SplatTransform.from_config(trunk)
    return model, preprocess, preprocess
