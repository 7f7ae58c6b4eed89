"""The variables the fitter optimises: each splat as (x, y, log l11, l21, log l22, rgb), so
the Cholesky diagonal stays positive, and the per-channel learning rates in the image's own
units (positions in grid spacings, l21 in initial sigmas)."""

from __future__ import annotations

import math

import torch


def grid_shape(count: int, height: int, width: int) -> tuple[int, int]:
    """Rows x cols of a grid with at least ``count`` points and cells as square as possible."""
    rows = max(1, round(math.sqrt(count * height / width)))
    return rows, math.ceil(count / rows)


def raw_to_splats(raw: torch.Tensor) -> torch.Tensor:
    """Optimised parameters (x, y, log l11, l21, log l22, rgb) -> Splats tensor."""
    return torch.cat(
        [raw[..., :2], raw[..., 2:3].exp(), raw[..., 3:4], raw[..., 4:5].exp(), raw[..., 5:]],
        dim=-1,
    )


def splats_to_raw(splats: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            splats[..., :2],
            splats[..., 2:3].log(),
            splats[..., 3:4],
            splats[..., 4:5].log(),
            splats[..., 5:],
        ],
        dim=-1,
    )


def raw_gradient(grad: torch.Tensor, current: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to the optimised parameters, given ``grad`` with respect to
    ``current = raw_to_splats(raw) * live`` (``live`` 0 or 1): the chain rule written out, as
    autograd would compute it (d exp(t) / dt = exp(t) for the log scales), bit for bit."""
    out = grad * live
    out[..., 2] = grad[..., 2] * current[..., 2]
    out[..., 4] = grad[..., 4] * current[..., 4]
    return out


def learning_rates(cfg, rows: int, cols: int, sigma: float, device) -> torch.Tensor:
    """``[8]`` per-channel rates of ``cfg`` (a FitConfig): scale-free, positions move in grid
    spacings of a ``rows x cols`` grid, l21 in initial sigmas (``sigma``, normalised)."""
    return torch.tensor(
        [
            cfg.lr_position / cols,
            cfg.lr_position / rows,
            cfg.lr_shape,
            cfg.lr_shape * sigma,
            cfg.lr_shape,
        ]
        + [cfg.lr_color] * 3,
        device=device,
    )
