"""The batched 2DGS fitter: L2 + lambda*L1(colour) on the plain sum of Gaussians, by Adam.

Images of one size are fitted together in one batch, so every renderer call covers the whole
batch. The default algorithm (docs/fitting.md): splats placed by the image-gradient density,
colours solved by least squares, 150 Adam steps during which the dimmest splats are moved to
where the error is largest, colours solved again at the end. ``FitConfig.preset("paper")``: the
paper's pipeline, a grid at 1.5x the budget pruned by luminance down to ``num_splats`` over 600
steps. Either way splats whose
luminance falls under ``prune_threshold`` are dropped, which is why a result may hold fewer
splats (padded with zero rows).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import ops
from .codec_refine import refine_quantized
from .fitting_init import adaptive_splats, relocate, solve_colors
from .images import to_rgb_batch, to_rgb_tensors
from .splats import DEFAULT_NUM_SPLATS, SPLAT_CHANNELS, luminance, pack_real_first


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Every knob of the fitter. The defaults are the algorithm of docs/fitting.md (adaptive
    placement, colour solves, relocation of dim splats to the largest errors, 150 Adam steps);
    ``FitConfig.preset("paper")`` is the paper's pipeline as first implemented here."""

    num_splats: int = DEFAULT_NUM_SPLATS
    iterations: int = 150
    init: str = "adaptive"  # "adaptive" (image-gradient density), "grid" (the paper's) or "random"
    init_scale: float = 1.0  # start with this many times num_splats, prune down to num_splats
    init_sigma: float = 0.6  # std-dev at init, in (local) splat spacings
    init_uniform: float = 0.1  # adaptive init: share of the density spread evenly
    init_smooth: float = 2.0  # adaptive init: blur of the gradient density, in pixels
    color_solve: int = 5  # CG steps of the least-squares colour solve after init (0: none)
    relocate_every: int = 10  # steps between moves of the dimmest splats to the largest errors
    relocate_start: float = 0.0  # relocations run between these fractions of the iterations
    relocate_end: float = 0.5
    relocate_fraction: float = 0.2  # share of the splats moved per relocation
    relocate_sigma: float = 0.15  # std-dev of a moved splat, in mean splat spacings
    relocate_solve: int = 1  # CG steps of the colour solve after each relocation
    final_solve: int = 3  # CG steps of the colour solve after the last Adam step (0: none)
    # Steps through the .splat codec's quantiser at its default grids (codec_refine): the
    # splats decode(encode(...)) returns are what is optimised; 0: none (float splats).
    codec_steps: int = 0
    prune_start: float = 0.1  # prune events run between these fractions of the iterations
    prune_end: float = 0.6
    prune_every: int = 50
    prune_threshold: float = 0.5 / 255  # splats with |colour| luminance below this are dropped
    lr_position: float = 0.15  # per step, in initial grid spacings
    lr_shape: float = 0.15  # per step, for log(l11), log(l22) and l21 / initial sigma
    lr_color: float = 0.04
    lr_final: float = 0.1  # cosine decay to this fraction of each learning rate
    adam_beta2: float = 0.9  # Adam's second-moment decay (the paper's pipeline: 0.999)
    l1_color: float = 1e-6  # lambda of the L1 penalty on colours (the paper's lambda_reg)
    batch_size: int = 64  # images fitted per batch (memory grows linearly with it)
    max_size: int = 1024  # longer side larger images are fitted at (splats are resolution-free)
    seed: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):  # types first: 2.5 splats or an inf rate are bugs
            value, kind = getattr(self, field.name), type(field.default)
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if kind is int and not (number and isinstance(value, numbers.Integral)):
                raise ValueError(f"fit option {field.name} must be an int, got {value!r}")
            if kind is float and not (number and math.isfinite(value)):
                raise ValueError(f"fit option {field.name} must be a finite number, got {value!r}")
            if kind is str and not isinstance(value, str):
                raise ValueError(f"fit option {field.name} must be a string, got {value!r}")
        checks = {
            "num_splats": self.num_splats >= 1,
            "iterations": self.iterations >= 0,
            "init": self.init in ("adaptive", "grid", "random"),
            "init_scale": self.init_scale >= 1.0,
            "init_sigma": 0 < self.init_sigma <= 10,  # in splat spacings: 10 blurs the image
            "init_uniform": 0 <= self.init_uniform <= 1,
            "init_smooth": self.init_smooth >= 0,
            "color_solve": self.color_solve >= 0,
            "relocate_every": self.relocate_every >= 0,
            "relocate_start": 0.0 <= self.relocate_start <= self.relocate_end <= 1.0,
            "relocate_fraction": 0 <= self.relocate_fraction <= 1,
            "relocate_sigma": 0 < self.relocate_sigma <= 10,
            "relocate_solve": self.relocate_solve >= 0,
            "final_solve": self.final_solve >= 0,
            "codec_steps": self.codec_steps >= 0,
            "prune_start": 0.0 <= self.prune_start <= self.prune_end <= 1.0,
            "prune_every": self.prune_every >= 1,
            "prune_threshold": self.prune_threshold >= 0,
            "lr_final": 0 <= self.lr_final <= 1,
            "adam_beta2": 0 <= self.adam_beta2 < 1,
            "batch_size": self.batch_size >= 1,
            "max_size": self.max_size >= 1,
            "lr_position": self.lr_position >= 0,
            "lr_shape": self.lr_shape >= 0,
            "lr_color": self.lr_color >= 0,
            "l1_color": self.l1_color >= 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"invalid fit option {name}={getattr(self, name)!r}")

    @classmethod
    def preset(cls, name: str, **overrides) -> FitConfig:
        """A named configuration of ``PRESETS``, with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise ValueError(f"unknown fit preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# Named configurations. "paper": the paper's pipeline as first implemented and benchmarked here
# (grid at 1.5x the budget, 600 Adam steps, luminance pruning down to the budget), kept so its
# numbers stay reproducible and every comparison can run it side by side.
PRESETS: dict[str, dict] = {
    "default": {},
    "paper": dict(
        iterations=600,
        init="grid",
        init_scale=1.5,
        init_sigma=0.6,
        color_solve=0,
        relocate_every=0,
        final_solve=0,
        prune_start=0.1,
        prune_end=0.6,
        prune_every=50,
        prune_threshold=0.5 / 255,
        lr_position=0.05,
        lr_shape=0.05,
        lr_color=0.02,
        lr_final=0.02,
        adam_beta2=0.999,
        l1_color=1e-6,
    ),
}


class FitResult(NamedTuple):
    splats: torch.Tensor  # [B, N, 8], zero rows where fewer than N splats survived
    psnr: torch.Tensor  # [B] dB of the clamped render against the image


def psnr(render: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (peak 1.0) of ``render`` clamped to [0, 1]; inputs ``[B, 3, H, W]``."""
    mse = (render.clamp(0, 1) - target).square().flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp_min(1e-12))


