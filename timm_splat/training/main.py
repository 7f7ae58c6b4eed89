"""``train(config)``: build the run, resume it, loop over epochs, write the final weights
(open_clip_train's ``main`` shape)."""

from __future__ import annotations

import time

from ..models import splat_trunk, uses_local_latents, uses_quick_gelu
from . import state
from .config import TrainConfig
from .loop import train_one_epoch
from .run import build_run


def train(config: TrainConfig) -> dict:
    """Run one stage (resuming its latest checkpoint); returns what ``final/run.json`` records."""
    run = build_run(config)
    config, accelerator = run.config, run.accelerator
    position = state.resume(run, run.stage_dir / "checkpoints")
    if position["step"] >= run.total:
        finished = state.finished_result(run)
        if finished is not None:
            accelerator.print(
                f"stage {config.stage} of {run.run_dir} is finished "
                f"({run.stage_dir / 'final'}): nothing to do; pass a new --output to train again"
            )
            accelerator.end_training()
            return finished
    run.stage_dir.mkdir(parents=True, exist_ok=True)
    clock = {"seen": 0, "start": time.perf_counter(), "loss": None}
    while position["step"] < run.total and position["epoch"] < config.epochs:
        if train_one_epoch(run, position, clock):
            break
    state.checkpoint(run, position)
    result = describe(run, position, clock)
    state.write_final(run, result)
    accelerator.end_training()
    return result


def describe(run, position: dict, clock: dict) -> dict:
    """What ``final/run.json`` records: enough to build the model again and to say how."""
    config, model = run.config, run.model
    trunk = splat_trunk(model)
    return {
        "model": config.model,
        "task": config.task,
        "stage": config.stage,
        "num_splats": config.num_splats,
        "num_classes": run.num_classes,
        "num_latents": trunk.patch_embed.num_patches if trunk is not None else None,
        "steps": position["step"],
        "epochs": config.epochs,
        "final_loss": clock["loss"],
        "data": config.train_data,
        "teacher": config.teacher,
        "teacher_pretrained": config.teacher_pretrained,
        "seed": config.seed,
        "quick_gelu": uses_quick_gelu(model) if trunk is not None else False,
        "local_latents": uses_local_latents(model) if trunk is not None else None,
    }
