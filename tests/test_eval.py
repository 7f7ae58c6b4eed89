"""Zero-shot evaluation end to end on a tiny pre-fitted dataset and an image folder (skimage
photos, 16 splats at 32 px), and the clip_benchmark wrapper against a stand-in registry."""

import json
import sys
import types

import datasets
import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import timm_splat
from timm_splat import cli
from timm_splat.cli import clip_benchmark as benchmark
from timm_splat.data import labelled_loader as build_loader
from timm_splat.evaluation import (
    evaluate_zero_shot,
    load_classnames,
    load_templates,
    zero_shot_classifier,
)
from timm_splat.samples import sample_photos


def main(argv):
    return cli.main(["eval", *argv])


PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
CLASSNAMES = ["astronaut", "coffee", "cat", "rocket", "motorcycle", "retina", "dog", "car"]
FIT = dict(num_splats=16, iterations=10)


@pytest.fixture(scope="module")
def photos():
    return sample_photos(32, names=PHOTOS)


@pytest.fixture(scope="module")
def prefit(photos, tmp_path_factory):
    """A labelled pre-fitted dataset in the published schema, laid out like a Hub dataset."""
    fitted = timm_splat.fit_splats(
        list(photos.values()),
        num_splats=FIT["num_splats"],
        progress=False,
        iterations=FIT["iterations"],
    )
    rows = {
        # real rows only (differing counts), as the writer stores them
        "splats": [s[timm_splat.splat_mask(s)].half().numpy() for s in fitted.splats],
        "label": list(range(len(PHOTOS))),
        "caption": [f"a photo of a {name}" for name in CLASSNAMES[: len(PHOTOS)]],
        "source_id": list(PHOTOS),
        "psnr": fitted.psnr.tolist(),
    }
    features = datasets.Features(
        {
            "splats": datasets.List(datasets.List(datasets.Value("float16"), length=8)),
            "label": datasets.Value("int64"),
            "caption": datasets.Value("string"),
            "source_id": datasets.Value("string"),
            "psnr": datasets.Value("float32"),
        }
    )
    folder = tmp_path_factory.mktemp("prefit")
    (folder / "data").mkdir()
    datasets.Dataset.from_dict(rows, features=features).to_parquet(
        str(folder / "data" / "validation-00000-of-00001.parquet")
    )
    return folder


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return open_clip.create_model("splat-ViT-test").eval()


@pytest.fixture(scope="module")
def run_dir(clip, tmp_path_factory):
    final = tmp_path_factory.mktemp("run") / "final"
    final.mkdir()
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()}, str(final / "model.safetensors")
    )
    (final / "run.json").write_text(json.dumps({"model": "splat-ViT-test", "num_splats": 16}))
    return final.parent


