"""``timm-splat fit IMAGE... --out DIR``: fp16 splat files (.safetensors) and their renders."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from ..images import to_rgb_tensors
from ..ops import render_splats
from ..report import format_table, to_pil
from ..splats import DEFAULT_NUM_SPLATS, save_splats
from .timed import add_fit_arguments, fit_timed, report_rows


def add_arguments(parser) -> None:
    parser.add_argument("images", nargs="+", help="image files (any format and mode PIL reads)")
    parser.add_argument("--num-splats", type=int, default=DEFAULT_NUM_SPLATS)
    parser.add_argument("--out", required=True, help="folder for <name>.safetensors and <name>.png")
    add_fit_arguments(parser)


def load_image(path: Path):
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot read image {path}: {exc}") from exc


def run(args) -> int:
    paths = [Path(p) for p in args.images]
    images = to_rgb_tensors([load_image(p) for p in paths])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result, seconds = fit_timed(images, args.num_splats, args.iterations, args.preset)
    stems: set[str] = set()
    for i, path in enumerate(paths):
        stem = path.stem
        while stem in stems:  # two inputs with one name must not overwrite each other
            stem += "_"
        stems.add(stem)
        height, width = images[i].shape[-2:]
        splats = result.splats[i].half().float()  # the render shows what the file holds
        save_splats(
            out / f"{stem}.safetensors",
            splats,
            height=height,
            width=width,
            psnr=f"{float(result.psnr[i]):.3f}",
            source=str(path),
        )
        to_pil(render_splats(splats, height, width)).save(out / f"{stem}.png")
    print(
        format_table(report_rows([p.name for p in paths], images, result, args.num_splats, seconds))
    )
    print(f"wrote {len(paths)} splat files (.safetensors, fp16) and renders (.png) to {out}")
    return 0
