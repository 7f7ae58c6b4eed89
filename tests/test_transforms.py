import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from timm_splat import psnr, render_splats
from timm_splat.samples import sample_photos
from timm_splat.splats import check_splats, splat_count
from timm_splat.transforms import SplatTransform

N, SIZE = 48, 32
FAST = dict(iterations=20)


@pytest.fixture(scope="module")
def transform():
    return SplatTransform(N, SIZE, **FAST)


@pytest.fixture(scope="module")
def photos():
    """Full-size, non-square photos (chelsea 451 x 300, coffee 600 x 400)."""
    return sample_photos(None, names=("chelsea", "coffee"))


def assert_real_splats(splats, num=N):
    assert splats.shape == (num, 8) and splats.dtype == torch.float32
    assert splats.device.type == "cpu"
    check_splats(splats)
    assert 0 < int(splat_count(splats)) <= num


def fit_psnr(splats, pixels):
    height, width = pixels.shape[-2:]
    return psnr(render_splats(splats[None], height, width), pixels[None]).item()


def test_every_image_kind_gives_the_same_valid_splats(transform, astronaut_64):
    array = np.array(astronaut_64)  # writable, for torch.from_numpy
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    kinds = {
        "pil": astronaut_64,
        "numpy uint8": array,
        "numpy float": array.astype(np.float32) / 255,
        "tensor uint8": tensor,
        "tensor float": tensor.float() / 255,
    }
    outputs = {name: transform(img) for name, img in kinds.items()}
    for name, splats in outputs.items():
        assert_real_splats(splats)
        assert torch.equal(splats, outputs["pil"]), name  # same pixels, same fit
    assert fit_psnr(outputs["pil"], transform.image_transform(astronaut_64)) > 14


def test_grayscale_inputs_fit_grey_splats(transform, astronaut_64):
    for grey in (astronaut_64.convert("L"), np.asarray(astronaut_64.convert("L"))):
        splats = transform(grey)
        assert_real_splats(splats)
        assert torch.equal(splats[:, 5], splats[:, 6]) and torch.equal(splats[:, 5], splats[:, 7])


@pytest.mark.parametrize("crop_mode", ["center", "squash"])
@pytest.mark.parametrize("size, crop_pct", [(SIZE, 0.875), ((24, 40), 0.9), ((40, 24), 1.0)])
def test_resize_and_crop_match_timms_eval_transform(photos, size, crop_pct, crop_mode):
    from timm.data.transforms_factory import transforms_imagenet_eval

    t = SplatTransform(N, size, crop_pct=crop_pct, crop_mode=crop_mode, **FAST)
    expected = (size, size) if isinstance(size, int) else size
    for photo in photos.values():
        ours = t.image_transform(photo)
        assert ours.shape == (3, *expected) and ours.dtype == torch.float32
        assert 0 <= ours.min() and ours.max() <= 1
        timm_pixels = (
            transforms_imagenet_eval(
                size,
                crop_pct=crop_pct,
                interpolation="bicubic",
                crop_mode=crop_mode,
                normalize=False,
            )(photo).float()
            / 255
        )
        # timm resizes uint8 PIL images (rounding to uint8 between its two passes), we resize
        # float tensors: equal up to that rounding; a one-pixel shift would be far off
        assert (ours - timm_pixels).abs().max() < 3 / 255
        assert (ours - timm_pixels).abs().mean() < 0.5 / 255


def test_non_square_fit_is_of_the_crop(photos):
    t = SplatTransform(N, (24, 40), **FAST)
    photo = photos["chelsea"]
    splats = t(photo)
    assert_real_splats(splats)
    crop = t.image_transform(photo)
    assert fit_psnr(splats, crop) > 14
    assert fit_psnr(splats, crop) > fit_psnr(splats, crop.flip(-1).flip(-2)) + 3


