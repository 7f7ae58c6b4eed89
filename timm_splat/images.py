"""Turn whatever a user holds into float RGB tensors ``[3, H, W]`` in [0, 1].

Accepted: PIL images of any mode (turned upright by their EXIF orientation; 16-bit modes scaled
by 65535), numpy arrays (HW or HWC; uint8, uint16, bool or float in [0, 1]), torch tensors
(``[3, H, W]`` / ``[B, 3, H, W]``, uint8 or float in [0, 1]; 1 or 4 channels are made RGB too),
and lists of those. Anything else, float pixels outside [0, 1] and undecodable files raise a
ValueError saying what was wrong.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps


def _from_pil(image) -> torch.Tensor:
    try:
        image = ImageOps.exif_transpose(image)  # the way a viewer shows it (phone photos)
        return _decoded_pil(image)
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # truncated, corrupt
        raise ValueError(f"cannot decode the image: {exc}") from exc


def _decoded_pil(image) -> torch.Tensor:
    mode = image.mode
    if mode.startswith("I;16"):  # 16 bits per pixel, however dark the image is
        return _from_numpy(np.asarray(image).astype(np.float32) / 65535.0)
    if mode in ("I", "F"):
        # 32-bit int / float greyscale (Image.convert("RGB") would clip it to 8 bits): PIL
        # makes these from 8-bit and 16-bit data, so the value range says which it was.
        array = np.asarray(image).astype(np.float32)
        high = float(array.max()) if array.size else 0.0
        peak = 1.0 if mode == "F" and high <= 1.0 else 255.0 if high <= 255 else 65535.0
        return _from_numpy(array / peak)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA").convert("RGB")  # drop alpha, the way timm's loaders do
    elif mode != "RGB":
        try:
            image = image.convert("RGB")
        except ValueError as exc:
            raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {exc}") from exc
    return _from_numpy(np.asarray(image))


# Float pixels a hair outside [0, 1] (resampling overshoot, rounding) are clamped; further out
# they were not meant as [0, 1] images, and fitting them as they are gives garbage.
FLOAT_SLACK = 1e-3


def _check_range(low: float, high: float, what: str) -> None:
    """ValueError unless float pixels with this min and max are finite and in [0, 1] (give or
    take FLOAT_SLACK)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError(f"{what} contains NaN or infinite values")
    if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
        raise ValueError(
            f"float pixel values must be in [0, 1], got [{low:.4g}, {high:.4g}]: divide 0..255 "
            "images by 255, and undo mean/std normalisation first"
        )


def _from_numpy(array: np.ndarray) -> torch.Tensor:
    if array.dtype == np.uint8:
        data = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        data = array.astype(np.float32) / 65535.0
    elif array.dtype == np.bool_ or np.issubdtype(array.dtype, np.floating):
        data = array.astype(np.float32)
    else:
        raise ValueError(f"numpy images must be uint8, uint16, bool or float, got {array.dtype}")
    if data.size:
        _check_range(float(data.min()), float(data.max()), "numpy image")
    data = data.clip(0, 1)
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim != 3:
        raise ValueError(f"numpy images must be HxW or HxWxC, got shape {array.shape}")
    return _to_rgb(torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1), array.shape)


def _to_rgb(chw: torch.Tensor, shape) -> torch.Tensor:
    channels = chw.shape[0]
    if channels == 1:
        chw = chw.expand(3, -1, -1)
    elif channels == 4:
        chw = chw[:3]
    elif channels != 3:
        raise ValueError(
            f"images need 1, 3 or 4 channels (grey, RGB, RGBA), got {channels} in shape "
            f"{tuple(shape)}"
        )
    return chw


def _from_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]`` / ``[B, 3, H, W]`` (or one / four channels) -> float32 ``[B, 3, H, W]``."""
    if tensor.layout != torch.strided:
        raise ValueError(
            f"image tensors must be dense, got a {tensor.layout} tensor: .to_dense() it"
        )
    if tensor.device.type == "meta":
        raise ValueError("image tensors must hold pixels, got a tensor on the meta device")
    if tensor.dim() == 2:
        tensor = tensor[None, None]
    elif tensor.dim() == 3:
        tensor = tensor[None]
    elif tensor.dim() != 4:
        raise ValueError(
            f"image tensors must be [3, H, W] or [B, 3, H, W], got {tuple(tensor.shape)}"
        )
    if tensor.dtype == torch.uint8:
        batch = tensor.float() / 255.0
    elif tensor.dtype == torch.bool:
        batch = tensor.float()
    elif tensor.is_floating_point():
        # One pass and one host sync for the whole batch: min and max also carry NaN and inf.
        if tensor.numel():
            _check_range(*(float(v) for v in torch.aminmax(tensor)), "image tensor")
        batch = tensor.float().clamp(0, 1)
    else:
        raise ValueError(f"image tensors must be uint8 or float, got {tensor.dtype}")
    channels = batch.shape[1]
    if channels == 1:
        batch = batch.expand(-1, 3, -1, -1)
    elif channels == 4:
        batch = batch[:, :3]
    elif channels != 3:
        raise ValueError(
            f"images need 1, 3 or 4 channels (grey, RGB, RGBA), got {channels} in shape "
            f"{tuple(tensor.shape)}"
        )
    if batch.shape[-1] == 0 or batch.shape[-2] == 0:
        raise ValueError(f"empty image: shape {tuple(tensor.shape)}")
    return batch.contiguous()


def to_rgb_batch(images: torch.Tensor) -> torch.Tensor:
    """A tensor batch ``[B, C, H, W]`` (or one image) as float32 RGB ``[B, 3, H, W]``, on its
    device and without splitting it into images."""
    try:
        return _from_tensor(images)
    except ValueError as error:
        raise ValueError(f"images: {error}") from None


def to_rgb_tensors(images: Any) -> list[torch.Tensor]:
    """Normalise ``images`` to a non-empty list of float32 ``[3, H, W]`` tensors."""
    if isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("no images given: expected at least one image")
    out: list[torch.Tensor] = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, torch.Tensor):
                converted = list(_from_tensor(item).unbind(0))
            elif isinstance(item, np.ndarray):
                converted = [_from_numpy(item)]
            elif isinstance(item, Image.Image):
                converted = [_from_pil(item)]
            else:
                converted = None
        except ValueError as error:
            raise ValueError(f"image {index}: {error}") from None
        if converted is None:
            raise ValueError(
                f"image {index}: expected a PIL image, numpy array or torch tensor, "
                f"got {type(item).__name__}"
            )
        for chw in converted:
            if chw.shape[-1] == 0 or chw.shape[-2] == 0:
                raise ValueError(f"image {index} is empty: shape {tuple(chw.shape)}")
            out.append(chw.contiguous())
    if not out:
        raise ValueError("no images given: the batch is empty")
    return out
