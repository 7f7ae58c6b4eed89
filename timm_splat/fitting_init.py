"""Parts of the fitter's default algorithm: content-adaptive placement, the least-squares colour
solve and the relocation of splats to the largest errors (docs/fitting.md).

They use only ``ops.render`` / ``ops.render_vjp`` and plain torch, so they run unchanged on the
CPU and on CUDA, none synchronises with the host, and an image's result does not depend on the
batch it is fitted in.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import ops


@functools.lru_cache(maxsize=8)
def _hilbert_order(height: int, width: int, device) -> torch.Tensor:
    """Row-major pixel indices in the order a Hilbert curve over the image visits them."""
    return _hilbert_index(height, width, device).argsort()


def _hilbert_index(height: int, width: int, device) -> torch.Tensor:
    """``[H * W]`` position of each pixel (row-major) along a Hilbert curve over the image."""
    order = 1 << max(1, math.ceil(math.log2(max(height, width))))
    y, x = torch.meshgrid(
        torch.arange(height, device=device), torch.arange(width, device=device), indexing="ij"
    )
    x, y = x.flatten().clone(), y.flatten().clone()
    index = torch.zeros_like(x)
    s = order // 2
    while s > 0:  # the classic xy -> d conversion, vectorised over pixels
        rx = ((x & s) > 0).long()
        ry = ((y & s) > 0).long()
        index += s * s * ((3 * rx) ^ ry)
        flip = ry == 0
        swap_x = torch.where(flip & (rx == 1), s - 1 - x, x)
        swap_y = torch.where(flip & (rx == 1), s - 1 - y, y)
        x, y = torch.where(flip, swap_y, swap_x), torch.where(flip, swap_x, swap_y)
        s //= 2
    return index


def _total(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Sum over ``dim`` as a running sum: unlike ``sum()``, whose split of a long reduction
    depends on the batch size, the same bits for an image whatever batch it is fitted in."""
    return x.cumsum(dim).select(dim, -1)


def _channel_sum(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, 1, H, W]``, added channel by channel (batch-invariant, see _total)."""
    return sum(x[:, c : c + 1] for c in range(x.shape[1]))


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
    magnitude = _channel_sum(gx.square() + gy.square()).sqrt()
    if smooth > 0:
        magnitude = _blur(magnitude, smooth)
    density = magnitude.flatten(1)
    density = density / _total(density).unsqueeze(1).clamp_min(1e-12)
    density = (1 - uniform) * density + uniform / density.shape[1]
    return density.view(targets.shape[0], *targets.shape[-2:])


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (replicated borders), as weighted sums of
    shifted slices rather than a convolution, whose algorithm (and bits) depend on the batch."""
    radius = max(1, math.ceil(3 * sigma))
    weights = [math.exp(-0.5 * (t / sigma) ** 2) for t in range(-radius, radius + 1)]
    weights = [w / sum(weights) for w in weights]
    height, width = image.shape[-2:]
    padded = F.pad(image, (radius, radius, 0, 0), mode="replicate")
    out = sum(w * padded[..., :, k : k + width] for k, w in enumerate(weights))
    padded = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return sum(w * padded[..., k : k + height, :] for k, w in enumerate(weights))


def sample_means(density: torch.Tensor, count: int, jitter: torch.Tensor) -> torch.Tensor:
    """``count`` points per image drawn from ``density [B, H, W]``: ``(xy [B, count, 2],
    pixel [B, count])``. Stratified along a Hilbert curve (dense where the density is high,
    evenly spread, no clumps); ``jitter [B, count, 3]`` in [0, 1) places each point in its
    stratum and inside its pixel."""
    batch, height, width = density.shape
    order = _hilbert_order(height, width, density.device)
    cdf = density.flatten(1)[:, order].cumsum(1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-20)
    u = (torch.arange(count, device=density.device) + jitter[..., 0]) / count
    pixel = order[torch.searchsorted(cdf, u.contiguous()).clamp_max(height * width - 1)]
    row, col = pixel // width, pixel % width
    xy = torch.stack([(col + jitter[..., 1]) / width, (row + jitter[..., 2]) / height], -1)
    return xy, pixel


def _isotropic(xy: torch.Tensor, sigma_px: torch.Tensor, height: int, width: int):
    """Unit-colour splats ``[B, n, 8]`` at ``xy`` with std-dev ``sigma_px`` pixels."""
    shape = torch.stack([sigma_px / width, torch.zeros_like(sigma_px), sigma_px / height], -1)
    return torch.cat([xy, shape, torch.ones_like(xy[..., :1]).expand(*xy.shape[:2], 3)], -1)