def _grid_shape(count: int, height: int, width: int) -> tuple[int, int]:
    """Rows x cols of a grid with at least ``count`` points and cells as square as possible."""
    rows = max(1, round(math.sqrt(count * height / width)))
    return rows, math.ceil(count / rows)


def _raw_to_splats(raw: torch.Tensor) -> torch.Tensor:
    """Optimised parameters (x, y, log l11, l21, log l22, rgb) -> Splats tensor."""
    return torch.cat(
        [raw[..., :2], raw[..., 2:3].exp(), raw[..., 3:4], raw[..., 4:5].exp(), raw[..., 5:]],
        dim=-1,
    )


def _splats_to_raw(splats: torch.Tensor) -> torch.Tensor:
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


def initial_splats(targets: torch.Tensor, count: int, cfg: FitConfig, backend: str = "auto"):
    """Structured (or random) initial splats for ``targets [B, 3, H, W]``: ``[B, n, 8]``,
    n >= count.

    Colours are the images' cell means divided by how much the neighbouring Gaussians overlap
    there, so the first render already matches the images' low frequencies."""
    batch, _, height, width = targets.shape
    device = targets.device
    rows, cols = _grid_shape(count, height, width)
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
        grid = (xy * 2 - 1).unsqueeze(1)  # [B, 1, n, 2] in grid_sample's [-1, 1]
        cell_mean = F.grid_sample(targets, grid, align_corners=False).squeeze(2).transpose(1, 2)
        cell_cover = F.grid_sample(coverage, grid, align_corners=False).squeeze(2).transpose(1, 2)
    colors = cell_mean / cell_cover.clamp_min(1e-3)
    return torch.cat([unit[..., :5], colors], -1)


def _prune_schedule(start_count: int, cfg: FitConfig) -> dict[int, int]:
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


class _Adam:
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
        idx = index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS)
        self.m = self.m.gather(1, idx)
        self.v = self.v.gather(1, idx)


