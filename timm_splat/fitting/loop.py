"""The fitting loop: images grouped by size and batched, each batch fitted by
:func:`fit_batch` (start, colour solve, steps with the schedule's prune and relocation events,
final solve, optional codec steps), with the stages of the sibling modules.

Loss: L2 + lambda*L1(colour) on the plain sum of Gaussians. Splats whose luminance falls under
``prune_threshold`` are dropped, which is why a result may hold fewer splats (padded with zero
rows).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import ops
from ..codec_refine import refine_quantized
from ..images import to_rgb_batch, to_rgb_tensors
from ..splats import SPLAT_CHANNELS, pack_real_first
from .config import FitConfig, resolve_config
from .initial import initial_state
from .parameters import learning_rates, raw_gradient, raw_to_splats, splats_to_raw
from .schedules import lr_scale, prune_schedule, relocation_steps, subsampled_steps
from .solvers import make_steps, solve_colors
from .topology import prune, relocate_dimmest
from .views import row_views

# How far below its start (the first colour solve's PSNR) a fit may end before it is reported as
# diverged: only rounding makes a step-free fit (iterations=0) differ from its start.
DIVERGENCE_MARGIN_DB = 1.0


class FitResult(NamedTuple):
    splats: torch.Tensor  # [B, N, 8], zero rows where fewer than N splats survived
    psnr: torch.Tensor  # [B] dB of the clamped render against the image


def psnr(render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (peak 1.0) of ``render`` clamped to [0, 1]; inputs ``[B, 3, H, W]``."""
    mse = (render.clamp(0, 1) - target).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def fit_batch(targets, cfg: FitConfig, backend, bar, callback, indices):
    """Fit one batch ``targets [B, 3, H, W]`` of one size: ``(splats [B, <=N, 8], psnr [B],
    psnr of the start [B])``."""
    batch, _, height, width = targets.shape
    splats, rows, cols, sigma = initial_state(targets, cfg, backend)
    floor = cfg.color_diagonal_floor
    splats = solve_colors(splats, targets, cfg.color_solve, backend, floor)
    # The start's PSNR, the least a fit that did not diverge ends with; none for a start above
    # the budget (init_scale > 1), which pruning down to it may leave below.
    start_quality = torch.full((batch,), -math.inf, device=targets.device)
    if splats.shape[1] <= cfg.num_splats:
        with torch.no_grad():
            start_quality = psnr(ops.render(splats, height, width, backend), targets)
    raw = splats_to_raw(splats)
    live = torch.ones(batch, raw.shape[1], 1, device=raw.device)
    lr = learning_rates(cfg, rows, cols, sigma, raw.device)
    steps = make_steps(cfg, raw, lr, (height, width), backend)
    schedule = prune_schedule(raw.shape[1], cfg)
    moves = relocation_steps(cfg)
    views = row_views(targets, cfg.subsample)
    subsampled = subsampled_steps(cfg, moves) if len(views) > 1 else set()
    seen = 0  # subsampled steps so far: the phase rotates over them
    for step in range(cfg.iterations):
        current = raw_to_splats(raw) * live
        # Loss: mean squared error per image + l1_color * |colour|. Its gradient is written out
        # so that the only image-sized tensor is the residual (on a GPU the loss's autograd
        # intermediates cost as much as the render itself). A subsampled step renders one row
        # view (views.py): its rows' error stands in for the image's.
        rendered, target, view_height, view = current, targets, height, None
        if step in subsampled:
            view, seen = views[seen % len(views)], seen + 1
            rendered, target, view_height = view.splats(rendered), view.target, view.height
        residual = ops.render(rendered, view_height, width, backend).sub_(target)
        # The render's VJP is linear: scale the small [B, n, 8] result, not the residual.
        vjp = ops.render_vjp(rendered, residual, view_height, width, backend)
        pixels = target[0].numel()
        grad_current = vjp * (2 / pixels)
        if view is not None:
            grad_current = view.pull_back(grad_current)
        grad_current[..., 5:] += cfg.l1_color * rendered[..., 5:].sign()
        grad = raw_gradient(grad_current, current, live)
        steps.step(raw, grad, lr_scale(step, cfg), live, rendered, vjp, view_height)
        if callback is not None:
            mse = torch.linalg.vector_norm(residual.flatten(1), dim=1).square() / pixels
            callback(step, indices, -10 * torch.log10(mse.clamp_min(1e-12)))
        if step in schedule:
            raw, live = prune(raw, live, steps, schedule[step], cfg.prune_threshold)
        if step in moves:
            raw, live = relocate_dimmest(raw, live, steps, residual, targets, cfg, backend)
        bar.update(batch)
    if raw.shape[1] > cfg.num_splats:  # fewer iterations than prune events
        raw, live = prune(raw, live, steps, cfg.num_splats, cfg.prune_threshold)
    final = raw_to_splats(raw) * live
    if cfg.final_solve:
        with torch.no_grad():
            final = solve_colors(final, targets, cfg.final_solve, backend, floor) * live
    final = pack_real_first(final)
    if cfg.codec_steps:
        final = refine_quantized(targets, final, steps=cfg.codec_steps, backend=backend)
    with torch.no_grad():
        quality = psnr(ops.render(final, height, width, backend), targets)
    return final, quality, start_quality


