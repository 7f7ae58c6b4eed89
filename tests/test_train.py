"""Training with accelerate on the CPU: stage 1 then stage 2 on a tiny model and a tiny captioned
set, losses fall, and a resumed run continues exactly where the checkpoint left it."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file, save_file

from timm_splat.samples import sample_photos

TINY = [
    "--model",
    "splat-ViT-test",
    "--num-splats",
    "16",
    "--image-size",
    "32",
    "--fit-iterations",
    "10",
    "--batch-size",
    "4",
    "--lr",
    "3e-3",
    "--warmup",
    "1",
    "--log-every",
    "1",
    "--cpu",
]


@pytest.fixture(scope="module")
def captioned_folder(tmp_path_factory):
    """8 small photos, each with its own caption file."""
    folder = tmp_path_factory.mktemp("captioned")
    photos = list(sample_photos(48).items())[:4]
    for i, (name, image) in enumerate(photos * 2):
        image = image.transpose(0) if i >= len(photos) else image  # second copy mirrored
        image.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"a photo of {name.replace('_', ' ')}")
    return folder


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny RGB CLIP as an open_clip local-dir model (random weights), the layout of
    splat-ViT-test's towers so from_rgb can copy it."""
    folder = tmp_path_factory.mktemp("teacher")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {
            "layers": 3,
            "width": 64,
            "head_width": 32,
            "patch_size": 32,
            "image_size": 64,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 2,
        },
    }
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return folder


