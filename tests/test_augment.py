"""Splat augmentations against the pixel operations they stand for."""

import numpy as np
import pytest
import torch

from timm_splat import render_splats
from timm_splat.augment import SplatAugment, SplatMixup, color_matrix, crop, hflip, recolor
from timm_splat.splats import check_splats, splat_count
from timm_splat.testing import random_splats


@pytest.fixture
def splats():
    s = random_splats(2, 60, dtype=torch.float64, seed=3)
    s[..., 0:2] = s[..., 0:2].clamp(0.05, 0.95)  # on the image, so crops keep some
    return s


def test_hflip_is_the_mirrored_image(splats):
    torch.testing.assert_close(
        render_splats(hflip(splats), 20, 24), render_splats(splats, 20, 24).flip(-1)
    )


def test_crop_is_the_zoomed_region(splats):
    """Rendering the cropped splats at H x W equals rendering the original at 2H x 2W and
    keeping the top-left quarter (pixel centres line up exactly)."""
    zoomed = crop(splats, (0.0, 0.0, 0.5, 0.5))
    check_splats(zoomed)
    torch.testing.assert_close(
        render_splats(zoomed, 16, 18), render_splats(splats, 32, 36)[..., :16, :18]
    )
    assert (splat_count(zoomed) < splat_count(splats)).all()  # splats off the region dropped


def test_colour_changes_are_the_same_linear_map_of_the_image(splats):
    matrix = color_matrix(brightness=1.2, saturation=0.5, hue=0.1).double()
    image = render_splats(splats, 12, 12)
    expected = torch.einsum("ij,bjhw->bihw", matrix, image)
    torch.testing.assert_close(render_splats(recolor(splats, matrix), 12, 12), expected)
    grey = color_matrix(saturation=0.0) @ torch.tensor([0.9, 0.2, 0.1])
    assert torch.allclose(grey, grey[0].expand(3))  # no saturation: grey


def test_random_augment_keeps_valid_splats(splats):
    augment = SplatAugment(hue=0.1, generator=torch.Generator().manual_seed(0))
    for _ in range(10):
        out = augment(splats[0].float())
        check_splats(out)
        assert out.shape == (60, 8)


def test_mixup_is_the_blend_of_the_images(splats):
    np.random.seed(0)
    mixup = SplatMixup(mixup_alpha=1.0, cutmix_alpha=0.0, num_classes=5, label_smoothing=0.0)
    target = torch.tensor([1, 3])
    mixed, soft = mixup(splats, target)
    lam = float(soft[0, 1])  # sample 0 keeps lam of its own label
    assert mixed.shape == (2, 120, 8) and 0 < lam < 1
    a, b = render_splats(splats, 16, 16), render_splats(splats.flip(0), 16, 16)
    torch.testing.assert_close(render_splats(mixed, 16, 16), lam * a + (1 - lam) * b)
    torch.testing.assert_close(soft.sum(1), torch.ones(2, dtype=soft.dtype))


def test_cutmix_takes_the_box_from_the_partner(splats):
    np.random.seed(1)
    cutmix = SplatMixup(mixup_alpha=0.0, cutmix_alpha=1.0, num_classes=5, label_smoothing=0.0)
    mixed, soft = cutmix(splats, torch.tensor([0, 4]))
    lam = float(soft[0, 0])
    assert 0 < lam < 1 and mixed.shape == (2, 120, 8)
    check_splats(mixed)
    # Every splat comes from one of the two images, none is duplicated.
    assert (splat_count(mixed) <= splat_count(splats) + splat_count(splats.flip(0))).all()
    with pytest.raises(ValueError, match="even"):
        cutmix(splats[:1], torch.tensor([0]))
