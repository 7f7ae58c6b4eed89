"""``timm-splat encode INPUT... --out DIR``: ``.splat`` files (the compact codec) from images
(fitted first) or from splat files written by ``timm-splat fit`` (.safetensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..codec import DEFAULT_SPEC, CodecSpec, decode, encode
from ..fitting import fit_splats, psnr
from ..images import to_rgb_tensors
from ..ops import render_splats
from ..splats import DEFAULT_NUM_SPLATS, load_splats
from .fit import load_image


def add_arguments(parser) -> None:
    parser.add_argument(
        "inputs", nargs="+", help="image files (fitted first) or .safetensors splat files"
    )
    parser.add_argument("--out", required=True, help="folder for <name>.splat")
    parser.add_argument("--num-splats", type=int, default=DEFAULT_NUM_SPLATS, help="for images")
    for name, default in DEFAULT_SPEC._asdict().items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=default, help=f"grid 2^-bits ({default})")
    parser.add_argument(
        "--method", default="auto", choices=["auto", "stored", "zlib", "lzma"], help="entropy stage"
    )


def _splats_and_image(path: Path, num_splats: int):
    """``(splats [N, 8], image [3, H, W] or None, (height, width) or None)``."""
    if path.suffix == ".safetensors":
        splats, meta = load_splats(path)
        try:
            size = (int(meta["height"]), int(meta["width"]))
        except (KeyError, ValueError):
            size = None
        return splats, None, size
    (image,) = to_rgb_tensors([load_image(path)])
    result = fit_splats(image[None], num_splats=num_splats, progress=False)
    return result.splats[0], image, tuple(image.shape[-2:])


def run(args) -> int:
    spec = CodecSpec(*(getattr(args, name) for name in CodecSpec._fields))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems: set[str] = set()
    for path in map(Path, args.inputs):
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        splats, image, size = _splats_and_image(path, args.num_splats)
        data = encode(splats, spec, size=size, method=args.method)
        stem = path.stem
        while stem in stems:  # two inputs with one name must not overwrite each other
            stem += "_"
        stems.add(stem)
        (out / f"{stem}.splat").write_bytes(data)
        line = f"{path.name}: {len(decode(data))} splats, {len(data)} bytes"
        if size:
            line += f", {8 * len(data) / (size[0] * size[1]):.3f} bpp at {size[0]}x{size[1]}"
        if image is not None:
            with torch.no_grad():
                render = render_splats(decode(data), *size)
            line += f", {float(psnr(render[None], image[None])):.2f} dB decoded"
        print(line)
    print(f"wrote {len(args.inputs)} .splat files to {out}")
    return 0
