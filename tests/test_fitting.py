import numpy as np
import pytest
import torch
from PIL import Image

from timm_splat import fit_splats, psnr, render_splats, splat_count
from timm_splat.fitting import FitConfig, _Adam, _prune, initial_splats
from timm_splat.images import to_rgb_tensors

FAST = dict(iterations=60, prune_every=10)


def test_fit_raises_psnr_on_a_real_photo(astronaut_64):
    target = to_rgb_tensors(astronaut_64)[0][None]
    start = initial_splats(target, 150, FitConfig(num_splats=100))
    start_psnr = psnr(render_splats(start, 64, 64), target).item()
    result = fit_splats(astronaut_64, num_splats=100, **FAST)
    assert result.splats.shape == (1, 100, 8)
    assert result.psnr.item() > start_psnr + 2
    assert result.psnr.item() > 18
    # the reported PSNR is the PSNR of the returned splats
    assert result.psnr.item() == pytest.approx(psnr(render_splats(result.splats, 64, 64), target).item(), abs=1e-4)


def test_structured_init_starts_better_than_random_init(astronaut_64):
    grid = fit_splats(astronaut_64, num_splats=100, init="grid", iterations=0).psnr.item()
    rand = fit_splats(astronaut_64, num_splats=100, init="random", iterations=0).psnr.item()
    assert grid > rand + 1


def test_init_colours_are_corrected_for_overlap():
    flat = torch.full((1, 3, 32, 32), 0.6)
    splats = initial_splats(flat, 64, FitConfig(num_splats=64))
    render = render_splats(splats, 32, 32)
    # Away from the borders (where fewer neighbours overlap) the first render is the image;
    # the raw cell means would render ~2.3x too bright.
    assert (render[..., 6:-6, 6:-6] - 0.6).abs().max() < 0.05


def test_fit_is_deterministic_and_batched_like_single(astronaut_64):
    small = astronaut_64.resize((32, 32))
    images = [small, small.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    a = fit_splats(images, num_splats=40, **FAST)
    b = fit_splats(images, num_splats=40, **FAST)
    assert torch.equal(a.splats, b.splats)
    single = fit_splats(images[1], num_splats=40, **FAST)
    torch.testing.assert_close(single.splats[0], a.splats[1], rtol=1e-4, atol=1e-5)


def test_mixed_sizes_and_padding_rows_are_zero(astronaut_64):
    flat = np.zeros((20, 30, 3), np.uint8)  # black: every splat falls under the threshold
    result = fit_splats([astronaut_64, flat], num_splats=50, **FAST)
    assert result.splats.shape == (2, 50, 8)
    counts = splat_count(result.splats)
    assert counts[0] == 50 and counts[1] < 50
    for s, n in zip(result.splats, counts):
        assert torch.count_nonzero(s[n:]) == 0  # padding rows are all zero, at the end
        assert (s[:n, 2] > 0).all() and (s[:n, 4] > 0).all()


def test_prune_keeps_the_highest_luminance_splats():
    raw = torch.zeros(1, 6, 8)
    lum = torch.tensor([0.5, 0.01, 0.9, 0.2, 0.0001, 0.7])
    raw[0, :, 6] = -lum / 0.7152  # luminance uses |colour|
    live = torch.ones(1, 6, 1)
    live[0, 5] = 0  # a dead splat is never kept over a live one
    adam = _Adam(raw, torch.ones(8))
    adam.m = raw.clone()
    kept, live2 = _prune(raw, live, adam, keep=3, threshold=0.0)
    assert torch.allclose(kept[0, :, 6].abs() * 0.7152, torch.tensor([0.5, 0.9, 0.2]))
    assert torch.equal(adam.m, kept)  # the moments follow their splats
    kept, live3 = _prune(raw, live, _Adam(raw, torch.ones(8)), keep=5, threshold=0.05)
    assert live3[0, :, 0].tolist() == [1, 0, 1, 1, 0]  # under the threshold: dropped


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_splats=0), "num_splats"),
        (dict(iterations=-1), "iterations"),
        (dict(init="kmeans"), "init"),
        (dict(learning_rate=1), "unknown fit option"),
    ],
)
def test_bad_options(kwargs, message, astronaut_64):
    with pytest.raises(ValueError, match=message):
        fit_splats(astronaut_64, **{"num_splats": 10, **kwargs})


def test_bad_images():
    with pytest.raises(ValueError, match="NaN"):
        fit_splats(torch.full((3, 8, 8), float("nan")), num_splats=10)
    with pytest.raises(ValueError, match="channels"):
        fit_splats(torch.rand(2, 8, 8), num_splats=10)
    with pytest.raises(ValueError, match="no images"):
        fit_splats([], num_splats=10)


def test_zero_iterations_and_tiny_images():
    result = fit_splats(torch.rand(3, 2, 3), num_splats=4, iterations=0)
    assert result.splats.shape == (1, 4, 8)
    assert torch.isfinite(result.psnr).all()
