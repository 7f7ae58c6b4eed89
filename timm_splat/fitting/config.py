"""Every knob of the fitter (:class:`FitConfig`), the named configurations (``PRESETS``) and the
rule that applies per-call overrides (:func:`resolve_config`)."""

from __future__ import annotations

import dataclasses
import math
import numbers

from ..splats import DEFAULT_NUM_SPLATS

# A Gaussian thinner than a pixel sums its squares over the pixels to ~sqrt(pi) x its length
# where a row of pixel centres runs through it, not to its near-zero integral; pi x length x
# this floor keeps the colour preconditioner from taking the second for the first.
DIAGONAL_FLOOR = 1 / math.sqrt(math.pi)


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Every knob of the fitter. The defaults are the algorithm of docs/fitting.md (adaptive
    placement, colour solves, relocation of dim splats to the largest errors, 190 Adam steps of
    which the first 60% render every second row, the colours taken over by conjugate gradients
    for the second half or so); ``FitConfig.preset("paper")`` is the paper's pipeline as first
    implemented here, ``FitConfig.preset("adam150")`` the default before colour CG (issue 11's)
    and ``FitConfig.preset("cg150")`` the default before subsampled steps;
    ``FitConfig.preset("fast")`` is this algorithm at a third of adam150's time."""

    num_splats: int = DEFAULT_NUM_SPLATS
    iterations: int = 190
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
    # Relocation targets are drawn from the residual energy to this power (1: in proportion to
    # it; 2: more at its peaks, docs/fitting.md row 69). Above 1 it needs relocate_solve or
    # relocate_guard: moved splats that land together each cancel the whole residual there, so
    # with neither their sum overshoots (row 73: -4.4 dB at N=1600 for the fast preset).
    relocate_power: float = 2.0
    # An image that a relocation leaves more than this many dB worse keeps its splats as they
    # were (row 70; read off the colour solve after it, so no render); 0: no check.
    relocate_guard: float = 4.0
    final_solve: int = 3  # CG steps of the colour solve after the last Adam step (0: none)
    # Steps through the .splat codec's quantiser at its default grids (codec_refine): the
    # splats decode(encode(...)) returns are what is optimised; 0: none (float splats).
    codec_steps: int = 0
    # Steps before subsample_end of the iterations (but for the relocations') render every
    # subsample-th row, the phase rotating from step to step (views.py): about half the cost of
    # a step at 2, so more steps for the same time (docs/fitting.md row 48); 1: every row.
    subsample: int = 2
    subsample_end: float = 0.6
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
    # "adam" or "gauss_newton": damped block-Jacobi Gauss-Newton on the geometry (solvers.py,
    # docs/fitting.md row 29: behind Adam at equal steps), colours still by Adam.
    geometry_step: str = "adam"
    gn_rate: float = 0.5  # Gauss-Newton step scale (cosine-decayed like the Adam rates)
    gn_damping: float = 0.1  # Levenberg-Marquardt damping, a fraction of the blocks' diagonal
    gn_momentum: float = 0.9  # heavy-ball momentum of the Gauss-Newton steps
    # "adam" or "cg": colours by conjugate gradients with a line search per step (variable
    # projection, docs/fitting.md rows 32-46, 58) for budgets of color_cg_min_splats or more
    # (the gain grows with the number of splats; below ~300 there is none), Adam keeping them
    # until color_cg_start of the steps, or color_cg_start_dense where a splat has fewer than
    # color_cg_dense_pixels of the image's pixels (at 224x224: N >= 1255).
    color_step: str = "cg"
    color_cg_min_splats: int = 400
    color_cg_start: float = 0.5
    color_cg_start_dense: float = 0.3
    color_cg_dense_pixels: float = 40.0
    # Render the CG direction for its exact step length every this many CG steps; in between,
    # its closed-form diagonal times the overlap ratio last measured (1: render every step).
    color_cg_render_every: int = 16
    # Floor, in pixels, of each splat extent in the colour solves' diagonal (solvers.py): with
    # the bare integral a needle thinner than a pixel took colour steps hundreds of times too
    # long, and long colour-CG fits diverged (docs/fitting.md row 57). 0: the bare integral.
    color_diagonal_floor: float = DIAGONAL_FLOOR
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
            "relocate_power": 0 < self.relocate_power <= 8,
            "relocate_guard": self.relocate_guard >= 0,
            "final_solve": self.final_solve >= 0,
            "codec_steps": self.codec_steps >= 0,
            "subsample": self.subsample >= 1,
            "subsample_end": 0 <= self.subsample_end <= 1,
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
            "geometry_step": self.geometry_step in ("adam", "gauss_newton"),
            "color_step": self.color_step in ("adam", "cg"),
            "color_cg_start": 0 <= self.color_cg_start <= 1,
            "color_cg_start_dense": 0 <= self.color_cg_start_dense <= 1,
            "color_cg_min_splats": self.color_cg_min_splats >= 0,
            "color_cg_dense_pixels": self.color_cg_dense_pixels >= 0,
            "color_cg_render_every": self.color_cg_render_every >= 1,
            "color_diagonal_floor": self.color_diagonal_floor >= 0,
            "gn_rate": self.gn_rate >= 0,
            "gn_damping": self.gn_damping >= 0,
            "gn_momentum": 0 <= self.gn_momentum < 1,
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
# numbers stay reproducible and every comparison can run it side by side. "adam150": the default
# of issue 11 (2026-11-25, commit fbde881) written out field by field, so it stays what it is
# when the default changes: the reference of issue 20's comparisons. "cg150": the default that
# followed it, before subsampled steps.
PRESETS: dict[str, dict] = {
    "default": {},
    # Colour CG as first measured (docs/fitting.md rows 32-34): from half the steps at every
    # budget, its direction rendered on every step (1.2x adam150's CPU time).
    "cg": dict(
        iterations=150,
        subsample=1,
        color_step="cg",
        color_cg_min_splats=0,
        color_cg_start=0.5,
        color_cg_start_dense=0.5,
        color_cg_render_every=1,
        color_diagonal_floor=0.0,
        relocate_power=1.0,
        relocate_guard=0.0,
    ),
    "adam150": dict(
        iterations=150,
        init="adaptive",
        init_scale=1.0,
        init_sigma=0.6,
        init_uniform=0.1,
        init_smooth=2.0,
        color_solve=5,
        relocate_every=10,
        relocate_start=0.0,
        relocate_end=0.5,
        relocate_fraction=0.2,
        relocate_sigma=0.15,
        relocate_solve=1,
        final_solve=3,
        prune_start=0.1,
        prune_end=0.6,
        prune_every=50,
        prune_threshold=0.5 / 255,
        lr_position=0.15,
        lr_shape=0.15,
        lr_color=0.04,
        lr_final=0.1,
        adam_beta2=0.9,
        l1_color=1e-6,
        geometry_step="adam",
        color_step="adam",
        subsample=1,
        color_diagonal_floor=0.0,
        relocate_power=1.0,
        relocate_guard=0.0,
    ),
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
        color_step="adam",
        subsample=1,
    ),
}


