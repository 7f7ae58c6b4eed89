"""Which splats a fit holds: luminance pruning down to the budget, and relocation of the
dimmest splats to where the error is largest (a fixed-budget form of densification). Both act
on the optimised parameters and keep the optimiser's state aligned with them."""

from __future__ import annotations

import math

import torch

from ..splats import SPLAT_CHANNELS, luminance
from .config import FitConfig
from .parameters import raw_to_splats, splats_to_raw
from .sampling import blur, channel_sum, isotropic, sample_at, sample_means, total
from .solvers import Adam, Steps, solve_colors, solve_colors_and_error


@torch.no_grad()
def prune(raw, live, steps: Adam | Steps, keep: int, threshold: float):
    """Keep the ``keep`` highest-luminance live splats per image (original order); mark those
    under ``threshold`` dead; ``steps`` (the optimisers' state) follows its splats."""
    score = luminance(raw)
    score = torch.where(live[..., 0] > 0, score, torch.full_like(score, -1.0))
    keep = min(keep, raw.shape[1])
    index = score.topk(keep, dim=1).indices.sort(dim=1).values
    raw = raw.gather(1, index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS))
    live = live.gather(1, index.unsqueeze(-1))
    live = live * (luminance(raw) >= threshold).unsqueeze(-1)
    steps.gather(index)
    return raw, live


def relocate(
    splats: torch.Tensor,
    residual: torch.Tensor,
    count: int,
    score: torch.Tensor,
    sigma: float,
    power: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the ``count`` lowest-``score`` splats of each image to where the error is largest.

    New means are stratified samples of the squared residual (``render - target``) raised to
    ``power`` (above 1: more of them at the peaks); each new splat has std-dev ``sigma`` mean
    spacings of the budget and the colour that cancels the (slightly blurred) residual there.
    Returns ``(splats, index [B, count])`` of the moved rows."""
    batch, n, _ = splats.shape
    height, width = residual.shape[-2:]
    index = score.topk(count, dim=1, largest=False).indices
    # One blur of the residual and its energy together (one pass of the op overhead)
    blurred = blur(torch.cat([residual, channel_sum(residual.square())], 1), 1.0)
    energy = blurred[:, 3] + 1e-12  # never all zero
    if power != 1.0:  # (the fits before relocate_power existed: no power at all, bit for bit)
        energy = energy.pow(power) + 1e-30
    jitter = torch.full((batch, count, 3), 0.5, device=splats.device)  # deterministic
    xy, _ = sample_means(energy, count, jitter)
    sigma_px = torch.full_like(xy[..., 0], sigma * math.sqrt(height * width / n))
    new = isotropic(xy, sigma_px, height, width)
    new[..., 5:] = -sample_at(blurred[:, :3], xy)
    rows = index.unsqueeze(-1).expand(-1, -1, splats.shape[-1])
    return splats.scatter(1, rows, new), index


@torch.no_grad()
def relocate_dimmest(raw, live, steps: Adam | Steps, residual, targets, cfg: FitConfig, backend):
    """One relocation of the loop: the dimmest (or dead) splats move to the largest errors, all
    colours are re-solved (``relocate_solve`` CG steps), the moved splats' optimiser state reset.
    ``residual``: the error of this step's (full) render. With ``relocate_guard``, an image the
    relocation leaves more than that many dB worse keeps its splats and optimiser state."""
    current = raw_to_splats(raw) * live
    score = torch.where(live[..., 0] > 0, luminance(current), torch.full_like(live[..., 0], -1.0))
    count = max(1, round(cfg.relocate_fraction * raw.shape[1]))
    before = (raw, live, steps.state()) if cfg.relocate_guard else None
    moved, index = relocate(current, residual, count, score, cfg.relocate_sigma, cfg.relocate_power)
    live = live.scatter(1, index.unsqueeze(-1), 1.0)
    floor = cfg.color_diagonal_floor
    if before is None:
        moved = solve_colors(moved * live, targets, cfg.relocate_solve, backend, floor)
    else:  # the solve's error comes with it: the check costs no render
        moved, error = solve_colors_and_error(
            moved * live, targets, cfg.relocate_solve, backend, floor
        )
    rows = index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS)
    raw = raw.scatter(1, rows, splats_to_raw(moved.gather(1, rows)))
    raw[..., 5:] = moved[..., 5:]
    steps.reset(index)
    if before is not None:
        # A relocation may cost a little at first and pay later; one that costs this much
        # took splats something large needed (docs/fitting.md row 70).
        worse = error > total(residual.square().flatten(1)) * 10 ** (cfg.relocate_guard / 10)
        old_raw, old_live, old_state = before
        keep = worse.view(-1, 1, 1)
        raw, live = torch.where(keep, old_raw, raw), torch.where(keep, old_live, live)
        steps.restore(worse, old_state)
    return raw, live
