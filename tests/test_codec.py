"""The ``.splat`` codec: exact round trips, canonical bytes, clear errors, and a decoder that
survives any bytes (ValueError, never another exception, a hang or an unbounded allocation)."""

import lzma
import struct
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from timm_splat.cli import main
from timm_splat.codec import (
    HEADER,
    MAGIC,
    MAX_SPLATS,
    VERSION,
    CodecSpec,
    decode,
    encode,
    quantize,
    read_header,
)
from timm_splat.ops import render_splats
from timm_splat.splats import check_splats, save_splats, splat_mask
from timm_splat.testing import random_splats

SPECS = [CodecSpec(), CodecSpec(8, 3, 2, 5), CodecSpec(14, 7, 6, 10), CodecSpec(0, 0, 0, 0)]


@pytest.fixture(scope="module")
def splats():
    return random_splats(1, 300, torch.float32, seed=3)[0]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("method", ["auto", "stored", "zlib", "lzma"])
def test_round_trips_are_exact(splats, spec, method):
    data = encode(splats, spec, method=method)
    decoded = decode(data)
    assert decoded.dtype == torch.float32 and decoded.shape == (297, 8)  # padding dropped
    assert torch.equal(decoded, quantize(splats, spec))
    assert encode(decoded, spec, method=method) == data  # the decoded splats are on the grid
    assert read_header(data).method == method or method == "auto"


def test_order_and_padding_do_not_change_the_bytes(splats):
    data = encode(splats)
    shuffled = splats[torch.randperm(len(splats), generator=torch.Generator().manual_seed(0))]
    assert encode(shuffled) == data
    assert encode(torch.cat([splats, torch.zeros(5, 8)])[None]) == data  # [1, N, 8] too


def test_quantisation_error_is_half_a_step(splats):
    spec = CodecSpec(10, 4, 3, 6)
    real = splats[splat_mask(splats)].double()
    decoded = decode(encode(splats, spec)).double()
    # the codec reorders: match rows by nearest position
    match = torch.cdist(decoded[:, :2], real[:, :2]).argmin(1)
    assert len(set(match.tolist())) == len(real)
    real = real[match]
    assert (decoded[:, :2] - real[:, :2]).abs().max() <= 2**-11 + 1e-9
    ratio = (decoded[:, [2, 4]] / real[:, [2, 4]]).log().abs()
    assert ratio.max() <= 2**-5 + 1e-6
    assert (decoded[:, 5:] - real[:, 5:]).abs().max() <= 2**-7 + 1e-9


def test_fine_grids_render_what_was_fitted(astronaut_64):
    from timm_splat import fit_splats
    from timm_splat.images import to_rgb_tensors

    image = to_rgb_tensors([astronaut_64])[0]
    fitted = fit_splats(image[None], num_splats=64, iterations=20).splats[0]
    data = encode(fitted, position_bits=14, scale_bits=8, shear_bits=8, colour_bits=10)
    assert len(data) < 64 * 16  # smaller than fp16 even at these grids
    before, after = render_splats(fitted, 64, 64), render_splats(decode(data), 64, 64)
    assert (before - after).abs().max() < 0.02
    coarse = encode(fitted)
    assert len(coarse) < len(data)


def test_empty_and_header_fields():
    data = encode(torch.zeros(0, 8), size=(224, 300))
    assert decode(data).shape == (0, 8)
    header = read_header(data)
    assert (header.count, header.height, header.width, header.spec) == (0, 224, 300, CodecSpec())
    assert read_header(encode(torch.zeros(3, 8))).height == 0  # all padding: nothing stored


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s: encode(s, position_bits=21), "position_bits"),
        (lambda s: encode(s, colour_bits=-1), "colour_bits"),
        (lambda s: encode(s, color_bits=4), "unknown codec option"),
        (lambda s: encode(s, method="bz2"), "method"),
        (lambda s: encode(s, size=(0, 4)), "size"),
        (lambda s: encode(s[None].repeat(2, 1, 1)), r"one image's splats"),
        (lambda s: encode(s.clone().index_fill_(1, torch.tensor([0]), 1e6)), "beyond"),
        (lambda s: encode(torch.full((MAX_SPLATS + 1, 8), 0.5)), "MAX_SPLATS"),
        (lambda s: encode(s.clone().fill_(float("nan"))), "NaN"),
    ],
)
def test_encode_errors(splats, call, message):
    with pytest.raises(ValueError, match=message):
        call(splats)


