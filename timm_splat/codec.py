"""The ``.splat`` byte format: one image's splats, quantised and entropy coded.

Layout (little-endian)::

    offset size  field
    0      4     magic b"SPLT"
    4      1     version (2; version 1 files, without the checksum, still decode)
    5      1     entropy stage: 0 stored, 1 zlib (raw deflate), 2 lzma (raw LZMA2)
    6      4     count: real splats, at most MAX_SPLATS
    10     1     position_bits  p: x, y on the grid 2^-p (normalised units)
    11     1     scale_bits     s: log l11, log l22 on the grid 2^-s
    12     1     shear_bits     h: l21 / l22 on the grid 2^-h
    13     1     colour_bits    c: r, g, b on the grid 2^-c
    14     2     height         of the image the splats were fitted to (0: not recorded)
    16     2     width          (the splats render at any size; this is the one they came from)
    18     4     CRC-32 of bytes 0-17 and the payload (version 2 only; zlib.crc32)
    22     ...   payload, through the entropy stage (from offset 18 in version 1)

Every value is an integer ``q`` times a power of two, so the decoded float32 values are exact
and quantising them again gives the same integers: ``encode(decode(b)) == b`` for any bytes
``encode`` wrote, and ``decode(encode(s))`` is ``quantize(s)``. Before the entropy stage the
payload is seven columns of integers (for each: its minimum as a zigzag varint, a byte width
``w`` <= 8, then the ``count`` values minus the minimum as ``w`` byte planes, most significant
plane first), in this order: the Morton code of (x, y) as deltas in sorted order (the splats are
stored in Morton order of their quantised position: the image is the plain sum of the splats,
so their order does not matter), log l11, log l22, the shear, and the colour as the lossless
integer YCoCg-R transform of (r, g, b) (Y, Co, Cg). Byte planes give the byte-oriented
compressors one distribution at a time; the encoder keeps whichever entropy stage is smallest.

:func:`decode` takes untrusted bytes: anything malformed (truncated, wrong magic or version, a
count above :data:`MAX_SPLATS`, trailing bytes, a payload that decompresses to more than the
header allows) raises ValueError, and nothing larger than the header's count allows is
allocated. Bytes damaged on a wire or a disk mostly still parse (version 1: 854 of 1,048
single-bit flips of a stored file decoded into other splats), hence version 2's checksum: a
CRC-32 catches every error burst of up to 32 bits and all but 2^-32 of the rest, so a damaged
file is a ValueError, not different splats.
"""

from __future__ import annotations

import lzma
import math
import struct
import zlib
from typing import NamedTuple

import numpy as np
import torch

from .splats import MIN_CHOLESKY, SPLAT_CHANNELS, check_splats, splat_mask

MAGIC = b"SPLT"
VERSION = 2  # what encode writes; decode reads VERSIONS
VERSIONS = (1, 2)
# A decoder's allocation is bounded by this: 65536 splats is 164x the default budget (400) and
# more than a 224 x 224 image has pixels.
MAX_SPLATS = 1 << 16
HEADER = struct.Struct("<4sBBIBBBBHH")  # the fields, in both versions
CHECKSUM = struct.Struct("<I")  # version 2: CRC-32 of the fields and the payload
STORED, ZLIB, LZMA = 0, 1, 2
METHODS = {"stored": STORED, "zlib": ZLIB, "lzma": LZMA}
COLUMNS = 7  # morton deltas, log l11, log l22, shear, Y, Co, Cg
# |q| stays below 2^24 so that q * 2^-k is exact in float32 (the idempotent round trip).
MAX_Q = 1 << 24
# The shear is stored times l22: float32's rounding of that product (2^-24 relative) must stay
# below half a grid step for the round trip to be exact.
MAX_SHEAR_Q = 1 << 20
MAX_BITS = 20
# The largest payload a count allows: every column's varint minimum (10 bytes), width byte and
# 8 planes.
_COLUMN_OVERHEAD = 11
# Raw LZMA2 (no container: the header says what it is). lc=0, pb=0: the byte planes have no
# useful previous-byte or alignment context (measured: 0.1-1% smaller than the defaults); a 64
# KiB dictionary holds a few thousand splats' payload and keeps encode and decode under a
# millisecond (preset 9's 64 MiB dictionary cost 78 ms per encode for the same bytes).
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "dict_size": 1 << 16, "lc": 0, "pb": 0}]


