"""Hub publishing, offline: a saved repo folder is placed in a temporary HF cache exactly as the
Hub would serve it and loaded back through timm's and open_clip's public ``hf-hub:`` APIs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import timm
import torch
from conftest import random_splats
from safetensors.torch import load_file, save_file

import timm_splat  # noqa: F401  (registers the splat models)
from timm_splat import cli, hub

REPO_FILES = {
    "config.json",
    "model.safetensors",
    "open_clip_config.json",
    "open_clip_model.safetensors",
    "README.md",
}
FAKE_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    model = open_clip.create_model("splat-ViT-test").eval()
    with torch.no_grad():  # a non-trivial logit scale, so a text-tower mix-up would show
        model.logit_scale.fill_(3.0)
    return model


@pytest.fixture(scope="module")
def saved(clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "repo"
    return hub.save_pretrained(
        clip,
        folder,
        num_splats=24,
        metrics={"imagenet_top1": 0.1234},
        data="skimage sample photos",
        base_model="hf-hub:org/base-clip",
        repo_id="org/splat-test",
        stage="clip",
    )


def serve(cache: Path, repo_id: str, folder: Path) -> None:
    """Put ``folder`` into an HF cache the way ``hf_hub_download`` leaves a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(FAKE_SHA)
    shutil.copytree(folder, repo / "snapshots" / FAKE_SHA)


def test_saved_folder_layout(saved):
    assert {p.name for p in saved.iterdir()} == REPO_FILES
    config = json.loads((saved / "config.json").read_text())
    assert config["architecture"] == "splat_vit_test"
    assert (config["num_classes"], config["num_features"], config["global_pool"]) == (
        32,
        64,
        "token",
    )
    assert config["model_args"]["num_splats"] == 24
    assert "num_splats" not in config["pretrained_cfg"]  # timm's PretrainedCfg has no such field
    assert config["pretrained_cfg"]["mean"] and config["pretrained_cfg"]["input_size"] == [
        3,
        224,
        224,
    ]
    oc = json.loads((saved / "open_clip_config.json").read_text())
    assert oc["model_cfg"]["vision_cfg"]["timm_model_name"] == "splat_vit_test"
    assert oc["timm_splat"] == {"model_name": "splat-ViT-test", "num_splats": 24}
    assert {"mean", "std", "size"} <= set(oc["preprocess_cfg"])
    timm_weights = load_file(saved / "model.safetensors")
    assert torch.count_nonzero(timm_weights["head.bias"]) == 0
    card = (saved / "README.md").read_text()
    for text in (
        "library_name: timm",
        "- open_clip",
        "license: apache-2.0",
        "base_model: org/base-clip",
        "24 splats per image",
        "imagenet_top1 | 0.1234",
        "hf-hub:org/splat-test",
    ):
        assert text in card, text