def _header(method=0, count=1, bits=(10, 4, 3, 6), size=(0, 0), magic=MAGIC, version=1):
    """A hand-made header; version 1 by default, which has no checksum, so what follows is
    parsed whatever it is (the parser's own checks are what these tests reach)."""
    return HEADER.pack(magic, version, method, count, *bits, *size)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "shorter than the header"),
        (b"PK\x03\x04" + bytes(40), "magic"),
        (_header(version=3), "version 3"),
        (_header(version=0), "version 0"),
        (_header(version=2), "shorter than the header"),
        (_header(version=2) + bytes(4), "damaged"),
        (_header(method=7), "entropy stage"),
        (_header(count=MAX_SPLATS + 1), "more than"),
        (_header(bits=(10, 4, 3, 99)), "colour_bits"),
        (_header(size=(5, 0)), "half recorded"),
        (_header(count=2), "truncated"),
        (_header(method=1, count=4) + b"\x00\x01", "decompress|truncated"),
        (_header(method=2, count=4) + b"junk", "decompress|truncated"),
        ("not bytes", "must be bytes"),
    ],
)
def test_decode_errors(data, message):
    with pytest.raises(ValueError, match=message):
        decode(data)


def test_trailing_bytes_are_refused(splats):
    for method in ("stored", "zlib", "lzma"):
        with pytest.raises(ValueError, match="trailing|truncated"):
            decode(encode(splats, method=method, version=1) + b"\x00")
        with pytest.raises(ValueError, match="damaged"):  # version 2: the checksum sees it
            decode(encode(splats, method=method) + b"\x00")


