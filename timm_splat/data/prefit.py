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
import json
import logging
import math
import os
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fitting import FitConfig, fit_splats
from ..hub import card_template
from ..splats import BYTES_PER_SPLAT_FP16, SPLAT_CHANNELS, compression_ratio, splat_count
from ..transforms import SplatTransform
from .sources import Item, Source, open_source

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_DIR = ".prefit"
CARD_TEMPLATE = card_template("dataset_card.md")
# datasets' own rule for split names; also keeps file names and glob patterns plain.
_SPLIT_NAME = re.compile(r"^\w+(\.\w+)*$")
# Consecutive undecodable images at the very start of a run mean a wrong --dataset, not bad luck.
_MAX_FAILURES_BEFORE_FIRST_ROW = 64

Uploader = Callable[[Path, str], None]  # (local file, path in the repo)


class PrefitError(ValueError):
    """A run that cannot go on as asked; the message says how to fix it."""


# -- uploading ----------------------------------------------------------------------------------

class HubUploader:
    """Uploads each file as it is finished to a Hub dataset repo (created on first use).

    One commit per shard: ``datasets.Dataset.push_to_hub`` would replace the whole split, and
    a crash would lose what was uploaded."""

    def __init__(self, repo_id: str, private: bool | None = None, token: str | None = None,
                 retries: int = 4):
        from huggingface_hub import HfApi

        self.repo_id, self.private, self.target = repo_id, private, f"hf://datasets/{repo_id}"
        self.api = HfApi(token=token)
        self.retries = retries
        self._created = False

    def __call__(self, local_path: Path, path_in_repo: str) -> None:
        if not self._created:
            self.api.create_repo(self.repo_id, repo_type="dataset", private=self.private,
                                 exist_ok=True)
            self._created = True
        for attempt in range(self.retries + 1):
            try:
                self.api.upload_file(path_or_fileobj=str(local_path), path_in_repo=path_in_repo,
                                     repo_id=self.repo_id, repo_type="dataset",
                                     commit_message=f"timm-splat prefit: {path_in_repo}")
                return
            except OSError as exc:  # HTTP errors are OSErrors; ranks' commits can collide
                if attempt == self.retries:
                    raise
                logger.warning("upload of %s failed (%s); retrying", path_in_repo, exc)
                time.sleep(5 * 2**attempt)


