"""Which pixels a step renders: every ``k``-th row of the image, at a phase that rotates from
step to step, so ``k`` consecutive steps see every pixel once (docs/fitting.md row 48).

A row view is a smaller image, ``ceil`` of ``H / k`` rows, whose pixel centres are those rows
of the full image. The renderer samples pixel centres, so the same Gaussians in the view's
coordinates (an affine map of y, which scales the Cholesky factor's second row) render exactly
the full render's rows there, with the kernels as they are. The map is a per-channel scale and
offset, so the chain rule back to the splats is a product with the scale.

Plain torch, no host sync; each view is sliced from its own image, so an image's views do not
depend on its batch.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RowView(NamedTuple):
    target: torch.Tensor  # [B, 3, rows, W]: the image's rows of this view (contiguous)
    height: int  # rows
    scale: torch.Tensor  # [8]: view splats = splats * scale + offset
    offset: torch.Tensor  # [8]

    def splats(self, splats: torch.Tensor) -> torch.Tensor:
        """``splats [..., 8]`` in the view's coordinates."""
        return splats * self.scale + self.offset

    def pull_back(self, grad: torch.Tensor) -> torch.Tensor:
        """A gradient with respect to the view's splats -> the same with respect to the splats."""
        return grad * self.scale


def row_views(targets: torch.Tensor, every: int) -> list[RowView]:
    """The ``every`` row views of ``targets [B, 3, H, W]``, phase 0 first (row ``p`` of the
    image is the first of phase ``p``); one full view when ``every`` is 1 or the image has fewer
    than ``2 * every`` rows."""
    height = targets.shape[-2]
    if every <= 1 or height < 2 * every:
        every = 1
    views = []
    for phase in range(every):
        rows = len(range(phase, height, every))
        # View pixel i has its centre at (i + 0.5) / rows; the image's row every * i + phase at
        # (every * i + phase + 0.5) / height = a * (i + 0.5) / rows + b: y_view = (y - b) / a.
        a = every * rows / height
        b = (phase + 0.5 - every / 2) / height
        scale = targets.new_tensor([1, 1 / a, 1, 1 / a, 1 / a, 1, 1, 1])
        offset = targets.new_tensor([0, -b / a, 0, 0, 0, 0, 0, 0])
        target = targets[..., phase::every, :].contiguous() if every > 1 else targets
        views.append(RowView(target, rows, scale, offset))
    return views
