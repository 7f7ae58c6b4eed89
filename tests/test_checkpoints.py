"""Training checkpoints read back as untrusted files: every damage is found before anything is
restored, resume falls back to the newest checkpoint that verifies, and says what it skipped."""

import hashlib
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import save_file

from timm_splat.checkpoints import (
    COMPLETE,
    latest_checkpoint,
    load_checkpoint,
    resume_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)


@pytest.fixture(scope="module")
def accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def make_objects(accelerator, seed=0):
    """A tiny model, AdamW and a LambdaLR, prepared the way training prepares them."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler):
    loss = model(torch.randn(5, 3)).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


@pytest.fixture(scope="module")
def run(accelerator, tmp_path_factory):
    """A checkpoints folder with step_0000001 and step_0000002, and each one's weights."""
    folder = tmp_path_factory.mktemp("run") / "checkpoints"
    objects = make_objects(accelerator)
    weights = {}
    for step in (1, 2):
        train_step(*objects)
        path = folder / f"step_{step:07d}"
        save_checkpoint(
            accelerator,
            path,
            model=objects[0],
            optimizer=objects[1],
            scheduler=objects[2],
            position={"step": step, "epoch": 0, "batch_in_epoch": step},
        )
        weights[path.name] = {k: v.clone() for k, v in objects[0].state_dict().items()}
    return folder, weights


@pytest.fixture
def copy(run, tmp_path):
    folder = tmp_path / "checkpoints"
    shutil.copytree(run[0], folder)
    return folder


def rewrite(folder, name, data: bytes):
    """Replace a file and make complete.json agree with it (a careful-looking edit)."""
    (folder / name).write_bytes(data)
    meta = json.loads((folder / COMPLETE).read_text())
    meta["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / COMPLETE).write_text(json.dumps(meta))


def resume(accelerator, folder, **kwargs):
    model, optimizer, scheduler = make_objects(accelerator, seed=1)
    result = resume_checkpoint(
        accelerator, folder, model=model, optimizer=optimizer, scheduler=scheduler, **kwargs
    )
    return result, model


def test_save_lists_every_file_and_resume_restores_the_newest(accelerator, run, copy):
    folder, weights = run
    meta = verify_checkpoint(folder / "step_0000002")
    listed = set(meta["files"])
    on_disk = {p.name for p in (folder / "step_0000002").iterdir()} - {COMPLETE}
    assert listed == on_disk and "model.safetensors" in listed
    assert latest_checkpoint(folder) == folder / "step_0000002"
    (path, position, skipped), model = resume(accelerator, copy)
    assert path.name == "step_0000002" and skipped == []
    assert position == {"step": 2, "epoch": 0, "batch_in_epoch": 2}
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights["step_0000002"][key])
    assert resume(accelerator, copy.parent / "nothing")[0] is None  # a fresh start


def _flip_header_bit(path):
    data = bytearray(path.read_bytes())
    data[12] ^= 0x04
    path.write_bytes(bytes(data))