# The other operating point of today's algorithm (docs/fitting.md rows 56, 89): a third of
# adam150's rendered pixels and, from ~3000 splats at 224x224, of its CPU time. 76 steps, every
# one but the relocations' on every second row, relocating every 5 steps without a colour solve
# (colour CG, from 10% of the steps, solves them as it goes); so few steps want faster shapes
# and a higher floor under the rate decay (row 89). adam150's PSNR from ~3000 splats (N=3136:
# +0.2 / +0.5 dB on the tuning / held-out photos at 0.33x); below that 0.7-1.0 dB under it.
# Over the default, so it follows the default's other fields, but for the relocation targets and
# guard of rows 69-70 (measured on the default only; with no colour solve after its relocations,
# the guard would cost a render each).
PRESETS["fast"] = dict(
    iterations=76,
    subsample_end=1.0,
    relocate_every=5,
    relocate_solve=0,
    relocate_power=1.0,
    relocate_guard=0.0,
    color_cg_start=0.1,
    color_cg_start_dense=0.1,
    lr_shape=0.25,
    lr_final=0.2,
)


# The default of 2026-12-04 (commit 3be9a5b; docs/fitting.md rows 43-46), field by field: adam150
# with the colours by CG from 600 splats (150 full steps).
PRESETS["cg150"] = {
    **PRESETS["adam150"],
    "color_step": "cg",
    "color_cg_min_splats": 600,
    "color_cg_start": 0.5,
    "color_cg_start_dense": 0.3,
    "color_cg_dense_pixels": 40.0,
    "color_cg_render_every": 16,
}


# Fields whose default is not the value fits had before the field existed: a pre-fitted
# dataset whose stored settings lack one of them was fitted with the value here (data/prefit.py
# resumes it only under that value). The colours were Adam's until color_step existed, every
# step rendered every row until subsample existed, the colour diagonal had no floor, and
# relocation drew its targets in proportion to the residual energy, unchecked.
VALUES_BEFORE_THEY_EXISTED: dict[str, object] = {
    "color_step": "adam",
    "subsample": 1,
    "color_diagonal_floor": 0.0,
    "relocate_power": 1.0,
    "relocate_guard": 0.0,
}


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
