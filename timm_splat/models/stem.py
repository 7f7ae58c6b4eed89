"""The GS stem: a set of splats ``[B, N, 8]`` in, ``M`` tokens ``[B, M, D]`` out.

It takes the place of a ViT's patch embedding. Each real splat becomes a feature vector (its
position, the log of its Cholesky diagonal, its shear and colour, plus Fourier features of
position and shape), standardised per channel and projected to the ViT width. A Perceiver
resampler then cross-attends from ``M`` learned latents to those embeddings.

Position for the latents: the latents sit on a grid of cells over the image (14 x 14 for the
default 196) and their cross-attention carries a learned, per-head locality bias
``-strength * |latent cell centre - splat mean|^2`` (in cell units). Each latent so starts as a
soft patch of the image around its cell, which is what the pretrained ViT blocks and the
position embeddings copied from the RGB model expect at their input; heads can still learn to
look far (strength near zero). Content attention sees the splats' positions too, through their
Fourier features. ``local_latents=False`` drops the bias (and its parameter): plain Perceiver
latents, for the ablation against it.

Padding rows (``l11 == 0``) are masked out of the attention, so they never change the output,
and a learned null key / value keeps an image with no splats at all well defined. The stem has
no notion of splat order: permuting the splats permutes nothing downstream.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from ..splats import COLOR, L11, L21, L22, SPLAT_CHANNELS, XY, splat_mask

# Per-channel standardisation of (x, y, log l11, log l22, l21 / l22, r, g, b): typical centre and
# spread of fitted splats at 224 px (log l ~ log of a few pixels / 224). Fixed, not learned, so
# the stem sees the same scale at any budget; the projection after it is learned.
_BASE_MEAN = (0.5, 0.5, -3.5, -3.5, 0.0, 0.45, 0.45, 0.45)
_BASE_STD = (0.29, 0.29, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3)
# The locality strength before softplus, per head (see PerceiverResampler).
_LOCALITY_INIT = -0.5


# torch.jit.script calls __prepare_scriptable__ on every module first: the splat models answer
# with this instead of a TorchScript error about a constant deep in the stem.
NO_TORCHSCRIPT = (
    "splat models do not support TorchScript (torch.jit.script, open_clip's jit=True, "
    "--torchscript): TorchScript is deprecated in PyTorch 2 and cannot hold the pixel path's "
    "fitter. Use torch.compile(model) or torch.export.export(model, (splats,)) on splats "
    "[B, N, 8] instead (see README, 'Models')"
)


def latent_grid(num_latents: int) -> tuple[int, int]:
    """Rows x cols of the latent cells: the squarest factorisation (14 x 14 for 196, 7 x 14
    for 98)."""
    rows = int(math.isqrt(num_latents))
    while num_latents % rows:
        rows -= 1
    return rows, num_latents // rows


def fourier(values: torch.Tensor, frequencies: int) -> torch.Tensor:
    """``[..., C]`` -> ``[..., C * 2 * frequencies]``: sin and cos of ``pi * 2^k * values``."""
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=values.device, dtype=values.dtype)
    angles = (values.unsqueeze(-1) * scales).flatten(-2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SplatFeatures(nn.Module):
    """Per-splat input features ``[B, N, F]`` and the real-splat mask ``[B, N]``."""

    def __init__(self, position_frequencies: int = 8, shape_frequencies: int = 4, device=None):
        super().__init__()
        self.position_frequencies = position_frequencies
        self.shape_frequencies = shape_frequencies
        self.register_buffer("mean", torch.tensor(_BASE_MEAN, device=device), persistent=False)
        self.register_buffer("std", torch.tensor(_BASE_STD, device=device), persistent=False)

    @property
    def num_features(self) -> int:
        return 8 + 2 * 2 * self.position_frequencies + 3 * 2 * self.shape_frequencies

    def forward(self, splats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        splats = splats.float()
        # Real splats; l22 is checked too because its log is taken (check_splats is not run here).
        mask = splat_mask(splats) & (splats[..., L22] > 0)
        # Padding rows get a harmless unit shape: log(0) would put NaN into masked-out keys.
        safe = torch.where(mask.unsqueeze(-1), splats, torch.ones_like(splats))
        xy = safe[..., XY]
        log_diag = torch.stack([safe[..., L11].log(), safe[..., L22].log()], dim=-1)
        shear = safe[..., L21, None] / safe[..., L22, None]
        base = torch.cat([xy, log_diag, shear, safe[..., COLOR]], dim=-1)
        base = (base - self.mean) / self.std
        shape = torch.cat([base[..., 2:4], shear.clamp(-4, 4)], dim=-1) / 4
        features = torch.cat(
            [base, fourier(xy, self.position_frequencies), fourier(shape, self.shape_frequencies)],
            dim=-1,
        )
        return features, mask


class PerceiverResampler(nn.Module):
    """One cross-attention block from ``num_latents`` learned latents to masked splat tokens,
    then an MLP on the latents (pre-norm, residual).

    ``local_latents``: bias each latent's attention towards the splats near its grid cell (a
    learned strength per head, the ``locality`` parameter); False gives plain Perceiver latents
    (no bias term, no ``locality`` parameter), whose only link to a place is what they learn."""

    def __init__(
        self,
        dim: int,
        num_latents: int,
        num_heads: int,
        mlp_ratio: float = 2.0,
        local_latents: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if not isinstance(local_latents, bool):
            raise ValueError(f"local_latents must be True or False, got {local_latents!r}")
        self.num_heads = num_heads
        self.grid = latent_grid(num_latents)
        self.latents = nn.Parameter(torch.empty(num_latents, dim, **dd))
        self.norm_latents = nn.LayerNorm(dim, **dd)
        self.norm_tokens = nn.LayerNorm(dim, **dd)
        self.q = nn.Linear(dim, dim, **dd)
        self.kv = nn.Linear(dim, 2 * dim, **dd)
        self.null_kv = nn.Parameter(torch.empty(2, dim, **dd))
        self.proj = nn.Linear(dim, dim, **dd)
        # softplus(-0.5) ~ 0.47: a head starts out looking about 1.5 cells around its latent.
        if local_latents:
            self.locality = nn.Parameter(torch.full((num_heads,), _LOCALITY_INIT, **dd))
        else:
            self.register_parameter("locality", None)
        self.norm_mlp = nn.LayerNorm(dim, **dd)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, **dd), nn.GELU(), nn.Linear(hidden, dim, **dd)
        )
        rows, cols = self.grid
        ys = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) / rows
        xs = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) / cols
        centres = torch.stack([xs.repeat(rows), ys.repeat_interleave(cols)], dim=-1)
        self.register_buffer("centres", centres, persistent=False)  # [M, 2], row-major like patches
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.trunc_normal_(self.latents, std=0.02)
        nn.init.trunc_normal_(self.null_kv, std=0.02)

    @property
    def local_latents(self) -> bool:
        """Whether the latents' attention carries the locality bias (see the class doc)."""
        return self.locality is not None

    def set_local_latents(self, enabled: bool) -> None:
        """Add (freshly initialised) or remove the locality bias and its parameter."""
        if not isinstance(enabled, bool):
            raise ValueError(f"local_latents must be True or False, got {enabled!r}")
        if enabled == self.local_latents:
            return
        if enabled:
            self.locality = nn.Parameter(self.latents.new_full((self.num_heads,), _LOCALITY_INIT))
        else:
            del self.locality
            self.register_parameter("locality", None)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The bias follows the weights: a state dict with this resampler's latents but no
        # locality was saved with local_latents=False (and the converse), so every loader
        # (open_clip's hf-hub and file paths, timm's, load_state_dict) rebuilds what was saved.
        # A state dict without the resampler (from_rgb's, which keeps the new stem) changes
        # nothing.
        if prefix + "latents" in state_dict:
            self.set_local_latents(prefix + "locality" in state_dict)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"num_latents={self.latents.shape[0]}, local_latents={self.local_latents}"

    def attention_bias(self, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, heads or 1, M, N + 1]``: locality in cell units (when ``local_latents``), -inf
        on padding, 0 for the null key."""
        keep = mask[:, None, None, :]  # [B, 1, 1, N]
        if self.locality is None:
            bias = torch.zeros_like(keep, dtype=positions.dtype).expand(
                -1, -1, self.latents.shape[0], -1
            )
        else:
            rows, cols = self.grid
            cell = positions.new_tensor([cols, rows])
            offset = (self.centres[None, :, None, :] - positions[:, None, :, :]) * cell
            distance2 = offset.square().sum(-1)  # [B, M, N]
            bias = -F.softplus(self.locality)[None, :, None, None] * distance2[:, None]
        bias = bias.masked_fill(~keep, float("-inf"))
        return F.pad(bias, (0, 1))  # the null key, always visible

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor):
        batch, n, dim = tokens.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        latents = self.latents.unsqueeze(0).expand(batch, -1, -1)
        q = self.q(self.norm_latents(latents))
        kv = self.kv(self.norm_tokens(tokens)).view(batch, n, 2, dim)
        null = self.null_kv.to(kv.dtype).view(1, 1, 2, dim).expand(batch, 1, 2, dim)
        k, v = torch.cat([kv, null], dim=1).unbind(2)  # [B, N + 1, D] each

        def split(t):
            return t.view(batch, -1, heads, head_dim).transpose(1, 2)

        bias = self.attention_bias(positions.float(), mask).to(q.dtype)
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias)
        latents = latents + self.proj(out.transpose(1, 2).reshape(batch, -1, dim))
        return latents + self.mlp(self.norm_mlp(latents))


class GSStem(nn.Module):
    """Splats ``[B, N, 8]`` (any N, zero rows as padding) -> tokens ``[B, num_latents, D]``.

    Built by timm's ``VisionTransformer`` in place of its patch embedding (``embed_layer``), so
    it takes that constructor's arguments; ``img_size``, ``patch_size`` and ``in_chans`` only
    describe the pixels the splats were fitted from."""

    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=768,
        num_latents: int = 196,
        num_heads: int | None = None,
        position_frequencies: int = 8,
        shape_frequencies: int = 4,
        mlp_ratio: float = 2.0,
        local_latents: bool = True,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        device=None,
        dtype=None,
        **unused,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.patch_size = (
            (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        )
        self.num_patches = num_latents  # what VisionTransformer sizes its position embedding by
        self.grid_size = latent_grid(num_latents)
        self.features = SplatFeatures(position_frequencies, shape_frequencies, device=device)
        self.proj = nn.Linear(self.features.num_features, embed_dim, **dd)
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.resampler = PerceiverResampler(
            embed_dim,
            num_latents,
            num_heads or max(1, embed_dim // 64),
            mlp_ratio,
            local_latents=local_latents,
            **dd,
        )

    def __prepare_scriptable__(self):
        raise RuntimeError(NO_TORCHSCRIPT)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's resize hook: records the pixel size splats are fitted from. The tokens are the
        latents, whose grid does not depend on it."""
        if img_size is not None:
            self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        if patch_size is not None:
            self.patch_size = (
                (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
            )

    def feat_ratio(self, as_scalar: bool = True):
        """Pixels per latent cell (timm's feature ``reduction``)."""
        ratio = tuple(size // cells for size, cells in zip(self.img_size, self.grid_size))
        return max(ratio) if as_scalar else ratio

    def dynamic_feat_size(self, img_size) -> tuple[int, int]:
        """The token grid for any input: always the latent grid."""
        return self.grid_size

    def forward(self, splats: torch.Tensor) -> torch.Tensor:
        tracing = is_fx_symbolic_tracing()  # shapes are symbolic then: no check
        if not tracing and (splats.dim() != 3 or splats.shape[-1] != SPLAT_CHANNELS):
            raise ValueError(
                f"the GS stem takes splats [B, N, {SPLAT_CHANNELS}], got {tuple(splats.shape)}"
            )
        features, mask = self.features(splats)
        tokens = self.norm(self.proj(features.to(self.proj.weight.dtype)))
        return self.resampler(tokens, splats[..., XY], mask)