def _sample(image: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
    """Bilinear samples ``[B, n, C]`` of ``image [B, C, H, W]`` at normalised points ``xy``."""
    grid = (xy * 2 - 1).unsqueeze(1)
    return F.grid_sample(image, grid, align_corners=False).squeeze(2).transpose(1, 2)


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
    for :func:`solve_colors`)."""
    batch, _, height, width = targets.shape
    density = importance(targets, uniform, smooth)
    # The same draws for every image (a fit does not depend on its batch), from a CPU generator
    # (the same splats on any device).
    jitter = torch.rand(count, 3, generator=torch.Generator().manual_seed(seed))
    jitter = jitter.to(targets.device).expand(batch, count, 3)
    xy, pixel = sample_means(density, count, jitter)
    local = density.flatten(1).gather(1, pixel)  # probability of the sampled pixel
    sigma_px = (sigma * (count * local).clamp_min(1e-12).rsqrt()).clamp(0.5, max(height, width) / 4)
    unit = _isotropic(xy, sigma_px, height, width).contiguous()
    coverage = ops.render(unit, height, width, backend)[:, :1]
    color = _sample(targets, xy) / _sample(coverage, xy).clamp_min(1e-3)
    return torch.cat([unit[..., :5], color], -1)


def relocate(
    splats: torch.Tensor, residual: torch.Tensor, count: int, score: torch.Tensor, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the ``count`` lowest-``score`` splats of each image to where the error is largest.

    New means are stratified samples of the squared residual (``render - target``); each new
    splat has std-dev ``sigma`` mean spacings of the budget and the colour that cancels the
    (slightly blurred) residual there. Returns ``(splats, index [B, count])`` of the moved rows."""
    batch, n, _ = splats.shape
    height, width = residual.shape[-2:]
    index = score.topk(count, dim=1, largest=False).indices
    energy = _blur(_channel_sum(residual.square()), 1.0)[:, 0] + 1e-12  # never all zero
    jitter = torch.full((batch, count, 3), 0.5, device=splats.device)  # deterministic
    xy, _ = sample_means(energy, count, jitter)
    sigma_px = torch.full_like(xy[..., 0], sigma * math.sqrt(height * width / n))
    new = _isotropic(xy, sigma_px, height, width)
    new[..., 5:] = -_sample(_blur(residual, 1.0), xy)
    rows = index.unsqueeze(-1).expand(-1, -1, splats.shape[-1])
    return splats.scatter(1, rows, new), index


def solve_colors(
    splats: torch.Tensor, targets: torch.Tensor, steps: int, backend: str = "auto"
) -> torch.Tensor:
    """Colours that minimise the squared error for the splats' geometry, by ``steps`` of
    Jacobi-preconditioned conjugate gradients on the normal equations (the render is linear in
    the colours: one render and one VJP per step). Starts from the splats' own colours; a
    fixed step count and no early exit, so there is no host sync."""
    if steps <= 0:
        return splats
    _, _, height, width = targets.shape
    geometry = splats[..., :5]
    # diag(A^T A): sum over pixels of a Gaussian squared ~ pi * l11 * l22 in pixel units.
    diag = (math.pi * height * width * splats[..., 2] * splats[..., 4]).clamp_min(1e-6)
    inv_diag = (1 / diag).unsqueeze(-1)

    def normal(colors):  # A^T A colours
        full = torch.cat([geometry, colors], -1)
        return ops.render_vjp(
            full, ops.render(full, height, width, backend), height, width, backend
        )[..., 5:]

    colors = splats[..., 5:]
    full = torch.cat([geometry, colors], -1)
    residual = ops.render_vjp(
        full, targets - ops.render(full, height, width, backend), height, width, backend
    )[..., 5:]  # A^T (b - A x), [B, n, 3]
    z = residual * inv_diag
    p = z
    rz = _total(residual * z)  # [B, 3]: one system per image and channel
    for _ in range(steps):
        q = normal(p)
        alpha = rz / _total(p * q).clamp_min(1e-20)
        colors = colors + alpha.unsqueeze(1) * p
        residual = residual - alpha.unsqueeze(1) * q
        z = residual * inv_diag
        rz_new = _total(residual * z)
        p = z + (rz_new / rz.clamp_min(1e-20)).unsqueeze(1) * p
        rz = rz_new
    return torch.cat([geometry, colors], -1)