class DirectoryUploader:
    """``--dry-run-push DIR``: copies what would be uploaded into ``DIR``, laid out as the repo."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.target = str(self.root.resolve())

    def __call__(self, local_path: Path, path_in_repo: str) -> None:
        dest = self.root / path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, dest)


# -- small file helpers -------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:  # makes a rename durable across power loss; not possible on every platform
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: ranks never collide
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# -- statistics ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Stats:
    """Row counts and PSNR statistics in constant memory: PSNR percentiles come from a histogram
    of 0.01 dB bins (PSNR is below 120 dB, so at most 12000 bins whatever the dataset size)."""

    rows: int = 0
    skipped: int = 0
    shards: int = 0
    bytes: int = 0  # parquet bytes on disk
    real_splats: int = 0
    psnr_sum: float = 0.0
    psnr_min: float = math.inf
    psnr_max: float = -math.inf
    histogram: Counter = dataclasses.field(default_factory=Counter)

    def add(self, psnrs: Iterable[float], real_splats: int = 0, nbytes: int = 0, shards: int = 0):
        for value in psnrs:
            self.rows += 1
            self.psnr_sum += value
            self.psnr_min = min(self.psnr_min, value)
            self.psnr_max = max(self.psnr_max, value)
            self.histogram[round(value * 100)] += 1
        self.real_splats += real_splats
        self.bytes += nbytes
        self.shards += shards

    def merge(self, other: Stats) -> Stats:
        self.rows += other.rows
        self.skipped += other.skipped
        self.shards += other.shards
        self.bytes += other.bytes
        self.real_splats += other.real_splats
        self.psnr_sum += other.psnr_sum
        self.psnr_min = min(self.psnr_min, other.psnr_min)
        self.psnr_max = max(self.psnr_max, other.psnr_max)
        self.histogram.update(other.histogram)
        return self

    def percentile(self, q: float) -> float:
        target, seen = q / 100 * self.rows, 0
        for centi_db in sorted(self.histogram):
            seen += self.histogram[centi_db]
            if seen >= target:
                return centi_db / 100
        return math.nan

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["histogram"] = {str(k): v for k, v in sorted(self.histogram.items())}
        for key in ("psnr_min", "psnr_max"):  # JSON has no infinity
            data[key] = None if math.isinf(data[key]) else data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Stats:
        data = dict(data)
        data["histogram"] = Counter({int(k): v for k, v in data["histogram"].items()})
        data["psnr_min"] = math.inf if data["psnr_min"] is None else data["psnr_min"]
        data["psnr_max"] = -math.inf if data["psnr_max"] is None else data["psnr_max"]
        return cls(**data)

    def summary(self) -> dict:
        """The numbers the dataset card shows."""
        rows = max(self.rows, 1)
        return {
            "rows": self.rows, "skipped": self.skipped, "shards": self.shards,
            "psnr_mean": self.psnr_sum / rows, "psnr_min": self.psnr_min,
            "psnr_max": self.psnr_max, "real_splats_mean": self.real_splats / rows,
            "bytes_per_row": self.bytes / rows,
            **{f"psnr_p{q}": self.percentile(q) for q in (1, 5, 25, 50, 75, 95, 99)},
        }


# -- the per-rank journal -----------------------------------------------------------------------

class Journal:
    """A rank's record of finished work, one JSON line per event, appended and fsynced:

    - ``{"shard": k, "file": ..., "indices": [...], "psnr": [...], "real_splats": n,
      "bytes": n, "skipped": [[index, source_id], ...], "end": i}``: shard k is in place and
      every item of this rank below index ``end`` is in a shard or was undecodable;
    - ``{"skipped": [...], "end": i}``: undecodable items after the last shard;
    - ``{"pushed": k, "to": target}``: shard k was uploaded there.

    Reading it keeps only counters, the resume point and the small set of pushed shards, so
    memory does not grow with the dataset. A line cut short by a kill is dropped."""

    def __init__(self, path: Path):
        self.path = path
        self.shards = 0  # the next shard number
        self.files: list[str] = []  # finished shard files, by shard number
        self.cursor = 0  # resume at this global index
        self.pushed: set[tuple[int, str]] = set()
        self.stats = Stats()
        if path.exists():
            self._read()
        path.parent.mkdir(parents=True, exist_ok=True)

    def _read(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        if lines[-1]:  # no final newline: a kill -9 cut the last append short
            logger.warning("%s: dropping a half-written last line", self.path)
            _write_atomic(self.path, b"".join(line + b"\n" for line in lines[:-1]).decode())
        for number, line in enumerate(lines[:-1], 1):
            try:
                self._apply(json.loads(line))
            except (ValueError, KeyError) as exc:
                raise PrefitError(
                    f"{self.path} line {number} is corrupt ({exc}); delete that split's "
                    f"{STATE_DIR} folder and data files to fit it again"
                ) from exc

    def _apply(self, event: dict) -> None:
        if "pushed" in event:
            self.pushed.add((event["pushed"], event["to"]))
            return
        if "shard" in event:
            if event["shard"] != self.shards:
                raise ValueError(f"shard {event['shard']} after {self.shards - 1}")
            self.files.append(event["file"])
            self.shards += 1
            self.stats.add(event["psnr"], event["real_splats"], event["bytes"], shards=1)
        self.stats.skipped += len(event["skipped"])
        self.cursor = max(self.cursor, event["end"])

    def append(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._apply(event)


# -- run settings -------------------------------------------------------------------------------

def _diffs(stored: dict, now: dict) -> str:
    return "; ".join(f"{key}: {stored.get(key)!r} there, {now.get(key)!r} now"
                     for key in sorted(set(stored) | set(now)) if stored.get(key) != now.get(key))


def _check_settings(out: Path, split: str, settings: dict, run: dict) -> None:
    """Record the run's settings, or refuse to add to shards made with other settings.

    ``settings`` (budget, crop, fit) hold for the whole dataset; ``run`` (source, world size,
    number of items) for one split, whose resume skips items by their global index."""
    state = out / STATE_DIR
    path = state / "settings.json"
    if path.exists():
        diffs = _diffs(json.loads(path.read_text()), settings)
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
        _write_atomic(path, json.dumps(settings, indent=2, sort_keys=True))
    run_path = state / split / "run.json"
    if not run_path.exists():
        _write_atomic(run_path, json.dumps(run, indent=2, sort_keys=True))
        return
    stored = json.loads(run_path.read_text())
    redo = (f"pass a new --out, or delete {out / 'data'}/{split}-* and {state / split} to fit "
            "the split again")
    source_keys = ("source", "source_kind", "dataset_config")
    diffs = _diffs({k: stored[k] for k in source_keys}, {k: run[k] for k in source_keys})
    if diffs:
        raise PrefitError(f"split {split!r} in {out} is being fitted from another source "
                          f"({diffs}); shards of two sources must not be mixed: {redo}")
    if stored["world_size"] != run["world_size"]:
        raise PrefitError(
            f"split {split!r} in {out} was started on {stored['world_size']} process(es), now "
            f"{run['world_size']}: item i goes to rank i % world_size, so it can only be resumed "
            f"on {stored['world_size']}; or {redo}"
        )
    if None not in (stored["num_items"], run["num_items"]) and \
            stored["num_items"] != run["num_items"]:
        raise PrefitError(
            f"the source of split {split!r} held {stored['num_items']} images when the run "
            f"started and {run['num_items']} now: a resumed run skips images by their place in "
            f"the source, so the source must not change; restore it, or {redo}"
        )


def _run_settings(source: Source, transform: SplatTransform, config: FitConfig,
                  dataset_config: str | None, world_size: int) -> tuple[dict, dict]:
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
    run = {"source": source.name, "source_kind": source.kind, "dataset_config": dataset_config,
           "world_size": world_size, "num_items": source.num_items}
    return settings, run


def _split_state(out: Path, split: str, rank: int, journal: Journal, uploader_target):
    """Remove what a killed run left half-done; return the shards still to upload."""
    for tmp in (out / STATE_DIR / "tmp").glob(f"{split}-{rank:05d}-*"):
        tmp.unlink()
    known = set(journal.files)
    for path in (out / "data").glob(f"{split}-{rank:05d}-*.parquet"):
        if f"data/{path.name}" not in known:  # renamed in, but killed before the journal line
            path.unlink()
    missing = [f for f in journal.files if not (out / f).exists()]
    if missing:
        raise PrefitError(
            f"{len(missing)} finished shard(s) of split {split!r} are missing from {out} "
            f"({missing[0]}, ...): restore them, or delete {out / 'data'}/{split}-* and "
            f"{out / STATE_DIR / split} to fit the split again"
        )
    if uploader_target is None:
        return []
    return [(k, file) for k, file in enumerate(journal.files)
            if (k, uploader_target) not in journal.pushed]


# -- rank discovery -----------------------------------------------------------------------------

class _Ranks:
    """This process's rank and the two collective steps prefit needs (gather, barrier).

    Under ``accelerate launch`` / ``torchrun`` (WORLD_SIZE > 1) this is accelerate's
    ``PartialState`` on gloo: the collectives carry a few small Python objects, so they need no
    GPU, and the timeout is long because ranks may finish hours apart after a resume. Otherwise
    it is rank 0 of 1 and touches no global state."""

    def __init__(self):
        from accelerate.utils import get_int_from_env

        world = get_int_from_env(
            ["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1
        )
        self.state = None
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        if world > 1:
            from accelerate import PartialState

            self.state = PartialState(cpu=True, timeout=timedelta(hours=48))
            self.rank = self.state.process_index
            self.world_size = self.state.num_processes
            self.local_rank = self.state.local_process_index

    def gather(self, obj) -> list:
        if self.state is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()


# -- decoding and fitting -----------------------------------------------------------------------

class _Row(NamedTuple):
    index: int
    source_id: str
    label: int | None
    caption: str | None
    splats: np.ndarray  # [N, 8] float16
    psnr: float
    real_splats: int


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


def prefit_features(num_splats: int, class_names: list[str] | None = None):
    """The ``datasets.Features`` of a pre-fitted dataset's rows."""
    from datasets import Array2D, ClassLabel, Features, Value

    return Features({
        "splats": Array2D((num_splats, SPLAT_CHANNELS), "float16"),
        "label": ClassLabel(names=class_names) if class_names else Value("int64"),
        "caption": Value("string"),
        "source_id": Value("string"),
        "psnr": Value("float32"),
    })


