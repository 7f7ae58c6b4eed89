"""The steps that improve a fit for a fixed set of splats: Adam on every parameter, and the
least-squares colour solve (the render is linear in the colours).

Both run on ``[B, n, 8]`` tensors with fixed step counts and no early exit, so there is no host
sync, and per-image sums are running sums, so an image's result does not depend on its batch.
"""

from __future__ import annotations

import math

import torch

from .. import ops
from ..splats import SPLAT_CHANNELS
from .sampling import total


class Adam:
    """Adam over one ``[B, n, 8]`` tensor with a learning rate per channel. Written out because
    pruning gathers the moment estimates along with the parameters."""

    def __init__(self, param: torch.Tensor, lr: torch.Tensor, betas=(0.9, 0.999), eps=1e-15):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def step(self, param: torch.Tensor, grad: torch.Tensor, scale: float, live: torch.Tensor):
        b1, b2 = self.betas
        self.t += 1
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = self.lr * (scale / (1 - b1**self.t))
        denom = (self.v / (1 - b2**self.t)).sqrt_().add_(self.eps)
        param.sub_(step_size * self.m / denom * live)

    def gather(self, index: torch.Tensor):
        """Keep the moments of the splats ``index [B, k]`` (in that order)."""
        idx = index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS)
        self.m = self.m.gather(1, idx)
        self.v = self.v.gather(1, idx)

    def reset(self, index: torch.Tensor):
        """Forget the moments of the splats ``index [B, k]`` (they were moved)."""
        rows = index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS)
        self.m.scatter_(1, rows, 0.0)
        self.v.scatter_(1, rows, 0.0)


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
    rz = total(residual * z)  # [B, 3]: one system per image and channel
    for _ in range(steps):
        q = normal(p)
        alpha = rz / total(p * q).clamp_min(1e-20)
        colors = colors + alpha.unsqueeze(1) * p
        residual = residual - alpha.unsqueeze(1) * q
        z = residual * inv_diag
        rz_new = total(residual * z)
        p = z + (rz_new / rz.clamp_min(1e-20)).unsqueeze(1) * p
        rz = rz_new
    return torch.cat([geometry, colors], -1)
