"""open_clip's own model tests, adapted to every registered ``splat-ViT-*`` config.

open_clip 3.3.0 does not install its tests; these follow its tests/test_inference.py
(reproducible encode_image / encode_text, tuple and dict outputs agree, the jit=True variant),
tests/test_inference_simple.py (preprocess + tokenizer + probabilities) and
tests/test_training_simple.py (``open_clip_train.main`` on its synthetic dataset, with
``--lock-image``), in open_clip's conventions: ``create_model_and_transforms``,
``get_tokenizer``, ``ClipLoss``, checkpoints loaded by ``open_clip.load_checkpoint``. open_clip's
regression data (outputs of pretrained RGB models) has no splat counterpart, so reproducibility
under a seed replaces it. Models get open_clip's pixel preprocess here (the splat models fit
pixels on the fly) unless a test says otherwise. The small configs run in CI; the full-size ones
are marked slow (``pytest -m slow``).
"""

import logging
import os
import random
import subprocess
import sys

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import timm_splat
from timm_splat.models.stem import NO_TORCHSCRIPT
from timm_splat.testing import random_splats

FAST = ["splat-ViT-test", "splat-ViT-Mini-7"]
MODELS = [
    pytest.param(name, marks=[] if name in FAST else pytest.mark.slow)
    for name in sorted(open_clip.list_models())
    if name.startswith("splat-")
]


def seed_all(seed: int = 0) -> None:  # open_clip's util_test.seed_all
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def random_images(batch: int, size) -> list:  # util_test.random_image_batch
    height, width = (size, size) if isinstance(size, int) else size
    data = np.random.randint(255, size=(batch, height, width, 3), dtype=np.uint8)
    return [Image.fromarray(d) for d in data]


def random_texts(batch: int) -> list[str]:  # util_test.random_text_batch, shorter
    words = ["a", "photo", "of", "cat", "dog", "diagram", "red", "blue", "small", "the"]
    return [" ".join(random.choices(words, k=random.randint(3, 12))) for _ in range(batch)]


def create(name: str, **kwargs):
    # As open_clip's tests call it (pretrained_hf is no longer an argument in 3.x).
    options = dict(pretrained=None, precision="fp32", jit=False, force_quick_gelu=False)
    return open_clip.create_model_and_transforms(name, **dict(options, **kwargs))


def small_budget(model, num_splats: int = 64, iterations: int = 20):
    """Fit pixels with fewer splats and steps: the tests check plumbing, not fit quality."""
    trunk = timm_splat.models.splat_trunk(model)
    trunk.num_splats = num_splats
    trunk.fit_options = {"iterations": iterations}
    return model


def test_every_splat_config_is_covered():
    names = {p.values[0] for p in MODELS}
    assert set(FAST) <= names and {"splat-ViT-B-16", "splat-ViT-L-14"} <= names
    for name in names:
        config = open_clip.get_model_config(name)
        assert config["vision_cfg"]["timm_model_name"].startswith("splat_vit_")


@pytest.mark.parametrize("name", MODELS)
def test_inference_with_data(name):
    """tests/test_inference.py: encode_text / encode_image of random data, twice from the same
    seed (bit-identical), then the tuple and output_dict forms of forward agree."""
    outputs = []
    for _ in range(2):
        seed_all()
        model, _, preprocess_val = create(name)
        small_budget(model.eval())
        images = random_images(2, model.visual.image_size)
        texts = random_texts(2)
        tokenizer = open_clip.get_tokenizer(name)
        with torch.no_grad():
            image = torch.stack([preprocess_val(im) for im in images])
            text = tokenizer(texts)
            outputs.append((model.encode_image(image), model.encode_text(text)))
    (image_a, text_a), (image_b, text_b) = outputs
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)
    embed_dim = open_clip.get_model_config(name)["embed_dim"]
    assert image_a.shape == text_a.shape == (2, embed_dim)
    assert torch.isfinite(image_a).all() and torch.isfinite(text_a).all()

    with torch.no_grad():
        as_tuple = model(image, text)
        model.output_dict = True
        as_dict = model(image, text)
        model.output_dict = False
    assert torch.equal(as_dict["image_features"], as_tuple[0])
    assert torch.equal(as_dict["text_features"], as_tuple[1])
    assert torch.equal(as_dict["logit_scale"], as_tuple[2])


@pytest.mark.parametrize("name", FAST)
def test_inference_simple(name):
    """tests/test_inference_simple.py without weights: preprocess one image, tokenize three
    captions, probabilities over them; the untrained logit scale is CLIP's 1 / 0.07."""
    model, _, preprocess = create(name)
    small_budget(model.eval())
    tokenizer = open_clip.get_tokenizer(name)
    image = preprocess(random_images(1, model.visual.image_size)[0]).unsqueeze(0)
    text = tokenizer(["a diagram", "a dog", "a cat"])
    assert text.shape == (3, model.context_length) and text.dtype == torch.long
    with torch.no_grad():
        image_features = model.encode_image(image, normalize=True)
        text_features = model.encode_text(text, normalize=True)
        text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
        _, _, logit_scale = model(image, text)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(1))
    torch.testing.assert_close(text_probs.sum(-1), torch.ones(1))
    torch.testing.assert_close(logit_scale, torch.tensor(1 / 0.07))


