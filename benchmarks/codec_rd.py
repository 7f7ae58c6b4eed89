"""Rate-distortion of the .splat codec against JPEG, WebP and AVIF (Pillow) on 224 x 224 photos.

For each splat budget the photos are fitted once (``fit_splats``, default config), then encoded
at several grids (``CodecSpec``), with and without ``refine_quantized``. Every image is scored
as a displayable uint8 image (our renders clamped and rounded, like a decoded JPEG) against the
uint8 photo: PSNR and SSIM (scikit-image) against bits per pixel. "vs X" columns: the mean
over photos of our PSNR minus X's PSNR at the same bytes (X's quality sweep for that photo
interpolated linearly in bpp; ``*``: X cannot make a file that small for some photo, and its
smallest file, with more bytes, stands in). Also the fp16 baseline (16
bytes per splat) and raw uint8 pixels, and decode speeds (CPU, images/s).

    python benchmarks/codec_rd.py                      # held-out photos (reported)
    python benchmarks/codec_rd.py --photos tuning --budgets 100 400
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import time
from datetime import datetime, timezone

import numpy as np
import torch
from PIL import Image

from timm_splat import fit_splats
from timm_splat.codec import CodecSpec, decode, encode, quantize
from timm_splat.codec_refine import refine_quantized
from timm_splat.images import to_rgb_tensors
from timm_splat.ops import render_splats
from timm_splat.samples import HELDOUT_PHOTOS, SAMPLE_PHOTOS, sample_photos
from timm_splat.splats import splat_count

SIZE = 224
PIXELS = SIZE * SIZE
QUALITIES = {
    "JPEG": [1, 5, 10, 15, 20, 30, 40, 50, 75, 90],
    "WEBP": [0, 5, 10, 20, 30, 50, 70, 90],
    "AVIF": [0, 10, 20, 30, 40, 50, 60, 75, 90],
}


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` float -> ``[H, W, 3]`` uint8, as a viewer would show it."""
    return (image.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


def scores(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import structural_similarity

    mse = np.mean((decoded.astype(np.float64) - original.astype(np.float64)) ** 2)
    psnr = 10 * np.log10(255.0**2 / max(mse, 1e-10))
    ssim = structural_similarity(decoded, original, channel_axis=2, data_range=255)
    return float(psnr), float(ssim)


def pillow_point(array: np.ndarray, fmt: str, quality: int) -> tuple[int, np.ndarray]:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, quality=quality)
    data = buffer.getvalue()
    return len(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def equal_bytes_delta(ours: list[tuple[float, float]], curves: list[list[tuple]]) -> str:
    """Mean over photos of our PSNR minus the baseline's at our bpp (its curve interpolated).

    Where a photo's file is smaller than the baseline's smallest, the baseline's smallest file
    (which has more bytes) stands in and the cell is marked ``*``: the true equal-bytes gap is
    larger than shown there."""
    deltas, below = [], False
    for (bpp, psnr), curve in zip(ours, curves):
        points = sorted(curve)
        rates, values = [p[0] for p in points], [p[1] for p in points]
        below |= bpp < rates[0]
        deltas.append(psnr - float(np.interp(bpp, rates, values)))  # clamps to the ends
    return f"{np.mean(deltas):+.2f}" + ("*" if below else "")


def decode_speed(photos, fitted: dict[int, list[bytes]], repeats: int) -> list[tuple[str, float]]:
    """Images per second on the CPU (this process's threads) for each way to get an input."""
    rows = []

    def rate(fn, items):
        fn(items[0])  # warm-up (kernel load, allocator)
        start = time.perf_counter()
        for _ in range(repeats):
            for item in items:
                fn(item)
        return repeats * len(items) / (time.perf_counter() - start)

    for budget, blobs in fitted.items():
        rows.append((f".splat decode -> splats tensor, N={budget}", rate(decode, blobs)))
        rows.append(
            (
                f".splat decode + render 224, N={budget}",
                rate(lambda b: render_splats(decode(b), SIZE, SIZE), blobs),
            )
        )
    small = []
    for image in photos:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=75)
        small.append(buffer.getvalue())
    rows.append(
        (
            "JPEG q75 224x224 decode -> RGB array",
            rate(lambda d: np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), small),
        )
    )
    return rows


