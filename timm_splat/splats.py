"""The Splats tensor: ``[..., N, 8]`` floats, channels ``(x, y, l11, l21, l22, r, g, b)``.

Means are in normalised image coordinates (pixel (row i, col j) of an H x W image has its centre
at ``((j + 0.5) / W, (i + 0.5) / H)``); the Cholesky factor ``L = [[l11, 0], [l21, l22]]`` of the
covariance ``L L^T`` is in the same units, so one fit renders at any resolution. A row with
``l11 <= 0`` is padding ("no splat"); every consumer derives the mask from ``l11 > 0``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SPLAT_CHANNELS = 8
# The splat budget per image when nobody says otherwise (the paper's N=400, 23.5x compression
# of a 224x224 image). Every default in the package refers to this one constant.
DEFAULT_NUM_SPLATS = 400
CHANNEL_NAMES = ("x", "y", "l11", "l21", "l22", "r", "g", "b")
XY = slice(0, 2)
CHOLESKY = slice(2, 5)
COLOR = slice(5, 8)
L11, L21, L22 = 2, 3, 4  # the Cholesky factor's entries
# The thinnest a real splat may be (normalised units; a 224 px image's pixel is 4.5e-3): below
# it, 1 / l^2 overflows float32 in the renderer.
MIN_CHOLESKY = 1e-12
BYTES_PER_SPLAT_FP16 = SPLAT_CHANNELS * 2

# BT.709 luma weights, applied to |colour| to score a splat's visual weight (used for pruning).
LUMINANCE_WEIGHTS = (0.2126, 0.7152, 0.0722)


def splat_mask(splats: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` bool: True for real splats, False for padding rows."""
    return splats[..., L11] > 0


def splat_count(splats: torch.Tensor) -> torch.Tensor:
    """``[...]`` number of real splats per splat set."""
    return splat_mask(splats).sum(-1)


