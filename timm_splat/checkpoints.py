"""Training checkpoints without pickle, written so a kill never leaves one half-made.

A checkpoint folder ``step_XXXXXXX`` holds::

    model.safetensors           the (unwrapped) model's state dict
    optimizer.safetensors/.json the optimizer's tensors / the rest of its state dict
    scheduler.json              the learning-rate scheduler's state dict
    scaler.json                 the fp16 gradient scaler's state (only when there is one)
    rng-<rank>.safetensors/.json every process's torch (CPU, CUDA), numpy and Python RNG states
    state.json                  the loop's position (step, epoch, batch in epoch)
    complete.json               written last, with the world size: the checkpoint is whole

Every process writes into ``.step_XXXXXXX.partial``; once all are done the main process writes
``complete.json`` and renames the folder into place. A folder without ``complete.json`` (a crash
of an older layout, or someone's copy) is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data.journal import fsync_dir

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"
FORMAT_VERSION = 1


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# -- state dicts as tensors + JSON ------------------------------------------------------------


def _split_state(state, prefix: str, tensors: dict) -> object:
    """``state`` with every tensor moved into ``tensors`` (under a dotted key) and replaced by
    ``{"__tensor__": key}``, so the rest is JSON."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {
            "__dict__": [
                [
                    _split_state(k, f"{prefix}.k{i}", tensors),
                    _split_state(v, f"{prefix}.{i}", tensors),
                ]
                for i, (k, v) in enumerate(state.items())
            ]
        }
    if isinstance(state, (list, tuple)):
        return [_split_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(state)]
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot store a {type(state).__name__} in a checkpoint at {prefix}")


def _join_state(data, tensors: dict):
    if isinstance(data, dict) and "__tensor__" in data:
        return tensors[data["__tensor__"]]
    if isinstance(data, dict) and "__dict__" in data:
        return {_join_state(k, tensors): _join_state(v, tensors) for k, v in data["__dict__"]}
    if isinstance(data, list):
        return [_join_state(v, tensors) for v in data]
    return data


def _save_state(folder: Path, name: str, state) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_state(state, "s", tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    _write_json(folder / f"{name}.json", structure)


def _load_state(folder: Path, name: str):
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return _join_state(json.loads((folder / f"{name}.json").read_text()), tensors)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    numpy_state = np.random.get_state()
    keys = torch.from_numpy(numpy_state[1].astype(np.int64))  # uint32: not every reader's dtype
    state["numpy"] = [numpy_state[0], keys, *numpy_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, keys, *rest = state["python"]
    random.setstate((version, tuple(keys), *rest))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- saving and loading -----------------------------------------------------------------------


def save_checkpoint(
    accelerator,
    folder: Path,
    *,
    model,
    optimizer,
    scheduler,
    position: dict,
    keep: int | None = None,
) -> None:
    """Write a whole checkpoint to ``folder`` (every process calls this), then keep only the
    newest ``keep`` complete checkpoints beside it."""
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    _save_state(partial, f"rng-{rank}", _rng_state())
    if accelerator.is_main_process:
        weights = accelerator.unwrap_model(model).state_dict()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in weights.items()},
            str(partial / "model.safetensors"),
        )
        _save_state(partial, "optimizer", optimizer.state_dict())
        _write_json(partial / "scheduler.json", scheduler.state_dict())
        if getattr(accelerator, "scaler", None) is not None:
            _write_json(partial / "scaler.json", accelerator.scaler.state_dict())
        _write_json(partial / "state.json", position)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(
            partial / COMPLETE,
            {"format_version": FORMAT_VERSION, "world_size": accelerator.num_processes, **position},
        )
        fsync_dir(partial)
        if folder.exists():  # the same step saved again (the final save after a periodic one)
            shutil.rmtree(folder)
        os.replace(partial, folder)
        fsync_dir(folder.parent)
        if keep:
            for old in complete_checkpoints(folder.parent)[:-keep]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The complete checkpoints in ``checkpoints_dir``, oldest first."""
    found = sorted(Path(checkpoints_dir).glob("step_*"))
    return [path for path in found if (path / COMPLETE).is_file()]


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The newest complete checkpoint; logs (and skips) newer folders that are not complete."""
    checkpoints_dir = Path(checkpoints_dir)
    complete = complete_checkpoints(checkpoints_dir)
    newest = complete[-1] if complete else None
    for path in sorted(checkpoints_dir.glob("step_*")):
        if path not in complete and (newest is None or path.name > newest.name):
            logger.warning(
                "skipping checkpoint %s: incomplete (no %s), probably cut off by a crash",
                path,
                COMPLETE,
            )
    return newest


def load_checkpoint(accelerator, folder: Path, *, model, optimizer, scheduler) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the (prepared) objects; returns the loop
    position. Refuses a checkpoint of another world size: RNG streams are per process."""
    folder = Path(folder)
    meta = json.loads((folder / COMPLETE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder}: checkpoint format {meta.get('format_version')} is not "
            f"{FORMAT_VERSION}; start a new run directory"
        )
    if meta["world_size"] != accelerator.num_processes:
        raise ValueError(
            f"{folder} was written by {meta['world_size']} process(es), this run has "
            f"{accelerator.num_processes}: the data order and random streams would not continue. "
            f"Resume with {meta['world_size']} processes, or start a new run directory"
        )
    weights = load_file(str(folder / "model.safetensors"))
    accelerator.unwrap_model(model).load_state_dict(weights)
    optimizer.load_state_dict(_load_state(folder, "optimizer"))
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    if (folder / "scaler.json").is_file() and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(json.loads((folder / "scaler.json").read_text()))
    _set_rng_state(_load_state(folder, f"rng-{accelerator.process_index}"))
    return json.loads((folder / "state.json").read_text())
