"""``timm-splat decode FILE.splat... --out DIR``: renders (.png) and, on request, fp16 splat
files (.safetensors) of ``.splat`` files."""

from __future__ import annotations

from pathlib import Path

import torch

from ..codec import decode, read_header
from ..ops import render_splats
from ..report import to_pil
from ..splats import save_splats

# The largest render made unless asked for more: 4096 x 4096 is 200 MB of float32 RGB. A .splat
# header may record up to 65535 x 65535 (17 GB per channel), so the size it asks for is bounded
# before anything is allocated (what a server decoding others' files needs).
MAX_RENDER_PIXELS = 4096 * 4096


def add_arguments(parser) -> None:
    parser.add_argument("files", nargs="+", help=".splat files (timm-splat encode)")
    parser.add_argument("--out", required=True, help="folder for <name>.png")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="render size (default: the size recorded in the file, else 224 224)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=MAX_RENDER_PIXELS,
        help=f"refuse renders larger than HEIGHT x WIDTH = this (default: {MAX_RENDER_PIXELS})",
    )
    parser.add_argument(
        "--safetensors", action="store_true", help="also write <name>.safetensors (fp16)"
    )


def run(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in map(Path, args.files):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        data = path.read_bytes()
        try:
            header, splats = read_header(data), decode(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if args.size:
            height, width = args.size
        elif header.height:
            height, width = header.height, header.width
        else:
            height, width = 224, 224
        if height <= 0 or width <= 0:
            raise ValueError(f"--size must be positive, got {height} {width}")
        if height * width > args.max_pixels:
            asked = "--size" if args.size else f"{path}'s header"
            raise ValueError(
                f"{asked} asks for a {height} x {width} render ({height * width} pixels), more "
                f"than --max-pixels {args.max_pixels}: pass a smaller --size, or a larger "
                "--max-pixels if you mean it"
            )
        with torch.no_grad():
            to_pil(render_splats(splats, height, width)).save(out / f"{path.stem}.png")
        if args.safetensors:
            save_splats(out / f"{path.stem}.safetensors", splats, height=height, width=width)
        print(f"{path.name}: {header.count} splats, {len(data)} bytes -> {height}x{width}")
    print(f"wrote {len(args.files)} renders to {out}")
    return 0
