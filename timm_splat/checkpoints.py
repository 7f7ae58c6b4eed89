"""Training checkpoints without pickle, written so a kill never leaves one half-made, and
checked whole before anything is restored from them.

A checkpoint folder ``step_XXXXXXX`` holds::

    model.safetensors           the (unwrapped) model's state dict
    optimizer.safetensors/.json the optimizer's tensors / the rest of its state dict
    scheduler.json              the learning-rate scheduler's state dict
    scaler.json                 the fp16 gradient scaler's state (only when there is one)
    rng-<rank>.safetensors/.json every process's torch (CPU, CUDA), numpy and Python RNG states
    state.json                  the loop's position (step, epoch, batch in epoch, ...)
    complete.json               written last: world size, position, every other file's size
                                and sha256

Every process writes into ``.step_XXXXXXX.partial``; once all are done the main process writes
``complete.json`` and renames the folder into place. A folder without ``complete.json`` (a crash
of an older layout, or someone's copy) is never resumed from. The files are untrusted when
read back (a disk, a copy or a person may have changed them): :func:`verify_checkpoint` checks
the manifest, sizes, hashes and position, :func:`load_checkpoint` checks every state against
the objects it goes into before restoring, and :func:`resume_checkpoint` falls back to the next
older checkpoint when the newest is damaged, saying what it skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .data.journal import fsync_dir

logger = logging.getLogger(__name__)

COMPLETE = "complete.json"
FORMAT_VERSION = 2  # 2: complete.json lists every file with its size and sha256
_NAME = re.compile(r"^step_(\d{7,})$")
# Deeper nesting than any state dict has is an edited file (and would exhaust the stack).
_MAX_DEPTH = 32
_POSITION_KEYS = ("step", "epoch", "batch_in_epoch")
# A position beyond this is not a training run's (1e12 steps); it is a corrupt number.
_MAX_POSITION = 10**12


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored; the message names the file and what is wrong."""


