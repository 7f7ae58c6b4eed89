"""The step loop: one epoch of a stage (open_clip_train's ``train_one_epoch`` shape)."""

from __future__ import annotations

import json
import time

import torch

from . import state as checkpoints


class NonFiniteLoss(ValueError):
    """A step's loss or gradient norm was not finite (``--nonfinite stop``)."""


def _finite(accelerator, value: torch.Tensor) -> bool:
    """Whether ``value`` is finite on every process (they must all skip or stop together)."""
    flag = torch.isfinite(value.detach().float()).all().float().reshape(1)
    return bool(accelerator.gather(flag.to(accelerator.device)).min() > 0)


def train_one_epoch(run, position: dict, clock: dict) -> bool:
    """Train from ``position`` (updated in place) to the end of its epoch or the stage's last
    step; returns True when the stage's last step was reached. ``clock``: images seen and the
    start time, for the log's throughput."""
    config, accelerator = run.config, run.accelerator
    if hasattr(run.loader, "set_epoch"):
        run.loader.set_epoch(position["epoch"])
    if hasattr(run.dataset, "set_epoch"):  # caption / augmentation draws of this epoch
        run.dataset.set_epoch(position["epoch"], config.seed)
    batches = run.loader
    if position["batch_in_epoch"]:
        batches = accelerator.skip_first_batches(run.loader, position["batch_in_epoch"])
    for batch in batches:
        with accelerator.accumulate(run.prepared_model):
            loss = run.loss(run.model, batch)
            usable = _finite(accelerator, loss)
            if usable:
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(run.params, 1.0)
                    usable = norm is None or _finite(accelerator, torch.as_tensor(norm))
            if not usable:
                _nonfinite(run, position, loss)
            else:
                run.optimizer.step()
                run.scheduler.step()
                run.loss.after_step(run.model)
            run.optimizer.zero_grad()
        position["batch_in_epoch"] += 1
        clock["seen"] += len(batch["ids"]) * accelerator.num_processes
        if config.record_samples:  # an audit trail: which process saw which samples
            with (run.stage_dir / f"samples-{accelerator.process_index}.txt").open("a") as f:
                f.write("".join(f"{position['epoch']} {i}\n" for i in batch["ids"]))
        if not accelerator.sync_gradients:
            continue
        position["step"] += 1
        if usable:
            clock["loss"] = accelerator.reduce(loss.detach(), reduction="mean").item()
        if position["step"] % config.log_every == 0 or position["step"] == 1:
            _log(run, position, clock)
        if position["step"] % config.checkpoint_every == 0:
            checkpoints.checkpoint(run, position)
        if position["step"] >= run.total:
            return True
    position["epoch"] += 1
    position["batch_in_epoch"] = 0
    return position["step"] >= run.total


def _nonfinite(run, position: dict, loss: torch.Tensor) -> None:
    where = f"step {position['step'] + 1} (epoch {position['epoch']}, batch "
    where += f"{position['batch_in_epoch']})"
    if run.config.nonfinite == "stop":
        raise NonFiniteLoss(
            f"stage {run.config.stage}: the loss or its gradient is not finite at {where} "
            f"(loss {loss.item()}): stopped; nothing was written for this step. Lower --lr, "
            "check the data, or resume from an earlier checkpoint; --nonfinite skip skips such "
            "steps instead"
        )
    run.accelerator.print(f"skipping {where}: non-finite loss or gradient ({loss.item()})")


def _log(run, position: dict, clock: dict) -> None:
    record = {
        "step": position["step"],
        "epoch": position["epoch"],
        "loss": clock.get("loss"),
        "lr": run.scheduler.get_last_lr()[0],
        "images_per_s": clock["seen"] / (time.perf_counter() - clock["start"]),
    }
    run.accelerator.print(json.dumps(record))
    if run.accelerator.is_main_process:
        with (run.stage_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(record) + "\n")