class CodecSpec(NamedTuple):
    """Quantisation grids, as bits after the binary point (step ``2^-bits``)."""

    position_bits: int = 10
    scale_bits: int = 4
    shear_bits: int = 3
    colour_bits: int = 6


DEFAULT_SPEC = CodecSpec()


class SplatHeader(NamedTuple):
    """What the first bytes of a ``.splat`` file say."""

    method: str  # the entropy stage: "stored", "zlib" or "lzma"
    count: int
    spec: CodecSpec
    height: int  # 0: not recorded
    width: int
    version: int = VERSION


def _check_spec(spec: CodecSpec) -> CodecSpec:
    for name, bits in zip(CodecSpec._fields, spec):
        if not isinstance(bits, int) or isinstance(bits, bool) or not 0 <= bits <= MAX_BITS:
            raise ValueError(f"{name} must be an int in [0, {MAX_BITS}], got {bits!r}")
    return spec


def _spec(spec: CodecSpec | None, overrides: dict) -> CodecSpec:
    unknown = set(overrides) - set(CodecSpec._fields)
    if unknown:
        raise ValueError(f"unknown codec option(s) {sorted(unknown)}; use {CodecSpec._fields}")
    return _check_spec((spec or DEFAULT_SPEC)._replace(**overrides))


def _round(values: np.ndarray, bits: int, what: str, limit: int = MAX_Q) -> np.ndarray:
    q = np.rint(values.astype(np.float64) * 2.0**bits)
    if q.size and not np.abs(q).max() < limit:
        raise ValueError(
            f"{what} {np.abs(values).max():g} is beyond the codec's range at {bits} bits "
            f"(|value| * 2^bits < 2^{limit.bit_length() - 1})"
        )
    return q.astype(np.int64)


def _scale_floor(spec: CodecSpec) -> int:
    """The smallest log-scale index whose splat is not thinner than MIN_CHOLESKY."""
    return math.ceil(math.log(MIN_CHOLESKY) * 2.0**spec.scale_bits)


def quantize_integers(splats: torch.Tensor, spec: CodecSpec) -> np.ndarray:
    """``[n, 8]`` int64: the grid indices of the real splats' (x, y, log l11, log l22, shear,
    r, g, b), in the order given."""
    values = splats.detach().to("cpu", torch.float64).numpy()
    x, y, l11, l21, l22 = (values[:, i] for i in range(5))
    scale_floor = _scale_floor(spec)
    q = np.empty((len(values), SPLAT_CHANNELS), np.int64)
    q[:, 0] = _round(x, spec.position_bits, "position")
    q[:, 1] = _round(y, spec.position_bits, "position")
    q[:, 2] = np.maximum(_round(np.log(l11), spec.scale_bits, "log l11"), scale_floor)
    q[:, 3] = np.maximum(_round(np.log(l22), spec.scale_bits, "log l22"), scale_floor)
    q[:, 4] = _round(l21 / l22, spec.shear_bits, "shear l21 / l22", MAX_SHEAR_Q)
    q[:, 5:] = _round(values[:, 5:], spec.colour_bits, "colour")
    return q


def dequantize(q: np.ndarray, spec: CodecSpec) -> torch.Tensor:
    """Grid indices ``[n, 8]`` (as from :func:`quantize_integers`) to float32 splats ``[n, 8]``."""
    q = torch.from_numpy(np.ascontiguousarray(q, dtype=np.int64)).to(torch.float64)
    out = torch.empty(q.shape, dtype=torch.float64)
    out[:, :2] = q[:, :2] * 2.0**-spec.position_bits
    l11 = torch.exp(q[:, 2] * 2.0**-spec.scale_bits).to(torch.float32).double()
    l22 = torch.exp(q[:, 3] * 2.0**-spec.scale_bits).to(torch.float32).double()
    out[:, 2], out[:, 4] = l11, l22
    out[:, 3] = q[:, 4] * 2.0**-spec.shear_bits * l22
    out[:, 5:] = q[:, 5:] * 2.0**-spec.colour_bits
    return out.to(torch.float32)


