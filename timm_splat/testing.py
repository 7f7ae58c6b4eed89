"""Helpers for testing renderers and code that consumes splats (like ``torch.testing``): random
valid splat sets with the awkward cases, and tools for comparing kernels with the reference."""

from __future__ import annotations

import torch

from .reference import CUTOFF_SIGMA, pixel_centers


def random_splats(batch, n, dtype=torch.float64, seed=0, padding=3):
    """Random splats that include the awkward cases: off the image, very thin, very large,
    strongly sheared, and zero padding rows at the end."""
    g = torch.Generator().manual_seed(seed)
    s = torch.zeros(batch, n, 8, dtype=dtype)
    s[..., 0:2] = torch.rand(batch, n, 2, generator=g, dtype=dtype) * 1.6 - 0.3
    s[..., 2] = torch.rand(batch, n, generator=g, dtype=dtype) * 0.12 + 0.004
    s[..., 3] = torch.randn(batch, n, generator=g, dtype=dtype) * 0.05
    s[..., 4] = torch.rand(batch, n, generator=g, dtype=dtype) * 0.12 + 0.004
    s[..., 5:] = torch.randn(batch, n, 3, generator=g, dtype=dtype)
    s[:, 0, 2:5] = torch.tensor([0.002, 0.0, 0.3], dtype=dtype)  # very thin and long
    s[:, 1, 2:5] = torch.tensor([2.0, 0.5, 1.5], dtype=dtype)  # far larger than the image
    s[:, 2, 0:2] = torch.tensor([1.5, -0.8], dtype=dtype)  # entirely off the image
    s[:, 3, 2:5] = torch.tensor([0.05, 0.2, 0.01], dtype=dtype)  # strongly sheared
    if padding:
        s[:, -padding:] = 0
    return s


def away_from_cutoff(splats, height, width, margin=1e-5):
    """``splats`` with the splats zeroed (made padding) that put a pixel centre within
    ``margin`` (relative, ~100 float32 ulps) of the 3-sigma cut-off (|z|^2 = 9). There the
    Gaussian drops by exp(-4.5) = 1.1% of its colour, and float32 may keep a pixel that float64
    cuts; comparing float32 kernels with a float64 reference only measures arithmetic on inputs
    where the cut is unambiguous."""
    s = splats.detach().double()
    px, py = pixel_centers(height, width, torch.float64, s.device)
    ambiguous = torch.zeros(s.shape[:2], dtype=torch.bool, device=s.device)
    for start in range(0, s.shape[1], 64):
        c = s[:, start : start + 64, :, None, None]
        z1 = (px.view(1, 1, 1, -1) - c[:, :, 0]) / c[:, :, 2]
        z2 = (py.view(1, 1, -1, 1) - c[:, :, 1] - c[:, :, 3] * z1) / c[:, :, 4]
        near = ((z1 * z1 + z2 * z2) - CUTOFF_SIGMA**2).abs() < margin * CUTOFF_SIGMA**2
        ambiguous[:, start : start + 64] = near.flatten(2).any(-1) & (c[:, :, 2, 0, 0] > 0)
    return torch.where(ambiguous.unsqueeze(-1), torch.zeros_like(splats), splats)


def poison_allocator():
    """Fill memory the CUDA caching allocator will hand out next with NaN, so an output element
    a kernel forgets to write shows up."""
    junk = torch.full((1 << 26,), float("nan"), device="cuda")
    del junk