def test_prefitted_splats_pass_through_padded(transform, astronaut_64):
    fitted = transform(astronaut_64)[:30].double()
    for out in (transform(fitted), transform.image_transform(fitted)):
        assert out.shape == (N, 8) and out.dtype == torch.float32
        assert torch.equal(out[:30], fitted.float())
        assert torch.count_nonzero(out[30:]) == 0
    with pytest.raises(ValueError, match=r"60 pre-fitted splat rows.*num_splats=48"):
        transform(torch.cat([fitted, fitted]))


def test_collate_fits_the_batch_like_per_image_calls(transform, astronaut_64, photos):
    images = [astronaut_64, *photos.values()]
    batch = [(transform.image_transform(img), label) for label, img in enumerate(images)]
    splats, labels = transform.collate(batch)
    assert splats.shape == (3, N, 8) and splats.dtype == torch.float32
    assert torch.equal(labels, torch.tensor([0, 1, 2]))
    # Bit-identical, not just close: with the default grid init every image's fit is
    # independent of the others in its batch (checked on the CPU kernels and the reference).
    # init="random" is not batch-invariant: it draws each start from the image's batch slot.
    for single, img in zip(splats, images):
        assert torch.equal(single, transform(img))


def test_collate_mixes_pixels_and_prefitted_splats(transform, astronaut_64, photos):
    prefitted = transform(photos["coffee"])[:40]
    pixels = transform.image_transform(astronaut_64)
    out = transform.collate([pixels, prefitted, photos["chelsea"]])  # bare samples, a raw image
    assert isinstance(out, torch.Tensor) and out.shape == (3, N, 8)
    assert torch.equal(out[0], transform(astronaut_64))
    assert torch.equal(out[1, :40], prefitted) and torch.count_nonzero(out[1, 40:]) == 0
    assert torch.equal(out[2], transform(photos["chelsea"]))
    # tuples with several fields collate the rest like default_collate
    splats, labels, names = transform.collate([(pixels, 3, "a"), [prefitted, 4, "b"]])
    assert splats.shape == (2, N, 8) and labels.tolist() == [3, 4] and list(names) == ["a", "b"]


def test_dataloader_with_image_transform_and_collate(transform, astronaut_64, photos):
    images = [astronaut_64, *photos.values()]
    dataset = [(transform.image_transform(img), i) for i, img in enumerate(images)]
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=transform.collate))
    assert [b[0].shape for b in batches] == [(2, N, 8), (1, N, 8)]
    assert torch.equal(batches[1][0][0], transform(images[2]))


def test_from_config_reads_a_timm_data_config():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    t = SplatTransform.from_config(timm.data.resolve_model_data_config(model))
    assert (t.num_splats, t.image_size, t.crop_pct) == (400, (224, 224), 0.9)
    assert t.interpolation.value == "bicubic" and t.crop_mode == "center"
    assert SplatTransform.from_config(model.pretrained_cfg).image_size == (224, 224)
    cfg = {
        "input_size": (3, 24, 40),
        "interpolation": "bilinear",
        "crop_pct": 0.95,
        "mean": (0.1, 0.2, 0.3),
        "std": (0.5, 0.5, 0.5),
        "num_splats": 64,
    }
    t = SplatTransform.from_config(cfg, crop_pct=1.0, **FAST)
    assert (t.num_splats, t.image_size, t.crop_pct) == (64, (24, 40), 1.0)
    assert t.interpolation.value == "bilinear" and t.fit_options == FAST
    assert SplatTransform.from_config(cfg, num_splats=32).num_splats == 32
    from_model = SplatTransform.from_config(model)  # a model: its data config, default budget
    assert (from_model.num_splats, from_model.crop_pct) == (400, 0.9)
    with pytest.raises(TypeError, match="resolve_model_data_config"):
        SplatTransform.from_config("vit_tiny_patch16_224")


def test_bad_options_fail_at_construction():
    with pytest.raises(ValueError, match=r"unknown fit option\(s\) \['iteration'\].*iterations"):
        SplatTransform(N, SIZE, iteration=20)
    with pytest.raises(ValueError, match="iterations"):
        SplatTransform(N, SIZE, iterations=-1)
    for kwargs in (
        {"num_splats": 0},
        {"image_size": (32,)},
        {"crop_pct": 0.0},
        {"crop_pct": 1.5},
        {"interpolation": "lanczos"},
        {"crop_mode": "border"},
    ):
        with pytest.raises(ValueError):
            SplatTransform(**kwargs)