def _morton(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Interleave the bits of two non-negative ints < 2^25 (x in the even bits)."""
    code = np.zeros(len(x), np.uint64)
    x, y = x.astype(np.uint64), y.astype(np.uint64)
    for bit in range(25):
        one = np.uint64(1)
        code |= ((x >> np.uint64(bit)) & one) << np.uint64(2 * bit)
        code |= ((y >> np.uint64(bit)) & one) << np.uint64(2 * bit + 1)
    return code


def _unmorton(code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros(len(code), np.uint64)
    y = np.zeros(len(code), np.uint64)
    one = np.uint64(1)
    for bit in range(25):
        x |= ((code >> np.uint64(2 * bit)) & one) << np.uint64(bit)
        y |= ((code >> np.uint64(2 * bit + 1)) & one) << np.uint64(bit)
    return x.astype(np.int64), y.astype(np.int64)


def _ycocg(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    co = r - b
    t = b + (co >> 1)
    cg = g - t
    return np.stack([t + (cg >> 1), co, cg], 1)


def _rgb(ycocg: np.ndarray) -> np.ndarray:
    y, co, cg = ycocg[:, 0], ycocg[:, 1], ycocg[:, 2]
    t = y - (cg >> 1)
    g = cg + t
    b = t - (co >> 1)
    return np.stack([b + co, g, b], 1)


def _canonical(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by Morton order of the position (ties by the other fields, so the order is a
    function of the set); returns the sorted rows and their Morton codes."""
    xmin = q[:, 0].min() if len(q) else 0
    ymin = q[:, 1].min() if len(q) else 0
    codes = _morton(q[:, 0] - xmin, q[:, 1] - ymin)
    keys = [q[:, i] for i in range(SPLAT_CHANNELS - 1, 1, -1)] + [codes]
    order = np.lexsort(keys)
    return q[order], codes[order]


# -- serialisation -----------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    zig = (value << 1) ^ (value >> 63)  # zigzag, value in int64
    out = bytearray()
    while True:
        byte = zig & 0x7F
        zig >>= 7
        if zig:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _column(values: np.ndarray) -> bytes:
    low = int(values.min()) if len(values) else 0
    shifted = (values - low).astype(np.uint64)
    top = int(shifted.max()) if len(values) else 0
    width = (top.bit_length() + 7) // 8
    planes = shifted.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - width :]
    return _varint(low) + bytes([width]) + planes.T.tobytes()


def _payload(q: np.ndarray, codes: np.ndarray) -> bytes:
    deltas = np.diff(codes, prepend=np.uint64(0)).astype(np.int64)
    xmin = int(q[:, 0].min()) if len(q) else 0
    ymin = int(q[:, 1].min()) if len(q) else 0
    columns = [deltas, q[:, 2], q[:, 3], q[:, 4], *_ycocg(q[:, 5:]).T]
    return _varint(xmin) + _varint(ymin) + b"".join(_column(c) for c in columns)


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise ValueError("the splat payload is truncated")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def varint(self) -> int:
        zig, shift = 0, 0
        while True:
            (byte,) = self.take(1)
            zig |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= 64:
                raise ValueError("the splat payload has a malformed varint")
        return (zig >> 1) ^ -(zig & 1)

    def column(self, count: int) -> np.ndarray:
        low = self.varint()
        (width,) = self.take(1)
        if width > 8:
            raise ValueError(f"the splat payload has a column of width {width} bytes (max 8)")
        planes = np.frombuffer(self.take(width * count), np.uint8).reshape(width, count)
        wide = np.zeros((count, 8), np.uint8)
        wide[:, 8 - width :] = planes.T
        values = wide.view(">u8").reshape(count).astype(np.uint64)
        if abs(low) >= 1 << 62 or (count and int(values.max()) >= 1 << 62):
            raise ValueError("the splat payload holds a value beyond the codec's range")
        return values.astype(np.int64) + low


