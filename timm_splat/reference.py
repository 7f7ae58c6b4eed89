"""Pure-PyTorch twin of the renderer kernels (csrc/): dense, chunked over splats.

Slow but obviously right: every splat is evaluated at every pixel, with the same cut-off ellipse
as the kernels (csrc/splat_math.h), and autograd provides the gradients. The tests compare the
kernels against it, values and gradients; it is also the fallback when the kernels cannot be
built.
"""

from __future__ import annotations

import torch

CUTOFF_SIGMA = 3.0  # must equal kCutoffSigma in csrc/splat_math.h
_CHUNK_ELEMENTS = 1 << 24  # splat-pixel pairs evaluated at once, bounds the memory


def pixel_centers(height: int, width: int, dtype=torch.float32, device=None):
    """Normalised coordinates of pixel centres: ``(px [W], py [H])``."""
    px = (torch.arange(width, dtype=dtype, device=device) + 0.5) / width
    py = (torch.arange(height, dtype=dtype, device=device) + 0.5) / height
    return px, py


def render_reference(splats: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Render ``[B, N, 8]`` splats to ``[B, 3, height, width]`` (plain sum, unclamped)."""
    batch, n, _ = splats.shape
    px, py = pixel_centers(height, width, splats.dtype, splats.device)
    px = px.view(1, 1, 1, width)
    py = py.view(1, 1, height, 1)
    real = (splats[..., 2] > 0) & (splats[..., 4] > 0)
    # Padding rows get a harmless unit shape so no NaN can leak into the gradients.
    safe = torch.where(real.unsqueeze(-1), splats, torch.ones_like(splats))
    out = splats.new_zeros(batch, 3, height, width)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, batch * height * width))
    for start in range(0, n, chunk):
        s = safe[:, start : start + chunk, :, None, None]  # [B, n, 8, 1, 1]
        z1 = (px - s[:, :, 0]) / s[:, :, 2]
        z2 = (py - s[:, :, 1] - s[:, :, 3] * z1) / s[:, :, 4]
        m2 = z1 * z1 + z2 * z2  # [B, n, H, W]
        keep = (m2 <= CUTOFF_SIGMA**2) & real[:, start : start + chunk, None, None]
        weight = torch.where(keep, torch.exp(-0.5 * m2), torch.zeros_like(m2))
        color = splats[:, start : start + chunk, 5:8]  # [B, n, 3]
        out = out + torch.einsum("bnhw,bnc->bchw", weight, color)
    return out
