"""What the ``demo`` and ``fit`` subcommands share: a timed fit and its report rows."""

from __future__ import annotations

import time

from ..fitting import PRESETS, FitConfig, fit_splats
from ..report import FitRow
from ..splats import splat_count


def add_fit_arguments(parser) -> None:
    """``--iterations`` and ``--preset``, the fitter's options both subcommands take."""
    parser.add_argument("--iterations", type=int, default=None, help="default: the preset's")
    parser.add_argument(
        "--preset",
        default="default",
        choices=sorted(PRESETS),
        help="fitter configuration (FitConfig.preset): 'fast' takes a third of the time, for "
        "a lower PSNR below ~3000 splats at 224x224 (docs/fitting.md); default: %(default)s",
    )


def fit_timed(images, budget: int, iterations: int | None, preset: str = "default"):
    """``(FitResult, seconds per image)`` of one fit of ``images`` at ``budget`` splats."""
    options = {} if iterations is None else {"iterations": iterations}
    config = FitConfig.preset(preset, num_splats=budget, **options)
    start = time.perf_counter()
    result = fit_splats(images, config, progress=True)
    return result, (time.perf_counter() - start) / len(images)


def report_rows(names, images, result, budget, seconds) -> list[FitRow]:
    kept = splat_count(result.splats)
    return [
        FitRow(name, budget, int(kept[i]), float(result.psnr[i]), *images[i].shape[-2:], seconds)
        for i, name in enumerate(names)
    ]