def test_splat_preprocess_matches_the_pixel_path(astronaut_64):
    """timm_splat.create_model_and_transforms hands out a SplatTransform: the same model reads
    its splats, and open_clip's pixel preprocess of the same image gives finite features too."""
    model, _, preprocess = timm_splat.create_model_and_transforms("splat-ViT-Mini-7")
    assert isinstance(preprocess, timm_splat.SplatTransform)
    splats = preprocess(astronaut_64)
    assert splats.shape == (model.visual.trunk.num_splats, 8)
    _, _, pixel_preprocess = open_clip.create_model_and_transforms("splat-ViT-Mini-7")
    small_budget(model.eval())
    with torch.no_grad():
        from_splats = model.encode_image(splats[None])
        from_pixels = model.encode_image(pixel_preprocess(astronaut_64)[None])
    assert from_splats.shape == from_pixels.shape == (1, 64)
    assert torch.isfinite(from_pixels).all()


def test_jit_true_falls_back_with_the_reason(caplog):
    """open_clip's jit=True scripts the model; splat models refuse TorchScript (deprecated in
    PyTorch 2, and the pixel path's fitter cannot be scripted), so open_clip logs our reason
    and returns the eager model, as it does for any model that fails to script."""
    with caplog.at_level(logging.WARNING):
        model, _, _ = create("splat-ViT-test", jit=True)
    assert not isinstance(model, torch.jit.ScriptModule)
    assert "do not support TorchScript" in caplog.text
    with torch.no_grad():
        assert model.encode_image(random_splats(1, 30, dtype=torch.float32)).shape == (1, 32)

    class TestWrapper(torch.nn.Module):  # util_test.TestWrapper, what test_inference scripts
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.head = torch.nn.Linear(32, 2)

        def forward(self, image, text):
            return {"test_output": self.head(self.model(image, text)[0])}

    with pytest.raises(RuntimeError, match="do not support TorchScript"):
        torch.jit.script(TestWrapper(model))
    assert "torch.compile" in NO_TORCHSCRIPT


@pytest.mark.parametrize("precision", ["bf16", "pure_bf16"])
def test_reduced_precision_on_splats(precision):
    model, _, _ = create("splat-ViT-test", precision=precision)
    splats = random_splats(2, 40, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        features = model.eval().encode_image(splats)
    assert features.shape == (2, 32) and torch.isfinite(features.float()).all()


def test_contrastive_training_step():
    """A ClipLoss step on splats and tokens: every trainable parameter gets a gradient (the GS
    stem included) and the step changes the weights; lock_image_tower keeps the locked part."""
    seed_all()
    model, _, _ = create("splat-ViT-test")
    tokenizer = open_clip.get_tokenizer("splat-ViT-test")
    loss_fn = open_clip.ClipLoss()
    splats = random_splats(4, 40, dtype=torch.float32)
    text = tokenizer(random_texts(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image_features, text_features, logit_scale = model.train()(splats, text)
    loss = loss_fn(image_features, text_features, logit_scale)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    # open_clip's text tower has no use for its attention mask buffer; parameters all train.
    assert not missing, missing
    before = model.visual.trunk.patch_embed.proj.weight.detach().clone()
    optimizer.step()
    assert not torch.equal(before, model.visual.trunk.patch_embed.proj.weight)

    model.lock_image_tower(unlocked_groups=1)  # open_clip's --lock-image-unlocked-groups
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert "trunk.patch_embed.proj.weight" not in trainable  # the stem is group 0
    assert any(n.startswith("trunk.norm.") for n in trainable)
    assert "head.proj.weight" in trainable


def test_state_dict_round_trip(tmp_path):
    """Save a state dict (torch and safetensors) and load it back the open_clip way: as the
    ``pretrained`` file of create_model and through load_checkpoint."""
    from safetensors.torch import save_file

    seed_all()
    model, _, _ = create("splat-ViT-test")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    splats = random_splats(2, 40, dtype=torch.float32)
    text = open_clip.get_tokenizer("splat-ViT-test")(["a cat", "a dog"])
    with torch.no_grad():
        expected = model.eval()(splats, text)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors"
    )
    loaded = [
        open_clip.create_model("splat-ViT-test", pretrained=str(tmp_path / "model.pt")),
        open_clip.create_model("splat-ViT-test", pretrained=str(tmp_path / "m.safetensors")),
    ]
    fresh = open_clip.create_model("splat-ViT-test")
    open_clip.load_checkpoint(fresh, str(tmp_path / "model.pt"), strict=True)
    for other in [*loaded, fresh]:
        with torch.no_grad():
            for a, b in zip(other.eval()(splats, text), expected):
                assert torch.equal(a, b)


def test_zero_shot_classifier_and_open_clip_train_eval_loop():
    """open_clip's zero-shot pieces: build_zero_shot_classifier from class names and templates,
    then what open_clip_train's zero_shot.run does with a batch (model(image=...), logits
    against the classifier). Its accuracy() fails on numpy 2 (float() of a 1-element array), so
    top-k is counted here."""
    seed_all()
    model, _, _ = create("splat-ViT-test")
    tokenizer = open_clip.get_tokenizer("splat-ViT-test")
    classnames = open_clip.IMAGENET_CLASSNAMES[:5]
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(
            model.eval(), tokenizer, classnames, open_clip.SIMPLE_IMAGENET_TEMPLATES
        )
    assert classifier.shape == (32, 5)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(5))
    splats, target = random_splats(6, 40, dtype=torch.float32), torch.arange(6) % 5
    with torch.no_grad():
        output = model(image=splats)
    image_features = output["image_features"] if isinstance(output, dict) else output[0]
    logits = 100.0 * image_features @ classifier
    assert logits.shape == (6, 5) and torch.isfinite(logits).all()
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(6))
    top5 = logits.topk(5).indices.eq(target[:, None]).any(-1)
    assert top5.all()  # five classes: top-5 always hits


