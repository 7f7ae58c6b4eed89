"""The batched 2DGS fitter: L2 + lambda*L1(colour) on the plain sum of Gaussians.

Images of one size are fitted together in one batch, so every renderer call covers the whole
batch. The default algorithm (docs/fitting.md): splats placed by the image-gradient density,
colours solved by least squares, 190 Adam steps during which the dimmest splats are moved to
where the error is largest (the first 60% of the steps rendering every second row, the phase
rotating), the colours taken over from Adam by conjugate gradients for the last half (the last
70% for dense budgets), colours solved again at the end. ``FitConfig.preset("cg150")``: the
same with 150 full steps (the default before subsampled steps); ``FitConfig.preset("adam150")``:
that with Adam to the end (the default before issue 20). ``FitConfig.preset("paper")``: the
paper's pipeline, a grid at 1.5x the budget pruned by luminance down to ``num_splats`` over 600
steps.

One module per stage, each importing only those before it:

- ``config``: :class:`FitConfig`, ``PRESETS``, :func:`resolve_config`
- ``sampling``: image-space helpers of placement (densities, Hilbert sampling, blurs)
- ``views``: the row views subsampled steps render
- ``parameters``: the optimised parameterisation and its learning rates
- ``initial``: where a fit starts (adaptive, grid, random)
- ``solvers``: the steps (Adam, colour CG, Gauss-Newton, the least-squares colour solve)
- ``schedules``: when the learning rate decays, splats are pruned or relocated, steps subsampled
- ``topology``: pruning and relocation
- ``loop``: :func:`fit_splats` and the per-batch loop
"""

from .config import PRESETS, FitConfig, resolve_config
from .initial import initial_splats
from .loop import FitResult, fit_splats, psnr

__all__ = [
    "PRESETS",
    "FitConfig",
    "FitResult",
    "fit_splats",
    "initial_splats",
    "psnr",
    "resolve_config",
]
