"""``timm-splat prefit``: pre-fit a dataset into parquet shards of splats; on several GPUs /
machines ``accelerate launch -m timm_splat prefit ...`` (item i goes to rank i % world_size).
Kill it at any point and run the same command again to resume.

    accelerate launch -m timm_splat prefit --dataset ILSVRC/imagenet-1k --split validation \\
        --num-splats 400 --out ./in1k-val-gs400 --push-to-hub org/in1k-val-gs400
    timm-splat prefit --dataset ./my_images --num-splats 400 --out ./out
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

import torch.distributed

from ..data import prefit
from ..fitting import PRESETS, FitConfig
from ..hub import DirectoryUploader, HubUploader
from ..splats import DEFAULT_NUM_SPLATS

_FIT_FIELDS = {
    f.name: f for f in dataclasses.fields(FitConfig) if f.name not in ("num_splats", "batch_size")
}


def _fit_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` for a FitConfig field, VALUE converted to the field's type."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in _FIT_FIELDS:
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE with KEY one of {sorted(_FIT_FIELDS)}, got {text!r}"
        )
    kind = type(_FIT_FIELDS[key].default)
    try:
        return key, kind(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{key} takes a {kind.__name__}: {exc}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.add_argument(
        "--dataset",
        required=True,
        help="image folder (class subfolders = labels), webdataset .tar shards "
        "(file, glob or folder), .parquet files, a local dataset folder or a Hub id",
    )
    parser.add_argument("--out", required=True, help="output folder (resumed if it holds a run)")
    parser.add_argument(
        "--split",
        default="train",
        help="split to read, and its name in the output (default: train)",
    )
    parser.add_argument("--dataset-config", default=None, help="config name of a Hub dataset")
    parser.add_argument(
        "--num-splats",
        type=int,
        default=DEFAULT_NUM_SPLATS,
        help=f"splat budget per image (default: {DEFAULT_NUM_SPLATS})",
    )
    parser.add_argument(
        "--image-size", type=int, default=224, help="crop size fitted (default: 224)"
    )
    parser.add_argument(
        "--crop-pct",
        type=float,
        default=1.0,
        help="crop share of the resized shorter side, timm's convention (default: 1)",
    )
    parser.add_argument(
        "--interpolation", default="bicubic", help="resize interpolation (default: bicubic)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="images per fit call (default: 64; on a GPU use thousands)",
    )
    parser.add_argument(
        "--shard-size", type=int, default=1000, help="rows per parquet file (default: 1000)"
    )
    parser.add_argument("--device", default=None, help="default: this rank's GPU, else the CPU")
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help=f"iterations per fit (default: the --fit-preset's; {FitConfig.iterations} for the "
        "default)",
    )
    parser.add_argument("--seed", type=int, default=None, help="fit seed (default: 0)")
    parser.add_argument(
        "--fit-preset",
        default="default",
        choices=sorted(PRESETS),
        help="fitter configuration (FitConfig.preset) the other fit options change; 'fast' "
        "takes a third of the time (docs/fitting.md); default: %(default)s",
    )
    parser.add_argument(
        "--fit-option",
        type=_fit_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other FitConfig field (repeatable)",
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="image decoding threads (default: 4)"
    )
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="only the first LIMIT items of the source (a trial run)",
    )
    push = parser.add_mutually_exclusive_group()
    push.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="upload each finished shard, then the card, to this dataset repo",
    )
    push.add_argument(
        "--dry-run-push",
        metavar="DIR",
        help="copy what --push-to-hub would upload into DIR instead",
    )
    parser.add_argument(
        "--keep-images",
        action="store_true",
        help="also store the fitted crops (PNG), so stage 1 can distil from this dataset",
    )
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    fit_options = {**PRESETS[args.fit_preset], **dict(args.fit_option)}
    for name in ("iterations", "seed"):
        if getattr(args, name) is not None:
            fit_options[name] = getattr(args, name)
    uploader = None
    if args.push_to_hub:
        uploader = HubUploader(args.push_to_hub, private=args.private or None)
    elif args.dry_run_push:
        uploader = DirectoryUploader(args.dry_run_push)
    try:
        prefit(
            args.dataset,
            args.out,
            split=args.split,
            num_splats=args.num_splats,
            image_size=args.image_size,
            crop_pct=args.crop_pct,
            interpolation=args.interpolation,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            device=args.device,
            dataset_config=args.dataset_config,
            limit=args.limit,
            workers=args.workers,
            uploader=uploader,
            repo_id=args.push_to_hub,
            progress=False if args.no_progress else None,
            keep_images=args.keep_images,
            **fit_options,
        )
    finally:
        if torch.distributed.is_initialized():  # else gloo aborts at interpreter exit
            torch.distributed.destroy_process_group()
    return 0
