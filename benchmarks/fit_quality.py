"""Fitting quality and time: the default fitter against the paper's pipeline
(``FitConfig.preset("paper")``), side by side in one run, on scikit-image's colour photos (the
tuning set) and on held-out photos the fitter was never tuned on, 224x224, per budget. PSNR of
the clamped render; seconds are wall time per image (and process CPU time), ratios are to the
paper preset on the same photos in the same run. The numbers docs/fitting.md quotes.

    python benchmarks/fit_quality.py [--budgets 400 900 1600 3136] [--sets tune heldout]
                                     [--random-init] [--repeats 1]
"""

import argparse

from fit_lab import SETS, compare

from timm_splat.fitting import FitConfig

MARKS = (10, 30, 60, 120, 300, 600)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budgets", type=int, nargs="+", default=[400, 900, 1600, 3136])
    parser.add_argument("--sets", nargs="+", default=["tune", "heldout"], choices=list(SETS))
    parser.add_argument(
        "--random-init", action="store_true", help="also the paper preset from random init"
    )
    parser.add_argument("--repeats", type=int, default=1, help="time the best of R runs")
    args = parser.parse_args()
    variants = [("paper", FitConfig.preset("paper")), ("default", FitConfig())]
    if args.random_init:
        variants.append(("paper-random", FitConfig.preset("paper", init="random")))
    table = compare(
        variants, args.budgets, args.sets, repeats=args.repeats, marks=MARKS, per_image=True
    )
    print("\nGoal: default >= paper + 1 dB in <= 1/4 of its wall time, every budget and set")
    for (budget, set_name, name), (psnr, wall, _, _) in table.items():
        if name == "default":
            ref_psnr, ref_wall, _, _ = table[budget, set_name, "paper"]
            gain, ratio = psnr - ref_psnr, wall / ref_wall
            verdict = "met" if gain >= 1 and ratio <= 0.25 else "NOT met"
            print(f"  N={budget} {set_name}: {gain:+.2f} dB, {ratio:.2f}x the time: {verdict}")


if __name__ == "__main__":
    main()
