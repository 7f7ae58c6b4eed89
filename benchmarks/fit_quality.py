"""Fitting quality and time on scikit-image's colour photos at 224x224 (default settings):
mean PSNR against iterations and seconds per image, per budget; optionally random init too.

    python benchmarks/fit_quality.py [--budgets 400 1600] [--iterations 600] [--random-init]
"""

import argparse
import time

import torch

from timm_splat import fit_splats
from timm_splat.fitting import FitConfig
from timm_splat.samples import sample_photos


def run(images, budget, **options):
    curve = {}
    iterations = options.get("iterations", FitConfig.iterations)
    marks = {int(iterations * f) - 1 for f in (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)}

    def record(step, indices, psnr):
        if step in marks:
            curve[step + 1] = float(psnr.mean())

    start = time.perf_counter()
    result = fit_splats(images, num_splats=budget, callback=record, progress=False, **options)
    return result, (time.perf_counter() - start) / len(images), curve


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", type=int, nargs="+", default=[400, 1600])
    parser.add_argument("--iterations", type=int, default=FitConfig.iterations)
    parser.add_argument("--random-init", action="store_true", help="also fit from random init")
    args = parser.parse_args()

    photos = sample_photos(224)
    images = list(photos.values())
    print(f"{len(images)} photos ({', '.join(photos)}), 224x224, {torch.get_num_threads()} threads")
    inits = ["grid", "random"] if args.random_init else ["grid"]
    for budget in args.budgets:
        for init in inits:
            result, seconds, curve = run(images, budget, iterations=args.iterations, init=init)
            kept = (result.splats[..., 2] > 0).sum(1).float().mean()
            print(f"\nN={budget} init={init}: mean PSNR {result.psnr.mean():.2f} dB "
                  f"(clamped render), {seconds:.2f} s/image, {kept:.0f} splats kept on average")
            print("  per image: " + ", ".join(f"{n} {p:.2f}" for n, p in zip(photos, result.psnr.tolist())))
            print("  PSNR vs iterations (unclamped render during the fit): "
                  + ", ".join(f"{k}: {v:.2f}" for k, v in sorted(curve.items())))


if __name__ == "__main__":
    main()