def _compress(payload: bytes, method: int) -> bytes:
    if method == ZLIB:
        packer = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
        return packer.compress(payload) + packer.flush()
    if method == LZMA:
        return lzma.compress(payload, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
    return payload


def _decompress(body: bytes, method: int, limit: int) -> bytes:
    """At most ``limit`` bytes out; ValueError for anything malformed or longer."""
    if method == STORED:
        payload = body
    else:
        try:
            if method == ZLIB:
                unpacker = zlib.decompressobj(-15)
                payload = unpacker.decompress(body, limit + 1)
                finished = unpacker.eof and not unpacker.unused_data
            else:
                unpacker = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
                payload = unpacker.decompress(body, limit + 1)
                finished = unpacker.eof and not unpacker.unused_data
        except (zlib.error, lzma.LZMAError) as exc:
            raise ValueError(f"the splat payload does not decompress: {exc}") from exc
        if len(payload) <= limit and not finished:
            raise ValueError("the splat payload is truncated or has trailing bytes")
    if len(payload) > limit:
        raise ValueError(f"the splat payload is longer than its count allows ({limit} bytes)")
    return payload


# -- public API --------------------------------------------------------------------------------


def _one_image(splats: torch.Tensor) -> torch.Tensor:
    check_splats(splats)
    if splats.dim() == 3 and splats.shape[0] == 1:
        splats = splats[0]
    if splats.dim() != 2:
        raise ValueError(f"encode takes one image's splats [N, 8], got {tuple(splats.shape)}")
    real = splats.detach().cpu()[splat_mask(splats.detach().cpu())]
    if len(real) > MAX_SPLATS:
        raise ValueError(f"{len(real)} splats is more than the codec's MAX_SPLATS={MAX_SPLATS}")
    return real


def encode(
    splats: torch.Tensor,
    spec: CodecSpec | None = None,
    *,
    size: tuple[int, int] | None = None,
    method: str = "auto",
    version: int = VERSION,
    **bits,
) -> bytes:
    """One image's splats ``[N, 8]`` (padding rows dropped) as ``.splat`` bytes.

    ``spec`` or keyword overrides (``position_bits``, ``scale_bits``, ``shear_bits``,
    ``colour_bits``) choose the grids; ``size`` is the (height, width) of the image they were
    fitted to, recorded for whoever renders them; ``method`` the entropy stage ("auto": the
    smallest of "stored", "zlib", "lzma"); ``version`` 1 writes the old format (no checksum)
    for readers that predate version 2."""
    spec = _spec(spec, bits)
    if method != "auto" and method not in METHODS:
        raise ValueError(f"method must be 'auto' or one of {sorted(METHODS)}, got {method!r}")
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    height, width = _size(size)
    q, codes = _canonical(quantize_integers(_one_image(splats), spec))
    payload = _payload(q, codes)
    methods = METHODS.values() if method == "auto" else [METHODS[method]]
    bodies = {m: _compress(payload, m) for m in methods}
    best = min(bodies, key=lambda m: (len(bodies[m]), m))
    fields = HEADER.pack(MAGIC, version, best, len(q), *spec, height, width)
    if version == 1:
        return fields + bodies[best]
    return fields + CHECKSUM.pack(zlib.crc32(bodies[best], zlib.crc32(fields))) + bodies[best]


def _header_size(version: int) -> int:
    return HEADER.size + (CHECKSUM.size if version >= 2 else 0)


def _size(size) -> tuple[int, int]:
    if size is None:
        return 0, 0
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"size must be (height, width), got {size!r}") from exc
    if not (0 < height < 1 << 16 and 0 < width < 1 << 16):
        raise ValueError(f"size must be two ints in [1, 65535], got {size!r}")
    return height, width


