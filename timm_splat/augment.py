"""Augmentation of splats themselves, exact where pixels allow it: an image is the plain sum of
its Gaussians, so a flip, a crop-and-zoom or a linear colour change of the image is the same map
applied to every splat, and Mixup of two images is the union of their splat sets.

- :class:`SplatAugment`: per-sample random flip, random resized crop (zoom) and colour jitter
  (brightness, saturation, hue), for a dataset transform after :class:`SplatTransform`.
- :class:`SplatMixup`: timm's ``Mixup`` (same arguments, same soft targets) for splat batches.
"""

from __future__ import annotations

import math

import torch
from timm.data.mixup import Mixup, cutmix_bbox_and_lam, mixup_target

from .reference import CUTOFF_SIGMA
from .splats import COLOR, L11, L21, L22, LUMINANCE_WEIGHTS, pack_real_first, splat_mask


def hflip(splats: torch.Tensor) -> torch.Tensor:
    """The splats of the mirrored image: x -> 1 - x and the shear changes sign."""
    out = splats.clone()
    real = splat_mask(splats)
    out[..., 0] = torch.where(real, 1 - splats[..., 0], splats[..., 0])
    out[..., L21] = -splats[..., L21]
    return out


def crop(splats: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """The splats of the image region ``box = (x0, y0, width, height)`` (normalised
    coordinates) stretched to the whole frame; splats that no longer touch the frame become
    padding rows (at the end)."""
    x0, y0, width, height = box
    out = splats.clone()
    out[..., 0] = (splats[..., 0] - x0) / width
    out[..., 1] = (splats[..., 1] - y0) / height
    out[..., L11] = splats[..., L11] / width
    out[..., L21] = splats[..., L21] / height
    out[..., L22] = splats[..., L22] / height
    # The cut-off ellipse's half extents (as in the renderer): drop splats outside the frame.
    rx = CUTOFF_SIGMA * out[..., L11]
    ry = CUTOFF_SIGMA * torch.sqrt(out[..., L21] ** 2 + out[..., L22] ** 2)
    x, y = out[..., 0], out[..., 1]
    inside = (x + rx > 0) & (x - rx < 1) & (y + ry > 0) & (y - ry < 1) & splat_mask(splats)
    return pack_real_first(out * inside.unsqueeze(-1).to(out.dtype))


def color_matrix(brightness: float = 1.0, saturation: float = 1.0, hue: float = 0.0):
    """The 3x3 linear map of RGB that scales brightness, mixes towards grey (saturation) and
    rotates hue (``hue`` in turns) about the grey axis."""
    grey = torch.tensor(LUMINANCE_WEIGHTS).expand(3, 3)
    matrix = saturation * torch.eye(3) + (1 - saturation) * grey
    angle = 2 * math.pi * hue
    axis = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = (
        math.cos(angle) * torch.eye(3)
        + math.sin(angle) * cross
        + (1 - math.cos(angle)) * torch.outer(axis, axis)
    )
    return brightness * rotation @ matrix


def recolor(splats: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Every splat's colour through ``matrix``: the image through the same linear map."""
    out = splats.clone()
    out[..., COLOR] = splats[..., COLOR] @ matrix.to(splats).T
    return out


class SplatAugment:
    """Random flip, resized crop and colour jitter of one image's splats ``[N, 8]``.

    ``scale`` / ``ratio``: area share and aspect range of the crop, as torchvision's
    RandomResizedCrop (``scale=(1, 1)`` turns cropping off); ``brightness`` / ``saturation``:
    the largest relative change; ``hue``: the largest rotation in turns."""

    def __init__(
        self,
        hflip: float = 0.5,
        scale=(0.5, 1.0),
        ratio=(3 / 4, 4 / 3),
        brightness: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        if not 0 <= hflip <= 1 or not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(
                f"bad SplatAugment ranges: hflip={hflip}, scale={scale}, ratio={ratio}"
            )
        self.hflip, self.scale, self.ratio = hflip, scale, ratio
        self.brightness, self.saturation, self.hue = brightness, saturation, hue
        self.generator = generator

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.generator))

    def __call__(self, splats: torch.Tensor) -> torch.Tensor:
        if self._uniform(0, 1) < self.hflip:
            splats = hflip(splats)
        if self.scale != (1.0, 1.0):
            area = self._uniform(*self.scale)
            aspect = math.exp(self._uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
            width = min(1.0, math.sqrt(area * aspect))
            height = min(1.0, math.sqrt(area / aspect))
            box = (self._uniform(0, 1 - width), self._uniform(0, 1 - height), width, height)
            splats = crop(splats, box)
        matrix = color_matrix(
            self._uniform(1 - self.brightness, 1 + self.brightness),
            self._uniform(1 - self.saturation, 1 + self.saturation),
            self._uniform(-self.hue, self.hue),
        )
        return recolor(splats, matrix)


class SplatMixup(Mixup):
    """timm's ``Mixup`` / CutMix for splat batches ``[B, N, 8]``, batch mode: the same arguments,
    random draws and soft targets as timm's (``timm.data.Mixup``).

    Mixup is exact: each image's splats with colours times ``lam`` joined with its partner's
    (the batch flipped, as timm pairs them) times ``1 - lam`` render ``lam * A + (1 - lam) * B``,
    so the batch holds 2N splat rows. CutMix keeps A's splats whose centres fall outside a box
    and B's inside it (Gaussians across the box edge are kept whole), also in 2N rows; ``lam`` is
    the share of the frame outside the box."""

    def __init__(self, *args, cutmix_grid: int = 224, **kwargs):
        super().__init__(*args, **kwargs)
        if self.mode != "batch":
            raise ValueError("SplatMixup mixes whole batches only (mode='batch')")
        self.cutmix_grid = cutmix_grid  # the pixel grid CutMix boxes are drawn on

    def __call__(self, x: torch.Tensor, target: torch.Tensor):
        if len(x) % 2:
            raise ValueError(f"Mixup pairs images: the batch size must be even, got {len(x)}")
        lam, use_cutmix = self._params_per_batch()
        partner = x.flip(0)
        if lam == 1.0:
            mixed = x
        elif use_cutmix:
            grid = self.cutmix_grid
            (top, bottom, left, right), lam = cutmix_bbox_and_lam(
                (grid, grid), lam, ratio_minmax=self.cutmix_minmax, correct_lam=self.correct_lam
            )
            xs, ys = x[..., 0] * grid, x[..., 1] * grid
            px, py = partner[..., 0] * grid, partner[..., 1] * grid
            outside = ~((xs >= left) & (xs < right) & (ys >= top) & (ys < bottom))
            inside = (px >= left) & (px < right) & (py >= top) & (py < bottom)
            mixed = torch.cat([x * outside.unsqueeze(-1), partner * inside.unsqueeze(-1)], dim=1)
            mixed = pack_real_first(mixed)
        else:
            mixed = torch.cat(
                [recolor(x, torch.eye(3) * lam), recolor(partner, torch.eye(3) * (1 - lam))], dim=1
            )
        target = mixup_target(target, self.num_classes, lam, self.label_smoothing, self.multi_label)
        return mixed, target
