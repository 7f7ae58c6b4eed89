"""The ``timm-splat`` command: demo, fit, build; prefit, train, eval and push run their modules."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

DEMO_BUDGETS = (400, 900, 1600, 3136)


def _fit_timed(images, budget: int, iterations: int | None):
    from .fitting import fit_splats

    options = {} if iterations is None else {"iterations": iterations}
    start = time.perf_counter()
    result = fit_splats(images, num_splats=budget, progress=True, **options)
    return result, (time.perf_counter() - start) / len(images)


def _rows(names, images, result, budget, seconds):
    from .report import FitRow
    from .splats import splat_count

    kept = splat_count(result.splats)
    return [
        FitRow(name, budget, int(kept[i]), float(result.psnr[i]), *images[i].shape[-2:], seconds)
        for i, name in enumerate(names)
    ]


def cmd_demo(args) -> int:
    from .images import to_rgb_tensors
    from .ops import render_splats
    from .report import format_table, save_grid, save_psnr_plot
    from .samples import sample_photos

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    photos = sample_photos(args.size)
    names = list(photos)
    images = to_rgb_tensors(list(photos.values()))
    print(f"fitting {len(names)} scikit-image photos at {args.size}x{args.size}, "
          f"budgets {list(args.budgets)}", flush=True)
    rows, renders = [], []
    for budget in args.budgets:
        result, seconds = _fit_timed(images, budget, args.iterations)
        rows += _rows(names, images, result, budget, seconds)
        renders.append(render_splats(result.splats, args.size, args.size))
    rows.sort(key=lambda r: (names.index(r.image), r.budget))
    print(format_table(rows))
    for budget in args.budgets:
        mine = [r for r in rows if r.budget == budget]
        print(f"mean at {budget:>5} splats: {sum(r.psnr for r in mine) / len(mine):.2f} dB, "
              f"{sum(r.seconds for r in mine) / len(mine):.2f} s/image")
    grid = [[images[i]] + [render[i] for render in renders] for i in range(len(names))]
    save_grid(out / "demo_grid.png", grid)
    save_psnr_plot(out / "demo_psnr.png", rows)
    print(f"wrote {out / 'demo_grid.png'} (original | {' | '.join(map(str, args.budgets))} "
          f"splats) and {out / 'demo_psnr.png'}")
    return 0


def _load_image(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def cmd_fit(args) -> int:
    from .images import to_rgb_tensors
    from .ops import render_splats
    from .report import format_table, to_pil
    from .splats import save_splats

    paths = [Path(p) for p in args.images]
    images = to_rgb_tensors([_load_image(p) for p in paths])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, seconds = _fit_timed(images, args.num_splats, args.iterations)
    stems: set[str] = set()
    for i, path in enumerate(paths):
        stem = path.stem
        while stem in stems:  # two inputs with one name must not overwrite each other
            stem += "_"
        stems.add(stem)
        height, width = images[i].shape[-2:]
        splats = result.splats[i].half().float()  # the render shows what the file holds
        save_splats(out / f"{stem}.safetensors", splats, height=height, width=width,
                    psnr=f"{float(result.psnr[i]):.3f}", source=str(path))
        to_pil(render_splats(splats, height, width)).save(out / f"{stem}.png")
    print(format_table(_rows([p.name for p in paths], images, result, args.num_splats, seconds)))
    print(f"wrote {len(paths)} splat files (.safetensors, fp16) and renders (.png) to {out}")
    return 0


def cmd_build(args) -> int:
    from . import extension

    kind = "CPU and CUDA" if args.cuda else "CPU"
    print(f"building the {kind} renderer kernels (torch {torch.__version__})...", flush=True)
    start = time.perf_counter()
    try:
        built = extension.build(verbose=args.verbose, cuda=args.cuda or None)
    except Exception as exc:
        print(f"kernel build failed: {exc}\n(rerun with --verbose for the compiler's output)",
              file=sys.stderr)
        return 1
    print(f"built {built['name']} for {' + '.join(built['devices'])} in "
          f"{time.perf_counter() - start:.0f} s, cached in {built['folder']}")
    if built["cuda_archs"]:
        print(f"CUDA archs: {built['cuda_archs']} (toolkit {built['cuda_home']})")
    return 0


# Subcommands that are programs of their own (also run as `accelerate launch -m <module>`): the
# rest of the command line goes to the module's main().
DELEGATED = {
    "prefit": ("timm_splat.prefit", "fit a dataset once into parquet shards of splats"),
    "train": ("timm_splat.train", "train a splat CLIP (stage distill, then clip)"),
    "eval": ("timm_splat.eval", "zero-shot ImageNet-1K (or any labelled set) evaluation"),
    "push": ("timm_splat.hub", "publish a training run to the Hugging Face Hub"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-splat", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (see: timm-splat {name} --help)", add_help=False)

    demo = sub.add_parser("demo", help="fit scikit-image's sample photos at several budgets")
    demo.add_argument("--out", default="out/demo", help="folder for the grid and plot PNGs")
    demo.add_argument("--budgets", type=int, nargs="+", default=list(DEMO_BUDGETS))
    demo.add_argument("--size", type=int, default=224)
    demo.add_argument("--iterations", type=int, default=None, help="default: the fitter's")
    demo.set_defaults(func=cmd_demo)

    fit = sub.add_parser("fit", help="fit splats to image files")
    fit.add_argument("images", nargs="+", help="image files (any format and mode PIL reads)")
    fit.add_argument("--num-splats", type=int, default=400)
    fit.add_argument("--out", required=True, help="folder for <name>.safetensors and <name>.png")
    fit.add_argument("--iterations", type=int, default=None, help="default: the fitter's")
    fit.set_defaults(func=cmd_fit)

    build = sub.add_parser("build", help="compile the renderer kernels now (else: on first use)")
    build.add_argument("--cuda", action="store_true",
                       help="build the CUDA kernels too (needs nvcc, not a GPU)")
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    build.set_defaults(func=cmd_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # bad input: say what was wrong, no traceback
        print(f"timm-splat {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
