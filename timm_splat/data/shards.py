"""The pre-fitted dataset format, written and read in one place: parquet shards of fp16 splats
``[N, 8]`` with ``label`` / ``caption`` / ``source_id`` / ``psnr`` columns, the ``datasets``
Features in each file's schema metadata, ``data/{split}-{rank:05d}-{shard:05d}.parquet``."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..splats import SPLAT_CHANNELS
from .journal import STATE_DIR, Journal, fsync_dir

FORMAT_VERSION = 1
Uploader = Callable[[Path, str], None]  # (local file, path in the repo)


class Row(NamedTuple):
    index: int
    source_id: str
    label: int | None
    caption: str | None
    splats: np.ndarray  # [N, 8] float16
    psnr: float
    real_splats: int
    image: bytes | None = None  # PNG of the fitted crop (prefit keep_images=True)


def prefit_features(num_splats: int, class_names: list[str] | None = None, images: bool = False):
    """The ``datasets.Features`` of a pre-fitted dataset's rows (``images``: with an ``image``
    column holding the fitted crops, for distillation from pre-fitted data)."""
    from datasets import Array2D, ClassLabel, Features, Image, Value

    extra = {"image": Image()} if images else {}
    return Features(
        {
            "splats": Array2D((num_splats, SPLAT_CHANNELS), "float16"),
            "label": ClassLabel(names=class_names) if class_names else Value("int64"),
            "caption": Value("string"),
            "source_id": Value("string"),
            "psnr": Value("float32"),
            **extra,
        }
    )


class ShardWriter:
    """Writes rows as the next shard (temp file, fsync, rename), journals it, uploads it."""

    def __init__(
        self,
        out: Path,
        split: str,
        rank: int,
        features,
        journal: Journal,
        uploader: Uploader | None,
    ):
        self.out, self.split, self.rank = out, split, rank
        self.features, self.journal, self.uploader = features, journal, uploader
        self.tmp_dir = out / STATE_DIR / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (out / "data").mkdir(parents=True, exist_ok=True)

    def write(self, rows: list[Row], skipped: list) -> None:
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
        if "image" in self.features:
            columns["image"] = [{"bytes": r.image, "path": None} for r in rows]
        table = Dataset.from_dict(columns, features=self.features).data.table
        # The "huggingface" schema metadata carries the Features (Array2D, ClassLabel) to readers.
        table = table.replace_schema_metadata(self.features.arrow_schema.metadata)
        tmp, final = self.tmp_dir / name, self.out / "data" / name
        with open(tmp, "wb") as f:
            pq.write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(final.parent)
        end = rows[-1].index + 1
        mine = [s for s in skipped if s[0] < end]
        del skipped[: len(mine)]
        self.journal.append(
            {
                "shard": shard,
                "file": f"data/{name}",
                "end": end,
                "indices": [r.index for r in rows],
                "psnr": [r.psnr for r in rows],
                "real_splats": sum(r.real_splats for r in rows),
                "bytes": final.stat().st_size,
                "skipped": mine,
            }
        )
        self.push(shard, f"data/{name}")

    def push(self, shard: int, file: str) -> None:
        if self.uploader is not None:
            self.uploader(self.out / file, file)
            self.journal.append({"pushed": shard, "to": upload_target(self.uploader)})


def upload_target(uploader) -> str:
    return getattr(uploader, "target", None) or repr(uploader)


def load_prefit(path_or_repo: str | Path, split: str | None = None, **load_kwargs):
    """A pre-fitted dataset as a ``datasets.Dataset`` in torch format.

    ``path_or_repo``: an ``--out`` folder or a Hub dataset id (with ``HF_HUB_OFFLINE=1``, read
    from the Hub cache, e.g. after ``huggingface_hub.snapshot_download``). ``split`` may be left
    out when there is only one. ``load_kwargs`` go to ``datasets.load_dataset`` (``cache_dir``,
    ``revision``, ``streaming``, ...).

    Rows: ``splats`` is a float16 tensor ``[N, 8]``; ``label`` (int, -1 for none),
    ``caption`` (str or None), ``source_id`` (str) and ``psnr`` (float) are Python values.
    With ``streaming=True`` an ``IterableDataset`` comes back, whose splats are float32.
    """
    from datasets import DatasetDict, IterableDataset, IterableDatasetDict, load_dataset
    from datasets.exceptions import DatasetGenerationError

    path = Path(path_or_repo).expanduser()
    name = str(path_or_repo)
    root = None  # where the folder's files may live (links are followed only inside it)
    if not path.exists():
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise FileNotFoundError(f"no pre-fitted dataset at {name}: no such folder")
        snapshot = _offline_snapshot(name, load_kwargs.get("revision"))
        if snapshot is not None:
            load_kwargs.pop("revision", None)  # the snapshot is that revision
            path = snapshot
            root = snapshot.parent.parent  # the Hub cache links snapshot files to ../../blobs
    if path.exists():
        # A local folder is read from its own data/ files, checked first, never from paths its
        # card names (a card could point outside the folder).
        files = check_shards(path, split, root=root)
        data_files = {k: [str(f) for f in v] for k, v in files.items()}
        try:
            ds = load_dataset("parquet", data_files=data_files, split=split, **load_kwargs)
        except DatasetGenerationError as exc:  # a shard whose pages do not decode
            raise ValueError(
                f"{name}: a shard does not decode ({exc.__cause__ or exc}); find it "
                "with pyarrow.parquet.read_table on each data/ file, restore or "
                "delete it"
            ) from exc
    else:
        ds = load_dataset(name, split=split, **load_kwargs)
    if isinstance(ds, (DatasetDict, IterableDatasetDict)):
        if len(ds) != 1:
            raise ValueError(f"{name} has splits {sorted(ds)}: pass split=")
        ds = next(iter(ds.values()))
    if "splats" not in (ds.features or {}):
        raise ValueError(f"{name} is not a pre-fitted splat dataset (no 'splats' column)")
    if isinstance(ds, IterableDataset):
        return ds.with_format("torch")
    # dtype applies to every tensor column, so only splats become tensors; the rest stay Python.
    return ds.with_format("torch", columns=["splats"], output_all_columns=True, dtype=torch.float16)


# A shard row's bytes once decoded, beyond its splats: label, caption, ids. More than this per
# row is not a pre-fitted dataset but a decompression bomb.
MAX_ROW_EXTRA_BYTES = 64 * 1024
MAX_SPLATS_PER_ROW = 1 << 16
# Splats one shard may hold (rows x N), checked before decoding: 8M splats are 128 MiB of fp16
# (prefit's default shard of 1000 rows x 400 is 0.4M). Zero padding compresses to nothing, so
# without this an 88 KB file decoded to 766 MB.
MAX_SPLATS_PER_SHARD = 1 << 23


def _regular_file_inside(file: Path, root: Path) -> None:
    """ValueError unless ``file`` is a regular file whose real path is inside ``root``: a link
    is followed only when it stays in the dataset (a FIFO would block the reader forever)."""
    real = file.resolve()
    if not real.is_relative_to(root):
        raise ValueError(
            f"{file} is (or is under) a symbolic link to {real}, outside {root}: load_prefit reads "
            "only files inside the dataset folder; copy the shards in instead of linking them"
        )
    try:
        mode = os.stat(real).st_mode
    except OSError as exc:
        raise ValueError(f"{file} cannot be read ({exc})") from exc
    if not stat.S_ISREG(mode):
        raise ValueError(f"{file} is not a regular file (a pipe, device or folder): remove it")


def check_shards(
    folder: Path, split: str | None = None, root: Path | None = None
) -> dict[str, list[Path]]:
    """``{split: parquet files}`` of a local pre-fitted dataset, each checked from its metadata
    alone (no rows decoded): a regular file inside ``root`` (default: the folder; symbolic
    links are followed only when they stay there), readable, rows of splats ``[N, 8]`` with a
    sane N, at most MAX_SPLATS_PER_SHARD splats, and no more decoded bytes per row than such
    rows need. Raises ValueError naming the bad file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = Path(folder)
    root = Path(root or folder).resolve()
    files: dict[str, list[Path]] = {}
    kinds: dict[str, tuple] = {}  # split -> (splats layout, first file)
    for file in sorted((folder / "data").glob("*.parquet")):
        name = file.name.split("-")[0]
        if split is None or name == split:
            files.setdefault(name, []).append(file)
    if not files:
        wanted = f"split {split!r}" if split else "any split"
        raise FileNotFoundError(
            f"{folder} holds no parquet shards of {wanted} in data/ "
            "(a timm-splat prefit output folder or a downloaded copy)"
        )
    for file in (f for group in files.values() for f in group):
        _regular_file_inside(file, root)
        try:
            meta = pq.read_metadata(file)
            schema = meta.schema.to_arrow_schema()
        except (OSError, ValueError, pa.ArrowException) as exc:  # cut short, not parquet
            raise ValueError(
                f"{file} is not a readable parquet shard ({exc}): restore it or delete it"
            ) from exc
        num_splats = _splats_per_row(schema, file)
        _check_columns(schema, file)
        kind = str(schema.field("splats").type), num_splats
        first = kinds.setdefault(file.name.split("-")[0], (kind, file))
        if first[0] != kind:
            raise ValueError(
                f"{file} stores splats as {kind[0]} of up to {kind[1]}, {first[1]} as "
                f"{first[0][0]} of up to {first[0][1]}: one split's shards must share a layout "
                "(pre-fit them with one --num-splats, or split them)"
            )
        total = _splats_in_shard(meta, num_splats)
        if total > MAX_SPLATS_PER_SHARD:
            raise ValueError(
                f"{file} holds {meta.num_rows} rows of up to {num_splats} splats ({total} in "
                f"all), more than MAX_SPLATS_PER_SHARD={MAX_SPLATS_PER_SHARD} a shard may "
                "decode to: not a pre-fitted shard (prefit writes smaller ones)"
            )
        decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        limit = meta.num_rows * (num_splats * SPLAT_CHANNELS * 4 + MAX_ROW_EXTRA_BYTES)
        if decoded > limit:
            raise ValueError(
                f"{file} decodes to {decoded} bytes for {meta.num_rows} rows of "
                f"{num_splats} splats: not a pre-fitted shard"
            )
    return files


