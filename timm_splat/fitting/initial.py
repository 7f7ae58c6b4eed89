"""Where a fit starts: splats placed by the image-gradient density (``init="adaptive"``, the
default), on the paper's grid (``"grid"``) or uniformly at random (``"random"``), with colours
that already match the image's low frequencies. :func:`initial_state` is the one entry the loop
calls; it also returns the scale the learning rates are measured in.

Only ``ops.render`` and plain torch: the same on the CPU and on CUDA, no host sync (but the
one ``.item()`` of the grid's sigma, once per batch), and an image's start does not depend on
its batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import ops
from .config import FitConfig
from .parameters import grid_shape
from .sampling import blur, channel_sum, isotropic, sample_at, sample_means, total


def initial_state(targets: torch.Tensor, cfg: FitConfig, backend: str = "auto"):
    """``(splats [B, n, 8], rows, cols, sigma)`` for ``targets [B, 3, H, W]``: the starting
    splats (n >= ``init_scale * num_splats``, colours not yet solved), the grid the learning
    rates count spacings of, and the initial std-dev (normalised by the height)."""
    _, _, height, width = targets.shape
    start = math.ceil(cfg.init_scale * cfg.num_splats)
    if cfg.init == "adaptive":
        splats = adaptive_splats(
            targets,
            start,
            uniform=cfg.init_uniform,
            smooth=cfg.init_smooth,
            sigma=cfg.init_sigma,
            seed=cfg.seed,
            backend=backend,
        )
        rows, cols = grid_shape(start, height, width)
        sigma = cfg.init_sigma * math.sqrt((height / rows) * (width / cols)) / height
    else:
        splats = initial_splats(targets, start, cfg, backend)
        rows, cols = grid_shape(splats.shape[1], height, width)
        sigma = splats[0, 0, 4].item()
    return splats, rows, cols, sigma


def initial_splats(targets: torch.Tensor, count: int, cfg: FitConfig, backend: str = "auto"):
    """Structured (or random) initial splats for ``targets [B, 3, H, W]``: ``[B, n, 8]``,
    n >= count.

    Colours are the images' cell means divided by how much the neighbouring Gaussians overlap
    there, so the first render already matches the images' low frequencies."""
    batch, _, height, width = targets.shape
    device = targets.device
    rows, cols = grid_shape(count, height, width)
    n = rows * cols
    sigma_px = cfg.init_sigma * math.sqrt((height / rows) * (width / cols))
    if cfg.init == "grid":
        ys = (torch.arange(rows, dtype=torch.float32, device=device) + 0.5) / rows
        xs = (torch.arange(cols, dtype=torch.float32, device=device) + 0.5) / cols
        xy = torch.stack([xs.repeat(rows), ys.repeat_interleave(cols)], -1).expand(batch, n, 2)
    else:
        generator = torch.Generator().manual_seed(cfg.seed)  # CPU: same splats on any device
        xy = torch.rand(batch, n, 2, generator=generator).to(device)
    shape = torch.tensor([sigma_px / width, 0.0, sigma_px / height], device=device)
    ones = torch.ones(batch, n, 3, device=device)
    unit = torch.cat([xy, shape.expand(batch, n, 3), ones], -1).contiguous()
    coverage = ops.render(unit, height, width, backend)[:, :1]  # [B, 1, H, W]
    if cfg.init == "grid":
        cell_mean = F.adaptive_avg_pool2d(targets, (rows, cols)).flatten(2).transpose(1, 2)
        cell_cover = F.adaptive_avg_pool2d(coverage, (rows, cols)).flatten(2).transpose(1, 2)
    else:  # sample image and coverage at each mean
        cell_mean = sample_at(targets, xy)
        cell_cover = sample_at(coverage, xy)
    colors = cell_mean / cell_cover.clamp_min(1e-3)
    return torch.cat([unit[..., :5], colors], -1)


def _gradients(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives ``(d/dx, d/dy)`` of each channel, ``[B, C, H, W]`` each."""
    kx = targets.new_tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 8
    padded = F.pad(targets, (1, 1, 1, 1), mode="replicate")
    channels = targets.shape[1]
    gx = F.conv2d(padded, kx.expand(channels, 1, 3, 3), groups=channels)
    gy = F.conv2d(padded, kx.t().expand(channels, 1, 3, 3), groups=channels)
    return gx, gy


def importance(targets: torch.Tensor, uniform: float, smooth: float) -> torch.Tensor:
    """``[B, H, W]`` sampling density (sums to 1 per image): image-gradient magnitude, blurred
    over ``smooth`` pixels, mixed with ``uniform`` of a flat density so flat areas keep splats."""
    gx, gy = _gradients(targets)
    magnitude = channel_sum(gx.square() + gy.square()).sqrt()
    if smooth > 0:
        magnitude = blur(magnitude, smooth)
    density = magnitude.flatten(1)
    density = density / total(density).unsqueeze(1).clamp_min(1e-12)
    density = (1 - uniform) * density + uniform / density.shape[1]
    return density.view(targets.shape[0], *targets.shape[-2:])


def adaptive_splats(
    targets: torch.Tensor,
    count: int,
    *,
    uniform: float,
    smooth: float,
    sigma: float,
    seed: int,
    backend: str = "auto",
) -> torch.Tensor:
    """``count`` splats per image placed by the image's gradient density: ``[B, count, 8]``.

    Each splat's std-dev is ``sigma`` times the local spacing ``1 / sqrt(count * density)``;
    colours are the image at the mean divided by the overlap of the neighbours (a cheap start
    for :func:`~timm_splat.fitting.solvers.solve_colors`)."""
    batch, _, height, width = targets.shape
    density = importance(targets, uniform, smooth)
    # The same draws for every image (a fit does not depend on its batch), from a CPU generator
    # (the same splats on any device).
    jitter = torch.rand(count, 3, generator=torch.Generator().manual_seed(seed))
    jitter = jitter.to(targets.device).expand(batch, count, 3)
    xy, pixel = sample_means(density, count, jitter)
    local = density.flatten(1).gather(1, pixel)  # probability of the sampled pixel
    sigma_px = (sigma * (count * local).clamp_min(1e-12).rsqrt()).clamp(0.5, max(height, width) / 4)
    unit = isotropic(xy, sigma_px, height, width).contiguous()
    coverage = ops.render(unit, height, width, backend)[:, :1]
    color = sample_at(targets, xy) / sample_at(coverage, xy).clamp_min(1e-3)
    return torch.cat([unit[..., :5], color], -1)
