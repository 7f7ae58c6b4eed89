"""Pre-fit a dataset into parquet shards of splats: ``python -m timm_splat.prefit`` or, on
several GPUs / machines, ``accelerate launch -m timm_splat.prefit`` (item i goes to rank
i % world_size). Kill it at any point and run the same command again to resume.

    accelerate launch -m timm_splat.prefit --dataset ILSVRC/imagenet-1k --split validation \\
        --num-splats 400 --out ./in1k-val-gs400 --push-to-hub org/in1k-val-gs400
    python -m timm_splat.prefit --dataset ./my_images --num-splats 400 --out ./out
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys

from .fitting import FitConfig

_FIT_FIELDS = {f.name: f for f in dataclasses.fields(FitConfig)
               if f.name not in ("num_splats", "batch_size")}


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="timm-splat prefit",
        description="Fit every image of a dataset into splats and write resumable parquet "
                    "shards (optionally uploading them to the Hub as they finish).",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True,
                   help="image folder (class subfolders = labels), webdataset .tar shards (file, "
                        "glob or folder), .parquet files, a local dataset folder or a Hub id")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a run)")
    p.add_argument("--split", default="train",
                   help="split to read, and its name in the output (default: train)")
    p.add_argument("--dataset-config", default=None, help="config name of a Hub dataset")
    p.add_argument("--num-splats", type=int, default=400,
                   help="splat budget per image (default: 400)")
    p.add_argument("--image-size", type=int, default=224, help="crop size fitted (default: 224)")
    p.add_argument("--crop-pct", type=float, default=1.0,
                   help="crop share of the resized shorter side, timm's convention (default: 1)")
    p.add_argument("--interpolation", default="bicubic",
                   help="resize interpolation (default: bicubic)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per fit call (default: 64; on a GPU use thousands)")
    p.add_argument("--shard-size", type=int, default=1000,
                   help="rows per parquet file (default: 1000)")
    p.add_argument("--device", default=None, help="default: this rank's GPU, else the CPU")
    p.add_argument("--iterations", type=int, default=None,
                   help="Adam steps per fit (default: FitConfig's 600)")
    p.add_argument("--seed", type=int, default=None, help="fit seed (default: 0)")
    p.add_argument("--fit-option", type=_fit_option, action="append", default=[],
                   metavar="KEY=VALUE", help="any other FitConfig field (repeatable)")
    p.add_argument("--workers", type=int, default=4, help="image decoding threads (default: 4)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first LIMIT items of the source (a trial run)")
    push = p.add_mutually_exclusive_group()
    push.add_argument("--push-to-hub", metavar="REPO",
                      help="upload each finished shard, then the card, to this dataset repo")
    push.add_argument("--dry-run-push", metavar="DIR",
                      help="copy what --push-to-hub would upload into DIR instead")
    p.add_argument("--private", action="store_true", help="create the Hub repo private")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch.distributed

    from .data.prefit import DirectoryUploader, HubUploader, prefit

    fit_options = dict(args.fit_option)
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
            args.dataset, args.out, split=args.split, num_splats=args.num_splats,
            image_size=args.image_size, crop_pct=args.crop_pct, interpolation=args.interpolation,
            batch_size=args.batch_size, shard_size=args.shard_size, device=args.device,
            dataset_config=args.dataset_config, limit=args.limit, workers=args.workers,
            uploader=uploader, repo_id=args.push_to_hub,
            progress=False if args.no_progress else None, **fit_options,
        )
    except ValueError as exc:  # PrefitError, SourceError, bad fit options: say what to fix
        print(f"timm-splat prefit: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_initialized():  # else gloo aborts at interpreter exit
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