def read_header(data: bytes) -> SplatHeader:
    """The header of ``.splat`` bytes; ValueError if it is malformed."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"splat bytes must be bytes, got {type(data).__name__}")
    data = bytes(data[: HEADER.size + CHECKSUM.size])
    if len(data) < HEADER.size:
        raise ValueError(f"not a splat file: {len(data)} bytes is shorter than the header")
    magic, version, method, count, *bits, height, width = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a splat file: magic {magic!r}, expected {MAGIC!r}")
    if version not in VERSIONS:
        raise ValueError(
            f"splat format version {version} is not supported (this reads versions "
            f"{', '.join(map(str, VERSIONS))}): a newer timm-splat wrote it, or it is damaged"
        )
    if len(data) < _header_size(version):
        raise ValueError(f"not a splat file: {len(data)} bytes is shorter than the header")
    names = {code: name for name, code in METHODS.items()}
    if method not in names:
        raise ValueError(f"unknown entropy stage {method} in the splat header")
    if count > MAX_SPLATS:
        raise ValueError(f"the splat header claims {count} splats, more than {MAX_SPLATS}")
    if (height == 0) != (width == 0):
        raise ValueError(f"the splat header's size {height} x {width} is half recorded")
    spec = _check_spec(CodecSpec(*bits))
    return SplatHeader(names[method], count, spec, height, width, version)


def decode(data: bytes) -> torch.Tensor:
    """``.splat`` bytes to float32 splats ``[count, 8]`` (in the codec's Morton order)."""
    header = read_header(data)
    count, spec = header.count, header.spec
    limit = 20 + COLUMNS * (_COLUMN_OVERHEAD + 8 * count)
    body = bytes(data[_header_size(header.version) :])
    if header.version >= 2:
        (stored,) = CHECKSUM.unpack_from(data, HEADER.size)
        if zlib.crc32(body, zlib.crc32(bytes(data[: HEADER.size]))) != stored:
            raise ValueError(
                "the splat file is damaged: its CRC-32 does not match its bytes (changed or "
                "cut in transfer or storage); send or fetch it again"
            )
    reader = _Reader(_decompress(body, METHODS[header.method], limit))
    xmin, ymin = reader.varint(), reader.varint()
    columns = [reader.column(count) for _ in range(COLUMNS)]
    if reader.at != len(reader.data):
        raise ValueError("the splat payload has trailing bytes")
    deltas = columns[0]
    if count and (deltas.min() < 0 or int(deltas.sum()) >= 1 << 50):  # below 2^50: exact
        raise ValueError("the splat payload's positions are out of order or out of range")
    dx, dy = _unmorton(np.cumsum(deltas).astype(np.uint64))
    q = np.empty((count, SPLAT_CHANNELS), np.int64)
    q[:, 0], q[:, 1] = dx + xmin, dy + ymin
    q[:, 2], q[:, 3], q[:, 4] = columns[1:4]
    q[:, 5:] = _rgb(np.stack(columns[4:], 1)) if count else 0
    if count and (np.abs(q).max() >= MAX_Q or np.abs(q[:, 4]).max() >= MAX_SHEAR_Q):
        raise ValueError("the splat payload holds a value beyond the codec's range")
    if count and q[:, 2:4].min() < _scale_floor(spec):
        raise ValueError(f"the splat payload holds a splat thinner than {MIN_CHOLESKY:g}")
    splats = dequantize(q, spec)
    try:
        check_splats(splats, "decoded splats")
    except ValueError as exc:
        raise ValueError(f"the splat payload decodes to invalid splats: {exc}") from exc
    return splats


def quantize(splats: torch.Tensor, spec: CodecSpec | None = None, **bits) -> torch.Tensor:
    """What :func:`decode` returns for ``encode(splats, spec, **bits)``, without the entropy
    stage: one image's real splats ``[n, 8]`` on the codec's grids, in its order."""
    spec = _spec(spec, bits)
    q, _ = _canonical(quantize_integers(_one_image(splats), spec))
    return dequantize(q, spec)