def _damage(folder, how, name):
    path = folder / name
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: max(0, path.stat().st_size // 2)])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flip":
        _flip_header_bit(path)


FILES = [
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "state.json",
    "rng-0.safetensors",
    "rng-0.json",
]


@pytest.mark.parametrize(
    "how, name",
    [("delete", f) for f in FILES]
    + [("truncate", f) for f in FILES]
    + [("empty", COMPLETE), ("truncate", COMPLETE), ("flip", "model.safetensors")],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    accelerator, run, copy, how, name, caplog
):
    _damage(copy / "step_0000002", how, name)
    with caplog.at_level(logging.WARNING, logger="timm_splat.checkpoints"):
        assert latest_checkpoint(copy) == copy / "step_0000001"
    assert "skipping checkpoint step_0000002" in caplog.text
    (path, position, skipped), model = resume(accelerator, copy)
    assert path.name == "step_0000001" and position["step"] == 1
    assert len(skipped) == 1 and "step_0000002" in skipped[0]
    for key, value in model.state_dict().items():
        assert torch.equal(value, run[1]["step_0000001"][key])


def test_a_bogus_newer_folder_with_only_a_marker_is_skipped(accelerator, copy):
    bogus = copy / "step_9999999"
    bogus.mkdir()
    shutil.copy(copy / "step_0000002" / COMPLETE, bogus / COMPLETE)
    assert latest_checkpoint(copy) == copy / "step_0000002"
    (path, _, skipped), _ = resume(accelerator, copy)
    assert path.name == "step_0000002" and "step_9999999" in skipped[0]


def test_none_that_verifies_is_a_clear_error(accelerator, copy):
    for step in (1, 2):
        (copy / f"step_{step:07d}" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"no checkpoint in .* can be resumed.*model.safetensors"):
        latest_checkpoint(copy)
    with pytest.raises(ValueError, match="move .* away to start the stage afresh"):
        resume(accelerator, copy)


def _state(folder, **changes):
    state = json.loads((folder / "state.json").read_text())
    state.update(changes)
    data = json.dumps(state).encode()
    rewrite(folder, "state.json", data)
    meta = json.loads((folder / COMPLETE).read_text())
    meta.update(changes)
    (folder / COMPLETE).write_text(json.dumps(meta))


def _deep(levels):
    return ("[" * levels + "]" * levels).encode()


def _json(folder, name, edit):
    data = json.loads((folder / name).read_text())
    rewrite(folder, name, json.dumps(edit(data)).encode())


def _optimizer_ref(data):
    data["__dict__"][0][1]["__dict__"][0][1]["__dict__"][1][1] = {"__tensor__": "nope"}
    return data


def _nan_lr(data):
    groups = data["__dict__"][1][1]
    groups[0]["__dict__"] = [
        [k, float("nan") if k == "lr" else v] for k, v in groups[0]["__dict__"]
    ]
    return data


def _weights(folder, change):
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    change(weights)
    save_file(weights, str(folder / "tmp.safetensors"))
    data = (folder / "tmp.safetensors").read_bytes()
    (folder / "tmp.safetensors").unlink()
    rewrite(folder, "model.safetensors", data)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: _state(f, step=-5), r"step must be an int in \[0"),
        (lambda f: _state(f, step="x"), "step must be an int"),
        (lambda f: _state(f, epoch=-1), "epoch must be an int"),
        (lambda f: _state(f, batch_in_epoch=1e9), "batch_in_epoch must be an int"),
        (lambda f: _state(f, step=7), "the folder's name says 2"),
        (lambda f: rewrite(f, "state.json", b"[1, 2]"), "must hold a JSON object"),
        (lambda f: rewrite(f, "optimizer.json", b"{not json"), "optimizer.json is not readable"),
        (lambda f: rewrite(f, "optimizer.json", _deep(200_000)), "optimizer.json is nested"),
        (lambda f: rewrite(f, "optimizer.json", _deep(100)), "optimizer.json is nested deeper"),
        (lambda f: _json(f, "optimizer.json", _optimizer_ref), "refers to tensor 'nope'"),
        (lambda f: _json(f, "optimizer.json", _nan_lr), "learning rate lr=nan"),
        (lambda f: _json(f, "scheduler.json", lambda d: {**d, "optimizer": 5}), "unknown keys"),
        (lambda f: _json(f, "scheduler.json", lambda d: {**d, "base_lrs": "x"}), "base_lrs"),
        (lambda f: _json(f, "rng-0.json", lambda d: 5), "does not hold RNG states"),
        (
            lambda f: _weights(f, lambda w: w.update({"extra": torch.zeros(1)})),
            "unexpected",
        ),
        (
            lambda f: _weights(f, lambda w: w.update({"0.weight": torch.zeros(4, 4)})),
            r"0.weight is torch.float32 \(4, 4\)",
        ),
        (
            lambda f: _weights(f, lambda w: w["0.bias"].fill_(float("nan"))),
            "0.bias holds NaN",
        ),
        (
            lambda f: (f / COMPLETE).write_text('{"format_version": 2, "world_size": 0}'),
            "world_size must be an int",
        ),
    ],
)
def test_edited_contents_are_refused_naming_the_file(accelerator, copy, damage, message):
    newest = copy / "step_0000002"
    damage(newest)
    model, optimizer, scheduler = make_objects(accelerator, seed=1)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(accelerator, newest, model=model, optimizer=optimizer, scheduler=scheduler)
    (path, _, skipped), _ = resume(accelerator, copy)  # and resume passes over it
    assert path.name == "step_0000001" and len(skipped) == 1 and "step_0000002" in skipped[0]


def test_bounds_from_the_run(accelerator, copy):
    with pytest.raises(ValueError, match=r"batch_in_epoch must be an int in \[0, 1\]"):
        verify_checkpoint(copy / "step_0000002", bounds={"batch_in_epoch": 1})
    (path, _, _), _ = resume(accelerator, copy, bounds={"batch_in_epoch": 1})
    assert path.name == "step_0000001"


def test_pruning_keeps_this_checkpoint_whatever_newer_folders_exist(accelerator, copy):
    bogus = copy / "step_9999999"
    bogus.mkdir()
    (bogus / COMPLETE).write_text("{}")
    model, optimizer, scheduler = make_objects(accelerator)
    save_checkpoint(
        accelerator,
        copy / "step_0000003",
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        position={"step": 3, "epoch": 0, "batch_in_epoch": 3},
        keep=2,
    )
    assert sorted(p.name for p in copy.iterdir()) == [
        "step_0000002",
        "step_0000003",
        "step_9999999",
    ]
    assert latest_checkpoint(copy) == copy / "step_0000003"


def test_the_callers_check_passes_over_a_checkpoint_too(accelerator, copy):
    def check(position, folder):
        if position["step"] > 1:
            raise ValueError(f"{folder}: step {position['step']} is beyond this run")

    (path, position, skipped), _ = resume(accelerator, copy, check=check)
    assert path.name == "step_0000001" and "step 2 is beyond this run" in skipped[0]