def test_hub_round_trip_through_timm_and_open_clip(clip, saved, tmp_path):
    """timm.create_model / open_clip.create_model_and_transforms("hf-hub:...") with
    HF_HUB_OFFLINE=1 give the original model's outputs."""
    cache = tmp_path / "hf" / "hub"
    serve(cache, "org/splat-test", saved)
    tiny = timm.create_model("splat_vit_test", num_classes=10, num_splats=48).eval()
    serve(cache, "org/splat-timm", hub.save_pretrained(tiny, tmp_path / "timm_repo"))
    splats = random_splats(3, 40, dtype=torch.float32)
    save_file({"splats": splats}, str(tmp_path / "splats.safetensors"))
    code = f"""
import torch, timm, open_clip, timm_splat, timm_splat.hub, timm_splat.models
from safetensors.torch import load_file, save_file
splats = load_file({str(tmp_path / "splats.safetensors")!r})["splats"]
out = {{}}
with torch.no_grad():
    vit = timm.create_model("hf-hub:org/splat-test", pretrained=True).eval()
    out["timm"] = vit(splats)
    model, _, preprocess = open_clip.create_model_and_transforms("hf-hub:org/splat-test")
    tokens = open_clip.get_tokenizer("hf-hub:org/splat-test")(["a photo of a cat", "a dog"])
    out["image"] = model.eval().encode_image(splats)
    out["text"] = model.encode_text(tokens)
    out["tokens"] = tokens
    loaded, info = timm_splat.models.load_clip("hf-hub:org/splat-test")
    out["loaded"] = loaded.encode_image(splats)
    small = timm.create_model("hf-hub:org/splat-timm", pretrained=True).eval()
    out["small"] = small(splats)
out["budgets"] = torch.tensor([vit.num_splats, vit._model_args["num_splats"], info["num_splats"],
                               small.num_splats])
save_file({{k: v.contiguous() for k, v in out.items()}}, {str(tmp_path / "out.safetensors")!r})
"""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_CACHE=str(cache),
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    env.pop("HF_TOKEN", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = load_file(tmp_path / "out.safetensors")
    tokens = out["tokens"]
    with torch.no_grad():
        image = clip.encode_image(splats)
        text = clip.encode_text(tokens)
        small = tiny(splats)
    assert image.shape == (3, 32)
    torch.testing.assert_close(out["timm"], image, rtol=0, atol=1e-6)
    assert torch.equal(out["image"], image)
    assert torch.equal(out["loaded"], image)
    assert torch.equal(out["text"], text)
    assert torch.equal(out["small"], small)
    assert out["budgets"].tolist() == [24, 24, 24, 48]


class RecordingApi:
    """What push_to_hub would send: create_repo / upload_folder calls, the folder copied."""

    def __init__(self, into: Path):
        self.into, self.calls = into, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        self.calls.append(("upload_folder", repo_id, kwargs))
        shutil.copytree(folder_path, self.into / f"upload{len(self.calls)}")
        return "commit-info"


def uploaded_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_push_to_hub_sends_the_folder(saved, tmp_path):
    api = RecordingApi(tmp_path)
    assert hub.push_to_hub(saved, "org/splat-test", private=True, api=api) == "commit-info"
    (_, repo, create), (_, upload_repo, upload) = api.calls
    assert (repo, create["private"], create["exist_ok"]) == ("org/splat-test", True, True)
    assert upload_repo == "org/splat-test" and upload["commit_message"]
    files = uploaded_files(tmp_path / "upload2")
    assert files == REPO_FILES
    assert not any(name.endswith(hub.PICKLE_SUFFIXES) for name in files)


def test_push_refuses_pickles(saved, tmp_path):
    folder = shutil.copytree(saved, tmp_path / "repo")
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        hub.push_to_hub(folder, "org/x", api=RecordingApi(tmp_path))


@pytest.fixture
def run_dir(clip, tmp_path):
    """A training run directory as timm_splat.training leaves it."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in clip.state_dict().items()}, str(final / "model.safetensors")
    )
    (final / "run.json").write_text(
        json.dumps(
            {
                "model": "splat-ViT-test",
                "num_splats": 36,
                "stage": "clip",
                "data": "tiny",
                "metrics": {"top1": 0.5},
                "teacher": "ViT-B-16",
                "teacher_pretrained": "datacomp_xl_s13b_b90k",
            }
        )
    )
    return final.parent


def test_push_run(clip, run_dir, tmp_path):
    api = RecordingApi(tmp_path)
    assert hub.push_run(run_dir, "org/run", api=api) is None
    pushed = tmp_path / "upload2"
    assert uploaded_files(pushed) == REPO_FILES
    assert json.loads((pushed / "config.json").read_text())["model_args"]["num_splats"] == 36
    card = (pushed / "README.md").read_text()
    assert "ViT-B-16 datacomp_xl_s13b_b90k" in card and "| top1 | 0.5 |" in card
    # the CLI's --folder-only writes the same folder and pushes nothing
    out = tmp_path / "folder"
    assert cli.main(["push", str(run_dir), "org/run", "--folder-only", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == REPO_FILES
    assert torch.equal(
        load_file(out / "open_clip_model.safetensors")["logit_scale"], clip.logit_scale
    )
    assert cli.main(["push", str(tmp_path / "nowhere"), "org/run", "--folder-only", str(out)]) == 2


def test_card_names_datasets_only_by_hub_id(tmp_path):
    tiny = timm.create_model("splat_vit_test", num_classes=10)
    local = tmp_path / "data" / "train"
    local.mkdir(parents=True)
    card = (hub.save_pretrained(tiny, tmp_path / "a", data=str(local)) / "README.md").read_text()
    assert "datasets:" not in card.split("---")[1]  # a local path is not Hub metadata
    card = (
        hub.save_pretrained(tiny, tmp_path / "b", data="org/in1k-gs400") / "README.md"
    ).read_text()
    assert "datasets:\n- org/in1k-gs400" in card.split("---")[1]


def test_an_edited_config_cannot_ask_for_a_giant_model(saved, tmp_path):
    """A config.json / open_clip_config.json edited to ask for tens of GB is refused before
    anything is allocated."""
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    config = json.loads((edited / "config.json").read_text())
    config["model_args"]["depth"], config["model_args"]["embed_dim"] = 4000, 8192
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="B parameters"):
        timm.create_model(f"local-dir:{edited}", pretrained=True)
    oc = json.loads((edited / "open_clip_config.json").read_text())
    oc["model_cfg"]["text_cfg"].update(width=16384, layers=96)
    (edited / "open_clip_config.json").write_text(json.dumps(oc))
    with pytest.raises(ValueError, match="text tower"):
        from timm_splat.models import load_clip

        load_clip(str(edited))


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "key, value",
    [("num_classes", 10**9), ("num_latents", 10**8), ("embed_dim", 10**8), ("num_latents", 1.5)],
)
def test_every_size_of_a_timm_config_is_counted(saved, tmp_path, key, value):
    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    _edit_json(edited / "config.json", lambda c: c["model_args"].update({key: value}))
    with pytest.raises(ValueError, match=rf"B parameters|{key} must be an int"):
        timm.create_model(f"local-dir:{edited}", pretrained=True)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c["model_cfg"]["text_cfg"].update(vocab_size=10**9), "B parameters"),
        (lambda c: c["model_cfg"]["text_cfg"].update(context_length=10**6), "B parameters"),
        (lambda c: c["model_cfg"].update(embed_dim=10**8), "B parameters"),
        (lambda c: c["model_cfg"]["text_cfg"].update(layers="x"), "depth must be an int"),
        (
            lambda c: c["model_cfg"]["vision_cfg"].update(timm_model_name="vit_tiny_patch16_224"),
            "not a splat ViT",
        ),
        (lambda c: c["timm_splat"].update(num_splats="abc"), "num_splats must be a positive int"),
        (lambda c: c.update(timm_splat=[1]), "timm_splat must be an object"),
    ],
)
def test_an_edited_open_clip_config_is_refused_before_building(saved, tmp_path, edit, message):
    from timm_splat.models import load_clip

    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    _edit_json(edited / "open_clip_config.json", edit)
    with pytest.raises(ValueError, match=rf"open_clip_config.json.*{message}|{message}"):
        load_clip(str(edited))


def test_damaged_model_folders_name_the_file(saved, run_dir, tmp_path):
    from timm_splat.models import load_clip

    edited = tmp_path / "edited"
    shutil.copytree(saved, edited)
    (edited / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"open_clip_config.json is not readable JSON"):
        load_clip(str(edited))
    shutil.copy(saved / "open_clip_config.json", edited)
    weights = edited / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="weights do not load"):
        load_clip(str(edited))

    run = run_dir  # the fixture's own copy (function scope)
    (run / "final" / "run.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"run.json holds a list"):
        load_clip(str(run))
    for field, value in (("num_splats", 0), ("num_splats", "abc"), ("quick_gelu", "yes")):
        (run / "final" / "run.json").write_text(
            json.dumps({"model": "splat-ViT-test", field: value})
        )
        with pytest.raises(ValueError, match=rf"run.json: {field} must be"):
            load_clip(str(run))
    (run / "final" / "run.json").write_text(json.dumps({"model": "splat-ViT-test"}))
    weights = run / "final" / "model.safetensors"
    tensors = load_file(weights)  # its header nested deeply: json.loads raises RecursionError
    save_file(tensors, weights, metadata={"timm_splat_run": "[" * 100_000})
    with pytest.raises(ValueError, match="timm_splat_run header is not JSON"):
        load_clip(str(run))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"{weights} is not a readable safetensors"):
        load_clip(str(run))


def test_non_finite_weights_are_never_published(tmp_path):
    model = timm.create_model("splat_vit_test", num_classes=4, num_splats=8)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights"):
        hub.save_pretrained(model, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
