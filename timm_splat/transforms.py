"""A torchvision-style dataset transform: images in, Splats tensors ``[num_splats, 8]`` out.

Geometry follows timm's eval transform (resize the shorter side to ``image_size / crop_pct``,
centre-crop ``image_size``), then :func:`~timm_splat.fitting.fit_splats` fits the crop. Two ways
to use it::

    t = SplatTransform(num_splats=400, image_size=224)
    # per sample: each DataLoader worker fits one image at a time
    loader = DataLoader(ImageFolder(root, transform=t), batch_size=64)
    # per batch (faster): workers only resize and crop, each batch is fitted in one call
    loader = DataLoader(ImageFolder(root, transform=t.image_transform), batch_size=64,
                        collate_fn=t.collate)

Already-fitted splats ``[n, 8]`` pass through both paths (padded to ``num_splats``), so a
pre-fitted dataset works with the same pipeline.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import default_collate
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .fitting import fit_splats, resolve_config
from .images import Image, to_rgb_tensors
from .splats import DEFAULT_NUM_SPLATS, SPLAT_CHANNELS, check_splats, pad_splats

# What timm uses when a config has no crop_pct (timm.data.DEFAULT_CROP_PCT).
TIMM_DEFAULT_CROP_PCT = 0.875
# The modes torchvision can resize float tensors with (box / hamming / lanczos are PIL-only).
INTERPOLATIONS = {
    m.value: m
    for m in (
        InterpolationMode.NEAREST,
        InterpolationMode.NEAREST_EXACT,
        InterpolationMode.BILINEAR,
        InterpolationMode.BICUBIC,
    )
}
CROP_MODES = ("center", "squash")
# A resized side longer than this many crop sides (an extreme aspect ratio) is resized only
# where the crop keeps it: memory stays bounded by the crop, as fit_splats' max_size bounds its.
_MAX_RESIZE_RATIO = 4
_ACCEPTED = (
    "a PIL image, a numpy array (HW or HWC), an image tensor [3, H, W] (uint8, or float in "
    "[0, 1]) or fitted splats [n, 8] (float)"
)


def _is_splats(x) -> bool:
    # 2-D float with 8 columns: a splat set. Image tensors are 3-D ([C, H, W]), so no clash.
    return (
        isinstance(x, torch.Tensor)
        and x.dim() == 2
        and x.shape[-1] == SPLAT_CHANNELS
        and x.is_floating_point()
    )


def _positive_int(value, name: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return number


def _image_size(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"image_size must be an int or (H, W), got {value!r}")
        return _positive_int(value[0], "image_size[0]"), _positive_int(value[1], "image_size[1]")
    size = _positive_int(value, "image_size")
    return size, size


class SplatTransform:
    """Resize, centre-crop and fit an image into ``num_splats`` splats ``[num_splats, 8]``.

    Args:
        num_splats: splat budget per image; the output is padded with zero rows to it.
        image_size: crop size, an int or ``(H, W)``.
        crop_pct: the crop's share of the resized image (timm's convention): the shorter side is
            resized to ``image_size / crop_pct``. 1.0 keeps the whole shorter side.
        interpolation: "bicubic", "bilinear", "nearest" or "nearest-exact" (antialiased).
        device: where to fit (default: CPU); fitted splats stay there.
        crop_mode: "center" (keep aspect ratio) or "squash" (resize each side to
            ``image_size / crop_pct``, then crop), as in timm.
        **fit_options: any :class:`~timm_splat.fitting.FitConfig` field (iterations, seed, ...),
            checked here so a typo fails before the first sample.
    """

    def __init__(
        self,
        num_splats: int = DEFAULT_NUM_SPLATS,
        image_size: int | tuple[int, int] = 224,
        crop_pct: float = 1.0,
        interpolation: str | InterpolationMode = "bicubic",
        device: str | torch.device | None = None,
        *,
        crop_mode: str = "center",
        **fit_options,
    ):
        self.num_splats = _positive_int(num_splats, "num_splats")
        self.image_size = _image_size(image_size)
        real = isinstance(crop_pct, numbers.Real) and not isinstance(crop_pct, bool)
        if not real or not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be a number in (0, 1], got {crop_pct!r}")
        self.crop_pct = float(crop_pct)
        mode = getattr(interpolation, "value", interpolation)  # InterpolationMode or str
        if mode not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.interpolation = INTERPOLATIONS[mode]
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
        self.crop_mode = crop_mode
        self.device = None if device is None else torch.device(device)
        # Bad options fail now, not per sample.
        self.fit_config = resolve_config(None, dict(fit_options, num_splats=self.num_splats))
        self.fit_options = dict(fit_options)

    @classmethod
    def from_config(cls, cfg, **overrides) -> SplatTransform:
        """Build the transform a timm model's pixels would get, from its data config.

        ``cfg``: a splat model (its data config and budget), or a dict:
        ``timm.data.resolve_model_data_config(model)`` or ``model.pretrained_cfg``;
        ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode`` and ``num_splats``
        (default :data:`~timm_splat.splats.DEFAULT_NUM_SPLATS`) are read, ``overrides`` (any
        ``__init__`` argument) win. ``mean`` and
        ``std`` are ignored on purpose: splats are fitted to raw [0, 1] colours and the model
        normalises splat features itself.
        """
        if isinstance(cfg, torch.nn.Module):
            from timm.data import resolve_model_data_config

            model = cfg
            cfg = dict(resolve_model_data_config(model))
            cfg["num_splats"] = getattr(model, "num_splats", None)
        if not isinstance(cfg, Mapping):
            raise TypeError(
                "from_config takes a splat model or a dict: timm.data.resolve_model_data_config"
                f"(model) or model.pretrained_cfg, got {type(cfg).__name__}"
            )
        kwargs = {
            "num_splats": cfg.get("num_splats") or DEFAULT_NUM_SPLATS,
            "image_size": tuple(cfg.get("input_size") or (3, 224, 224))[-2:],
            "crop_pct": cfg.get("crop_pct") or TIMM_DEFAULT_CROP_PCT,
            "interpolation": cfg.get("interpolation") or "bicubic",
            "crop_mode": cfg.get("crop_mode") or "center",
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def __call__(self, img) -> torch.Tensor:
        """``img`` (see :meth:`image_transform`) -> float32 splats ``[num_splats, 8]``."""
        pixels = self.image_transform(img)
        if _is_splats(pixels):
            return pixels
        return self._fit([pixels])[0]

    def image_transform(self, img) -> torch.Tensor:
        """The pixel part alone: resize + centre-crop to a float32 ``[3, H, W]`` tensor in [0, 1].

        Fitted splats ``[n, 8]`` pass through, as float32 padded to ``[num_splats, 8]``."""
        if _is_splats(img):
            return self._pad(img)
        return self._resize_crop(self._to_pixels(img))

    def collate(self, batch) -> torch.Tensor | tuple:
        """DataLoader ``collate_fn`` that fits a whole batch in one :func:`fit_splats` call.

        ``batch``: samples that are each an :meth:`image_transform` output (raw images and
        fitted splats work too), or tuples / lists ``(that, label, ...)``. Returns splats
        ``[B, num_splats, 8]``, or ``(splats, *rest)`` with the rest collated by
        ``default_collate``. With the default grid init each fit equals :meth:`__call__`'s
        exactly; ``init="random"`` draws an image's start by its place in the batch, so it
        does not.
        """
        if not isinstance(batch, (list, tuple)) or not batch:
            raise ValueError(f"collate takes a non-empty list of samples, got {batch!r:.80}")
        tupled = [isinstance(sample, (tuple, list)) for sample in batch]
        if any(tupled) and not all(tupled):
            raise TypeError(
                "collate: either every sample is a tuple (pixels, label, ...) or none is"
            )
        if any(tupled) and any(len(sample) == 0 for sample in batch):
            raise ValueError("collate: empty tuple sample; expected (pixels, label, ...)")
        # image_transform is a cheap no-op on its own outputs and makes raw images work too.
        items = [self.image_transform(s[0] if t else s) for s, t in zip(batch, tupled)]
        splats = torch.zeros(len(items), self.num_splats, SPLAT_CHANNELS, device=self.device)
        to_fit = []
        for index, item in enumerate(items):
            if _is_splats(item):
                splats[index] = item.to(splats.device)
            else:
                to_fit.append(index)
        if to_fit:  # one call: fit_splats batches same-size images through its batched kernels
            splats[to_fit] = self._fit([items[i] for i in to_fit])
        if not tupled[0]:
            return splats
        rest = default_collate([sample[1:] for sample in batch]) if len(batch[0]) > 1 else []
        return (splats, *rest)

    def __repr__(self) -> str:
        height, width = self.image_size
        size = height if height == width else self.image_size
        args = [
            f"num_splats={self.num_splats}",
            f"image_size={size}",
            f"crop_pct={self.crop_pct}",
            f"interpolation={self.interpolation.value!r}",
            f"crop_mode={self.crop_mode!r}",
            f"device={None if self.device is None else str(self.device)!r}",
        ] + [f"{name}={value!r}" for name, value in self.fit_options.items()]
        return f"{type(self).__name__}({', '.join(args)})"

    # -- internals ------------------------------------------------------------------------

    def _fit(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        result = fit_splats(pixels, self.fit_config, progress=False, device=self.device)
        return result.splats.to(torch.float32)

    def _pad(self, splats: torch.Tensor) -> torch.Tensor:
        check_splats(splats)
        return pad_splats([splats.detach().cpu()], self.num_splats)[0]

    def _to_pixels(self, img) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            if img.dim() == 4:
                raise ValueError(
                    f"SplatTransform takes one image, got a batch {tuple(img.shape)}; use "
                    "collate (or fit_splats) for batches"
                )
            if img.dim() not in (2, 3):
                raise ValueError(f"expected {_ACCEPTED}; got a tensor of shape {tuple(img.shape)}")
            if img.dim() == 3 and img.shape[-1] == SPLAT_CHANNELS and img.shape[0] not in (1, 3, 4):
                raise ValueError(
                    f"got a tensor {tuple(img.shape)}: a batch of splat sets [B, N, 8]? "
                    "SplatTransform takes one image or one splat set [n, 8]; pass the sets one "
                    "by one"
                )
        elif not isinstance(img, np.ndarray) and not isinstance(img, Image.Image):
            raise TypeError(f"expected {_ACCEPTED}; got {type(img).__name__}")
        return to_rgb_tensors(img)[0]  # any PIL mode / dtype -> float [3, H, W] in [0, 1]

    def _resize_crop(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        crop = self.image_size
        scale_h, scale_w = (math.floor(side / self.crop_pct) for side in crop)
        if self.crop_mode == "squash":
            size = (scale_h, scale_w)
        elif scale_h == scale_w:  # torchvision Resize(int): shorter side to it, longer truncated
            short, long = sorted((height, width))
            size = (scale_h, int(scale_h * long / short))
            size = size if height <= width else size[::-1]
        else:  # timm's ResizeKeepRatio: the smallest scale that covers (scale_h, scale_w)
            ratio = min(height / scale_h, width / scale_w)
            size = (round(height / ratio), round(width / ratio))
        if any(side > _MAX_RESIZE_RATIO * c for side, c in zip(size, crop)):
            return self._resize_crop_part(pixels, size, crop).contiguous()
        if size != (height, width):
            pixels = TF.resize(pixels, list(size), interpolation=self.interpolation, antialias=True)
            pixels = pixels.clamp(0, 1)  # bicubic overshoots at edges
        if size != crop:
            pixels = TF.center_crop(pixels, list(crop))
        return pixels.contiguous()

    def _resize_crop_part(self, pixels: torch.Tensor, size, crop) -> torch.Tensor:
        """Resize + centre-crop of an image far longer than the crop on some side (a 10000 x 1
        strip resized to 224 high is 2.2M pixels wide): only the part of the source the crop
        keeps (and the filter's reach around it) is resized, so memory follows the crop, not
        the source's aspect ratio."""
        parts, lengths, offsets = [], [], []
        for axis, (resized, c) in enumerate(zip(size, crop)):
            source = pixels.shape[-2 + axis]
            factor = resized / source
            start = int(round((resized - c) / 2.0))  # TF.center_crop's offset
            # Bicubic reaches 2 source pixels (2 / factor when antialiased downsampling).
            margin = math.ceil(2 / min(factor, 1.0)) + 2
            low = max(0, math.floor(start / factor) - margin)
            high = min(source, math.ceil((start + c) / factor) + margin)
            parts.append(slice(low, high))
            lengths.append(max(c, round((high - low) * factor)))
            offsets.append(int(round(start - low * factor)))
        part = pixels[..., parts[0], parts[1]]
        part = TF.resize(part, lengths, interpolation=self.interpolation, antialias=True)
        part = part.clamp(0, 1)
        height, width = crop
        top, left = (min(max(0, o), n - c) for o, n, c in zip(offsets, lengths, crop))
        return part[..., top : top + height, left : left + width]
