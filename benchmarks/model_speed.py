"""Forward time of splat_vit_b16 on pre-fitted splats against timm's vit_base_patch16_224 on
pixels, same batch, same machine, one run (runs interleaved, median of the repeats).

    python benchmarks/model_speed.py [--batch 32] [--budgets 400 1600 3136] [--repeats 5] \\
        [--device cpu]

Goal: at most 1.15x the ViT's time at N=400. Fitting is not timed: the splats are pre-fitted
(as a pre-fitted dataset serves them).
"""

import argparse
import statistics
import time

import timm
import torch

import timm_splat  # noqa: F401  (registers splat_vit_*)
from timm_splat import fit_splats
from timm_splat.images import to_rgb_tensors
from timm_splat.samples import sample_photos


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--budgets", type=int, nargs="+", default=[400, 1600, 3136])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    photos = list(sample_photos(224).values())
    index = torch.arange(args.batch) % len(photos)
    pixels = torch.stack(to_rgb_tensors(photos))[index].to(device)
    inputs = {}
    for budget in args.budgets:  # a short fit: values do not change the forward's cost
        fitted = fit_splats(photos, num_splats=budget, iterations=60, progress=False, device=device)
        inputs[budget] = fitted.splats[index].to(device)

    vit = timm.create_model("vit_base_patch16_224", num_classes=1000).eval().to(device)
    splat_vit = timm.create_model("splat_vit_b16", num_classes=1000).eval().to(device)
    runs = {"vit_base_patch16_224 (pixels)": lambda: vit(pixels)}
    for budget, splats in inputs.items():
        runs[f"splat_vit_b16 (N={budget})"] = lambda s=splats: splat_vit(s)

    times = {name: [] for name in runs}
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn, device))

    base = statistics.median(times["vit_base_patch16_224 (pixels)"])
    threads = torch.get_num_threads() if device.type == "cpu" else ""
    print(f"forward, batch {args.batch}, {device.type} {threads} threads, median of {args.repeats}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:32s} {median * 1e3:9.1f} ms  {median / base:5.2f}x")


if __name__ == "__main__":
    main()
