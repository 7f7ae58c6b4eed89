"""Splat ViTs: timm's ``VisionTransformer`` with the GS stem in place of the patch embedding.

The stem sits at ``patch_embed``, where timm's tooling (``group_matcher``, layer decay, open_clip's
``lock``) looks for a ViT's stem; everything after it is timm's own code, so blocks, norms and
heads load straight from RGB ViTs and CLIP towers (see :func:`timm_splat.from_rgb`).

Inputs: splats ``[B, N, 8]`` (zero rows pad), or pixels ``[B, 3, H, W]`` normalised with the
model's data config (``timm.data.resolve_model_data_config``), which are fitted on the fly with
the budget ``model.num_splats`` so timm's and open_clip's pixel pipelines work
unchanged (slowly: pre-fit, or use :class:`timm_splat.SplatTransform`, for real work).
"""

from __future__ import annotations

from functools import partial

import torch
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models import (
    build_model_with_cfg,
    checkpoint,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models._features import feature_take_indices  # what timm's own ViT uses
from timm.models._input import update_model_args
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ..fitting import fit_splats, resolve_config
from ..splats import DEFAULT_NUM_SPLATS, SPLAT_CHANNELS
from .stem import NO_TORCHSCRIPT, GSStem

# No splat ViT is near this (splat_vit_l14: 0.3B); a config asking for more was most likely
# edited or corrupted, and would allocate tens of GB before anything could check it.
MAX_PARAMETERS = 2_000_000_000


def _count(value, name: str, what: str, integer: bool = True) -> float:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not is_number or not 0 <= value < float("inf") or (integer and int(value) != value):
        kind = "an int" if integer else "a number"
        raise ValueError(f"{what}: {name} must be {kind} >= 0, got {value!r}")
    return float(value)


def check_model_size(
    width,
    depth,
    mlp_ratio=4.0,
    what: str = "the splat ViT",
    *,
    tables: dict | None = None,
    extra: dict | None = None,
) -> None:
    """ValueError when a transformer of this shape would exceed MAX_PARAMETERS, counting also
    ``tables`` (name: rows of ``width`` numbers, e.g. classes, latents, vocabulary, positions)
    and ``extra`` (name: numbers, e.g. an attention mask); every count must be an int >= 0.
    Called before anything is built: a config's numbers are untrusted."""
    width, depth = _count(width, "width", what), _count(depth, "depth", what)
    parameters = depth * width**2 * (4 + 2 * _count(mlp_ratio, "mlp_ratio", what, False))
    parts = [f"width {width:.0f}", f"depth {depth:.0f}"]
    for name, rows in (tables or {}).items():
        parameters += _count(rows, name, what) * width
        parts.append(f"{name} {rows}")
    for name, count in (extra or {}).items():
        parameters += _count(count, name, what)
    if not parameters <= MAX_PARAMETERS:
        raise ValueError(
            f"{what} config asks for about {parameters / 1e9:.1f}B parameters "
            f"({', '.join(parts)}), more than {MAX_PARAMETERS / 1e9:.0f}B: the config is "
            "probably edited or corrupt; refusing to allocate it"
        )


# Why the pixel path is left out of torch.compile graphs (and what to do instead).
_NOT_CAPTURED = (
    "splat ViTs fit pixel inputs with an optimiser (autograd steps, data-dependent pruning), "
    "which torch.compile(fullgraph=True), torch.export, torch.onnx.export and torch.jit.trace "
    "cannot capture: "
    "compile or export the model on splats [B, N, 8] (fit them first with "
    "timm_splat.fit_splats or timm_splat.SplatTransform), or use torch.compile without "
    "fullgraph, which runs the fit eagerly"
)


class SplatVisionTransformer(VisionTransformer):
    """A ViT that reads 2D Gaussian splats.

    Args:
        num_latents: tokens the stem's Perceiver resampler makes (196 default, 98 in the paper's
            ablation); they replace the patch tokens.
        num_splats: the budget pixel inputs are fitted with (cfg value by default).
        local_latents: the resampler's learned locality bias towards each latent's grid cell
            (default); False gives plain Perceiver latents (the ablation), with no ``locality``
            parameter.
        stem_args: extra :class:`GSStem` arguments (Fourier frequencies, resampler MLP ratio).
        fit_options: :func:`timm_splat.fit_splats` options for pixel inputs (e.g. iterations).
        **kwargs: ``VisionTransformer`` arguments (depth, embed_dim, num_heads, pre_norm, ...).
    """

    def __init__(
        self,
        num_latents: int = 196,
        num_splats: int = DEFAULT_NUM_SPLATS,
        local_latents: bool = True,
        stem_args: dict | None = None,
        fit_options: dict | None = None,
        **kwargs,
    ):
        check_model_size(
            kwargs.get("embed_dim", 768),
            kwargs.get("depth", 12),
            kwargs.get("mlp_ratio", 4.0),
            tables={"num_latents": num_latents, "num_classes": kwargs.get("num_classes", 1000)},
        )
        for name in ("embed_layer", "dynamic_img_size", "dynamic_img_pad"):
            if kwargs.pop(name, None):
                raise ValueError(
                    f"{name} is not supported by splat ViTs: the GS stem has no image grid"
                )
        kwargs.setdefault("in_chans", 3)
        stem = partial(
            GSStem,
            num_latents=num_latents,
            num_heads=kwargs.get("num_heads", 12),
            **{"local_latents": local_latents, **(stem_args or {})},
        )
        super().__init__(embed_layer=stem, **kwargs)
        self.num_splats = num_splats
        self.fit_options = dict(fit_options or {})
        resolve_config(None, self.fit_options)  # a bad option fails here, not at the first fit
        # What the pixel path undoes: pixels arrive normalised by the model's data config.
        device = kwargs.get("device")  # timm's create_model(device=...), "meta" included
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=device).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.register_load_state_dict_post_hook(_record_local_latents)

    def __prepare_scriptable__(self):
        raise RuntimeError(NO_TORCHSCRIPT)

    @property
    def num_splats(self) -> int:
        """The splat budget: what pixel inputs are fitted with and what the weights expect.
        Setting it records it in timm's model args, so ``save_for_hf`` writes it to
        ``config.json`` (``model_args``) and ``create_model`` rebuilds it from there."""
        return self._num_splats

    @num_splats.setter
    def num_splats(self, value: int) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or int(value) != value
            or value < 1
        ):
            raise ValueError(f"num_splats must be a positive int, got {value!r}")
        self._num_splats = int(value)
        update_model_args(self, num_splats=self._num_splats)

    def set_pixel_normalization(self, mean, std):
        """The mean / std pixel inputs were normalised with (the data config's)."""
        self.pixel_mean.copy_(torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.pixel_std.copy_(torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @torch.compiler.disable(reason=_NOT_CAPTURED)
    @torch.no_grad()
    def fit_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels ``[B, 3, H, W]`` -> splats ``[B, num_splats, 8]`` on their device.

        Always eager: ``torch.compile(model)`` breaks the graph here and compiles the rest;
        ``fullgraph=True``, ``torch.export`` and ONNX export of pixel inputs raise (see
        ``_NOT_CAPTURED``)."""
        images = pixels.float() * self.pixel_std + self.pixel_mean
        low, high = (float(v) for v in torch.aminmax(images))
        # Normalised noise (what timm's tests and tools feed, torch.randn) un-normalises to
        # mean +- std * (its extremes, beyond 5 sigma in a 224x224 batch now and then): within
        # [-2.5, 3.5] up to 8 sigma, and clamped like resampling overshoot; 0..255 tensors and
        # the like are far outside and refused.
        if low < -2.5 or high > 3.5:
            raise ValueError(
                f"pixel inputs un-normalise to [{low:.2f}, {high:.2f}], not [0, 1]: normalise them "
                "with the model's data config (timm.data.resolve_model_data_config(model)), or "
                "call model.set_pixel_normalization(mean, std) with what you used"
            )
        # The fit differentiates the render: under torch.inference_mode (timm's validate.py)
        # it runs outside it, on a copy (an inference tensor cannot enter autograd).
        with torch.inference_mode(False):
            fitted = fit_splats(
                images.clamp(0, 1).clone(),
                num_splats=self.num_splats,
                progress=False,
                **self.fit_options,
            )
        return fitted.splats

    def as_splats(self, x: torch.Tensor) -> torch.Tensor:
        if is_fx_symbolic_tracing():  # timm's FX feature extraction traces splat inputs only
            return x
        if x.dim() == 4 and x.shape[1] == 3:
            # Export would fail deep inside the fit, less clearly; a trace would bake one
            # image's fit (its pruning, its steps) into the graph and be wrong for the next.
            if torch.compiler.is_exporting() or torch.jit.is_tracing():
                raise RuntimeError(_NOT_CAPTURED)
            return self.fit_pixels(x)
        if x.dim() != 3 or x.shape[-1] != SPLAT_CHANNELS:
            raise ValueError(
                f"{type(self).__name__} takes splats [B, N, {SPLAT_CHANNELS}] or pixels "
                f"[B, 3, H, W], got {tuple(x.shape)}"
            )
        return x

    def forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return super().forward_features(self.as_splats(x), *args, **kwargs)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        """timm's ``forward_intermediates`` contract for splat (or pixel) inputs: block outputs
        as NCHW maps on the latent grid (``patch_embed.grid_size``, 14 x 14 for 196 latents),
        or NLC tokens. timm's ViT reads the grid off the input's height and width, which splats
        do not have."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(self.as_splats(x)))))
        blocks = self.blocks if not stop_early else self.blocks[: max_index + 1]
        intermediates = []
        for i, block in enumerate(blocks):
            if attn_mask is not None or is_causal:
                x = block(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing:
                x = checkpoint(block, x)
            else:
                x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            height, width = self.patch_embed.grid_size
            intermediates = [
                y.reshape(y.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
                for y in intermediates
            ]
        if output_dict:
            result = {"image_intermediates": intermediates}
            if return_prefix_tokens and self.num_prefix_tokens:
                result["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                result["image_features"] = self.norm(x)
            return result
        if return_prefix_tokens and self.num_prefix_tokens:
            intermediates = list(zip(intermediates, prefix))
        return intermediates if intermediates_only else (self.norm(x), intermediates)


def _record_local_latents(model: SplatVisionTransformer, incompatible_keys) -> None:
    """After a load (which may switch the stem's locality bias to match the weights), keep
    timm's model args in step, so ``save_for_hf`` writes what the model now is."""
    local = model.patch_embed.resampler.local_latents
    if getattr(model, "_model_args", {}).get("local_latents", True) != local:
        update_model_args(model, local_latents=local)


def _cfg(**kwargs):
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        # The latent grid (and so every feature map) stays the same whatever the input size:
        # pixels are fitted to splats first. The reductions timm reports (stem.feat_ratio) are
        # this input size over the grid; timm's tests and tools then feed this size.
        "fixed_input_size": True,
        "mean": OPENAI_CLIP_MEAN,
        "std": OPENAI_CLIP_STD,
        "first_conv": "patch_embed.proj",  # the stem's first layer (a Linear on splat features)
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


# Only untrained cfgs: a tag with a weight source is added here when those weights exist.
default_cfgs = generate_default_cfgs(
    {
        f"{name}.untrained": _cfg(**extra)
        for name, extra in (
            ("splat_vit_test", {}),
            ("splat_vit_mini", {"input_size": (3, 28, 28)}),
            ("splat_vit_s16", {}),
            ("splat_vit_b16", {}),
            ("splat_vit_b32", {}),
            ("splat_vit_l14", {}),
        )
    }
)


def _has_weights(variant: str, kwargs: dict) -> bool:
    cfg = resolve_pretrained_cfg(
        variant,
        pretrained_cfg=kwargs.get("pretrained_cfg"),
        pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
    )
    return any(getattr(cfg, key, None) for key in ("url", "file", "hf_hub_id", "state_dict"))


def _create(variant: str, pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    if pretrained and not _has_weights(variant, kwargs):
        raise ValueError(
            f"no pretrained weights are published for {variant} yet: train them (README, 'The "
            "pipeline') and load yours with timm.create_model('hf-hub:<org/repo>', "
            "pretrained=True) or pretrained_cfg_overlay=dict(file='model.safetensors')"
        )
    model = build_model_with_cfg(
        SplatVisionTransformer,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=min(3, kwargs.get("depth", 12)), feature_cls="getter"),
        **kwargs,
    )
    if isinstance(model, SplatVisionTransformer):  # not a features_only wrapper
        model.num_splats = model.num_splats  # recorded in the model args timm set after __init__
    return model


# The CLIP-style towers (pre-norm, eps 1e-5) match open_clip's and timm's *_clip_* ViTs.
_CLIP = dict(pre_norm=True, norm_layer=partial(nn.LayerNorm, eps=1e-5))


@register_model
def splat_vit_test(pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    """A tiny splat ViT (width 64, 3 blocks, 49 latents) for tests: 3 blocks, the feature levels
    timm's generic tests ask of a model with forward_intermediates."""
    args = dict(patch_size=32, embed_dim=64, depth=3, num_heads=2, num_latents=49, **_CLIP)
    return _create("splat_vit_test", pretrained, **dict(args, **kwargs))


@register_model
def splat_vit_mini(pretrained: bool = False, **kwargs) -> SplatVisionTransformer:
    """A miniature CLIP tower for 28x28 inputs (width 128, 4 blocks, 4x4 latents, the grid of
    its RGB twin's 7 px patches): the student of `timm-splat reproduce` on MNIST-sized images."""
    args = dict(
        img_size=28, patch_size=7, embed_dim=128, depth=4, num_heads=4, num_latents=16, **_CLIP
    )
    return _create("splat_vit_mini", pretrained, **dict(args, **kwargs))


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
