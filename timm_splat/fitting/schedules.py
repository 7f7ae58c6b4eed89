"""When things happen during a fit of ``cfg.iterations`` steps: the learning-rate decay, the
prune events and the relocations. Pure functions of the config (host integers), so the loop
never asks the device when to act."""

from __future__ import annotations

import math

from .config import FitConfig


def lr_scale(step: int, cfg: FitConfig) -> float:
    """Cosine decay from 1 to ``lr_final`` over the iterations."""
    cosine = 0.5 * (1 + math.cos(math.pi * step / cfg.iterations))
    return cfg.lr_final + (1 - cfg.lr_final) * cosine


def prune_schedule(start_count: int, cfg: FitConfig) -> dict[int, int]:
    """step -> splat count to keep after that step, ending at num_splats."""
    first = int(cfg.prune_start * cfg.iterations)
    last = max(first, int(cfg.prune_end * cfg.iterations) - 1)
    steps = list(range(first, last + 1, cfg.prune_every)) or [first]
    if steps[-1] != last:
        steps.append(last)
    steps = [s for s in steps if s < cfg.iterations]
    schedule = {}
    for i, step in enumerate(steps):
        frac = (i + 1) / len(steps)
        schedule[step] = round(start_count - (start_count - cfg.num_splats) * frac)
    return schedule


def relocation_steps(cfg: FitConfig) -> set[int]:
    """The steps after which the dimmest splats move to the largest errors."""
    if not (cfg.relocate_every and cfg.relocate_fraction > 0):
        return set()
    return set(
        range(
            int(cfg.relocate_start * cfg.iterations),
            int(cfg.relocate_end * cfg.iterations),
            cfg.relocate_every,
        )
    )


def subsampled_steps(cfg: FitConfig, moves: set[int]) -> set[int]:
    """The steps that render a row view (every ``subsample``-th row, views.py): those before
    ``subsample_end`` of the iterations, but for the relocations' (which sample the whole
    residual)."""
    if cfg.subsample <= 1:
        return set()
    return set(range(int(cfg.subsample_end * cfg.iterations))) - moves
