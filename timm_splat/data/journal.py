"""The pre-fit run's bookkeeping on disk: atomic file writes, the per-rank journal of finished
shards (what a resumed run trusts) and the constant-memory PSNR statistics it accumulates."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

STATE_DIR = ".prefit"  # hidden folder of an output dataset that holds the run's state


class PrefitError(ValueError):
    """A run that cannot go on as asked; the message says how to fix it."""


def read_state_json(path: Path, what: str = "a JSON object"):
    """A state file this project wrote, read back as untrusted: the parsed JSON object, or
    PrefitError naming the file (unreadable, not JSON, nested too deeply, not an object)."""
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:
        data, problem = None, "is nested too deeply"
    except (OSError, ValueError) as exc:
        data, problem = None, f"is not readable JSON ({exc})"
    else:
        problem = None if isinstance(data, dict) else f"holds a {type(data).__name__}, not {what}"
    if problem:
        raise PrefitError(
            f"{path} {problem}: it was changed or damaged since timm-splat prefit wrote it; "
            "restore it, or delete the output folder's split (data files and its "
            f"{STATE_DIR} folder) to fit it again"
        )
    return data


def read_run(path: Path) -> dict:
    """A split's ``run.json``, checked: what pre-fitting writes there, or PrefitError."""
    run = read_state_json(path)
    kinds = {
        "source": str,
        "source_kind": str,
        "dataset_config": (str, type(None)),
        "world_size": int,
        "num_items": (int, type(None)),
    }
    for key, kind in kinds.items():
        value = run.get(key)
        bad = not isinstance(value, kind) or isinstance(value, bool)
        if bad or (key == "world_size" and value < 1) or (isinstance(value, int) and value < 0):
            raise PrefitError(
                f"{path}: {key} is {value!r}, not what timm-splat prefit writes there; restore "
                f"the file, or delete the split (its data files and {path.parent}) to fit it again"
            )
    return run


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fsync_dir(path: Path) -> None:
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


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # per process: ranks never collide
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
        """Inverse of :meth:`to_dict`; ValueError for anything it did not write."""
        fields = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != fields:
            raise ValueError(f"statistics must be an object with keys {sorted(fields)}")
        data = dict(data)
        histogram = data["histogram"]
        if not isinstance(histogram, dict) or not all(
            isinstance(k, str) and k.lstrip("-").isdigit() and _is_int(v)
            for k, v in histogram.items()
        ):
            raise ValueError("statistics: histogram must map centi-dB to counts")
        data["histogram"] = Counter({int(k): v for k, v in histogram.items()})
        for key in ("rows", "skipped", "shards", "bytes", "real_splats"):
            if not _is_int(data[key]):
                raise ValueError(f"statistics: {key} must be an int >= 0, got {data[key]!r}")
        for key in ("psnr_sum", "psnr_min", "psnr_max"):
            if data[key] is not None and not _is_number(data[key]):
                raise ValueError(f"statistics: {key} must be a number, got {data[key]!r}")
        data["psnr_sum"] = data["psnr_sum"] or 0.0
        data["psnr_min"] = math.inf if data["psnr_min"] is None else data["psnr_min"]
        data["psnr_max"] = -math.inf if data["psnr_max"] is None else data["psnr_max"]
        return cls(**data)

    def summary(self) -> dict:
        """The numbers the dataset card shows."""
        rows = max(self.rows, 1)
        return {
            "rows": self.rows,
            "skipped": self.skipped,
            "shards": self.shards,
            "psnr_mean": self.psnr_sum / rows,
            "psnr_min": self.psnr_min,
            "psnr_max": self.psnr_max,
            "real_splats_mean": self.real_splats / rows,
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
    memory does not grow with the dataset. A line cut short by a kill is dropped. Every line
    is checked as untrusted: shard k's file is exactly the name pre-fitting gives it
    (``data/{split}-{rank:05d}-{k:05d}.parquet``, so no path leads outside the folder), its
    indices are this rank's (``i % world_size == rank``), increasing, after the previous
    line's and below ``num_items``, and ``end`` is one past the last item it names."""

    def __init__(
        self,
        path: Path,
        *,
        split: str,
        rank: int = 0,
        world_size: int = 1,
        num_items: int | None = None,
    ):
        self.path = path
        self.split, self.rank, self.world_size, self.num_items = split, rank, world_size, num_items
        self.shards = 0  # the next shard number
        self.files: list[str] = []  # finished shard files, by shard number
        self.rows: list[int] = []  # their row counts
        self.sizes: list[int] = []  # and sizes in bytes, to check them against the disk
        self.cursor = 0  # resume at this global index
        self.pushed: set[tuple[int, str]] = set()
        self.stats = Stats()
        if path.exists():
            self._read()
        path.parent.mkdir(parents=True, exist_ok=True)

    def shard_file(self, shard: int) -> str:
        """The one name shard ``shard`` of this rank has, relative to the output folder."""
        return f"data/{self.split}-{self.rank:05d}-{shard:05d}.parquet"

    def _read(self) -> None:
        lines = self.path.read_bytes().split(b"\n")
        if lines[-1]:  # no final newline: a kill -9 cut the last append short
            logger.warning("%s: dropping a half-written last line", self.path)
            write_atomic(self.path, b"".join(line + b"\n" for line in lines[:-1]).decode())
        for number, line in enumerate(lines[:-1], 1):
            try:
                self._apply(json.loads(line))
            except RecursionError:
                problem = "nested too deeply"
            except (ValueError, KeyError, TypeError) as exc:
                problem = str(exc)
            else:
                continue
            raise PrefitError(
                f"{self.path} line {number} is corrupt ({problem}); delete that split's "
                f"{STATE_DIR} folder and data files to fit it again"
            )

    def _index(self, value, what: str) -> int:
        if not _is_int(value) or value % self.world_size != self.rank:
            raise ValueError(
                f"{what} {value!r} is not an item of rank {self.rank} of {self.world_size}"
            )
        if self.num_items is not None and value >= self.num_items:
            raise ValueError(f"{what} {value} is beyond the source's {self.num_items} items")
        return value

    def _check(self, event) -> None:
        """ValueError unless ``event`` is a line :meth:`append` could have written next."""
        if not isinstance(event, dict):
            raise ValueError(f"a line must be a JSON object, got a {type(event).__name__}")
        if "pushed" in event:
            if set(event) != {"pushed", "to"} or not isinstance(event["to"], str):
                raise ValueError("a push line holds exactly pushed (shard) and to (target)")
            if not _is_int(event["pushed"]) or event["pushed"] >= self.shards:
                raise ValueError(f"pushed shard {event['pushed']!r}, which is not finished")
            return
        keys = {"shard", "file", "end", "indices", "psnr", "real_splats", "bytes", "skipped"}
        if set(event) != (keys if "shard" in event else {"skipped", "end"}):
            raise ValueError(f"unexpected keys {sorted(event)}")
        skipped = event["skipped"]
        if not isinstance(skipped, list) or not all(
            isinstance(s, list) and len(s) == 2 and isinstance(s[1], str) for s in skipped
        ):
            raise ValueError("skipped must be a list of [index, source_id]")
        named = [self._index(s[0], "skipped item") for s in skipped]
        rows = []
        if "shard" in event:
            if event["shard"] != self.shards:
                raise ValueError(f"shard {event['shard']!r} after {self.shards - 1}")
            if event["file"] != self.shard_file(self.shards):
                raise ValueError(
                    f"shard {self.shards} names file {event['file']!r}, not "
                    f"{self.shard_file(self.shards)!r}"
                )
            indices, psnr = event["indices"], event["psnr"]
            if not isinstance(indices, list) or not indices:
                raise ValueError("indices must be a non-empty list")
            if not isinstance(psnr, list) or len(psnr) != len(indices):
                raise ValueError("psnr must be a list with one number per index")
            if not all(_is_number(v) for v in psnr):
                raise ValueError("psnr values must be finite numbers")
            for key in ("real_splats", "bytes"):
                if not _is_int(event[key]):
                    raise ValueError(f"{key} must be an int >= 0, got {event[key]!r}")
            rows = [self._index(i, "index") for i in indices]
            if set(rows) & set(named):
                raise ValueError("an item is both in the shard and skipped")
        elif not skipped:
            raise ValueError("a skipped line without skipped items")
        for items in (rows, named):
            if items != sorted(set(items)) or (items and items[0] < self.cursor):
                raise ValueError(f"items out of order or before index {self.cursor}")
        last = rows[-1] if rows else named[-1]
        if event["end"] != last + 1 or (named and named[-1] > last):
            raise ValueError(f"end {event['end']!r} is not one past its last item ({last})")

    def _apply(self, event: dict) -> None:
        self._check(event)
        if "pushed" in event:
            self.pushed.add((event["pushed"], event["to"]))
            return
        if "shard" in event:
            self.files.append(event["file"])
            self.rows.append(len(event["indices"]))
            self.sizes.append(event["bytes"])
            self.shards += 1
            self.stats.add(event["psnr"], event["real_splats"], event["bytes"], shards=1)
        self.stats.skipped += len(event["skipped"])
        self.cursor = event["end"]

    def append(self, event: dict) -> None:
        self._check(event)  # what is written must read back
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._apply(event)
