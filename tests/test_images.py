import numpy as np
import pytest
import torch
from PIL import Image

from timm_splat.images import to_rgb_tensors

RGB = np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "1", "YCbCr", "I", "F"])
def test_pil_modes(mode):
    image = Image.fromarray(RGB).convert(mode)
    (t,) = to_rgb_tensors(image)
    assert t.shape == (3, 12, 10) and t.dtype == torch.float32
    assert 0 <= t.min() and t.max() <= 1


def test_pil_16_bit_keeps_its_range():
    array = np.linspace(0, 65535, 12 * 10).astype(np.uint16).reshape(12, 10)
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    (t,) = to_rgb_tensors(image)
    torch.testing.assert_close(t[0], torch.from_numpy(array.astype(np.float32) / 65535))


def test_pil_rgb_matches_numpy_and_tensor():
    a = to_rgb_tensors(Image.fromarray(RGB))[0]
    b = to_rgb_tensors(RGB)[0]
    c = to_rgb_tensors(torch.from_numpy(RGB).permute(2, 0, 1))[0]
    d = to_rgb_tensors(torch.from_numpy(RGB).permute(2, 0, 1).float() / 255)[0]
    for other in (b, c, d):
        torch.testing.assert_close(a, other)


def test_batches_lists_and_channels():
    batch = torch.rand(4, 3, 8, 9)
    assert len(to_rgb_tensors(batch)) == 4
    assert len(to_rgb_tensors([batch[0], RGB, RGB[..., 0], np.zeros((5, 5, 4), np.float32)])) == 4
    assert to_rgb_tensors(torch.rand(1, 7, 7))[0].shape == (3, 7, 7)


@pytest.mark.parametrize(
    "bad, message",
    [
        ([], "no images"),
        (torch.rand(2, 3, 0, 4), "empty"),
        (torch.full((3, 4, 4), float("nan")), "NaN"),
        (torch.rand(5, 4, 4), "1, 3 or 4 channels"),
        (np.zeros((4, 4, 2), np.uint8), "1, 3 or 4 channels"),
        (np.zeros((4, 4), np.int64), "uint8, uint16, bool or float"),
        ("image.png", "PIL image, numpy array or torch tensor"),
        (torch.rand(1, 1, 3, 4, 4), r"\[3, H, W\]"),
    ],
)
def test_bad_inputs_say_what_is_wrong(bad, message):
    with pytest.raises(ValueError, match=message):
        to_rgb_tensors(bad)


@pytest.mark.parametrize("scale", [255.0, -1.0])
def test_float_pixels_outside_0_1_are_refused(scale):
    array = np.random.default_rng(1).random((6, 5, 3)).astype(np.float32) * scale
    for image in (array, torch.from_numpy(array).permute(2, 0, 1)):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\].*255"):
            to_rgb_tensors(image)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        to_rgb_tensors(Image.fromarray(array[..., 0] * 1000, mode="F"))


def test_a_hair_outside_0_1_is_clamped():
    t = to_rgb_tensors(torch.tensor([-5e-4, 1.0004]).view(1, 1, 2).expand(3, 1, 2))[0]
    assert t.min() == 0 and t.max() == 1


def test_dark_16_bit_image_is_scaled_by_its_bit_depth():
    array = np.full((4, 4), 200, np.uint16)  # dark, but 16-bit: 200 / 65535, not 200 / 255
    (t,) = to_rgb_tensors(Image.fromarray(array))
    torch.testing.assert_close(t, torch.full((3, 4, 4), 200 / 65535))


def test_exif_orientation_is_applied(tmp_path):
    array = np.zeros((4, 6, 3), np.uint8)
    array[0, 0] = 255  # top-left marker
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(array).save(tmp_path / "phone.jpg", exif=exif, quality=100)
    with Image.open(tmp_path / "phone.jpg") as image:
        (t,) = to_rgb_tensors(image)
    assert t.shape == (3, 6, 4)  # upright: taller than wide
    assert t[0, 0, -1] > 0.5  # the marker is now at the top right


def test_truncated_file_is_a_value_error(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.png") as image, pytest.raises(ValueError, match="decode"):
        to_rgb_tensors(image)
