"""Splat ViTs: timm's ``VisionTransformer`` with the GS stem in place of the patch embedding.

The stem sits at ``patch_embed``, where timm's tooling (``group_matcher``, layer decay, open_clip's
``lock``) looks for a ViT's stem; everything after it is timm's own code, so blocks, norms and
heads load straight from RGB ViTs and CLIP towers (see :func:`timm_splat.from_rgb`).

Inputs: splats ``[B, N, 8]`` (zero rows pad), or pixels ``[B, 3, H, W]`` normalised with the
model's data config (``timm.data.resolve_model_data_config``), which are fitted on the fly with
the budget in ``pretrained_cfg["num_splats"]`` so timm's and open_clip's pixel pipelines work
unchanged (slowly: pre-fit, or use :class:`timm_splat.SplatTransform`, for real work).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..fitting import fit_splats, resolve_config
from ..splats import DEFAULT_NUM_SPLATS, SPLAT_CHANNELS
from .stem import GSStem

HUB_ORG = "timm-splat"  # where published weights live: hf-hub:timm-splat/<model>.<tag>


class SplatVisionTransformer(VisionTransformer):
    """A ViT that reads 2D Gaussian splats.

    Args:
        num_latents: tokens the stem's Perceiver resampler makes (196 default, 98 in the paper's
            ablation); they replace the patch tokens.
        num_splats: the budget pixel inputs are fitted with (cfg value by default).
        stem_args: extra :class:`GSStem` arguments (Fourier frequencies, resampler MLP ratio).
        fit_options: :func:`timm_splat.fit_splats` options for pixel inputs (e.g. iterations).
        **kwargs: ``VisionTransformer`` arguments (depth, embed_dim, num_heads, pre_norm, ...).
    """

    def __init__(self, num_latents: int = 196, num_splats: int = DEFAULT_NUM_SPLATS,
                 stem_args: dict | None = None, fit_options: dict | None = None, **kwargs):
        for name in ("embed_layer", "dynamic_img_size", "dynamic_img_pad"):
            if kwargs.pop(name, None):
                raise ValueError(f"{name} is not supported by splat ViTs: the GS stem has no image grid")
        kwargs.setdefault("in_chans", 3)
        stem = partial(GSStem, num_latents=num_latents, num_heads=kwargs.get("num_heads", 12),
                       **(stem_args or {}))
        super().__init__(embed_layer=stem, **kwargs)
        self.num_splats = num_splats
        self.fit_options = dict(fit_options or {})
        resolve_config(None, self.fit_options)  # a bad option fails here, not at the first fit
        # What the pixel path undoes: pixels arrive normalised by the model's data config.
        self.register_buffer("pixel_mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def num_splats(self) -> int:
        """The splat budget: what pixel inputs are fitted with and what the weights expect.
        Setting it also records it in ``pretrained_cfg`` (what data configs and the Hub read)."""
        return self._num_splats

    @num_splats.setter
    def num_splats(self, value: int) -> None:
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise ValueError(f"num_splats must be a positive int, got {value!r}")
        self._num_splats = int(value)
        if isinstance(getattr(self, "pretrained_cfg", None), dict):
            self.pretrained_cfg["num_splats"] = self._num_splats

    def set_pixel_normalization(self, mean, std):
        """The mean / std pixel inputs were normalised with (the data config's)."""
        self.pixel_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.pixel_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @torch.no_grad()
    def fit_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` -> splats ``[B, num_splats, 8]`` on their device."""
        images = pixels.float() * self.pixel_std + self.pixel_mean
        low, high = (float(v) for v in torch.aminmax(images))
        if low < -0.25 or high > 1.25:  # resampling overshoot is fine, other normalisations are not
            raise ValueError(
                f"pixel inputs un-normalise to [{low:.2f}, {high:.2f}], not [0, 1]: normalise them "
                "with the model's data config (timm.data.resolve_model_data_config(model)), or "
                "call model.set_pixel_normalization(mean, std) with what you used"
            )
        fitted = fit_splats(images.clamp(0, 1), num_splats=self.num_splats, progress=False,
                            **self.fit_options)
        return fitted.splats

    def as_splats(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[1] == 3:
            return self.fit_pixels(x)
        if x.dim() != 3 or x.shape[-1] != SPLAT_CHANNELS:
            raise ValueError(
                f"{type(self).__name__} takes splats [B, N, {SPLAT_CHANNELS}] or pixels "
                f"[B, 3, H, W], got {tuple(x.shape)}"
            )
        return x

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super().forward_features(self.as_splats(x), *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args, **kwargs):
        return super().forward_intermediates(self.as_splats(x), *args, **kwargs)


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "first_conv": None,
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# The budget each published tag's weights were trained with. timm's PretrainedCfg has no field
# for it, so it lives here, keyed by "<architecture>.<tag>".
_BUDGETS: dict[str, int] = {}


def _hub(name: str, tag: str, num_splats: int, **kwargs):
    """A cfg for weights a later release publishes, trained at ``num_splats`` splats."""
    _BUDGETS[f"{name}.{tag}"] = num_splats
    return _cfg(hf_hub_id=f"{HUB_ORG}/{name}.{tag}", num_classes=512, **kwargs)


def budget_of(pretrained_cfg: dict) -> int:
    """The splat budget a cfg's weights expect (DEFAULT_NUM_SPLATS for untrained cfgs)."""
    key = f"{pretrained_cfg.get('architecture')}.{pretrained_cfg.get('tag')}"
    return _BUDGETS.get(key, DEFAULT_NUM_SPLATS)


default_cfgs = generate_default_cfgs({
    "splat_vit_test.untrained": _cfg(),
    "splat_vit_s16.untrained": _cfg(),
    "splat_vit_b16.gs400_datacomp": _hub("splat_vit_b16", "gs400_datacomp", 400),
    "splat_vit_b16.gs1600_datacomp": _hub("splat_vit_b16", "gs1600_datacomp", 1600),
    "splat_vit_b16.gs3136_datacomp": _hub("splat_vit_b16", "gs3136_datacomp", 3136),
    "splat_vit_b32.gs400_datacomp": _hub("splat_vit_b32", "gs400_datacomp", 400),
    "splat_vit_l14.gs400_datacomp": _hub("splat_vit_l14", "gs400_datacomp", 400),
})


def _create(variant: str, pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    budget = kwargs.pop("num_splats", None)
    model = build_model_with_cfg(
        SplatVisionTransformer, variant, pretrained,
        feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs,
    )
    model.num_splats = budget or budget_of(model.pretrained_cfg)
    return model


# The CLIP-style towers (pre-norm, eps 1e-5) match open_clip's and timm's *_clip_* ViTs.
_CLIP = dict(pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5))


@register_model
def splat_vit_test(pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    """A tiny splat ViT (width 64, 2 blocks, 49 latents) for tests."""
    args = dict(patch_size=32, embed_dim=64, depth=2, num_heads=2, num_latents=49, **_CLIP)
    return _create("splat_vit_test", pretrained, **dict(args, **kwargs))


@register_model
def splat_vit_s16(pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    """ViT-S/16 layout (timm's vit_small_patch16_224: no pre-norm) with the GS stem."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create("splat_vit_s16", pretrained, **dict(args, **kwargs))


@register_model
def splat_vit_b16(pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    """ViT-B/16 CLIP image tower with the GS stem (the paper's model)."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_CLIP)
    return _create("splat_vit_b16", pretrained, **dict(args, **kwargs))


@register_model
def splat_vit_b32(pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    """ViT-B/32 CLIP image tower with the GS stem."""
    args = dict(patch_size=32, embed_dim=768, depth=12, num_heads=12, **_CLIP)
    return _create("splat_vit_b32", pretrained, **dict(args, **kwargs))


@register_model
def splat_vit_l14(pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    """ViT-L/14 CLIP image tower with the GS stem."""
    args = dict(patch_size=14, embed_dim=1024, depth=24, num_heads=16, **_CLIP)
    return _create("splat_vit_l14", pretrained, **dict(args, **kwargs))