def _check_columns(schema, file: Path) -> None:
    """The other columns readers use have their types: integer labels, string captions and
    ids (a string label or a number caption would fail deep inside training)."""
    import pyarrow as pa

    wanted = {
        "label": ("integers", pa.types.is_integer),
        "caption": ("strings", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
        "source_id": ("strings", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    }
    for name, (what, ok) in wanted.items():
        if name in schema.names:
            kind = schema.field(name).type
            if not (ok(kind) or pa.types.is_null(kind)):
                raise ValueError(f"{file}: column {name!r} holds {kind}, not {what}")


def _splats_in_shard(meta, num_splats: int) -> int:
    """The splats a shard decodes to, from its metadata: rows x N for a fixed ``[N, 8]``
    column; for rows of any length, the values its splats column chunks declare / 8."""
    if num_splats < MAX_SPLATS_PER_ROW:
        return meta.num_rows * num_splats
    leaves = [
        i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] == "splats"
    ]
    values = sum(
        meta.row_group(g).column(i).num_values for g in range(meta.num_row_groups) for i in leaves
    )
    return max(values // SPLAT_CHANNELS, meta.num_rows)


def _splats_per_row(schema, file: Path) -> int:
    """The most splats a row of the shard can hold: N of a fixed ``[N, 8]`` array column (what
    prefit writes), or MAX_SPLATS_PER_ROW for rows of any length of 8 floats each."""
    import pyarrow as pa
    from datasets import Array2D, Features

    if "splats" not in schema.names:
        raise ValueError(f"{file} has no 'splats' column: not a pre-fitted shard")
    try:  # datasets parses the shard's own JSON; damaged, it fails in many ways
        column = Features.from_arrow_schema(schema)["splats"]
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, RecursionError) as exc:
        raise ValueError(f"{file}: unreadable features ({type(exc).__name__}: {exc})") from exc
    bad = ValueError(
        f"{file}: 'splats' is {column}, not float splats [N, {SPLAT_CHANNELS}] with "
        f"1 <= N <= {MAX_SPLATS_PER_ROW}"
    )
    if isinstance(column, Array2D):
        rows, channels = column.shape
        if (
            channels != SPLAT_CHANNELS
            or not 1 <= rows <= MAX_SPLATS_PER_ROW
            or column.dtype not in ("float16", "float32")
        ):
            raise bad
        return rows
    kind = schema.field("splats").type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind)):
        raise bad
    row = kind.value_type
    if not (
        pa.types.is_fixed_size_list(row)
        and row.list_size == SPLAT_CHANNELS
        and (pa.types.is_float16(row.value_type) or pa.types.is_float32(row.value_type))
    ):
        raise bad
    return MAX_SPLATS_PER_ROW


def _offline_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """Offline, the repo's files in the Hub cache (``snapshot_download`` put them there):
    ``datasets`` alone only finds what it prepared itself while online."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(
            snapshot_download(
                repo_id, repo_type="dataset", revision=revision, local_files_only=True
            )
        )
    except LocalEntryNotFoundError:
        return None  # load_dataset may still have its own cached copy