class _ShardWriter:
    def __init__(self, out: Path, split: str, rank: int, features, journal: Journal,
                 uploader: Uploader | None):
        self.out, self.split, self.rank = out, split, rank
        self.features, self.journal, self.uploader = features, journal, uploader
        self.tmp_dir = out / STATE_DIR / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (out / "data").mkdir(parents=True, exist_ok=True)

    def write(self, rows: list[_Row], skipped: list) -> None:
        """Write ``rows`` as the next shard, journal it (with the skipped items before its
        end) and upload it. ``skipped`` is consumed in place."""
        import pyarrow.parquet as pq
        from datasets import Dataset

        shard = self.journal.shards
        name = f"{self.split}-{self.rank:05d}-{shard:05d}.parquet"
        columns = {
            "splats": np.stack([r.splats for r in rows]),
            "label": [-1 if r.label is None else r.label for r in rows],
            "caption": [r.caption for r in rows],
            "source_id": [r.source_id for r in rows],
            "psnr": np.array([r.psnr for r in rows], dtype=np.float32),
        }
        table = Dataset.from_dict(columns, features=self.features).data.table
        # The "huggingface" schema metadata carries the Features (Array2D, ClassLabel) to readers.
        table = table.replace_schema_metadata(self.features.arrow_schema.metadata)
        tmp, final = self.tmp_dir / name, self.out / "data" / name
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        end = rows[-1].index + 1
        mine = [s for s in skipped if s[0] < end]
        del skipped[: len(mine)]
        self.journal.append({
            "shard": shard, "file": f"data/{name}", "end": end,
            "indices": [r.index for r in rows], "psnr": [r.psnr for r in rows],
            "real_splats": sum(r.real_splats for r in rows), "bytes": final.stat().st_size,
            "skipped": mine,
        })
        self.push(shard, f"data/{name}")

    def push(self, shard: int, file: str) -> None:
        if self.uploader is not None:
            self.uploader(self.out / file, file)
            self.journal.append({"pushed": shard, "to": _target(self.uploader)})