def decode_and_resize_speed(names, repeats: int) -> tuple[str, float]:
    """JPEG q90 of the photo as shipped (e.g. 512 x 512 .. 1024 x 768), decode + resize."""
    full = sample_photos(None, names=names)
    blobs = []
    for image in full.values():
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        blobs.append(buffer.getvalue())
    from timm_splat.samples import center_crop_resize

    def load(d):
        return np.asarray(center_crop_resize(Image.open(io.BytesIO(d)).convert("RGB"), SIZE))

    load(blobs[0])
    start = time.perf_counter()
    for _ in range(repeats):
        for blob in blobs:
            load(blob)
    sizes = sorted({f"{im.size[0]}x{im.size[1]}" for im in full.values()})
    label = f"JPEG q90 at shipped size ({', '.join(sizes)}) decode + crop/resize to 224"
    return label, repeats * len(blobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", choices=["heldout", "tuning"], default="heldout")
    parser.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400, 800, 1600])
    parser.add_argument(
        "--specs",
        nargs="+",
        default=["8,3,2,5", "10,4,3,6", "12,5,4,7"],
        help="codec grids: position,scale,shear,colour bits",
    )
    parser.add_argument("--qat-steps", type=int, default=30, help="refine_quantized steps")
    parser.add_argument("--plot", default="docs/codec_rd.png")
    parser.add_argument("--json", default=None, help="write every measured point here")
    parser.add_argument("--speed-repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)

    names = HELDOUT_PHOTOS if args.photos == "heldout" else SAMPLE_PHOTOS
    photos = sample_photos(SIZE, names=names)
    arrays = [np.asarray(im) for im in photos.values()]
    images = torch.stack(to_rgb_tensors(list(photos.values())))
    specs = [CodecSpec(*(int(b) for b in s.split(","))) for s in args.specs]

    points = []  # (method, setting, [bpp per photo], [psnr], [ssim])
    curves = {}
    for fmt, qualities in QUALITIES.items():
        per_photo = [[] for _ in arrays]
        for quality in qualities:
            bpps, psnrs, ssims = [], [], []
            for i, array in enumerate(arrays):
                size, decoded = pillow_point(array, fmt, quality)
                psnr, ssim = scores(decoded, array)
                bpps.append(8 * size / PIXELS)
                psnrs.append(psnr)
                ssims.append(ssim)
                per_photo[i].append((8 * size / PIXELS, psnr))
            points.append((fmt, f"q={quality}", bpps, psnrs, ssims))
        curves[fmt] = per_photo

    speed_blobs = {}
    for budget in args.budgets:
        start = time.perf_counter()
        fitted = fit_splats(images, num_splats=budget, progress=False).splats
        fit_s = (time.perf_counter() - start) / len(images)
        kept = float(splat_count(fitted).float().mean())
        with torch.no_grad():
            renders = render_splats(fitted.half().float(), SIZE, SIZE)
        fp16 = [scores(to_uint8(r), a) for r, a in zip(renders, arrays)]
        counts = splat_count(fitted).tolist()
        points.append(
            (
                "splats fp16",
                f"N={budget}",
                [8 * 16 * c / PIXELS for c in counts],
                [p for p, _ in fp16],
                [s for _, s in fp16],
            )
        )
        for spec in specs:
            variants = [("codec", fitted)]
            if args.qat_steps:
                refined = refine_quantized(images, fitted, spec, steps=args.qat_steps)
                variants.append(("codec+QAT", refined))
            for label, splats in variants:
                bpps, psnrs, ssims, blobs = [], [], [], []
                for i, array in enumerate(arrays):
                    blob = encode(splats[i], spec, size=(SIZE, SIZE))
                    blobs.append(blob)
                    with torch.no_grad():
                        decoded = to_uint8(render_splats(decode(blob), SIZE, SIZE))
                    psnr, ssim = scores(decoded, array)
                    bpps.append(8 * len(blob) / PIXELS)
                    psnrs.append(psnr)
                    ssims.append(ssim)
                bits = ",".join(str(b) for b in spec)
                points.append((label, f"N={budget} bits={bits}", bpps, psnrs, ssims))
                if label == "codec" and spec == CodecSpec():
                    speed_blobs[budget] = blobs
                    assert all(
                        torch.equal(decode(b), quantize(splats[i], spec))
                        for i, b in enumerate(blobs)
                    )
        print(f"N={budget}: {kept:.0f} splats per image kept, {fit_s:.2f} s per image", flush=True)

    ones = [1.0] * len(arrays)
    points.append(("raw uint8", "224x224x3", [24.0] * len(arrays), [100.0] * len(arrays), ones))

    header = "| method | setting | bytes | bpp | PSNR dB | SSIM | vs JPEG | vs WebP | vs AVIF |"
    lines = [header, "|" + "---|" * 9]
    for method, setting, bpps, psnrs, ssims in points:
        if method.startswith("codec") or method == "splats fp16":
            ours = list(zip(bpps, psnrs))
            deltas = [equal_bytes_delta(ours, curves[f]) for f in ("JPEG", "WEBP", "AVIF")]
        else:
            deltas = [""] * 3
        mean_bpp = float(np.mean(bpps))
        lines.append(
            f"| {method} | {setting} | {mean_bpp * PIXELS / 8:.0f} | {mean_bpp:.3f} | "
            f"{np.mean(psnrs):.2f} | {np.mean(ssims):.3f} | " + " | ".join(deltas) + " |"
        )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.node()}"
    print(f"\n{args.photos} photos ({', '.join(names)}), {SIZE}x{SIZE}; {stamp}; {machine}\n")
    print("\n".join(lines))

    speeds = decode_speed(list(photos.values()), speed_blobs, args.speed_repeats)
    speeds.append(decode_and_resize_speed(names, max(1, args.speed_repeats // 4)))
    print("\n| input | images/s (CPU) |\n|---|---|")
    for label, rate in speeds:
        print(f"| {label} | {rate:.0f} |")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": points, "speeds": speeds, "stamp": stamp}, f)
    if args.plot:
        plot(points, args.plot, f"{args.photos} photos, {SIZE}x{SIZE}, mean over photos")


def plot(points, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for method, setting, bpps, psnrs, _ in points:
        if method == "raw uint8":
            continue
        key = method if "bits=" not in setting else f"{method} {setting.split('bits=')[1]}"
        groups.setdefault(key, []).append((float(np.mean(bpps)), float(np.mean(psnrs))))
    for key, xy in groups.items():
        xy.sort()
        style = "--" if key.split()[0] in ("JPEG", "WEBP", "AVIF") else "-"
        ax.plot(*zip(*xy), style, marker="o", markersize=3, label=key)
    ax.set_xlim(0, 2.0)
    ax.set_xlabel("bits per pixel")
    ax.set_ylabel("PSNR (dB)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