def _write_json(path: Path, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except RecursionError:
        raise CheckpointError(f"{path} is nested too deeply to be a checkpoint file") from None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{path} is not readable JSON ({exc})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


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


def _join_state(data, tensors: dict, where: Path, depth: int = 0):
    if depth > _MAX_DEPTH:
        raise CheckpointError(f"{where} is nested deeper than {_MAX_DEPTH} levels")
    if isinstance(data, dict):
        if set(data) == {"__tensor__"}:
            key = data["__tensor__"]
            if not isinstance(key, str) or key not in tensors:
                raise CheckpointError(
                    f"{where} refers to tensor {key!r}, which its .safetensors file does not hold"
                )
            return tensors[key]
        items = data.get("__dict__") if set(data) == {"__dict__"} else None
        if not isinstance(items, list) or not all(
            isinstance(p, list) and len(p) == 2 for p in items
        ):
            raise CheckpointError(
                f"{where} holds an object that is not a stored state: {data!r:.80}"
            )
        joined = {}
        for k, v in items:
            key = _join_state(k, tensors, where, depth + 1)
            if not isinstance(key, (str, int, float, bool, type(None))):
                raise CheckpointError(f"{where} holds a dict key that is a {type(key).__name__}")
            joined[key] = _join_state(v, tensors, where, depth + 1)
        return joined
    if isinstance(data, list):
        return [_join_state(v, tensors, where, depth + 1) for v in data]
    return data


def _save_state(folder: Path, name: str, state) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _split_state(state, "s", tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    _write_json(folder / f"{name}.json", structure)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def _load_state(folder: Path, name: str):
    tensors = _load_tensors(folder / f"{name}.safetensors")
    return _join_state(_read_json(folder / f"{name}.json"), tensors, folder / f"{name}.json")


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    numpy_state = np.random.get_state()
    keys = torch.from_numpy(numpy_state[1].astype(np.int64))  # uint32: not every reader's dtype
    state["numpy"] = [numpy_state[0], keys, *numpy_state[2:]]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state, where: Path | str = "the RNG state") -> None:
    """Restore every RNG, or (nothing restored) CheckpointError naming ``where``."""
    try:
        torch_state = state["torch"]
        version, keys, *rest = state["python"]
        python_state = (version, tuple(keys), *rest)
        kind, keys, *rest = state["numpy"]
        numpy_state = (kind, keys.numpy().astype(np.uint32), *rest)
        # Every state is tried on a throw-away generator first, so a bad one changes nothing.
        torch.Generator().set_state(torch_state)
        random.Random().setstate(python_state)
        np.random.RandomState().set_state(numpy_state)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        raise CheckpointError(
            f"{where} does not hold RNG states ({type(exc).__name__}: {exc})"
        ) from exc
    torch.set_rng_state(torch_state)
    random.setstate(python_state)
    np.random.set_state(numpy_state)
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: bad CUDA RNG states ({exc})") from None


# -- saving -----------------------------------------------------------------------------------


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
    newest ``keep`` complete checkpoints up to this one beside it."""
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
        files = {
            path.name: {"size": path.stat().st_size, "sha256": _sha256(path)}
            for path in sorted(partial.iterdir())
        }
        _write_json(
            partial / COMPLETE,
            {
                "format_version": FORMAT_VERSION,
                "world_size": accelerator.num_processes,
                **position,
                "files": files,
            },
        )
        fsync_dir(partial)
        if folder.exists():  # the same step saved again (the final save after a periodic one)
            shutil.rmtree(folder)
        os.replace(partial, folder)
        fsync_dir(folder.parent)
        if keep:
            # Only folders up to this one count: a newer one is a damaged leftover a resume
            # fell back from (it is replaced when the run gets there), and must not push this
            # checkpoint out.
            older = [p for p in complete_checkpoints(folder.parent) if p.name < folder.name]
            for old in older[: max(0, len(older) - (keep - 1))]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


# -- checking ---------------------------------------------------------------------------------


def complete_checkpoints(checkpoints_dir: Path) -> list[Path]:
    """The checkpoint folders in ``checkpoints_dir`` that have a ``complete.json`` marker,
    oldest first (not yet verified: see :func:`verify_checkpoint`)."""
    found = sorted(p for p in Path(checkpoints_dir).glob("step_*") if _NAME.match(p.name))
    return [path for path in found if (path / COMPLETE).is_file()]


def _check_int(value, name: str, where: Path, low: int = 0, high: int = _MAX_POSITION) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CheckpointError(f"{where}: {name} must be an int in [{low}, {high}], got {value!r}")
    return value


def check_position(position, where: Path, bounds: dict | None = None) -> dict:
    """``position`` (a loop position read from ``where``) range-checked: ``step``, ``epoch``
    and ``batch_in_epoch`` ints >= 0 and at most ``bounds[name]`` when given."""
    if not isinstance(position, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(position).__name__}")
    for name in _POSITION_KEYS:
        if name not in position:
            raise CheckpointError(f"{where} has no {name!r}")
        high = (bounds or {}).get(name, _MAX_POSITION)
        _check_int(position[name], name, where, 0, high)
    return position


def verify_checkpoint(folder: Path, bounds: dict | None = None) -> dict:
    """The checkpoint's ``complete.json`` once every file it lists is there with its size and
    sha256, nothing required is missing and the position is sane; CheckpointError (a
    ValueError naming the file) otherwise. Reads every file once; restores nothing."""
    folder = Path(folder)
    meta = _read_json(folder / COMPLETE)
    marker = folder / COMPLETE
    if not isinstance(meta, dict):
        raise CheckpointError(f"{marker} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{marker}: checkpoint format {meta.get('format_version')!r} is not "
            f"{FORMAT_VERSION} (older checkpoints list no file hashes); start a new run directory"
        )
    world = _check_int(meta.get("world_size"), "world_size", marker, 1, 1 << 20)
    files = meta.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{marker} lists no files")
    required = {"model.safetensors", "optimizer.safetensors", "optimizer.json"}
    required |= {"scheduler.json", "state.json"}
    required |= {f"rng-{r}.{ext}" for r in range(world) for ext in ("safetensors", "json")}
    missing = sorted(required - set(files))
    if missing:
        raise CheckpointError(f"{marker} does not list {missing[0]}: not a whole checkpoint")
    for name, entry in files.items():
        path = folder / name
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise CheckpointError(f"{marker} lists {name!r}, not a file of the checkpoint")
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise CheckpointError(f"{marker}: the entry of {name} has no sha256")
        size = _check_int(entry.get("size"), f"the size of {name}", marker, 0, 1 << 50)
        if not path.is_file() or path.is_symlink():
            raise CheckpointError(f"{path} is missing (or not a regular file)")
        if path.stat().st_size != size:
            raise CheckpointError(
                f"{path} has {path.stat().st_size} bytes, {COMPLETE} says {size}: cut short or "
                "changed since it was written"
            )
        if _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in {COMPLETE}: damaged")
    position = check_position(_read_json(folder / "state.json"), folder / "state.json", bounds)
    step = int(_NAME.match(folder.name).group(1)) if _NAME.match(folder.name) else None
    if step is not None and position["step"] != step:
        raise CheckpointError(
            f"{folder / 'state.json'} is at step {position['step']}, the folder's name says {step}"
        )
    if any(meta.get(k) != position[k] for k in _POSITION_KEYS):
        raise CheckpointError(f"{marker} and state.json disagree on the position")
    return meta


def _check_weights(weights: dict, expected: dict, where: Path) -> None:
    """Same keys, shapes and dtypes as the model's, all finite; before anything is loaded."""
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{where} does not fit the model: {len(missing)} missing key(s) "
            f"{missing[:3]}, {len(extra)} unexpected {extra[:3]}; was it written for another "
            "model? Start a new run directory, or resume with the model it was trained as"
        )
    for key, value in weights.items():
        want = expected[key]
        if value.shape != want.shape or value.dtype != want.dtype:
            raise CheckpointError(
                f"{where}: {key} is {value.dtype} {tuple(value.shape)}, the model's "
                f"{want.dtype} {tuple(want.shape)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: {key} holds NaN or infinite values")


