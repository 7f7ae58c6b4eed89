"""The paper's fitting study in one command, our numbers beside the paper's.

1. Structured (grid) vs random initialisation of the paper's pipeline at N=400 and N=4900 after
   3000 iterations (paper: 22.04 vs 17.77 dB and 35.25 vs 28.24 dB), with this package's
   default fitter beside them.
2. The pruning trade-off: a fit at N=3136 without pruning, then its lowest-luminance splats
   removed after the fit (paper: 37.43 dB pruned by 23.7% fell to 31.1 dB), against fitting the
   smaller budget directly.
3. PSNR against iterations (and against wall time) of the paper's pipeline and of the default
   fitter, as a PNG.

    python benchmarks/paper_fitting.py            # 7 photos, 3000 iterations (slow on a CPU)
    python benchmarks/paper_fitting.py --quick    # 3 photos, 600 iterations
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from timm_splat import fit_splats, psnr, render_splats
from timm_splat.fitting import FitConfig
from timm_splat.images import to_rgb_tensors
from timm_splat.samples import SAMPLE_PHOTOS, sample_photos
from timm_splat.splats import luminance, splat_mask

PAPER_INIT = {400: (22.04, 17.77), 4900: (35.25, 28.24)}  # (structured, random) dB
PAPER_PRUNE = (37.43, 0.237, 31.1)  # PSNR before, share pruned, PSNR after


def mean_psnr(images, config: FitConfig, **overrides) -> tuple[float, torch.Tensor]:
    result = fit_splats(images, config, progress=False, **overrides)
    return float(result.psnr.mean()), result.splats


def init_study(images, iterations: int):
    print(f"\n## 1. Structured vs random init, {iterations} iterations (paper: 3000)\n")
    print("| N | paper: grid | paper: random | ours: grid | ours: random | ours: default fitter |")
    print("|---:|---:|---:|---:|---:|---:|")
    paper = FitConfig.preset("paper", iterations=iterations)
    for budget, (grid_ref, random_ref) in PAPER_INIT.items():
        grid, _ = mean_psnr(images, paper, num_splats=budget, init="grid")
        rand, _ = mean_psnr(images, paper, num_splats=budget, init="random")
        new, _ = mean_psnr(images, FitConfig(), num_splats=budget)
        print(
            f"| {budget} | {grid_ref:.2f} | {random_ref:.2f} | {grid:.2f} | {rand:.2f} | "
            f"{new:.2f} ({FitConfig().iterations} it.) |",
            flush=True,
        )


def prune_after_fit(splats: torch.Tensor, share: float) -> torch.Tensor:
    """Zero the ``share`` of each image's real splats with the lowest luminance."""
    real = splat_mask(splats)
    score = torch.where(real, luminance(splats), torch.full_like(splats[..., 0], float("inf")))
    rank = score.argsort(1).argsort(1)  # 0 = dimmest real splat
    drop = rank < (share * real.sum(1, keepdim=True)).round()
    return splats * (~drop).unsqueeze(-1)


def prune_study(images, iterations: int, budget: int = 3136):
    print(f"\n## 2. Pruning after the fit, N={budget}, {iterations} iterations\n")
    targets = torch.stack(to_rgb_tensors(images))
    paper = FitConfig.preset("paper", iterations=iterations)
    full, splats = mean_psnr(images, paper, num_splats=budget, init_scale=1.0)
    print(
        "| pruned (lowest luminance) | splats left | PSNR after pruning | fitted directly at "
        "that budget (paper pipeline) |"
    )
    print("|---:|---:|---:|---:|")
    kept = float(splat_mask(splats).sum(1).float().mean())
    print(f"| 0% | {kept:.0f} | {full:.2f} | |")
    for share in (0.1, PAPER_PRUNE[1], 0.5):
        pruned = prune_after_fit(splats, share)
        after = float(psnr(render_splats(pruned, *targets.shape[-2:]), targets).mean())
        left = float(splat_mask(pruned).sum(1).float().mean())
        direct, _ = mean_psnr(images, paper, num_splats=round(left))
        print(f"| {share:.1%} | {left:.0f} | {after:.2f} | {direct:.2f} |", flush=True)
    print(
        f"\nPaper: {PAPER_PRUNE[0]:.2f} dB pruned by {PAPER_PRUNE[1]:.1%} fell to "
        f"{PAPER_PRUNE[2]:.2f} dB."
    )


def curves(images, budgets, iterations: int, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"\n## 3. PSNR against iterations -> {out}\n")
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    runs = [
        ("paper pipeline", FitConfig.preset("paper", iterations=iterations), "--"),
        ("default fitter", FitConfig(), "-"),
    ]
    for budget in budgets:
        for name, config, style in runs:
            steps, values, times = [], [], []
            start = time.perf_counter()

            def record(step, indices, value, steps=steps, values=values, times=times, start=start):
                steps.append(step + 1)
                values.append(float(value.mean()))
                times.append((time.perf_counter() - start) / len(images))

            final, _ = mean_psnr(images, config, num_splats=budget, callback=record)
            label = f"{name}, N={budget}"
            (line,) = by_step.plot(steps, values, style, label=label)
            by_time.plot(times, values, style, color=line.get_color(), label=label)
            print(
                f"- {label}: {final:.2f} dB after {config.iterations} iterations, "
                f"{times[-1]:.2f} s/image",
                flush=True,
            )
    for axis, xlabel in ((by_step, "iteration"), (by_time, "wall time per image (s)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("mean PSNR during the fit (dB)")
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=18)
    by_step.set_xscale("log")
    by_step.legend(fontsize=8)
    fig.suptitle(f"{len(images)} photos at 224x224 (unclamped render during the fit)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 photos, 600 iterations")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--photos", type=int, default=None)
    parser.add_argument("--out", default="out/paper_fitting/psnr_vs_iterations.png")
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["init", "prune", "curves"],
        choices=["init", "prune", "curves"],
    )
    args = parser.parse_args()
    iterations = args.iterations or (600 if args.quick else 3000)
    count = args.photos or (3 if args.quick else len(SAMPLE_PHOTOS))
    photos = sample_photos(224, names=SAMPLE_PHOTOS[:count])
    images = list(photos.values())
    print(
        f"# Paper fitting study: {', '.join(photos)} at 224x224, {iterations} iterations for "
        f"the paper pipeline, {torch.get_num_threads()} torch threads"
    )
    if "init" in args.parts:
        init_study(images, iterations)
    if "prune" in args.parts:
        prune_study(images, iterations)
    if "curves" in args.parts:
        curves(images, (400, 1600), iterations, Path(args.out))


if __name__ == "__main__":
    main()
