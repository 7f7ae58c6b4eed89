"""Splat models from pretrained RGB models (``from_rgb``) and the paper's freezing presets
(``freeze``)."""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import QuickGELU, resample_abs_pos_embed
from timm.models._input import update_model_args
from timm.models.vision_transformer import VisionTransformer, _convert_openai_clip
from torch import nn

from ..splats import DEFAULT_NUM_SPLATS
from .clip import register_open_clip_configs, splat_trunk
from .splat_vit import SplatVisionTransformer, _cfg

# open_clip vision towers we can mirror: (width, layers, patch) -> splat config name.
_CLIP_CONFIGS = {
    (768, 12, 16): "splat-ViT-B-16",
    (768, 12, 32): "splat-ViT-B-32",
    (1024, 24, 14): "splat-ViT-L-14",
    (64, 3, 32): "splat-ViT-test",
    (128, 4, 7): "splat-ViT-Mini-7",
}


def from_rgb(
    rgb: nn.Module,
    num_latents: int | None = None,
    num_splats: int = DEFAULT_NUM_SPLATS,
    local_latents: bool = True,
):
    """A splat model with the transformer of a pretrained RGB model.

    ``rgb``: a timm ``VisionTransformer`` -> a :class:`SplatVisionTransformer` with the same
    blocks, norms, class token, head and position embedding (resampled to the latent grid);
    or an open_clip CLIP with a ViT vision tower -> a ``splat-ViT-*`` CLIP with those and the
    whole text tower and logit scale. Only the GS stem is new (randomly initialised); train it
    with ``freeze(model, "distill")`` first. ``num_latents``: 196 by default for a timm ViT; a
    CLIP gets its splat config's. ``local_latents=False``: plain Perceiver latents, without the
    stem's locality bias (see :func:`set_local_latents`)."""
    if hasattr(rgb, "visual") and hasattr(rgb, "encode_text"):
        student = _clip_from_rgb(rgb, num_latents, num_splats)
        if not local_latents:
            set_local_latents(student, False)
        return student
    if isinstance(rgb, VisionTransformer) and not isinstance(rgb, SplatVisionTransformer):
        student = _vit_like(rgb, num_latents or 196, num_splats, local_latents)
        _load_vit(student, rgb.state_dict(), rgb.patch_embed.grid_size)
        return student
    raise TypeError(
        f"from_rgb takes a timm VisionTransformer or an open_clip CLIP with a ViT tower, got "
        f"{type(rgb).__name__}"
    )


def _vit_like(
    vit: VisionTransformer, num_latents: int, num_splats: int, local_latents: bool = True
) -> SplatVisionTransformer:
    """An untrained splat ViT whose layers have the shapes and types of ``vit``'s."""
    block = vit.blocks[0]
    norm = block.norm1
    args = dict(
        img_size=vit.patch_embed.img_size,
        patch_size=vit.patch_embed.patch_size,
        embed_dim=vit.embed_dim,
        depth=len(vit.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        # Layer scale: any value builds the right parameters; the weights are copied after.
        init_values=float(block.ls1.gamma.flatten()[0]) if hasattr(block.ls1, "gamma") else None,
        class_token=vit.cls_token is not None,
        reg_tokens=vit.num_reg_tokens,
        no_embed_class=vit.no_embed_class,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity),
        final_norm=not isinstance(vit.norm, nn.Identity),
        fc_norm=not isinstance(vit.fc_norm, nn.Identity),
        global_pool=vit.global_pool,
        num_classes=vit.num_classes,
        norm_layer=partial(type(norm), eps=norm.eps),
        act_layer=type(block.mlp.act),
    )
    student = SplatVisionTransformer(
        num_latents=num_latents, num_splats=num_splats, local_latents=local_latents, **args
    )
    source = getattr(vit, "pretrained_cfg", {}) or {}
    student.pretrained_cfg = student.default_cfg = _cfg(
        architecture=f"splat_vit from {source.get('architecture', type(vit).__name__)}",
        num_classes=vit.num_classes,
        num_splats=num_splats,
    )
    return student


