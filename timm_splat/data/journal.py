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
        data = dict(data)
        data["histogram"] = Counter({int(k): v for k, v in data["histogram"].items()})
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
            write_atomic(self.path, b"".join(line + b"\n" for line in lines[:-1]).decode())
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
