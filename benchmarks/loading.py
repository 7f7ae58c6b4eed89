"""Loading speed: a dataset streamed through a torch DataLoader as (a) JPEG files decoded and
put through timm's eval transform, (b) pre-fitted fp16 splats from the project's parquet shards
(ShardWriter, load_prefit), (c) .splat codec bytes (a parquet column of binary values, decoded
and padded per item). Samples per second with ``--workers`` DataLoader workers (0: the main
process), so the number is per worker.

The 14 scikit-image photos (tuning + held-out) are fitted once per budget and repeated to
``--items`` rows; the JPEGs are those photos at their shipped size, quality 90.

    python benchmarks/loading.py --budgets 400 3136 --items 512
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from timm_splat import fit_splats
from timm_splat.codec import decode, encode
from timm_splat.images import to_rgb_tensors
from timm_splat.samples import HELDOUT_PHOTOS, SAMPLE_PHOTOS, sample_photos
from timm_splat.splats import pad_splats, splat_count


class JpegFiles(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB"))


class SplatBytes(torch.utils.data.Dataset):
    """``.splat`` bytes read from a parquet column, decoded and padded to ``num_splats``."""

    def __init__(self, path, num_splats):
        import pyarrow.parquet as pq

        self.blobs = pq.read_table(path, columns=["splat"]).column("splat").to_pylist()
        self.num_splats = num_splats

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, i):
        return pad_splats([decode(self.blobs[i])], self.num_splats)[0]


class Prefit(torch.utils.data.Dataset):
    """load_prefit's rows as float32 ``[N, 8]`` (what a model is fed)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]["splats"].float()


def write_prefit(folder: Path, splats: torch.Tensor, items: int) -> None:
    """``items`` rows cycling through ``splats`` ``[P, N, 8]``, as ``timm-splat prefit``
    writes them (ShardWriter, journal, features)."""
    from timm_splat.data.journal import STATE_DIR, Journal
    from timm_splat.data.shards import Row, ShardWriter, prefit_features

    num_splats = splats.shape[1]
    journal = Journal(folder / STATE_DIR / "train" / "rank-00000.jsonl")
    writer = ShardWriter(folder, "train", 0, prefit_features(num_splats), journal, None)
    half = splats.half().numpy()
    counts = splat_count(splats).tolist()
    photos = len(half)
    rows = [
        Row(i, f"photo{i % photos}", i % 10, None, half[i % photos], 30.0, counts[i % photos])
        for i in range(items)
    ]
    for start in range(0, items, 256):
        writer.write(rows[start : start + 256], [])


def rate(dataset, workers: int, batch_size: int, passes: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0
    )
    for _ in loader:  # warm-up pass: workers started, files in the page cache
        break
    start = time.perf_counter()
    seen = 0
    for _ in range(passes):
        for batch in loader:
            seen += len(batch)
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=int, nargs="+", default=[400, 3136])
    parser.add_argument("--items", type=int, default=512)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--passes", type=int, default=2)
    args = parser.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from timm.data import create_transform, resolve_data_config

    from timm_splat.data.shards import load_prefit

    names = SAMPLE_PHOTOS + HELDOUT_PHOTOS
    shipped = sample_photos(None, names=names)
    small = torch.stack(to_rgb_tensors(list(sample_photos(224, names=names).values())))
    config = resolve_data_config({"input_size": (3, 224, 224), "interpolation": "bicubic"})
    transform = create_transform(**config, is_training=False)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = []
        for i, image in enumerate(shipped.values()):
            image.save(tmp / f"{i}.jpg", quality=90)
        paths = [tmp / f"{i % len(shipped)}.jpg" for i in range(args.items)]
        jpeg = rate(JpegFiles(paths, transform), args.workers, args.batch_size, args.passes)
        results.append(("JPEG q90 (shipped size) + timm eval transform", "", jpeg))
        for budget in args.budgets:
            fitted = fit_splats(small, num_splats=budget, progress=False).splats
            folder = tmp / f"prefit{budget}"
            write_prefit(folder, fitted, args.items)
            prefit = Prefit(load_prefit(folder, "train", cache_dir=str(tmp / "hf")))
            fp16 = rate(prefit, args.workers, args.batch_size, args.passes)
            blobs = [encode(fitted[i % len(fitted)]) for i in range(args.items)]
            table = pa.table({"splat": pa.array(blobs, pa.binary())})
            pq.write_table(table, tmp / f"codec{budget}.parquet")
            codec = SplatBytes(tmp / f"codec{budget}.parquet", budget)
            ours = rate(codec, args.workers, args.batch_size, args.passes)
            mean_bytes = np.mean([len(b) for b in blobs[: len(fitted)]])
            results.append((f"fp16 splats, load_prefit, N={budget}", 16 * budget, fp16))
            results.append((f".splat codec bytes, N={budget}", mean_bytes, ours))
            print(f"N={budget} done", flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(
        f"\n{args.items} items, batch {args.batch_size}, {args.workers} workers, "
        f"{torch.get_num_threads()} torch threads; {stamp}; {platform.machine()}\n"
    )
    print("| input | bytes per item | samples/s | vs JPEG |\n|---|---|---|---|")
    for label, size, value in results:
        size = f"{size:.0f}" if size != "" else "file"
        print(f"| {label} | {size} | {value:.0f} | {value / jpeg:.1f}x |")


if __name__ == "__main__":
    main()