def _load_vit(student: SplatVisionTransformer, state: dict, source_grid) -> None:
    """Load every non-stem weight of a timm-layout ViT state dict; the stem stays as it is."""
    state = {k: v for k, v in state.items() if not k.startswith("patch_embed.")}
    if "pos_embed" in state:
        prefix = 0 if student.no_embed_class else student.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"],
            new_size=student.patch_embed.grid_size,
            old_size=source_grid,
            num_prefix_tokens=prefix,
            verbose=False,
        )
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("patch_embed.")]
    if missing or unexpected:
        raise ValueError(
            f"the RGB model does not match the splat ViT built for it: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def copy_rgb_weights(student: SplatVisionTransformer, rgb: VisionTransformer) -> None:
    """Load a timm RGB ViT's blocks, norms, tokens, head and position embedding into an existing
    splat ViT (built by name, e.g. ``timm.create_model("splat_vit_mini")``, so it can be built
    again from its name); the stem stays as it is. A ValueError when the shapes differ."""
    if not isinstance(rgb, VisionTransformer) or isinstance(rgb, SplatVisionTransformer):
        raise TypeError(f"copy_rgb_weights takes a timm RGB VisionTransformer, got {type(rgb)}")
    try:
        _load_vit(student, rgb.state_dict(), rgb.patch_embed.grid_size)
    except RuntimeError as exc:  # size mismatches
        raise ValueError(
            f"the RGB model's layers do not fit this splat ViT (width, depth, heads, classes "
            f"must match): {str(exc).splitlines()[-1].strip()}"
        ) from exc


def _clip_from_rgb(clip: nn.Module, num_latents: int, num_splats: int):
    import open_clip

    visual = clip.visual
    if isinstance(getattr(visual, "trunk", None), VisionTransformer):  # a timm-tower CLIP
        raise NotImplementedError(
            "from_rgb of a CLIP with a timm vision tower: build the splat CLIP from a "
            "splat-ViT-* config and use from_rgb(clip.visual.trunk) for the trunk"
        )
    if (
        not hasattr(visual, "transformer")
        or getattr(visual, "attn_pool", None) is not None
        or getattr(visual, "pool_type", "tok") != "tok"
        or visual.proj is None
    ):
        raise NotImplementedError(
            "from_rgb supports open_clip ViT towers with class-token pooling and a projection "
            f"(got {type(visual).__name__})"
        )
    block = visual.transformer.resblocks[0]
    if not isinstance(block.ls_1, nn.Identity):
        raise NotImplementedError("from_rgb: open_clip towers with layer scale are not supported")
    key = (visual.transformer.width, visual.transformer.layers, visual.patch_size[0])
    if key not in _CLIP_CONFIGS:
        raise ValueError(
            f"no splat-ViT config for an open_clip tower of width {key[0]}, {key[1]} layers, "
            f"patch {key[2]}; known: {sorted(_CLIP_CONFIGS.values())}"
        )
    register_open_clip_configs()
    student = open_clip.create_model(_CLIP_CONFIGS[key])
    trunk = splat_trunk(student)
    trunk.num_splats = num_splats
    if num_latents not in (None, trunk.patch_embed.num_patches):
        raise ValueError(
            f"the {_CLIP_CONFIGS[key]} config has {trunk.patch_embed.num_patches} latents, not "
            f"{num_latents}: leave num_latents unset for a CLIP"
        )
    if isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU):
        set_quick_gelu(trunk)
    state = {"visual." + k: v for k, v in visual.state_dict().items()}
    converted = _convert_openai_clip(state, trunk)
    projection = converted.pop("head.weight")
    converted.pop("head.bias")
    _load_vit(trunk, converted, visual.grid_size)
    with torch.no_grad():
        student.visual.head.proj.weight.copy_(projection)
    text = {k: v for k, v in clip.state_dict().items() if not k.startswith("visual.")}
    missing, unexpected = student.load_state_dict(text, strict=False)
    missing = [k for k in missing if not k.startswith("visual.")]
    if missing or unexpected:
        raise ValueError(f"text towers differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return student


def uses_quick_gelu(model: nn.Module) -> bool:
    """True when a splat model's blocks use QuickGELU (OpenAI CLIP weights)."""
    trunk = splat_trunk(model)
    return trunk is not None and isinstance(trunk.blocks[0].mlp.act, QuickGELU)


def set_quick_gelu(model: nn.Module) -> None:
    """Swap the blocks' GELU for QuickGELU: open_clip builds timm towers with GELU whatever
    its quick_gelu flag says, and OpenAI weights need QuickGELU. Saved runs record it
    (``run.json["quick_gelu"]``) because the configs cannot."""
    for block in splat_trunk(model).blocks:
        block.mlp.act = QuickGELU()


def uses_local_latents(model: nn.Module) -> bool:
    """True when a splat model's resampler has the locality bias (the default)."""
    trunk = splat_trunk(model)
    if trunk is None:
        raise TypeError(f"not a splat ViT or splat CLIP: {type(model).__name__}")
    return trunk.patch_embed.resampler.local_latents


def set_local_latents(model: nn.Module, enabled: bool) -> None:
    """Give a splat ViT / CLIP's resampler the locality bias (a fresh one) or plain Perceiver
    latents (``enabled=False``: no bias, no ``locality`` parameter). Recorded in timm's model
    args, so ``save_for_hf`` / ``timm_splat.hub`` write it and ``create_model`` rebuilds it;
    open_clip's configs cannot hold it, but loading a state dict switches the stem to match the
    weights (no ``locality`` key: plain latents), so open_clip's loaders, ``load_state_dict`` and
    :func:`timm_splat.load_clip` rebuild what was saved. Use it before building an optimiser."""
    trunk = splat_trunk(model)
    if trunk is None:
        raise TypeError(f"set_local_latents takes a splat ViT or splat CLIP, got {type(model)}")
    trunk.patch_embed.resampler.set_local_latents(enabled)
    update_model_args(trunk, local_latents=enabled)


# The paper's two stages: 1 distils the stem alone, 2 adds the first two blocks, the final norm
# and the projection (the text tower stays frozen). A classifier's stage 2 ("finetune") trains
# the same parts, its head in place of the projection.
STAGES = ("distill", "clip", "finetune")


def freeze(model: nn.Module, stage: str, verbose: bool = True) -> float:
    """Set ``requires_grad`` for a training stage; returns (and prints) the trainable fraction.

    ``model``: a splat ViT (timm) or a splat CLIP (open_clip). ``stage``: "distill" (the GS
    stem only) or "clip" / "finetune" (stem + first two blocks + final norm + projection /
    head). An RGB model (a timm ViT, or an open_clip CLIP with open_clip's ViT tower) takes
    "clip" / "finetune" too: its patch embedding in the stem's place, the fair baseline for a
    student's stage 2."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    trunk = splat_trunk(model)
    if trunk is None:
        parts = _rgb_stage_two(model, stage)
    else:
        parts = {"stem": trunk.patch_embed}
        if stage != "distill":
            parts.update({f"block {i}": trunk.blocks[i] for i in range(min(2, len(trunk.blocks)))})
            parts.update(norm=trunk.norm, fc_norm=trunk.fc_norm)
            parts["projection"] = model.visual.head if trunk is not model else trunk.head
    model.requires_grad_(False)
    for part in parts.values():
        part.requires_grad_(True)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fraction = trainable / total
    if verbose:
        names = ", ".join(k for k, v in parts.items() if any(True for _ in v.parameters()))
        print(
            f"freeze(stage={stage!r}): training {fraction:.1%} of parameters "
            f"({trainable / 1e6:.2f}M of {total / 1e6:.2f}M): {names}"
        )
    return fraction


class _Parameter(nn.Module):
    """One bare parameter (open_clip's ``proj``) as a part ``freeze`` can switch."""

    def __init__(self, parameter: nn.Parameter):
        super().__init__()
        self.parameter = parameter

    def requires_grad_(self, requires_grad: bool = True):
        self.parameter.requires_grad_(requires_grad)
        return self


def _rgb_stage_two(model: nn.Module, stage: str) -> dict:
    """An RGB model's counterparts of stage 2's parts: patch embedding, first two blocks, final
    norm, head / projection."""
    if stage == "distill":
        raise ValueError("stage distill trains a GS stem: an RGB model has none")
    if isinstance(model, VisionTransformer):
        parts = {"patch embedding": model.patch_embed}
        parts.update({f"block {i}": model.blocks[i] for i in range(min(2, len(model.blocks)))})
        parts.update(norm=model.norm, fc_norm=model.fc_norm, head=model.head)
        return parts
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "transformer") and hasattr(visual, "conv1"):
        blocks = visual.transformer.resblocks
        parts = {"patch embedding": visual.conv1}
        parts.update({f"block {i}": blocks[i] for i in range(min(2, len(blocks)))})
        parts["norm"] = visual.ln_post
        if isinstance(visual.proj, nn.Parameter):
            parts["projection"] = _Parameter(visual.proj)
        return parts
    raise TypeError(
        "freeze takes a splat ViT, a splat CLIP, a timm ViT or an open_clip CLIP with "
        f"open_clip's ViT tower, got {type(model).__name__}"
    )