def luminance(splats: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` BT.709 luminance of |colour|; the pruning score of the paper."""
    weights = splats.new_tensor(LUMINANCE_WEIGHTS)
    return (splats[..., COLOR].abs() * weights).sum(-1)


def check_splats(splats: torch.Tensor, name: str = "splats") -> None:
    """Raise ValueError when ``splats`` is not a valid Splats tensor."""
    if not isinstance(splats, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor [..., N, 8], got {type(splats).__name__}")
    if splats.dim() < 2 or splats.shape[-1] != SPLAT_CHANNELS:
        raise ValueError(
            f"{name} must have shape [..., N, 8] with channels {CHANNEL_NAMES}, "
            f"got {tuple(splats.shape)}"
        )
    if not splats.is_floating_point():
        raise ValueError(f"{name} must be a floating point tensor, got {splats.dtype}")
    if not bool(torch.isfinite(splats).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    real = splat_mask(splats)
    if bool((real & (splats[..., L22] <= 0)).any()):
        raise ValueError(
            f"{name} has splats with l11 > 0 but l22 <= 0; a real splat needs l11 > 0 and l22 > 0 "
            "(an all-zero row is padding)"
        )
    if bool((real & ((splats[..., L11] < MIN_CHOLESKY) | (splats[..., L22] < MIN_CHOLESKY))).any()):
        raise ValueError(
            f"{name} has splats with l11 or l22 below {MIN_CHOLESKY:g}: the renderer divides by "
            "their squares, which overflow; such splats are invisible, drop them"
        )


def to_fp16(splats: torch.Tensor) -> torch.Tensor:
    """``splats`` as fp16 on the CPU, the storage format; ValueError when fp16 cannot hold them
    (a value beyond +-65504, or a real splat so thin that l11 or l22 rounds to 0)."""
    check_splats(splats)
    half = splats.detach().to("cpu", torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise ValueError(
            "splats hold values beyond fp16's range (+-65504): they cannot be "
            "stored as fp16; check the fit that made them"
        )
    real = splat_mask(splats.detach().cpu())
    if bool((real & ((half[..., L11] <= 0) | (half[..., L22] <= 0))).any()):
        raise ValueError(
            "splats have l11 or l22 below fp16's smallest value (6e-8): they would "
            "be stored as padding or invalid rows; drop or widen them first"
        )
    return half.contiguous()


def to_fp16_bytes(splats: torch.Tensor) -> bytes:
    """Pack splats as little-endian fp16, 16 bytes per splat (the paper's storage format)."""
    array = to_fp16(splats).numpy()
    return array.astype("<f2", copy=False).tobytes()


def from_fp16_bytes(data: bytes, num_splats: int | None = None) -> torch.Tensor:
    """Inverse of :func:`to_fp16_bytes`: ``[N, 8]`` float32 (or ``[B, num_splats, 8]``)."""
    if len(data) % BYTES_PER_SPLAT_FP16:
        raise ValueError(
            f"splat bytes must be a multiple of {BYTES_PER_SPLAT_FP16} (8 fp16 values per splat), "
            f"got {len(data)} bytes"
        )
    if num_splats is not None and (
        isinstance(num_splats, bool) or not isinstance(num_splats, int) or num_splats < 1
    ):
        raise ValueError(f"num_splats must be a positive int, got {num_splats!r}")
    splats = torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))
    splats = splats.reshape(-1, SPLAT_CHANNELS)
    if num_splats is not None:
        if splats.shape[0] % num_splats:
            raise ValueError(f"{splats.shape[0]} splats do not split into sets of {num_splats}")
        splats = splats.reshape(-1, num_splats, SPLAT_CHANNELS)
    check_splats(splats, "splat bytes")  # fp16 bytes may hold NaN, inf or invalid rows
    return splats


def compression_ratio(num_splats, height: int = 224, width: int = 224) -> float:
    """Raw uint8 RGB bytes over fp16 splat bytes: ``H*W*3 / (N*16)``.

    ``num_splats`` may be an int or a Splats tensor (its real splats are counted, averaged
    over the batch)."""
    if isinstance(num_splats, torch.Tensor):
        num_splats = float(splat_count(num_splats).float().mean())
    if num_splats <= 0:
        return float("inf")
    return height * width * 3 / (num_splats * BYTES_PER_SPLAT_FP16)


def pack_real_first(splats: torch.Tensor) -> torch.Tensor:
    """Move real splats to the front of each set and zero every padding row, keeping order."""
    real = splat_mask(splats)
    order = torch.argsort((~real).to(torch.int8), dim=-1, stable=True)
    packed = torch.gather(splats, -2, order.unsqueeze(-1).expand_as(splats))
    return packed * splat_mask(packed).unsqueeze(-1).to(packed.dtype)


def pad_splats(sets, num_splats: int | None = None) -> torch.Tensor:
    """Stack splat sets ``[n_i, 8]`` (any float dtype, e.g. fp16 rows of a pre-fitted dataset)
    into float32 ``[B, N, 8]``, padding each with zero rows (the padding convention) to
    ``num_splats``, or else to the longest set."""
    sets = [torch.as_tensor(s) for s in sets]
    if not sets:
        raise ValueError("pad_splats takes at least one splat set")
    for s in sets:
        if s.dim() != 2 or s.shape[-1] != SPLAT_CHANNELS:
            raise ValueError(f"expected splats [N, {SPLAT_CHANNELS}] per set, got {tuple(s.shape)}")
    sets = [s.float() for s in sets]
    longest = max(len(s) for s in sets)
    if num_splats is not None and longest > num_splats:
        real = max(int(splat_count(s)) for s in sets)
        raise ValueError(
            f"got {longest} pre-fitted splat rows ({real} real) but num_splats={num_splats}: "
            f"use num_splats >= {longest}, or drop padding rows first (pack_real_first moves "
            "them to the end)"
        )
    width = longest if num_splats is None else num_splats
    return torch.stack([F.pad(s, (0, 0, 0, width - len(s))) for s in sets])


def save_splats(path, splats: torch.Tensor, **metadata) -> None:
    """Write one image's splats ``[N, 8]`` to a safetensors file as fp16 (real splats only).

    ``metadata`` (e.g. height, width, psnr) is stored as strings in the file's header."""
    from safetensors.torch import save_file

    check_splats(splats)
    if splats.dim() != 2:
        raise ValueError(f"save_splats takes one image's splats [N, 8], got {tuple(splats.shape)}")
    real = to_fp16(splats[splat_mask(splats)])
    meta = {key: str(value) for key, value in metadata.items()}
    save_file({"splats": real}, str(path), meta)


def load_splats(path) -> tuple[torch.Tensor, dict[str, str]]:
    """Read a file written by :func:`save_splats`: ``(splats [N, 8] float32, metadata)``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            splats, metadata = f.get_tensor("splats"), dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for bad headers
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(f"{path} is not a splat file ({type(exc).__name__}: {exc})") from exc
    check_splats(splats, f"splats in {path}")  # before .float(): ints and bools are refused
    return splats.float(), metadata
