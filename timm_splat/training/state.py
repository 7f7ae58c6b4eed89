"""A stage's state on disk: its checkpoints (resume, with the position checked against the
run), and its final weights, written whole and never non-finite."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..checkpoints import resume_checkpoint, save_checkpoint
from ..models.factory import resolve_run, run_metadata

START = {"step": 0, "epoch": 0, "batch_in_epoch": 0}


def resume(run, checkpoints_dir: Path) -> dict:
    """The loop position of the newest checkpoint that verifies and fits this run (model,
    optimiser, scheduler and RNG restored; a damaged newer one is passed over with one line
    saying why), else the start."""
    bounds = None
    if run.steps_per_epoch is not None:
        bounds = {"epoch": run.config.epochs, "batch_in_epoch": run.batches_per_epoch}
    found = resume_checkpoint(
        run.accelerator,
        checkpoints_dir,
        model=run.prepared_model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        bounds=bounds,
        check=lambda position, folder: check_position(position, folder, run),
    )
    if found is None:
        return dict(START)
    checkpoint, position, skipped = found
    for line in skipped:
        run.accelerator.print(line)
    run.accelerator.print(f"resumed {checkpoint} at step {position['step']}")
    return position


def check_position(position, checkpoint: Path, run) -> None:
    """A checkpoint's position is a file's word: it must be whole numbers that this run's data
    and settings could have reached (else the loop would start at step -5, skip an epoch, or end
    a stage that never ran)."""
    keys = set(START)
    if not isinstance(position, dict) or set(position) < keys:
        raise ValueError(f"{checkpoint}/state.json: expected {sorted(keys)}, got {position!r}")
    for key in keys:
        value = position[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"{checkpoint}/state.json: {key} must be a whole number >= 0, got {value!r}; "
                "the checkpoint is damaged: delete it to resume from the one before"
            )
    step, epoch, batch = position["step"], position["epoch"], position["batch_in_epoch"]
    if run.steps_per_epoch is None:  # a stream of unknown length: nothing to check it against
        return
    expected = epoch * run.steps_per_epoch + math.ceil(batch / run.config.accum_steps)
    if batch > run.batches_per_epoch or epoch > run.config.epochs or step != expected:
        raise ValueError(
            f"{checkpoint}: position step {step}, epoch {epoch}, batch {batch} is not one this "
            f"run reaches ({run.batches_per_epoch} batches per epoch and process, "
            f"{run.config.epochs} epochs, accumulation {run.config.accum_steps}): it was written "
            "with other settings (batch size, processes, data) or is damaged; resume with the "
            "settings it was written with, or start a new --output"
        )


def checkpoint(run, position: dict) -> None:
    save_checkpoint(
        run.accelerator,
        run.stage_dir / "checkpoints" / f"step_{position['step']:07d}",
        model=run.prepared_model,
        optimizer=run.optimizer,
        scheduler=run.scheduler,
        position=dict(position),
        keep=run.config.keep_checkpoints,
    )


def nonfinite_weights(model) -> list[str]:
    return [name for name, value in model.state_dict().items() if not torch.isfinite(value).all()]


def write_final(run, result: dict) -> None:
    """``<stage>/final`` and ``<run>/final``: weights + run.json, each renamed into place whole
    (a reader never sees half a folder). Refuses weights that are not finite."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    bad = nonfinite_weights(run.model)
    if bad:
        raise ValueError(
            f"stage {run.config.stage} ended with non-finite weights ({bad[0]}, ...): nothing "
            "is written to final/; lower --lr or check the data and the checkpoint it resumed"
        )
    partial = run.stage_dir / ".final.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in run.model.state_dict().items()}
    save_file(weights, partial / "model.safetensors", metadata=run_metadata(result))
    (partial / "run.json").write_text(json.dumps(result, indent=2) + "\n")
    for final in (run.stage_dir / "final", run.run_dir / "final"):
        publish(partial, final)
    shutil.rmtree(partial)


def publish(source: Path, final: Path) -> None:
    """Copy ``source`` to ``final``, replacing it by a rename."""
    copy = final.with_name(f".{final.name}.new")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(source, copy)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(copy, final)


def finished_result(run) -> dict | None:
    """A finished stage's run.json, after finishing what a kill left undone: a run killed
    between ``<stage>/final`` and ``<run>/final`` gets its top-level ``final/`` now (when this
    stage is the newest finished one). None where there is none, or it is damaged or edited:
    the stage then finishes again from its last checkpoint and writes it anew."""
    stage_final = run.stage_dir / "final"
    weights = stage_final / "model.safetensors"
    if not ((stage_final / "run.json").is_file() and weights.is_file()):
        return None
    # Read once, as untrusted: unreadable or not an object, its types, and what builds the
    # model again against the weights' header.
    try:
        result = resolve_run(weights)[1]
    except ValueError:
        return None
    top = run.run_dir / "final"
    if run.accelerator.is_main_process and not (top / "run.json").is_file():
        publish(stage_final, top)
        run.accelerator.print(f"finished {top} (a previous run stopped before writing it)")
    return result