def test_decompression_bombs_stop_at_the_count():
    """A tiny file that claims 1 splat but inflates to megabytes is refused after reading
    only what one splat may need."""
    zeros = bytes(50_000_000)
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    bomb = packer.compress(zeros) + packer.flush()
    with pytest.raises(ValueError, match="longer than its count allows"):
        decode(_header(method=1, count=1) + bomb)
    xz = lzma.compress(zeros, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    with pytest.raises(ValueError, match="longer than its count allows"):
        decode(_header(method=2, count=1) + xz)


def test_a_huge_count_needs_its_bytes():
    # 65536 splats claimed, a column of 2-byte values announced, 4 bytes given: refused by
    # length before the planes are read
    with pytest.raises(ValueError, match="truncated"):
        decode(_header(count=MAX_SPLATS) + b"\x00\x00\x00\x02" + bytes(4))


def test_decoded_values_stay_valid():
    # a scale index below the floor (a splat thinner than MIN_CHOLESKY) is refused
    columns = b"\x00\x00" + b"".join(  # xmin, ymin; then 7 columns, 1 value each, width 0
        struct.pack("B", 0x7F) + b"\x00" if i in (1, 2) else b"\x00\x00" for i in range(7)
    )
    with pytest.raises(ValueError, match="thinner|beyond|invalid"):
        decode(_header(count=1, bits=(10, 0, 3, 6)) + columns.replace(b"\x7f", b"\x7f\x7f", 0))
    huge = b"\x00\x00" + b"\x00\x00" + b"\xfe\x03\x00" * 2 + b"\x00\x00" * 4  # log l = 255
    with pytest.raises(ValueError, match="invalid|beyond"):
        decode(_header(count=1, bits=(10, 0, 3, 6)) + huge)


# -- version 2: the checksum -------------------------------------------------------------------


@pytest.mark.parametrize("method", ["stored", "zlib", "lzma"])
def test_every_single_bit_flip_is_refused(splats, method):
    """Version 1 decoded most single-bit flips into other splats; version 2's CRC-32 refuses
    every one of them (and any burst of up to 32 bits), in the header or the payload."""
    data = encode(splats, method=method, size=(48, 40))
    assert read_header(data).version == VERSION == 2
    for bit in range(8 * len(data)):
        damaged = bytearray(data)
        damaged[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ValueError):
            decode(bytes(damaged))
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            decode(data[:cut])


def test_version_1_files_still_decode(splats):
    for method in ("stored", "zlib", "lzma"):
        old = encode(splats, method=method, size=(48, 40), version=1)
        new = encode(splats, method=method, size=(48, 40))
        assert len(new) == len(old) + 4 and new[5:18] == old[5:18]
        assert read_header(old).version == 1 and read_header(old).height == 48
        assert torch.equal(decode(old), decode(new))
        assert encode(decode(old), method=method, size=(48, 40)) == new  # re-encoding upgrades
    with pytest.raises(ValueError, match="version must be"):
        encode(splats, version=3)


def test_a_damaged_version_2_file_says_so(splats):
    data = bytearray(encode(splats))
    data[-1] ^= 0x10
    with pytest.raises(ValueError, match="damaged.*CRC-32"):
        decode(bytes(data))


# -- fuzzing -----------------------------------------------------------------------------------

FUZZ = settings(max_examples=800, deadline=None)
GOOD = encode(random_splats(1, 40, torch.float32, seed=1)[0], size=(32, 32))
GOOD_STORED = encode(random_splats(1, 40, torch.float32, seed=1)[0], method="stored")
GOOD_ZLIB = encode(random_splats(1, 40, torch.float32, seed=1)[0], method="zlib")
GOOD_V1 = encode(random_splats(1, 40, torch.float32, seed=1)[0], method="zlib", version=1)


def _survives(data: bytes) -> None:
    try:
        splats = decode(data)
    except ValueError:
        return
    check_splats(splats)
    assert splats.dtype == torch.float32 and splats.shape == (read_header(data).count, 8)


@FUZZ
@given(
    base=st.sampled_from([GOOD, GOOD_STORED, GOOD_ZLIB, GOOD_V1]),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 2000)),
)
def test_mutated_files(base, flips, cut):
    buffer = bytearray(base)
    for position, value in flips:
        buffer[position % len(buffer)] = value
    _survives(bytes(buffer[:cut]))


@FUZZ
@given(
    method=st.integers(0, 3),
    count=st.integers(0, 1 << 32 - 1).map(lambda c: c % (MAX_SPLATS + 8)),
    bits=st.tuples(*[st.integers(0, 24)] * 4),
    body=st.binary(max_size=600),
)
def test_random_bodies_behind_a_valid_magic(method, count, bits, body):
    _survives(_header(method, count, bits) + body)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes(data):
    _survives(data)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            *[st.floats(-3, 3, allow_nan=False)] * 2,
            st.floats(1e-6, 2),
            st.floats(-2, 2, allow_nan=False),
            st.floats(1e-6, 2),
            *[st.floats(-4, 4, allow_nan=False)] * 3,
        ),
        max_size=30,
    ),
    spec=st.tuples(*[st.integers(0, 16)] * 4).map(lambda b: CodecSpec(*b)),
)
def test_any_splats_round_trip(rows, spec):
    splats = torch.tensor(rows, dtype=torch.float32).reshape(-1, 8)
    try:
        data = encode(splats, spec)
    except ValueError as exc:  # only the documented range limit may refuse finite splats
        assert "beyond the codec's range" in str(exc)
        return
    decoded = decode(data)
    assert torch.equal(decoded, quantize(splats, spec))
    assert encode(decoded, spec) == data


# -- command line ------------------------------------------------------------------------------


