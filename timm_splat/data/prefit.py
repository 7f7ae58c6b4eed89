"""Pre-fitting: a dataset in, parquet shards of fp16 splats out; resumable and split across ranks.

Layout of ``out`` (the layout of the Hub dataset repo, plus a hidden state folder)::

    README.md                                   dataset card (rank 0, when every rank is done)
    data/{split}-{rank:05d}-{shard:05d}.parquet columns splats, label, caption, source_id, psnr
    .prefit/settings.json                       what every shard was made with (never mixed)
    .prefit/{split}/run.json                    its source, world size and number of items
    .prefit/{split}/rank-{rank:05d}.jsonl       journal: one line per finished shard
    .prefit/{split}/summary.json                merged statistics, for the card
    .prefit/tmp/                                shards being written

Crash safety: a shard is written to ``.prefit/tmp``, fsynced and renamed into ``data/`` (atomic),
then a journal line (its item indices, PSNRs, the index it ends at) is appended and fsynced. On
restart a rank reads its journal, deletes any shard file the journal does not know (killed
between rename and append: its rows are fitted again into the same file name) and continues
after the last journalled item. Fitting is deterministic and batch-invariant (grid init), so the
result equals an uninterrupted run's. ``datasets`` ignores the hidden ``.prefit`` folder.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fitting import FitConfig, fit_splats, resolve_config
from ..fitting.config import VALUES_BEFORE_THEY_EXISTED
from ..splats import DEFAULT_NUM_SPLATS, splat_count
from ..transforms import SplatTransform
from .card import write_card
from .journal import (
    STATE_DIR,
    Journal,
    PrefitError,
    Stats,
    read_run,
    read_state_json,
    write_atomic,
)
from .ranks import Ranks
from .shards import (
    FORMAT_VERSION,
    MAX_SPLATS_PER_SHARD,
    Row,
    ShardWriter,
    Uploader,
    prefit_features,
    upload_target,
)
from .sources import Item, Source, open_source

logger = logging.getLogger(__name__)

# datasets' own rule for split names; also keeps file names and glob patterns plain.
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")
# Consecutive undecodable images at the very start of a run mean a wrong --dataset, not bad luck.
_MAX_FAILURES_BEFORE_FIRST_ROW = 64


# -- run settings -------------------------------------------------------------------------------


def _diffs(stored: dict, now: dict) -> str:
    return "; ".join(
        f"{key}: {stored.get(key)!r} there, {now.get(key)!r} now"
        for key in sorted(set(stored) | set(now))
        if stored.get(key) != now.get(key)
    )


def _check_settings(out: Path, split: str, settings: dict, run: dict) -> None:
    """Record the run's settings, or refuse to add to shards made with other settings.

    ``settings`` (budget, crop, fit) hold for the whole dataset; ``run`` (source, world size,
    number of items) for one split, whose resume skips items by their global index."""
    state = out / STATE_DIR
    path = state / "settings.json"
    if path.exists():
        stored = read_state_json(path)
        if isinstance(stored.get("fit"), dict):
            # Fit options added since the shards were written fitted as their defaults do, or
            # as the value they replaced (a default that changed the fit when it came).
            defaults = {**dataclasses.asdict(FitConfig()), **VALUES_BEFORE_THEY_EXISTED}
            new = set(settings.get("fit", {})) - set(stored["fit"])
            stored["fit"] = {**{k: defaults[k] for k in new if k in defaults}, **stored["fit"]}
        diffs = _diffs(stored, settings)
        if diffs:
            raise PrefitError(
                f"{out} holds splats pre-fitted with other settings ({diffs}). Shards of "
                "different settings must not be mixed in one dataset: pass a new --out, run "
                f"with the settings in {path}, or delete {out} to start over."
            )
    else:
        if any((out / "data").glob("*.parquet")):
            raise PrefitError(
                f"{out / 'data'} holds parquet files that no timm-splat prefit run wrote "
                f"(there is no {path}): pass an empty or new --out"
            )
        write_atomic(path, json.dumps(settings, indent=2, sort_keys=True))
    run_path = state / split / "run.json"
    if not run_path.exists():
        write_atomic(run_path, json.dumps(run, indent=2, sort_keys=True))
        return
    stored = read_run(run_path)
    redo = (
        f"pass a new --out, or delete {out / 'data'}/{split}-* and {state / split} to fit "
        "the split again"
    )
    source_keys = ("source", "source_kind", "dataset_config")
    diffs = _diffs({k: stored[k] for k in source_keys}, {k: run[k] for k in source_keys})
    if diffs:
        raise PrefitError(
            f"split {split!r} in {out} is being fitted from another source "
            f"({diffs}); shards of two sources must not be mixed: {redo}"
        )
    if stored["world_size"] != run["world_size"]:
        raise PrefitError(
            f"split {split!r} in {out} was started on {stored['world_size']} process(es), now "
            f"{run['world_size']}: item i goes to rank i % world_size, so it can only be resumed "
            f"on {stored['world_size']}; or {redo}"
        )
    if (
        None not in (stored["num_items"], run["num_items"])
        and stored["num_items"] != run["num_items"]
    ):
        raise PrefitError(
            f"the source of split {split!r} held {stored['num_items']} images when the run "
            f"started and {run['num_items']} now: a resumed run skips images by their place in "
            f"the source, so the source must not change; restore it, or {redo}"
        )


def _run_settings(
    source: Source,
    transform: SplatTransform,
    config: FitConfig,
    dataset_config: str | None,
    world_size: int,
) -> tuple[dict, dict]:
    """(settings of the whole dataset, settings of this split's run)."""
    fit = dataclasses.asdict(config)
    # batch_size changes nothing in the result (the fit is batch-invariant): free on resume.
    del fit["batch_size"], fit["num_splats"]
    settings = {
        "format_version": FORMAT_VERSION,
        "num_splats": transform.num_splats,
        "image_size": list(transform.image_size),
        "crop_pct": transform.crop_pct,
        "interpolation": transform.interpolation.value,
        "fit": fit,
    }
    run = {
        "source": source.name,
        "source_kind": source.kind,
        "dataset_config": dataset_config,
        "world_size": world_size,
        "num_items": source.num_items,
    }
    return settings, run


def _split_state(out: Path, split: str, rank: int, journal: Journal, uploader_target):
    """Remove what a killed run left half-done; return the shards still to upload."""
    for tmp in (out / STATE_DIR / "tmp").glob(f"{split}-{rank:05d}-*"):
        tmp.unlink()
    known = set(journal.files)
    for path in (out / "data").glob(f"{split}-{rank:05d}-*.parquet"):
        # Only names pre-fitting gives its shards: renamed in, but killed before the journal line.
        if f"data/{path.name}" not in known and _SHARD_NAME.match(path.name):
            path.unlink()
    redo = (
        f"restore it, or delete {out / 'data'}/{split}-* and {out / STATE_DIR / split} to fit the "
        "split again"
    )
    for file, rows, size in zip(journal.files, journal.rows, journal.sizes):
        _check_journalled_shard(out / file, rows, size, redo)
    if uploader_target is None:
        return []
    return [
        (k, file)
        for k, file in enumerate(journal.files)
        if (k, uploader_target) not in journal.pushed
    ]


_SHARD_NAME = re.compile(r"^\w+(\.\w+)*-\d{5}-\d{5}\.parquet$")


def _check_journalled_shard(path: Path, rows: int, size: int, redo: str) -> None:
    """A finished shard is still what the journal says: a regular file (not a link to
    elsewhere) of the journalled size and row count."""
    import pyarrow.parquet as pq

    if path.is_symlink() or not path.exists():
        what = "is a symbolic link" if path.is_symlink() else "is missing"
        raise PrefitError(f"finished shard {path} {what}: {redo}")
    if not path.is_file():
        raise PrefitError(f"finished shard {path} is not a regular file: {redo}")
    if path.stat().st_size != size:
        raise PrefitError(
            f"finished shard {path} has {path.stat().st_size} bytes, its journal says {size}: "
            f"it was changed or cut short; {redo}"
        )
    try:
        found = pq.read_metadata(path).num_rows
    except (OSError, ValueError) as exc:
        raise PrefitError(f"finished shard {path} is not readable parquet ({exc}): {redo}") from exc
    if found != rows:
        raise PrefitError(
            f"finished shard {path} holds {found} rows, its journal says {rows}: {redo}"
        )


def _chunks(items: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _prepared_batches(items: Iterator[Item], prepare, batch_size: int, workers: int):
    """Batches of ``(item, pixels, error)``, decoded and cropped by a thread pool one batch
    ahead of the consumer, so decoding overlaps fitting (PIL and torch release the GIL). At
    most two batches of pixels exist at a time."""

    def load(item: Item):
        try:
            return prepare(item.image()), None
        except Exception as exc:  # any undecodable image is skipped and journalled, not fatal
            return None, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="prefit-decode") as pool:
        ahead: deque = deque()
        for chunk in _chunks(items, batch_size):
            ahead.append([(item, pool.submit(load, item)) for item in chunk])
            if len(ahead) > 1:
                yield [(item, *future.result()) for item, future in ahead.popleft()]
        while ahead:
            yield [(item, *future.result()) for item, future in ahead.popleft()]


def _remaining(cursor: int, stop: int | None, rank: int, world_size: int) -> int | None:
    if stop is None:
        return None
    first = cursor + (rank - cursor) % world_size
    return len(range(first, stop, world_size))


def prefit(
    dataset: str | Source,
    out: str | Path,
    *,
    split: str = "train",
    num_splats: int = DEFAULT_NUM_SPLATS,
    image_size: int | tuple[int, int] = 224,
    crop_pct: float = 1.0,
    interpolation: str = "bicubic",
    batch_size: int = 64,
    shard_size: int = 1000,
    device: str | torch.device | None = None,
    dataset_config: str | None = None,
    limit: int | None = None,
    workers: int = 4,
    uploader: Uploader | None = None,
    repo_id: str | None = None,
    progress: bool | None = None,
    keep_images: bool = False,
    **fit_options,
) -> dict | None:
    """Fit every image of ``dataset`` into ``num_splats`` splats and write parquet shards to
    ``out`` (see the module docstring for the layout); resumes what ``out`` already holds.

    Args:
        dataset: an image folder, tar shards, parquet files, a Hub id or a
            :class:`~timm_splat.data.sources.Source` (see :func:`~timm_splat.data.open_source`).
        split: the split to read and the name it gets in ``out``.
        image_size, crop_pct, interpolation: the :class:`SplatTransform` resize + centre-crop.
        batch_size: images per :func:`fit_splats` call (on a GPU, thousands fit in memory).
        shard_size: rows per parquet file.
        device: where to fit; default the rank's GPU if there is one, else the CPU.
        limit: only items with a global index below this.
        workers: threads decoding images while the previous batch is fitted.
        uploader: ``uploader(local_path, path_in_repo)`` called for each finished shard and
            then the card (:class:`HubUploader`, :class:`DirectoryUploader`, or your own; a
            ``target`` attribute names where it sends, so a resumed run re-sends what its
            journal does not show as sent there).
        repo_id: the Hub id the card's usage example names.
        progress: show a progress bar (default: on the local main process).
        keep_images: also store each fitted crop (PNG, ``image`` column), so distillation's
            teacher can read the pixels of pre-fitted data instead of fitting every epoch.
        **fit_options: :class:`~timm_splat.fitting.FitConfig` fields (iterations, seed, ...).

    Returns:
        On rank 0 the split's statistics (:meth:`Stats.summary`), elsewhere None.
    """
    if not _SPLIT_NAME.match(split):
        raise PrefitError(f"split name {split!r} must match {_SPLIT_NAME.pattern} (datasets' rule)")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise PrefitError(f"{name} must be a positive int, got {value!r}")
    if shard_size * num_splats > MAX_SPLATS_PER_SHARD:  # load_prefit would refuse the shards
        raise PrefitError(
            f"shard_size {shard_size} x num_splats {num_splats} is more than "
            f"{MAX_SPLATS_PER_SHARD} splats per shard, which load_prefit reads: use a smaller "
            "--shard-size"
        )
    fit_options.pop("batch_size", None)  # batch_size above decides
    transform = SplatTransform(
        num_splats, image_size, crop_pct=crop_pct, interpolation=interpolation, **fit_options
    )
    config = resolve_config(None, dict(fit_options, num_splats=num_splats, batch_size=batch_size))
    ranks = Ranks()
    rank, world = ranks.rank, ranks.world_size
    source = dataset if isinstance(dataset, Source) else open_source(dataset, split, dataset_config)
    out = Path(out)
    settings, run = _run_settings(source, transform, config, dataset_config, world)
    if keep_images:  # only when set: datasets written before the option resume unchanged
        settings["keep_images"] = True
    _check_settings(out, split, settings, run)

    journal = Journal(
        out / STATE_DIR / split / f"rank-{rank:05d}.jsonl",
        split=split,
        rank=rank,
        world_size=world,
        num_items=source.num_items,
    )
    unpushed = _split_state(out, split, rank, journal, uploader and upload_target(uploader))
    writer = ShardWriter(
        out,
        split,
        rank,
        prefit_features(num_splats, source.class_names, images=keep_images),
        journal,
        uploader,
    )
    for shard, file in unpushed:  # finished before a kill, or before --push-to-hub was given
        writer.push(shard, file)
    if journal.shards:
        logger.info(
            "rank %d: resuming %s after %d shards (%d rows), at item %d",
            rank,
            split,
            journal.shards,
            journal.stats.rows,
            journal.cursor,
        )
    if device is None or (str(device) == "cuda" and world > 1):  # one GPU per local rank
        device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"

    items = source.items(rank, world, start=journal.cursor, stop=limit)
    known_end = source.num_items if limit is None else min(limit, source.num_items or limit)
    rows: list[Row] = []
    skipped: list = []  # [index, source_id] of undecodable items not journalled yet
    failures = 0
    show = ranks.local_rank == 0 if progress is None else progress
    with tqdm(
        total=_remaining(journal.cursor, known_end, rank, world),
        disable=not show,
        unit="img",
        desc=f"prefit {split}",
        dynamic_ncols=True,
    ) as bar:
        for batch in _prepared_batches(items, transform.image_transform, batch_size, workers):
            good = [(item, pixels) for item, pixels, _ in batch if pixels is not None]
            for item, _, error in batch:
                if error is not None:
                    logger.warning("skipping %s (item %d): %s", item.source_id, item.index, error)
                    skipped.append([item.index, item.source_id])
            failures = 0 if good else failures + len(batch)
            if failures >= _MAX_FAILURES_BEFORE_FIRST_ROW and not journal.stats.rows and not rows:
                raise PrefitError(
                    f"the first {failures} images of {source.name} all failed to load (last: "
                    f"{batch[-1][2]}): is --dataset right?"
                )
            if good:
                rows += _fit_batch(good, config, device, keep_images)
                bar.set_postfix(
                    psnr=f"{np.mean([r.psnr for r in rows[-len(good) :]]):.2f}", refresh=False
                )
            bar.update(len(batch))
            while len(rows) >= shard_size:
                writer.write(rows[:shard_size], skipped)
                rows = rows[shard_size:]
        if rows:
            writer.write(rows, skipped)
        if skipped:
            journal.append({"skipped": skipped, "end": skipped[-1][0] + 1})

    return _finish(ranks, journal, out, split, uploader, repo_id)


def _png(pixels: torch.Tensor) -> bytes:
    from PIL import Image

    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _fit_batch(good: list, config: FitConfig, device, keep_images: bool = False) -> list[Row]:
    """One fit_splats call for the batch (its own batch size, so one kernel batch)."""
    pixels = torch.stack([pixels for _, pixels in good])
    fitted = fit_splats(pixels, config, progress=False, device=device, batch_size=len(good))
    half = fitted.splats.to("cpu", torch.float16)
    real = splat_count(half).tolist()  # counted as stored: fp16 is what readers get
    return [
        Row(
            item.index,
            item.source_id,
            item.label,
            item.caption,
            splats,
            psnr,
            count,
            _png(pixels) if keep_images else None,
        )
        for (item, pixels), splats, psnr, count in zip(
            good, half.numpy(), fitted.psnr.tolist(), real
        )
    ]


def _finish(ranks: Ranks, journal: Journal, out: Path, split: str, uploader, repo_id):
    """Once every rank is done, rank 0 merges the statistics and writes (and sends) the card."""
    stats = ranks.gather(journal.stats.to_dict())  # also waits for the slowest rank
    result = None
    if ranks.rank == 0:
        merged = Stats()
        for part in stats:
            merged.merge(Stats.from_dict(part))
        write_atomic(
            out / STATE_DIR / split / "summary.json", json.dumps(merged.to_dict(), sort_keys=True)
        )
        card = write_card(out, repo_id=repo_id)
        if uploader is not None:
            uploader(card, "README.md")
        result = merged.summary()
        logger.info(
            "%s: %d rows in %d shards, PSNR mean %.2f dB, %d skipped",
            split,
            merged.rows,
            merged.shards,
            result["psnr_mean"],
            merged.skipped,
        )
    ranks.barrier()
    return result