def test_bad_inputs_say_what_to_pass(transform, astronaut_64):
    with pytest.raises(TypeError, match="PIL image, a numpy array"):
        transform("photo.jpg")
    with pytest.raises(TypeError, match="got list"):
        transform([astronaut_64])
    with pytest.raises(ValueError, match="one image.*collate"):
        transform(torch.rand(2, 3, SIZE, SIZE))
    with pytest.raises(ValueError, match="shape"):
        transform(torch.rand(5))
    with pytest.raises(ValueError, match=r"\[0, 1\].*normalisation"):
        transform(torch.randn(3, SIZE, SIZE))  # a mean/std-normalised image
    with pytest.raises(ValueError, match="255"):
        transform(np.asarray(astronaut_64).astype(np.float32))
    with pytest.raises(ValueError, match="channels"):
        transform(torch.rand(2, SIZE, SIZE))
    with pytest.raises(TypeError, match="every sample is a tuple"):
        transform.collate([(torch.rand(3, SIZE, SIZE), 0), torch.rand(3, SIZE, SIZE)])


def test_fitting_leaves_the_global_rng_alone(transform, astronaut_64):
    # Fitting must not reseed torch: the next sample's random augmentations would repeat.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    transform(astronaut_64)
    assert torch.equal(torch.rand(4), expected)


def test_repr_and_pickle(transform, astronaut_64):
    text = repr(SplatTransform(400, (224, 192), crop_pct=0.9, iterations=300))
    assert text == (
        "SplatTransform(num_splats=400, image_size=(224, 192), crop_pct=0.9, "
        "interpolation='bicubic', crop_mode='center', device=None, iterations=300)"
    )
    assert repr(transform).startswith("SplatTransform(num_splats=48, image_size=32,")
    clone = pickle.loads(pickle.dumps(transform))  # DataLoader workers may spawn
    assert torch.equal(clone(astronaut_64), transform(astronaut_64))


@pytest.mark.parametrize("shape", [(1, 2000), (1500, 1), (3, 900)])
def test_extreme_aspect_ratios_resize_only_what_the_crop_keeps(shape, monkeypatch):
    """A 1 x 2000 strip resized to 32 high would be 64000 wide: only the part the crop keeps is
    resized (memory follows the crop), and the crop matches resizing it all."""
    from torchvision.transforms.v2 import functional as TF

    from timm_splat import transforms

    torch.manual_seed(0)
    image = torch.rand(3, *shape)
    t = SplatTransform(N, SIZE, crop_pct=0.875)
    sizes = []
    resize = TF.resize
    monkeypatch.setattr(
        transforms.TF, "resize", lambda x, size, **kw: sizes.append(size) or resize(x, size, **kw)
    )
    crop = t.image_transform(image)
    assert crop.shape == (3, SIZE, SIZE)
    assert max(h * w for h, w in sizes) <= 64 * SIZE * SIZE
    monkeypatch.setattr(transforms, "_MAX_RESIZE_RATIO", 10**9)  # the plain path
    sizes.clear()
    reference = t.image_transform(image)
    assert max(h * w for h, w in sizes) > 64 * SIZE * SIZE
    assert (crop - reference).abs().max() < 1e-3  # a quarter of an 8-bit level


def test_a_strip_of_one_pixel_at_224_is_cheap():
    t = SplatTransform(N, 224, iterations=2)
    assert t.image_transform(torch.rand(3, 10000, 1)).shape == (3, 224, 224)


def test_a_batch_of_splat_sets_is_named():
    with pytest.raises(ValueError, match=r"batch of splat sets \[B, N, 8\]"):
        SplatTransform(N, SIZE)(torch.rand(2, 32, 8))
