"""Quantisation-aware refinement: a few Adam steps through the codec's quantiser, so the splats
that get optimised are the ones :func:`timm_splat.codec.decode` will return.

The fitter optimises float splats and the codec then rounds them to its grids; rounding each
value on its own is not the best set of grid points for the image. Here the codec's own
parameters (position, log l11, log l22, shear l21 / l22, colour) are the variables; each step
renders their rounded values and passes the gradient straight through the rounding
(the straight-through estimator), so a value moves to another grid point when the image is
better for it.
"""

from __future__ import annotations

import torch

from .codec import DEFAULT_SPEC, CodecSpec, quantize
from .ops import render_splats
from .splats import check_splats, splat_mask


def _to_codec_params(splats: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` splats -> (x, y, log l11, log l22, l21 / l22, r, g, b)."""
    x, y, l11, l21, l22 = splats[..., :5].unbind(-1)
    real = l11 > 0
    safe11 = torch.where(real, l11, torch.ones_like(l11))
    safe22 = torch.where(real, l22, torch.ones_like(l22))
    shape = torch.stack([safe11.log(), safe22.log(), l21 / safe22], -1)
    return torch.cat([splats[..., :2], shape, splats[..., 5:]], -1)


def _from_codec_params(params: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    l11, l22 = params[..., 2].exp(), params[..., 3].exp()
    l21 = params[..., 4] * l22
    splats = torch.cat([params[..., :2], torch.stack([l11, l21, l22], -1), params[..., 5:]], -1)
    return splats * real.unsqueeze(-1).to(splats.dtype)


def _steps(spec: CodecSpec, like: torch.Tensor) -> torch.Tensor:
    """The grid step of each codec parameter, ``[8]``."""
    bits = [spec.position_bits] * 2 + [spec.scale_bits] * 2 + [spec.shear_bits]
    bits += [spec.colour_bits] * 3
    return like.new_tensor([2.0**-b for b in bits])


def _round_through(params: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Rounded to the grids forwards, the identity backwards."""
    rounded = torch.round(params / step) * step
    return params + (rounded - params).detach()


def refine_quantized(
    images: torch.Tensor,
    splats: torch.Tensor,
    spec: CodecSpec | None = None,
    *,
    steps: int = 30,
    colour_steps: int | None = None,
    lr: float = 0.005,
    colour_lr: float = 0.003,
    backend: str = "auto",
) -> torch.Tensor:
    """Refine fitted splats ``[B, N, 8]`` for images ``[B, 3, H, W]`` through the codec's
    quantiser; returns ``[B, N, 8]`` float32 splats on the codec's grids (padding rows stay
    zero), so ``quantize`` and ``encode`` leave them unchanged.

    Two phases (measured on the sample photos, docs/codec.md): first the geometry is rounded
    and the colours, on which the image depends linearly, are re-fitted in float to make up
    for it (``colour_steps`` Adam steps, default two thirds of ``steps``: most of the gain);
    then every parameter takes the rest of the steps through the rounding (straight-through
    estimator; ``lr`` in grid steps, small, as Adam moves every parameter at once), keeping each
    image's best grid point. With ``steps=0`` this is per-image :func:`quantize`."""
    spec = spec or DEFAULT_SPEC
    check_splats(splats)
    if splats.dim() != 3 or images.dim() != 4 or images.shape[0] != splats.shape[0]:
        raise ValueError(
            f"refine_quantized takes images [B, 3, H, W] and splats [B, N, 8], got "
            f"{tuple(images.shape)} and {tuple(splats.shape)}"
        )
    colour_steps = (2 * steps) // 3 if colour_steps is None else colour_steps
    for name, value in (("steps", steps), ("colour_steps", colour_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if colour_steps > steps or not (lr > 0 and colour_lr > 0):
        raise ValueError("colour_steps must be <= steps, and lr and colour_lr > 0")
    height, width = images.shape[-2:]
    target = images.detach().float()
    real = splat_mask(splats)
    step = _steps(spec, target)
    params = _to_codec_params(splats.detach().float())

    def loss_of(candidate):
        render = render_splats(_from_codec_params(candidate, real), height, width, backend)
        return (render - target).square().flatten(1).mean(1)

    # Phase 1: geometry on its grids, colours re-fitted in float.
    geometry = torch.round(params[..., :5] / step[:5]) * step[:5]
    colour = params[..., 5:].clone().requires_grad_(True)
    optimizer = torch.optim.Adam([colour], lr=colour_lr)
    for _ in range(colour_steps):
        optimizer.zero_grad(set_to_none=True)
        loss_of(torch.cat([geometry, colour], -1)).sum().backward()
        optimizer.step()
    params = torch.cat([geometry, colour.detach()], -1)
    # Phase 2: everything through the rounding, in units of grid steps.
    scaled = (params / step).requires_grad_(True)
    optimizer = torch.optim.Adam([scaled], lr=lr)
    best = _round_through(params, step)
    best_loss = torch.full((len(splats),), float("inf"), device=target.device)
    for i in range(steps - colour_steps + 1):
        rounded = _round_through(scaled * step, step)
        loss = loss_of(rounded)
        with torch.no_grad():  # keep each image's best grid point seen (Adam may overshoot)
            better = loss.detach() < best_loss
            best_loss = torch.where(better, loss.detach(), best_loss)
            best[better] = rounded.detach()[better]
        if i == steps - colour_steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        optimizer.step()
    refined = _from_codec_params(best, real)
    # Re-quantise through the codec itself: exactly what decode(encode(...)) returns, in place
    # of the splats each image had (its padding rows last).
    out = torch.zeros_like(refined)
    for b in range(len(refined)):
        grid = quantize(refined[b].cpu(), spec)
        out[b, : len(grid)] = grid.to(out.device)
    return out