def _target(uploader) -> str:
    return getattr(uploader, "target", None) or repr(uploader)


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
    num_splats: int = 400,
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
        **fit_options: :class:`~timm_splat.fitting.FitConfig` fields (iterations, seed, ...).

    Returns:
        On rank 0 the split's statistics (:meth:`Stats.summary`), elsewhere None.
    """
    if not _SPLIT_NAME.match(split):
        raise PrefitError(f"split name {split!r} must match {_SPLIT_NAME.pattern} (datasets' rule)")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise PrefitError(f"{name} must be a positive int, got {value!r}")
    fit_options.pop("batch_size", None)  # batch_size above decides
    transform = SplatTransform(num_splats, image_size, crop_pct=crop_pct,
                               interpolation=interpolation, **fit_options)
    config = FitConfig(num_splats=num_splats, batch_size=batch_size, **fit_options)
    ranks = _Ranks()
    rank, world = ranks.rank, ranks.world_size
    source = dataset if isinstance(dataset, Source) else open_source(dataset, split,
                                                                      dataset_config)
    out = Path(out)
    _check_settings(out, split, *_run_settings(source, transform, config, dataset_config, world))

    journal = Journal(out / STATE_DIR / split / f"rank-{rank:05d}.jsonl")
    unpushed = _split_state(out, split, rank, journal, uploader and _target(uploader))
    writer = _ShardWriter(out, split, rank, prefit_features(num_splats, source.class_names),
                          journal, uploader)
    for shard, file in unpushed:  # finished before a kill, or before --push-to-hub was given
        writer.push(shard, file)
    if journal.shards:
        logger.info("rank %d: resuming %s after %d shards (%d rows), at item %d", rank, split,
                    journal.shards, journal.stats.rows, journal.cursor)
    if device is None or (str(device) == "cuda" and world > 1):  # one GPU per local rank
        device = f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"

    items = source.items(rank, world, start=journal.cursor, stop=limit)
    known_end = source.num_items if limit is None else min(limit, source.num_items or limit)
    rows: list[_Row] = []
    skipped: list = []  # [index, source_id] of undecodable items not journalled yet
    failures = 0
    show = ranks.local_rank == 0 if progress is None else progress
    with tqdm(total=_remaining(journal.cursor, known_end, rank, world), disable=not show,
              unit="img", desc=f"prefit {split}", dynamic_ncols=True) as bar:
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
                rows += _fit_batch(good, num_splats, device, fit_options)
                bar.set_postfix(psnr=f"{np.mean([r.psnr for r in rows[-len(good):]]):.2f}",
                                refresh=False)
            bar.update(len(batch))
            while len(rows) >= shard_size:
                writer.write(rows[:shard_size], skipped)
                rows = rows[shard_size:]
        if rows:
            writer.write(rows, skipped)
        if skipped:
            journal.append({"skipped": skipped, "end": skipped[-1][0] + 1})

    return _finish(ranks, journal, out, split, uploader, repo_id)


def _fit_batch(good: list, num_splats: int, device, fit_options: dict) -> list[_Row]:
    """One fit_splats call for the batch (its own batch size, so one kernel batch)."""
    fitted = fit_splats(torch.stack([pixels for _, pixels in good]), num_splats=num_splats,
                        progress=False, device=device, **dict(fit_options, batch_size=len(good)))
    half = fitted.splats.to("cpu", torch.float16)
    real = splat_count(half).tolist()  # counted as stored: fp16 is what readers get
    return [_Row(item.index, item.source_id, item.label, item.caption, splats, psnr, count)
            for (item, _), splats, psnr, count in zip(good, half.numpy(), fitted.psnr.tolist(),
                                                       real)]


def _finish(ranks: _Ranks, journal: Journal, out: Path, split: str, uploader, repo_id):
    """Once every rank is done, rank 0 merges the statistics and writes (and sends) the card."""
    stats = ranks.gather(journal.stats.to_dict())  # also waits for the slowest rank
    result = None
    if ranks.rank == 0:
        merged = Stats()
        for part in stats:
            merged.merge(Stats.from_dict(part))
        _write_atomic(out / STATE_DIR / split / "summary.json",
                      json.dumps(merged.to_dict(), sort_keys=True))
        card = write_card(out, repo_id=repo_id)
        if uploader is not None:
            uploader(card, "README.md")
        result = merged.summary()
        logger.info("%s: %d rows in %d shards, PSNR mean %.2f dB, %d skipped", split,
                    merged.rows, merged.shards, result["psnr_mean"], merged.skipped)
    ranks.barrier()
    return result


# -- the dataset card ---------------------------------------------------------------------------

def _size_category(rows: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
              (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
    return next((name for bound, name in bounds if rows < bound), "100M<n<1B")


_FALLBACK_TEMPLATE = """---
{{ card_data }}
---