def _fit_batch(targets, cfg: FitConfig, backend, bar, callback, indices):
    batch, _, height, width = targets.shape
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
        rows, cols = _grid_shape(start, height, width)
        sigma = cfg.init_sigma * math.sqrt((height / rows) * (width / cols)) / height
    else:
        splats = initial_splats(targets, start, cfg, backend)
        rows, cols = _grid_shape(splats.shape[1], height, width)
        sigma = splats[0, 0, 4].item()
    splats = solve_colors(splats, targets, cfg.color_solve, backend)
    raw = _splats_to_raw(splats)
    live = torch.ones(batch, raw.shape[1], 1, device=raw.device)
    # Scale-free learning rates: positions move in grid spacings, l21 in initial sigmas.
    lr = torch.tensor(
        [
            cfg.lr_position / cols,
            cfg.lr_position / rows,
            cfg.lr_shape,
            cfg.lr_shape * sigma,
            cfg.lr_shape,
        ]
        + [cfg.lr_color] * 3,
        device=raw.device,
    )
    adam = _Adam(raw, lr, betas=(0.9, cfg.adam_beta2))
    schedule = _prune_schedule(raw.shape[1], cfg)
    moves = set()
    if cfg.relocate_every and cfg.relocate_fraction > 0:
        moves = set(
            range(
                int(cfg.relocate_start * cfg.iterations),
                int(cfg.relocate_end * cfg.iterations),
                cfg.relocate_every,
            )
        )
    pixels = targets[0].numel()
    for step in range(cfg.iterations):
        param = raw.detach().requires_grad_(True)
        current = _raw_to_splats(param) * live
        # Loss: mean squared error per image + l1_color * |colour|. Its gradient is written out
        # so that the only image-sized tensor is the residual (on a GPU the loss's autograd
        # intermediates cost as much as the render itself).
        fixed = current.detach()
        residual = ops.render(fixed, height, width, backend).sub_(targets)
        # The render's VJP is linear: scale the small [B, n, 8] result, not the residual.
        grad_current = ops.render_vjp(fixed, residual, height, width, backend) * (2 / pixels)
        grad_current[..., 5:] += cfg.l1_color * fixed[..., 5:].sign()
        (grad,) = torch.autograd.grad(current, param, grad_current)
        cosine = 0.5 * (1 + math.cos(math.pi * step / cfg.iterations))
        adam.step(raw, grad, cfg.lr_final + (1 - cfg.lr_final) * cosine, live)
        if callback is not None:
            mse = torch.linalg.vector_norm(residual.flatten(1), dim=1).square() / pixels
            callback(step, indices, -10 * torch.log10(mse.clamp_min(1e-12)))
        if step in schedule:
            raw, live = _prune(raw, live, adam, schedule[step], cfg.prune_threshold)
        if step in moves:
            raw, live = _relocate(raw, live, adam, residual, targets, cfg, backend)
        bar.update(batch)
    if raw.shape[1] > cfg.num_splats:  # fewer iterations than prune events
        raw, live = _prune(raw, live, adam, cfg.num_splats, cfg.prune_threshold)
    final = _raw_to_splats(raw) * live
    if cfg.final_solve:
        with torch.no_grad():
            final = solve_colors(final, targets, cfg.final_solve, backend) * live
    final = pack_real_first(final)
    if cfg.codec_steps:
        final = refine_quantized(targets, final, steps=cfg.codec_steps, backend=backend)
    with torch.no_grad():
        quality = psnr(ops.render(final, height, width, backend), targets)
    return final, quality


@torch.no_grad()
def _prune(raw, live, adam: _Adam, keep: int, threshold: float):
    """Keep the ``keep`` highest-luminance live splats per image (original order); mark those
    under ``threshold`` dead."""
    score = luminance(raw)
    score = torch.where(live[..., 0] > 0, score, torch.full_like(score, -1.0))
    keep = min(keep, raw.shape[1])
    index = score.topk(keep, dim=1).indices.sort(dim=1).values
    raw = raw.gather(1, index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS))
    live = live.gather(1, index.unsqueeze(-1))
    live = live * (luminance(raw) >= threshold).unsqueeze(-1)
    adam.gather(index)
    return raw, live


@torch.no_grad()
def _relocate(raw, live, adam: _Adam, residual, targets, cfg: FitConfig, backend):
    """Move the dimmest (or dead) splats to the largest errors, then re-solve the colours."""
    current = _raw_to_splats(raw) * live
    score = torch.where(live[..., 0] > 0, luminance(current), torch.full_like(live[..., 0], -1.0))
    count = max(1, round(cfg.relocate_fraction * raw.shape[1]))
    moved, index = relocate(current, residual, count, score, cfg.relocate_sigma)
    live = live.scatter(1, index.unsqueeze(-1), 1.0)
    moved = solve_colors(moved * live, targets, cfg.relocate_solve, backend)
    rows = index.unsqueeze(-1).expand(-1, -1, SPLAT_CHANNELS)
    raw = raw.scatter(1, rows, _splats_to_raw(moved.gather(1, rows)))
    raw[..., 5:] = moved[..., 5:]
    adam.m.scatter_(1, rows, 0.0)
    adam.v.scatter_(1, rows, 0.0)
    return raw, live


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
            with the PSNR of that step's (unclamped) render per image of the batch; for
            PSNR-vs-iteration curves.
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
                fitted, q = _fit_batch(batch, cfg, backend, bar, callback, chunk)
                rows = torch.tensor(chunk, device=device)
                splats[rows, : fitted.shape[1]] = fitted
                quality[rows] = q
    if not bool(torch.isfinite(splats).all()):  # one host sync per call, after the work
        raise ValueError(
            "the fit diverged (non-finite splats): lower the learning rates (lr_position, "
            "lr_shape, lr_color) or use FitConfig()'s defaults"
        )
    return FitResult(splats, quality)


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


def resolve_config(config: FitConfig | None, overrides: dict) -> FitConfig:
    """``config`` with ``overrides`` applied; FitConfig validates the result."""
    if config is None:
        config = FitConfig()
    elif not isinstance(config, FitConfig):
        raise TypeError(
            f"config must be a FitConfig or None, got {type(config).__name__}: pass the budget "
            f"as fit_splats(images, num_splats={config!r})"
        )
    names = {f.name for f in dataclasses.fields(FitConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown fit option(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(config, **overrides)
