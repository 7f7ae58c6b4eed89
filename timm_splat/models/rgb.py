"""RGB twins of the miniature splat models, registered in timm: teachers that train from
scratch where no pretrained ViT fits the data (``timm-splat reproduce``'s classifiers)."""

from __future__ import annotations

from functools import partial

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .splat_vit import _cfg

# The splat models' cfg (CLIP mean / std, crop 1.0): the twins read the same pixels.
default_cfgs = generate_default_cfgs(
    {
        "vit_mini_patch7_28.untrained": _cfg(
            num_classes=10, input_size=(3, 28, 28), fixed_input_size=True
        )
    }
)


@register_model
def vit_mini_patch7_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A 28x28 ViT of 7 px patches (width 128, 4 blocks, pre-norm: the CLIP tower layout):
    ``from_rgb`` of it is ``splat_vit_mini``, and open_clip's ``ViT-Mini-7`` is its CLIP."""
    args = dict(
        img_size=28,
        patch_size=7,
        embed_dim=128,
        depth=4,
        num_heads=4,
        pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
    )
    return build_model_with_cfg(
        VisionTransformer, "vit_mini_patch7_28", pretrained, **dict(args, **kwargs)
    )