def fit_splats(
    images,
    config: FitConfig | None = None,
    *,
    progress: bool | None = None,
    callback: Callable[[int, list[int], torch.Tensor], None] | None = None,
    backend: str = "auto",
    device: str | torch.device | None = None,
    **overrides,
) -> FitResult:
    """Fit 2D Gaussian splats to images.

    Args:
        images: a PIL image, numpy array (HW / HWC), tensor ``[3, H, W]`` / ``[B, 3, H, W]``,
            or a list of those, of any sizes and modes.
        config: the fitter's settings (default: ``FitConfig()``).
        progress: show a progress bar (default: when writing to a terminal).
        callback: ``callback(step, image_indices, psnr)`` after every Adam step of a batch,
            with the PSNR of that step's (unclamped) render per image of the batch (of the
            rows it rendered, for a subsampled step); for PSNR-vs-iteration curves.
        backend: renderer, "auto", "kernel" or "reference".
        device: where to fit (default: the device of a tensor input, else the CPU); the results
            stay there. The loop makes no host synchronisation, so a GPU fit runs ahead of Python.
        **overrides: :class:`FitConfig` fields replacing those of ``config`` (num_splats,
            iterations, init, lr_*, prune_*, seed, ...).

    Returns:
        ``FitResult(splats [B, num_splats, 8], psnr [B])`` on ``device``: zero rows pad images
        for which pruning left fewer splats; the PSNR is against the image at the size it was
        fitted at (``max_size``). Deterministic for a given seed, and an image's fit does not
        depend on the batch it is in.
    """
    cfg = resolve_config(config, overrides)
    if device is None:
        first = images[0] if isinstance(images, (list, tuple)) and images else images
        device = first.device if isinstance(first, torch.Tensor) else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a torch device ({exc})") from None
    if isinstance(images, torch.Tensor) and images.dim() == 4:  # one batch: keep it whole
        batch = to_rgb_batch(images)
        groups = {tuple(batch.shape[-2:]): (list(range(len(batch))), batch)}
    else:
        groups = {}
        for index, image in enumerate(to_rgb_tensors(images)):
            groups.setdefault(tuple(image.shape[-2:]), ([], []))
            groups[tuple(image.shape[-2:])][0].append(index)
            groups[tuple(image.shape[-2:])][1].append(image)
        groups = {
            size: (indices, torch.stack(tensors)) for size, (indices, tensors) in groups.items()
        }
    groups = {
        size: (indices, _working_size(t, cfg.max_size)) for size, (indices, t) in groups.items()
    }
    count = sum(len(indices) for indices, _ in groups.values())

    splats = torch.zeros(count, cfg.num_splats, SPLAT_CHANNELS, device=device)
    quality = torch.zeros(count, device=device)
    start_quality = torch.zeros(count, device=device)
    disable = None if progress is None else not progress  # None: only on a terminal
    bar = tqdm(
        total=count * cfg.iterations, disable=disable, unit="img-it", desc=f"fit {cfg.num_splats}"
    )
    # Fitting differentiates the render whatever the caller's mode (models fit under no_grad).
    with bar, torch.enable_grad():
        for indices, targets in groups.values():
            for start in range(0, len(indices), cfg.batch_size):
                chunk = indices[start : start + cfg.batch_size]
                batch = targets[start : start + cfg.batch_size].to(device)
                fitted, q, q_start = fit_batch(batch, cfg, backend, bar, callback, chunk)
                rows = torch.tensor(chunk, device=device)
                splats[rows, : fitted.shape[1]] = fitted
                quality[rows], start_quality[rows] = q, q_start
    # The two checks below are the call's only host syncs, after all the work.
    if not bool(torch.isfinite(splats).all()):
        raise ValueError(
            "the fit diverged (non-finite splats): lower the learning rates (lr_position, "
            "lr_shape, lr_color) or use FitConfig()'s defaults"
        )
    _warn_if_worse_than_the_start(quality, start_quality)
    return FitResult(splats, quality)


def _warn_if_worse_than_the_start(quality: torch.Tensor, start: torch.Tensor) -> None:
    """Every step descends, so a fit that ends well below its start diverged while staying
    finite (as long colour-CG fits did before ``color_diagonal_floor``): its splats are
    returned, since they are what was asked for, but not silently."""
    worse = (quality < start - DIVERGENCE_MARGIN_DB).nonzero().flatten().tolist()
    if worse:
        shown = ", ".join(
            f"#{i}: {quality[i]:.2f} dB after {start[i]:.2f} dB at the start" for i in worse[:5]
        )
        warnings.warn(
            f"{len(worse)} of {len(quality)} fits ended below their start and diverged ({shown}"
            f"{', ...' if len(worse) > 5 else ''}): lower the learning rates or use FitConfig()'s "
            "defaults, and report it if they are the defaults",
            RuntimeWarning,
            stacklevel=3,
        )


def _working_size(images: torch.Tensor, max_size: int) -> torch.Tensor:
    """``images`` shrunk (antialiased) so the longer side is at most ``max_size``: the splats'
    coordinates are normalised, so they describe the full-size image all the same."""
    height, width = images.shape[-2:]
    if max(height, width) <= max_size:
        return images
    scale = max_size / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return small.clamp(0, 1)