def test_zero_shot_end_to_end(clip, prefit):
    tokenizer = open_clip.get_tokenizer("splat-ViT-test")
    classifier = zero_shot_classifier(clip, tokenizer, CLASSNAMES, ["a photo of a {}.", "a {c}."])
    assert classifier.shape == (32, len(CLASSNAMES))
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(len(CLASSNAMES)))
    loader, classes = build_loader(prefit, split="validation", batch_size=3)
    assert classes is None
    batches = list(loader)
    assert [tuple(s.shape[::2]) for s, _ in batches] == [(3, 8), (1, 8)]  # padded per batch
    result = evaluate_zero_shot(clip, classifier, batches)
    assert result["n"] == len(PHOTOS) and 0 < result["max_splats"] <= FIT["num_splats"]
    assert 0 <= result["top1"] <= result["top5"] <= 1
    # A classifier made of the images' own embeddings (in label order) must be always right,
    # and one shifted by a class always wrong: labels and samples stay aligned through loading.
    with torch.no_grad():
        embeddings = torch.cat([F.normalize(clip.encode_image(s), dim=-1) for s, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == list(range(len(PHOTOS)))
    oracle = evaluate_zero_shot(clip, embeddings.T, batches)
    assert (oracle["top1"], oracle["top5"]) == (1.0, 1.0)
    shifted = evaluate_zero_shot(clip, embeddings.roll(1, dims=0).T, batches)
    assert shifted["top1"] == 0.0 and shifted["top5"] == 1.0  # 4 classes: top-5 is top-4
    with pytest.raises(ValueError, match="--classnames"):
        evaluate_zero_shot(clip, classifier[:, :2], batches)
    with pytest.raises(ValueError, match="unlabelled"):
        evaluate_zero_shot(clip, classifier, [(batches[0][0], -torch.ones(3))])


def test_classnames_and_templates(tmp_path):
    assert len(load_classnames("imagenet")) == 1000
    assert load_classnames(None, ["golden_retriever", "tabby"]) == ["golden retriever", "tabby"]
    assert load_classnames(None, [f"n{i:08d}" for i in range(1000)])[0] == "tench"
    assert load_classnames("cat, dog") == ["cat", "dog"]
    (tmp_path / "names.json").write_text('["a", "b"]')
    assert load_classnames(str(tmp_path / "names.json")) == ["a", "b"]
    for text, problem in (
        ('["a", "b"', "is not readable"),
        ("[" * 100_000, "is not readable"),
        ('{"a": 1}', "holds a dict, not a list"),
        ("7", "holds a int"),
    ):
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(ValueError, match=f"class names file .*bad.json {problem}"):
            load_classnames(str(tmp_path / "bad.json"))
    assert len(load_templates(None)) == 80
    (tmp_path / "t.txt").write_text("a {}.\nthe {c}!\n")
    templates = load_templates([str(tmp_path / "t.txt"), "simple"])
    assert [t("cat") for t in templates[:2]] == ["a cat.", "the cat!"]
    with pytest.raises(ValueError):
        load_templates(["no placeholder"])


def write_image_folder(root, photos):
    for name, image in photos.items():
        label = "coffee_cup" if name == "coffee" else "not_coffee"
        (root / label).mkdir(parents=True, exist_ok=True)
        image.save(root / label / f"{name}.png")


def test_main_on_an_image_folder(photos, tmp_path, capsys):
    write_image_folder(tmp_path / "images", photos)
    out = tmp_path / "results.json"
    code = main(
        [
            "--model",
            "splat-ViT-test",
            "--data",
            str(tmp_path / "images"),
            "--classnames",
            "folder",
            "--templates",
            "a photo of a {}.",
            "--num-splats",
            "16",
            "--image-size",
            "32",
            "--iterations",
            "10",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--output",
            str(out),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "top1" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert (result["n"], result["num_classes"], result["num_splats"]) == (4, 2, 16)
    assert 0 <= result["top1"] <= 1 and result["top5"] == 1.0


def test_main_on_prefitted_splats_with_a_run_dir(clip, run_dir, prefit, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = [
        "--pretrained",
        str(run_dir),
        "--data",
        str(prefit),
        "--classnames",
        ",".join(CLASSNAMES),
        "--templates",
        "simple",
        "--batch-size",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args + ["--output", str(out)]) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    assert (result["model"], result["num_splats"], result["split"]) == (
        "splat-ViT-test",
        16,
        "validation",
    )
    # the CLI's numbers are evaluate_zero_shot's on the same model
    classifier = zero_shot_classifier(
        clip, open_clip.get_tokenizer("splat-ViT-test"), CLASSNAMES, load_templates(["simple"])
    )
    direct = evaluate_zero_shot(clip, classifier, build_loader(prefit, batch_size=2)[0])
    assert (result["top1"], result["top5"], result["n"]) == (
        direct["top1"],
        direct["top5"],
        direct["n"],
    )
    assert main(args[:-4] + ["--classnames", "a,b"]) == 2  # labels 2, 3 have no class name
    assert "--classnames" in capsys.readouterr().err
    assert main(args + ["--split", "train"]) == 2


# ----------------------------------------------------------------------- clip_benchmark


@pytest.fixture
def fake_clip_benchmark(monkeypatch):
    """The parts of clip_benchmark the wrapper touches: the loader registry and the zero-shot
    metrics module with its numpy-2.4-breaking float(size-1 array) accuracy."""
    package = types.ModuleType("clip_benchmark")
    models = types.ModuleType("clip_benchmark.models")
    models.TYPE2FUNC = {"open_clip": lambda **kw: None}
    models.MODEL_TYPES = list(models.TYPE2FUNC)
    metrics = types.ModuleType("clip_benchmark.metrics")
    zsc = types.ModuleType("clip_benchmark.metrics.zeroshot_classification")
    exec(
        "def accuracy(output, target, topk=(1,)):\n"
        "    pred = output.topk(max(topk), 1, True, True)[1].t()\n"
        "    correct = pred.eq(target.view(1, -1).expand_as(pred))\n"
        "    return [float(correct[:k].reshape(-1).float().sum(0, keepdim=True).numpy())"
        " / len(target)\n"
        "            for k in topk]\n",
        zsc.__dict__,
    )
    package.models, package.metrics, metrics.zeroshot_classification = models, metrics, zsc
    for name, module in [
        ("clip_benchmark", package),
        ("clip_benchmark.models", models),
        ("clip_benchmark.metrics", metrics),
        ("clip_benchmark.metrics.zeroshot_classification", zsc),
    ]:
        monkeypatch.setitem(sys.modules, name, module)
    return package


def test_benchmark_registers_the_splat_type(fake_clip_benchmark, run_dir, photos):
    logits, target = torch.tensor([[0.9, 0.1], [0.8, 0.2]]), torch.tensor([0, 1])
    zsc = fake_clip_benchmark.metrics.zeroshot_classification
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        with pytest.raises(TypeError):
            zsc.accuracy(logits, target)
    benchmark.register()
    models = fake_clip_benchmark.models
    assert models.TYPE2FUNC["splat"] is benchmark.load_splat and models.MODEL_TYPES[-1] == "splat"
    assert zsc.accuracy(logits, target, topk=(1, 2)) == [0.5, 1.0]
    model, transform, tokenizer = models.TYPE2FUNC["splat"](
        model_name="splat-ViT-test", pretrained=str(run_dir), cache_dir=None, device="cpu"
    )
    assert model.encode_text(tokenizer(["a cat"])).shape == (1, 32)
    # The transform gives pixels; encode_image fits the whole batch in one call, the same fits
    # as fitting each image on its own with the model's budget.
    images = [photos[name] for name in PHOTOS[:2]]
    per_image = timm_splat.SplatTransform.from_config(timm_splat.models.splat_trunk(model))
    with torch.no_grad():
        batched = model.encode_image(torch.stack([transform(im) for im in images]))
        single = model.encode_image(torch.stack([per_image(im) for im in images]))
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-5)


def test_benchmark_without_clip_benchmark(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "clip_benchmark", None)
    assert benchmark.main(["eval", "--dataset", "cifar10"]) == 2
    assert "pip install clip_benchmark" in capsys.readouterr().err


def test_a_dataset_with_class_names_is_scored_against_them(run_dir, prefit, tmp_path, capsys):
    """Without --classnames, a pre-fitted dataset's own ClassLabel names are used, not
    ImageNet's."""
    labelled = tmp_path / "labelled"
    (labelled / "data").mkdir(parents=True)
    table = datasets.load_dataset(
        "parquet",
        data_files=str(prefit / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "cache"),
    )
    table = table.cast_column("label", datasets.ClassLabel(names=CLASSNAMES))
    table.to_parquet(str(labelled / "data" / "validation-00000-00000.parquet"))
    out = tmp_path / "results.json"
    args = [
        "--pretrained",
        str(run_dir),
        "--data",
        str(labelled),
        "--templates",
        "simple",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--output",
        str(out),
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads(out.read_text())["num_classes"] == len(CLASSNAMES)
