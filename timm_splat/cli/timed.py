"""What the ``demo`` and ``fit`` subcommands share: a timed fit and its report rows."""

from __future__ import annotations

import time

from ..fitting import fit_splats
from ..report import FitRow
from ..splats import splat_count


def fit_timed(images, budget: int, iterations: int | None):
    """``(FitResult, seconds per image)`` of one fit of ``images`` at ``budget`` splats."""
    options = {} if iterations is None else {"iterations": iterations}
    start = time.perf_counter()
    result = fit_splats(images, num_splats=budget, progress=True, **options)
    return result, (time.perf_counter() - start) / len(images)


def report_rows(names, images, result, budget, seconds) -> list[FitRow]:
    kept = splat_count(result.splats)
    return [
        FitRow(name, budget, int(kept[i]), float(result.psnr[i]), *images[i].shape[-2:], seconds)
        for i, name in enumerate(names)
    ]
