import pytest
import torch
from conftest import random_splats

from timm_splat import (
    compression_ratio,
    from_fp16_bytes,
    load_splats,
    luminance,
    save_splats,
    splat_count,
    splat_mask,
    to_fp16_bytes,
)
from timm_splat.splats import check_splats, pack_real_first


def test_mask_and_count_follow_l11():
    s = random_splats(2, 10, padding=4)
    assert splat_mask(s).shape == (2, 10)
    assert splat_count(s).tolist() == [6, 6]


def test_fp16_round_trip_is_exact_for_fp16_values():
    s = random_splats(3, 7, dtype=torch.float32).half().float()
    data = to_fp16_bytes(s)
    assert len(data) == 3 * 7 * 16
    assert torch.equal(from_fp16_bytes(data, num_splats=7), s)
    assert from_fp16_bytes(data).shape == (21, 8)


def test_fp16_bytes_reject_bad_lengths():
    with pytest.raises(ValueError, match="multiple of 16"):
        from_fp16_bytes(b"\x00" * 17)


def test_compression_ratio_matches_paper():
    assert compression_ratio(3136) == pytest.approx(3.0, abs=0.01)
    assert compression_ratio(400) == pytest.approx(23.52, abs=0.01)
    s = random_splats(2, 400, padding=0)
    assert compression_ratio(s) == pytest.approx(compression_ratio(400))


def test_luminance_uses_bt709_on_absolute_colour():
    s = torch.zeros(1, 2, 8)
    s[0, 0, 5:] = torch.tensor([1.0, 0.0, 0.0])
    s[0, 1, 5:] = torch.tensor([0.0, -1.0, 0.0])
    assert luminance(s)[0].tolist() == pytest.approx([0.2126, 0.7152])


def test_pack_real_first_keeps_order_and_zeroes_padding():
    s = random_splats(1, 6, padding=0)
    s[0, 1, 2] = 0  # padding in the middle, with leftover junk in other channels
    s[0, 4, 2] = -1
    packed = pack_real_first(s)
    assert torch.equal(packed[0, :4], s[0, [0, 2, 3, 5]])
    assert torch.count_nonzero(packed[0, 4:]) == 0


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(4, 7), r"\[\.\.\., N, 8\]"),
        (torch.zeros(4, 8, dtype=torch.int32), "floating point"),
        (torch.full((4, 8), float("nan")), "NaN"),
        (torch.tensor([[0.5, 0.5, 0.1, 0.0, 0.0, 1, 1, 1]]), "l22 <= 0"),
        (torch.tensor([[0.5, 0.5, 1.4e-45, 0.0, 1.4e-45, 1, 1, 1]]), "below 1e-12"),
    ],
)
def test_check_splats_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        check_splats(bad)


def test_save_and_load_splats(tmp_path):
    s = random_splats(1, 9, dtype=torch.float32)[0]
    save_splats(tmp_path / "a.safetensors", s, height=10, width=20)
    loaded, meta = load_splats(tmp_path / "a.safetensors")
    assert loaded.shape == (6, 8)
    assert torch.allclose(loaded, s[:6].half().float())
    assert meta == {"height": "10", "width": "20"}


@pytest.mark.parametrize(
    "channel, value, message", [(5, 1e6, "fp16's range"), (4, 1e-8, "smallest value")]
)
def test_fp16_refuses_what_it_cannot_hold(tmp_path, channel, value, message):
    splats = torch.tensor([[0.5, 0.5, 0.1, 0.0, 0.1, 0.2, 0.2, 0.2]])
    splats[0, channel] = value
    with pytest.raises(ValueError, match=message):
        to_fp16_bytes(splats)
    with pytest.raises(ValueError, match=message):
        save_splats(tmp_path / "s.safetensors", splats)


def test_load_splats_checks_the_file(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a splat file"):
        load_splats(tmp_path / "junk.safetensors")
    save_file(
        {"splats": torch.tensor([[0.5, 0.5, 0.1, 0.0, -0.1, 1, 1, 1]])},
        str(tmp_path / "bad.safetensors"),
    )
    with pytest.raises(ValueError, match=r"bad.safetensors.*l22 <= 0"):
        load_splats(tmp_path / "bad.safetensors")