def run_train(*args):
    result = subprocess.run(
        [sys.executable, "-m", "timm_splat", "train", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def losses(run_dir, stage):
    lines = (run_dir / stage / "log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_distill_then_clip_losses_fall(tmp_path, captioned_folder, teacher_dir):
    run = tmp_path / "run"
    run_train(
        "--stage",
        "distill",
        "--teacher",
        f"local-dir:{teacher_dir}",
        "--train-data",
        str(captioned_folder),
        "--output",
        str(run),
        "--epochs",
        "8",
        *TINY,
    )
    distill = losses(run, "distill")
    assert len(distill) == 16
    assert sum(list(distill.values())[-4:]) < sum(list(distill.values())[:4])
    assert json.loads((run / "final" / "run.json").read_text())["stage"] == "distill"

    run_train(
        "--stage",
        "clip",
        "--resume",
        str(run),
        "--train-data",
        str(captioned_folder),
        "--epochs",
        "8",
        *TINY,
    )
    clip = losses(run, "clip")
    assert sum(list(clip.values())[-4:]) < sum(list(clip.values())[:4])
    assert json.loads((run / "final" / "run.json").read_text())["stage"] == "clip"
    assert (run / "clip" / "final" / "model.safetensors").exists()


def test_resume_gives_the_same_next_step(tmp_path, captioned_folder, teacher_dir):
    full = tmp_path / "full"
    common = [
        "--stage",
        "distill",
        "--teacher",
        f"local-dir:{teacher_dir}",
        "--train-data",
        str(captioned_folder),
        "--epochs",
        "2",
        "--checkpoint-every",
        "3",
        *TINY,
    ]
    run_train(*common, "--output", str(full))
    expected = losses(full, "distill")
    assert len(expected) == 4  # 2 epochs of 2 batches: step 3 is mid-epoch

    # A run killed after its step-3 checkpoint: only that checkpoint survives.
    cut = tmp_path / "cut"
    (cut / "distill" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        full / "distill" / "checkpoints" / "step_0000003",
        cut / "distill" / "checkpoints" / "step_0000003",
    )
    result = run_train(*common, "--resume", str(cut))
    assert "resumed" in result.stdout
    resumed = losses(cut, "distill")
    assert list(resumed) == [4]
    assert resumed[4] == pytest.approx(expected[4], rel=1e-6, abs=1e-9)


def test_distill_needs_a_teacher(tmp_path, captioned_folder):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "timm_splat",
            "train",
            "--stage",
            "distill",
            "--train-data",
            str(captioned_folder),
            "--output",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "needs --teacher" in result.stderr


def test_two_processes_split_an_epoch(tmp_path, captioned_folder):
    """torchrun, 2 CPU processes (gloo): each trains on its own half, together on every sample
    once, and ClipLoss gathers across them."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    run = tmp_path / "run"
    result = subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "timm_splat",
            "train",
            "--stage",
            "clip",
            "--train-data",
            str(captioned_folder),
            "--output",
            str(run),
            "--epochs",
            "1",
            "--record-samples",
            *TINY,
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [(run / "clip" / f"samples-{rank}.txt").read_text().split() for rank in (0, 1)]
    ids = [line for lines in seen for line in lines[1::2]]  # "epoch id" pairs
    assert len(seen[0]) == len(seen[1]) > 0
    assert sorted(ids) == sorted(p.name for p in captioned_folder.glob("*.png"))
    assert len(losses(run, "clip")) == 2  # 8 images / (2 processes x batch 2) = 2 steps


def test_clip_stage_on_prefitted_splats(tmp_path, captioned_folder):
    pytest.importorskip("datasets")
    from timm_splat.data import prefit

    prefit(
        str(captioned_folder),
        tmp_path / "prefit",
        num_splats=16,
        image_size=32,
        iterations=10,
        progress=False,
    )
    run = tmp_path / "run"
    run_train(
        "--stage",
        "clip",
        "--train-data",
        str(tmp_path / "prefit"),
        "--output",
        str(run),
        "--epochs",
        "2",
        *TINY,
    )
    assert len(losses(run, "clip")) == 4
    assert json.loads((run / "final" / "run.json").read_text())["num_splats"] == 16
    # A budget that is not the data's is refused, not recorded.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "timm_splat",
            "train",
            "--stage",
            "clip",
            "--train-data",
            str(tmp_path / "prefit"),
            "--output",
            str(tmp_path / "other"),
            *TINY,
            "--num-splats",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "pre-fitted with 16 splats" in result.stderr


def test_distill_from_webdataset_tars(tmp_path, captioned_folder, teacher_dir):
    """img2dataset-style tars (DataComp's images) stream into stage 1."""
    import tarfile

    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        for image in sorted(captioned_folder.glob("*.png")):
            tar.add(image, arcname=f"{image.stem}.png")
            tar.add(image.with_suffix(".txt"), arcname=f"{image.stem}.txt")
    run = tmp_path / "run"
    run_train(
        "--stage",
        "distill",
        "--teacher",
        f"local-dir:{teacher_dir}",
        "--train-data",
        str(tmp_path / "shard-00000.tar"),
        "--output",
        str(run),
        "--epochs",
        "2",
        "--max-steps",
        "4",
        "--record-samples",
        *TINY,
    )  # a stream has no length
    assert len(losses(run, "distill")) == 4
    seen = (run / "distill" / "samples-0.txt").read_text().split()[1::2]
    assert sorted(seen) == sorted([p.stem for p in captioned_folder.glob("*.png")] * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_both_stages_on_the_gpu_in_bf16(tmp_path, captioned_folder, teacher_dir):
    """bf16 autocast, splats fitted on the GPU in the collate step."""
    gpu = [a for a in TINY if a != "--cpu"]
    run = tmp_path / "run"
    run_train(
        "--stage",
        "distill",
        "--teacher",
        f"local-dir:{teacher_dir}",
        "--train-data",
        str(captioned_folder),
        "--output",
        str(run),
        "--epochs",
        "4",
        *gpu,
    )
    run_train(
        "--stage",
        "clip",
        "--resume",
        str(run),
        "--train-data",
        str(captioned_folder),
        "--epochs",
        "4",
        *gpu,
    )
    for stage in ("distill", "clip"):
        values = list(losses(run, stage).values())
        assert len(values) == 8 and all(math.isfinite(v) for v in values)
        assert sum(values[-2:]) < sum(values[:2])


def test_gradient_accumulation_matches_the_full_batch(tmp_path, captioned_folder, teacher_dir):
    """2 micro-batches of 2 accumulate to the step one batch of 4 takes (same samples: the
    seeded sampler's order does not depend on the batch size)."""
    from safetensors.torch import load_file

    common = [
        "--stage",
        "distill",
        "--teacher",
        f"local-dir:{teacher_dir}",
        "--train-data",
        str(captioned_folder),
        "--epochs",
        "1",
        *TINY,
    ]
    run_train(*common, "--output", str(tmp_path / "full"))
    run_train(
        *common, "--output", str(tmp_path / "accum"), "--batch-size", "2", "--accum-steps", "2"
    )
    assert len(losses(tmp_path / "accum", "distill")) == 2
    full = load_file(tmp_path / "full" / "final" / "model.safetensors")
    accum = load_file(tmp_path / "accum" / "final" / "model.safetensors")
    for name, value in full.items():
        # Summation order differs between the two runs, and with it float noise, which depends
        # on the CPU's vector width: up to 1.3e-5 after the two steps on an AVX-512 machine
        # (2026-12-07). Stepping after every micro-batch instead moves weights by ~1.4e-2.
        torch.testing.assert_close(accum[name], value, rtol=1e-4, atol=1e-4, msg=name)


def test_checkpoints_are_whole_pickle_free_and_pruned(tmp_path, captioned_folder, teacher_dir):
    """Checkpoints hold safetensors and JSON only; a half-written (newer) checkpoint is skipped
    on resume; only --keep-checkpoints survive; a finished stage is never rewritten."""
    run = tmp_path / "run"
    common = [
        "--stage",
        "distill",
        "--teacher",
        f"local-dir:{teacher_dir}",
        "--train-data",
        str(captioned_folder),
        "--output",
        str(run),
        "--epochs",
        "2",
        *TINY,
    ]
    run_train(*common, "--checkpoint-every", "1", "--keep-checkpoints", "2")
    checkpoints = run / "distill" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000003", "step_0000004"]
    suffixes = {p.suffix for p in run.rglob("*") if p.is_file()}
    assert suffixes <= {".safetensors", ".json", ".jsonl"}, suffixes

    final = run / "distill" / "final" / "run.json"
    before = final.read_bytes()
    result = run_train(*common)  # the same command again: the stage is finished
    assert "is finished" in result.stdout
    assert final.read_bytes() == before

    # A crash inside a save leaves a folder without complete.json: resume skips it.
    shutil.copytree(checkpoints / "step_0000003", checkpoints / "step_0000009")
    (checkpoints / "step_0000009" / "complete.json").unlink()
    shutil.rmtree(checkpoints / "step_0000004")
    shutil.rmtree(run / "distill" / "final")
    result = run_train(*common)
    assert "resumed" in result.stdout and "step_0000003" in result.stdout
    assert "skipping checkpoint" in result.stderr and "step_0000009" in result.stderr


def test_optimizer_and_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    from timm_splat import checkpoints

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    checkpoints._save_state(tmp_path, "optimizer", optimizer.state_dict())
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    restored.load_state_dict(checkpoints._load_state(tmp_path, "optimizer"))
    assert restored.param_groups[0]["lr"] == 1e-2
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(restored.state_dict()["state"][0][key], value)

    checkpoints._save_state(tmp_path, "rng", checkpoints._rng_state())
    expected = (torch.rand(3), np.random.rand(), random.random())
    checkpoints._set_rng_state(checkpoints._load_state(tmp_path, "rng"))
    assert torch.equal(torch.rand(3), expected[0])
    assert (np.random.rand(), random.random()) == expected[1:]


def test_a_resume_with_drawn_captions_is_bit_identical(tmp_path):
    """Captions drawn from open_clip's templates depend on (seed, epoch, sample), not on how many
    were drawn before: the loader reads a batch ahead of each checkpoint, and a resume skips
    batches without reading them."""
    from timm_splat.data import MNIST
    from timm_splat.training import TrainConfig, train

    common = dict(
        stage="pixel",
        model="ViT-Mini-7",
        train_data=MNIST,
        caption_templates="openai",
        epochs=1,
        max_steps=5,
        checkpoint_every=2,
        batch_size=16,
        lr=1e-3,
        warmup=1,
        cpu=True,
    )
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(TrainConfig(output=str(full), **common))
    (cut / "pixel" / "checkpoints").mkdir(parents=True)
    shutil.copytree(
        full / "pixel" / "checkpoints" / "step_0000002",
        cut / "pixel" / "checkpoints" / "step_0000002",
    )
    train(TrainConfig(output=str(cut), **common))
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(cut / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