# {{ pretty_name }}

{{ source_text }} pre-fitted into {{ num_splats }} Gaussian splats per image ({{ image_size }}).
"""


def _describe_source(run: dict) -> tuple[str, str, bool]:
    """(short name, markdown text, is a Hub dataset) of a split's source. Local paths stay
    private: the card names the folder, not where it lives."""
    name, kind = run["source"], run["source_kind"]
    if kind == "datasets" and not Path(name).is_absolute():
        return name, f"[{name}](https://huggingface.co/datasets/{name})", True
    short = Path(name).name
    what = {"imagefolder": "the local image folder", "webdataset": "the webdataset shards"}
    return short, f"{what.get(kind, 'the local dataset')} `{short}`", False


def write_card(out: str | Path, repo_id: str | None = None) -> Path:
    """(Re)write ``out/README.md`` from ``hub/dataset_card.md``, the run settings and every
    finished split's statistics; its YAML ``configs`` let the Hub viewer and
    ``datasets.load_dataset`` find each split (any split name)."""
    import pyarrow.parquet as pq
    from datasets import Features
    from huggingface_hub import DatasetCard, DatasetCardData

    from .. import __version__

    out = Path(out)
    state = out / STATE_DIR
    settings = json.loads((state / "settings.json").read_text())
    splits, sources = [], {}
    for path in sorted(state.glob("*/summary.json")):
        summary = Stats.from_dict(json.loads(path.read_text())).summary()
        splits.append({"name": path.parent.name, **summary})
        run = json.loads((path.parent / "run.json").read_text())
        sources.setdefault(_describe_source(run), []).append(path.parent.name)
    if not splits:
        raise PrefitError(f"{out} holds no finished split yet")

    (short, text, on_hub), first_run = next(iter(sources)), splits[0]["name"]
    if len(sources) > 1:  # splits fitted from different sources: say which is which
        text = "; ".join(f"{t} ({', '.join(names)})" for (_, t, _), names in sources.items())
    height, width = settings["image_size"]
    num_splats = settings["num_splats"]
    shard = next((out / "data").glob(f"{first_run}-*.parquet"), None)
    label = Features.from_arrow_schema(pq.read_schema(shard))["label"] if shard else None
    defaults = dataclasses.asdict(FitConfig())
    command = [f"python -m timm_splat.prefit --dataset {short} --split {first_run}",
               f"--num-splats {num_splats} --image-size {height} --out {out.name}"]
    if settings["crop_pct"] != 1.0 or settings["interpolation"] != "bicubic":
        command.append(f"--crop-pct {settings['crop_pct']} "
                       f"--interpolation {settings['interpolation']}")
    command += [f"--fit-option {k}={v}" for k, v in settings["fit"].items() if defaults[k] != v]
    rows = sum(s["rows"] for s in splits)
    card_data = DatasetCardData(
        pretty_name=f"{short} as {num_splats} Gaussian splats",
        size_categories=_size_category(rows),
        source_datasets=sorted(n for (n, _, hub) in sources if hub) or None,
        tags=["timm-splat", "gaussian-splatting", "image"],
        configs=[{"config_name": "default", "data_files": [
            {"split": s["name"], "path": f"data/{s['name']}-*"} for s in splits]}],
    )
    kind = json.loads((state / first_run / "run.json").read_text())["source_kind"]
    context = dict(
        source_text=text[0].upper() + text[1:], source_text_lower=text, version=__version__,
        num_splats=num_splats, image_size=f"{height}x{width}", crop_pct=settings["crop_pct"],
        interpolation=settings["interpolation"], splits=splits,
        bytes_per_image=num_splats * BYTES_PER_SPLAT_FP16, pixel_bytes=height * width * 3,
        compression=compression_ratio(num_splats, height, width),
        disk_bytes_per_image=round(sum(s["bytes_per_row"] * s["rows"] for s in splits)
                                   / max(1, rows)),
        label_type=(f"`ClassLabel` ({label.num_classes} classes)" if hasattr(label, "names")
                    else "`int64`"),
        source_id_text={"imagefolder": "the file's path in the folder",
                        "webdataset": "the webdataset key"}.get(kind, "the row index in the split"),
        repo_id=repo_id or "path/to/this/dataset",
        command=" \\\n    ".join(command), fit={"num_splats": num_splats, **settings["fit"]},
    )
    if CARD_TEMPLATE is not None:
        card = DatasetCard.from_template(card_data, template_path=str(CARD_TEMPLATE), **context)
    else:  # an installed wheel without the hub/ folder
        card = DatasetCard.from_template(card_data, template_str=_FALLBACK_TEMPLATE, **context)
    path = out / "README.md"
    _write_atomic(path, str(card))
    return path


__all__ = ["DirectoryUploader", "HubUploader", "Journal", "PrefitError", "Stats",
           "prefit", "prefit_features", "write_card"]