def test_cli_encode_decode(tmp_path, astronaut_64, capsys):
    astronaut_64.save(tmp_path / "astronaut.png")
    fitted = random_splats(1, 50, torch.float32, seed=2)[0]
    save_splats(tmp_path / "fitted.safetensors", fitted, height=48, width=40)
    code = main(
        [
            "encode",
            str(tmp_path / "astronaut.png"),
            str(tmp_path / "fitted.safetensors"),
            "--num-splats",
            "32",
            "--colour-bits",
            "7",
            "--out",
            str(tmp_path / "enc"),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "dB decoded" in printed and "bpp at 64x64" in printed
    data = (tmp_path / "enc" / "fitted.splat").read_bytes()
    assert read_header(data)[2:] == (CodecSpec(colour_bits=7), 48, 40, VERSION)
    stored = fitted.half().float()  # the .safetensors file holds fp16
    assert torch.equal(decode(data), quantize(stored, colour_bits=7))
    files = [str(tmp_path / "enc" / f"{n}.splat") for n in ("astronaut", "fitted")]
    code = main(["decode", *files, "--out", str(tmp_path / "dec"), "--safetensors"])
    assert code == 0
    from PIL import Image

    assert Image.open(tmp_path / "dec" / "fitted.png").size == (40, 48)
    assert Image.open(tmp_path / "dec" / "astronaut.png").size == (64, 64)
    assert (tmp_path / "dec" / "astronaut.safetensors").is_file()


@pytest.mark.parametrize("command", ["encode", "decode"])
def test_cli_bad_input_exits_2(tmp_path, capsys, command):
    bad = tmp_path / "bad.splat"
    bad.write_bytes(b"SPLT\x09" + bytes(30))
    target = bad if command == "decode" else tmp_path / "missing.png"
    assert main([command, str(target), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"timm-splat {command}: error:") and "\n" not in err


# -- quantisation-aware refinement -------------------------------------------------------------


def test_refine_quantized_beats_plain_rounding(astronaut_64):
    from timm_splat import fit_splats
    from timm_splat.codec_refine import refine_quantized
    from timm_splat.images import to_rgb_tensors

    image = to_rgb_tensors([astronaut_64])[0][None]
    fitted = fit_splats(image, num_splats=48, iterations=30).splats
    spec = CodecSpec(8, 3, 2, 5)  # coarse grids: rounding costs a lot
    plain = quantize(fitted[0], spec)
    refined = refine_quantized(image, fitted, spec, steps=12)
    assert refined.shape == fitted.shape
    real = refined[0][splat_mask(refined[0])]
    assert torch.equal(quantize(real, spec), real)  # on the grids: the codec keeps them
    assert torch.equal(decode(encode(real, spec)), real)

    def error(s):
        return (render_splats(s, 64, 64) - image[0]).square().mean()

    assert error(real) < error(plain)
    with pytest.raises(ValueError, match="steps"):
        refine_quantized(image, fitted, spec, steps=-1)


def test_cli_decode_bounds_the_render_size(tmp_path, capsys):
    """A 138-byte file whose header says 65535 x 65535 must not allocate 51 GB."""
    splats = random_splats(1, 4, dtype=torch.float32)[0]
    path = tmp_path / "huge.splat"
    path.write_bytes(encode(splats, size=(65535, 65535)))
    out = str(tmp_path / "o")
    assert main(["decode", str(path), "--out", out]) == 2
    err = capsys.readouterr().err
    assert "huge.splat's header asks for a 65535 x 65535 render" in err and "\n" not in err.strip()
    assert main(["decode", str(path), "--out", out, "--size", "100000", "100000"]) == 2
    assert "--size asks for a 100000 x 100000 render" in capsys.readouterr().err
    assert main(["decode", str(path), "--out", out, "--size", "16", "16"]) == 0
    assert main(["decode", str(path), "--out", out, "--max-pixels", "10"]) == 2