def _check_optimizer(state, optimizer, where: Path) -> None:
    """The structure an optimizer state dict has, with per-parameter tensors of the
    parameters' shapes and finite numbers (torch only checks the group sizes)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not isinstance(state, dict) or set(state) != {"state", "param_groups"}:
        raise CheckpointError(f"{where} is not an optimizer state (state, param_groups)")
    groups, per_param = state["param_groups"], state["state"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise CheckpointError(f"{where}: param_groups must be a list of objects")
    for group in groups:
        for key in ("lr", "initial_lr"):
            value = group.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise CheckpointError(f"{where}: learning rate {key} is {value!r}")
            if not (math.isfinite(value) and value >= 0):
                raise CheckpointError(f"{where}: learning rate {key}={value!r}")
    if not isinstance(per_param, dict):
        raise CheckpointError(f"{where}: state must be an object")
    for index, values in per_param.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointError(f"{where}: state of parameter {index!r}, which does not exist")
        if not isinstance(values, dict):
            raise CheckpointError(f"{where}: the state of parameter {index} is not an object")
        for name, value in values.items():
            if not isinstance(value, torch.Tensor):
                continue
            if value.dim() > 0 and value.shape != params[index].shape:
                raise CheckpointError(
                    f"{where}: {name} of parameter {index} is {tuple(value.shape)}, the "
                    f"parameter {tuple(params[index].shape)}"
                )
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{where}: {name} of parameter {index} is not finite")


def _same_kind(stored, current) -> bool:
    """A JSON value in place of ``current``: numbers for numbers, lists of the same length."""
    if current is None or isinstance(current, bool):
        return stored is None or isinstance(stored, bool)
    if isinstance(current, (int, float)):
        return (
            isinstance(stored, (int, float))
            and not isinstance(stored, bool)
            and math.isfinite(stored)
        )
    if isinstance(current, (list, tuple)):
        return (
            isinstance(stored, list)
            and len(stored) == len(current)
            and all(_same_kind(s, c) for s, c in zip(stored, current))
        )
    if isinstance(current, dict):
        return isinstance(stored, dict)
    return type(stored) is type(current)


def _check_like(stored, current: dict, where: Path) -> None:
    """``stored`` has no keys ``current`` (a state_dict) lacks and values of the same kinds
    (``load_state_dict`` of schedulers and scalers takes any dict and breaks later)."""
    if not isinstance(stored, dict):
        raise CheckpointError(f"{where} must hold a JSON object, got {type(stored).__name__}")
    extra = sorted(set(stored) - set(current))
    if extra:  # a key the state does not have (load_state_dict would set it as an attribute)
        raise CheckpointError(f"{where} does not fit this run's state (unknown keys {extra[:4]})")
    for key, value in current.items():
        if key in stored and not _same_kind(stored[key], value):
            raise CheckpointError(
                f"{where}: {key} is {stored[key]!r:.60}, expected like {value!r:.60}"
            )


# -- loading ----------------------------------------------------------------------------------


def load_checkpoint(
    accelerator, folder: Path, *, model, optimizer, scheduler, bounds: dict | None = None
) -> dict:
    """Restore what :func:`save_checkpoint` wrote into the (prepared) objects; returns the loop
    position (``state.json``). Everything is checked before it is restored: the files (as
    :func:`verify_checkpoint`), the weights' keys, shapes and finiteness, the optimizer's and
    scheduler's structure, the position (``bounds``: optional largest ``step`` / ``epoch`` /
    ``batch_in_epoch``). Refuses a checkpoint of another world size: RNG streams are per
    process. Raises CheckpointError (a ValueError naming the file); once one is raised the
    objects may be partly restored: load another checkpoint or start afresh."""
    folder = Path(folder)
    meta = verify_checkpoint(folder, bounds)
    if meta["world_size"] != accelerator.num_processes:
        raise CheckpointError(
            f"{folder} was written by {meta['world_size']} process(es), this run has "
            f"{accelerator.num_processes}: the data order and random streams would not continue. "
            f"Resume with {meta['world_size']} processes, or start a new run directory"
        )
    target = accelerator.unwrap_model(model)
    weights = _load_tensors(folder / "model.safetensors")
    _check_weights(weights, target.state_dict(), folder / "model.safetensors")
    optimizer_state = _load_state(folder, "optimizer")
    _check_optimizer(optimizer_state, optimizer, folder / "optimizer.json")
    scheduler_state = _read_json(folder / "scheduler.json")
    _check_like(scheduler_state, scheduler.state_dict(), folder / "scheduler.json")
    scaler = getattr(accelerator, "scaler", None)
    scaler_state = None
    if (folder / "scaler.json").is_file() and scaler is not None:
        scaler_state = _read_json(folder / "scaler.json")
        _check_like(scaler_state, scaler.state_dict(), folder / "scaler.json")
    rng = _load_state(folder, f"rng-{accelerator.process_index}")
    position = _read_json(folder / "state.json")

    target.load_state_dict(weights)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        raise CheckpointError(
            f"{folder / 'optimizer.json'} does not fit the optimizer ({exc})"
        ) from exc
    scheduler.load_state_dict(scheduler_state)
    if scaler_state is not None:
        scaler.load_state_dict(scaler_state)
    _set_rng_state(rng, folder / f"rng-{accelerator.process_index}.json")
    return position


def latest_checkpoint(checkpoints_dir: Path, bounds: dict | None = None) -> Path | None:
    """The newest checkpoint that verifies (:func:`verify_checkpoint`); each newer one skipped
    gets one warning saying why. None when there is no complete checkpoint at all (a fresh
    start); CheckpointError when there are some and none verifies."""
    checkpoints_dir = Path(checkpoints_dir)
    complete = complete_checkpoints(checkpoints_dir)
    _warn_incomplete(checkpoints_dir, complete)
    reasons = []
    for path in reversed(complete):
        try:
            verify_checkpoint(path, bounds)
        except CheckpointError as exc:
            logger.warning("skipping checkpoint %s: %s", path.name, exc)
            reasons.append(str(exc))
            continue
        return path
    if reasons:
        raise CheckpointError(_none_verifies(checkpoints_dir, reasons))
    return None


def _warn_incomplete(checkpoints_dir: Path, complete: list[Path]) -> None:
    """One warning per folder newer than the newest complete one (a save cut off by a crash)."""
    newest = complete[-1].name if complete else None
    for path in sorted(checkpoints_dir.glob("step_*")):
        if path not in complete and (newest is None or path.name > newest):
            logger.warning(
                "skipping checkpoint %s: incomplete (no %s), probably cut off by a crash",
                path,
                COMPLETE,
            )


def _none_verifies(checkpoints_dir: Path, reasons: list[str]) -> str:
    return (
        f"no checkpoint in {checkpoints_dir} can be resumed ({len(reasons)} damaged; newest: "
        f"{reasons[0]}): restore one, or move {checkpoints_dir} away to start the stage afresh"
    )


def resume_checkpoint(
    accelerator,
    checkpoints_dir: Path,
    *,
    model,
    optimizer,
    scheduler,
    bounds: dict | None = None,
    check: Callable[[dict, Path], None] | None = None,
) -> tuple[Path, dict, list[str]] | None:
    """Load the newest checkpoint that verifies and restores (:func:`load_checkpoint`), falling
    back to older ones: ``(folder, position, skipped)``, ``skipped`` one line per newer
    checkpoint passed over and why (also logged as warnings). ``check(position, folder)``: the
    caller's own test of a restored position (against the run's totals); a ValueError from it
    passes over that checkpoint too. None when there is no complete checkpoint (start afresh);
    CheckpointError when there are some and none restores."""
    checkpoints_dir = Path(checkpoints_dir)
    complete = complete_checkpoints(checkpoints_dir)
    _warn_incomplete(checkpoints_dir, complete)
    skipped = []
    for path in reversed(complete):
        try:
            position = load_checkpoint(
                accelerator,
                path,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                bounds=bounds,
            )
            if check is not None:
                check(position, path)
        except ValueError as exc:
            line = f"skipped checkpoint {path.name}: {exc}"
            logger.warning("%s", line)
            skipped.append(line)
            continue
        return path, position, skipped
    if skipped:
        raise CheckpointError(_none_verifies(checkpoints_dir, skipped))
    return None