def test_forward_intermediates_through_open_clip():
    model, _, _ = create("splat-ViT-test")
    splats = random_splats(2, 40, dtype=torch.float32)
    with torch.no_grad():
        out = model.eval().forward_intermediates(image=splats, image_indices=1)
        features = model.encode_image(splats, normalize=True)  # normalize: its default
    maps = out["image_intermediates"]
    assert len(maps) == 1 and maps[0].shape == (2, 64, 7, 7)  # the 7 x 7 latent grid
    torch.testing.assert_close(out["image_features"], features)


def test_compile_on_splats_and_on_pixels():
    """torch.compile of a splat CLIP: fullgraph on splats; on pixels the fit runs eagerly (a
    graph break) and fullgraph=True says why it cannot be captured."""
    model, _, preprocess = create("splat-ViT-test")
    small_budget(model.eval(), iterations=5)
    splats = random_splats(2, 40, dtype=torch.float32)
    pixels = torch.stack([preprocess(im) for im in random_images(2, 64)])
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model.encode_image, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(splats), model.encode_image(splats))
        torch._dynamo.reset()
        compiled = torch.compile(model.encode_image, backend="eager")
        torch.testing.assert_close(compiled(pixels), model.encode_image(pixels))
        torch._dynamo.reset()
        with pytest.raises(Exception, match="fit pixel inputs with an optimiser"):
            torch.compile(model.encode_image, backend="eager", fullgraph=True)(pixels)
    torch._dynamo.reset()


# open_clip_train's data module imports webdataset and braceexpand at the top, for its
# webdataset loader; the synthetic dataset needs neither, and they are not dependencies here.
_STUBS = """
import importlib.util, sys, types
def placeholder(attr):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return type(attr, (), {})
missing = [name for name in ("braceexpand", "webdataset") if not importlib.util.find_spec(name)]
if "webdataset" in missing:
    missing += ["webdataset.filters", "webdataset.tariterators"]
for name in missing:
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__getattr__ = placeholder
"""


def test_open_clip_train_main(tmp_path):
    """tests/test_training_simple.py: open_clip's training program, one epoch on its synthetic
    dataset with the image tower locked but its last two groups, a checkpoint saved; the
    checkpoint loads strictly into a fresh model."""
    args = [
        "--save-frequency", "1", "--zeroshot-frequency", "1", "--dataset-type", "synthetic",
        "--train-num-samples", "8", "--warmup", "1", "--batch-size", "4", "--lr", "1e-3",
        "--wd", "0.1", "--epochs", "1", "--workers", "0", "--model", "splat-ViT-test",
        "--lock-image", "--lock-image-unlocked-groups", "2", "--logs", str(tmp_path),
        "--name", "run",
    ]  # fmt: skip
    code = _STUBS + (
        "import timm_splat\n"
        "from open_clip_train.main import main\n"
        "timm_splat.models.splat_trunk  # registered\n"
        f"main({args!r})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, CUDA_VISIBLE_DEVICES=""),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Train Epoch: 0 [8/8 (100%)]" in result.stderr + result.stdout
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    model = open_clip.create_model("splat-ViT-test")
    open_clip.load_checkpoint(model, str(checkpoint), strict=True, weights_only=False)
