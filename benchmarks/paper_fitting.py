"""The paper's fitting study in one command, our numbers beside the paper's.

1. Structured (grid) vs random initialisation of the paper's pipeline at N=400 and N=4900 after
   3000 iterations (paper: 22.04 vs 17.77 dB and 35.25 vs 28.24 dB), with this package's
   default fitter beside them.
2. The pruning trade-off: a fit at N=3136 without pruning, then its lowest-luminance splats
   removed after the fit (paper: 37.43 dB pruned by 23.7% fell to 31.1 dB), against fitting the
   smaller budget directly.
3. PSNR against iterations (and against CPU time) of the paper's pipeline and of the default
   fitter, as a PNG.

Every fit is one photo under one configuration (an image's fit does not depend on its batch),
and each finished fit is appended to a JSON-lines journal at once, so a run that is killed loses
at most the fit in progress: the same command again skips what the journal holds (a fit is
named by its photo and its whole resolved FitConfig, a paper-pipeline fit by the preset and its
overrides, which a new FitConfig field does not change) and prints the tables when all is done.
``--report`` prints the tables from the journal alone (partial rows say how many photos).

    python benchmarks/paper_fitting.py            # 7 photos, 3000 iterations (slow on a CPU)
    python benchmarks/paper_fitting.py --quick    # 3 photos, 600 iterations
    python benchmarks/paper_fitting.py --report   # what the journal holds so far
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
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
PRUNE_BUDGET = 3136
PRUNE_SHARES = (0.1, PAPER_PRUNE[1], 0.5)
CURVE_BUDGETS = (400, 1600)


def config_fields(config: FitConfig) -> dict:
    return dataclasses.asdict(config)


def fit_key(photo: str, config: FitConfig, kind: str = "fit", preset=None) -> str:
    """A fit's name in the journal: its photo and every field of its resolved config; or, for a
    fit of a pinned preset (``preset``: its name and the overrides asked of it), those, so that
    a field added to FitConfig later does not orphan it. The paper preset is pinned: its fits do
    not change (tests/test_fitting.py::test_paper_preset_reproduces_the_original_fitter), and
    they are most of the study's time."""
    if preset is not None:
        name, overrides = preset
        return f"{kind}|{photo}|preset {name} {json.dumps(overrides, sort_keys=True)}"
    return f"{kind}|{photo}|{json.dumps(config_fields(config), sort_keys=True)}"


def _finite(value, low=-1e9, high=1e9) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and low <= value <= high


def check_entry(entry) -> str | None:
    """Why a journal entry cannot be trusted (None if it can). The journal is this script's
    own output, but anything could have happened to the file since."""
    if not isinstance(entry, dict) or set(entry) != {"key", "result"}:
        return "not an object with exactly 'key' and 'result'"
    key, result = entry["key"], entry["result"]
    if not isinstance(key, str) or key.split("|")[0] not in ("fit", "prune"):
        return "key is not a fit name"
    if not isinstance(result, dict) or not _finite(result.get("psnr"), 0, 400):
        return "result has no finite PSNR in [0, 400] dB"
    curve = result.get("curve")
    if not isinstance(curve, list) or not all(
        isinstance(p, list) and len(p) == 3 and all(_finite(v, 0) for v in p) for p in curve
    ):
        return "curve is not a list of [step, PSNR, CPU seconds]"
    if key.startswith("prune|"):
        pruned = result.get("pruned")
        if not _finite(result.get("kept"), 0) or not (
            isinstance(pruned, list)
            and len(pruned) == len(PRUNE_SHARES)
            and all(isinstance(p, list) and len(p) == 3 for p in pruned)
            and all(_finite(v, 0, 1e6) for p in pruned for v in p)
        ):
            return "prune result has no splat count or no pruned rows"
    return None


class Journal:
    """Finished fits, one JSON object per line: ``{"key": ..., "result": {...}}``."""

    def __init__(self, path: Path):
        self.path = path
        self.done: dict[str, dict] = {}
        if not path.exists():
            return
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                reason = f"not JSON ({exc.msg})"
            else:
                reason = check_entry(entry)
            if reason:
                print(
                    f"{path}:{number}: damaged entry ({reason}); it will be recomputed",
                    file=sys.stderr,
                )
                continue
            self.done[entry["key"]] = entry["result"]

    def add(self, key: str, result: dict):
        entry = {"key": key, "result": result}
        assert check_entry(entry) is None, check_entry(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() and (handle.seek(-1, os.SEEK_END), handle.read(1))[1] != b"\n":
                handle.write(b"\n")  # a line cut short by a kill: keep the next one whole
            handle.write(json.dumps(entry).encode() + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.done[key] = result


def _keep(step: int, last: int) -> bool:  # curve points: dense early, sparse late
    return step <= 50 or (step <= 500 and step % 5 == 0) or step % 25 == 0 or step == last


def run_fit(image, config: FitConfig) -> tuple[dict, torch.Tensor]:
    """Fit one image; its final PSNR and the (step, PSNR, CPU s) curve of the fit."""
    curve = []
    start = time.process_time()

    def record(step, indices, value):
        if _keep(step + 1, config.iterations):
            curve.append([step + 1, float(value.mean()), time.process_time() - start])

    result = fit_splats([image], config, progress=False, callback=record)
    return {"psnr": float(result.psnr[0]), "curve": curve}, result.splats


def prune_after_fit(splats: torch.Tensor, share: float) -> torch.Tensor:
    """Zero the ``share`` of each image's real splats with the lowest luminance."""
    real = splat_mask(splats)
    score = torch.where(real, luminance(splats), torch.full_like(splats[..., 0], float("inf")))
    rank = score.argsort(1).argsort(1)  # 0 = dimmest real splat
    drop = rank < (share * real.sum(1, keepdim=True)).round()
    return splats * (~drop).unsqueeze(-1)


def run_prune_fit(image, config: FitConfig) -> dict:
    """The N=3136 fit of the pruning study, and what pruning after it leaves."""
    result, splats = run_fit(image, config)
    target = torch.stack(to_rgb_tensors([image]))
    rows = []
    for share in PRUNE_SHARES:
        pruned = prune_after_fit(splats, share)
        after = float(psnr(render_splats(pruned, *target.shape[-2:]), target)[0])
        rows.append([share, float(splat_mask(pruned).sum()), after])
    return {**result, "kept": float(splat_mask(splats).sum()), "pruned": rows}


class Study:
    """The study's fits over the photos, each looked up in the journal or run and recorded."""

    def __init__(self, photos: dict, iterations: int, journal: Journal, compute: bool):
        self.photos, self.iterations, self.journal, self.compute = (
            photos,
            iterations,
            journal,
            compute,
        )
        self.pinned: dict[FitConfig, tuple[str, dict]] = {}  # config -> (preset, overrides)

    def paper(self, **overrides) -> FitConfig:
        overrides = {"iterations": self.iterations, **overrides}
        config = FitConfig.preset("paper", **overrides)
        self.pinned[config] = ("paper", overrides)
        return config

    def results(self, config: FitConfig, kind: str = "fit") -> list[dict]:
        """One result per photo (only the journal's when not computing)."""
        out = []
        done = self.journal.done
        for name, image in self.photos.items():
            key = fit_key(name, config, kind, self.pinned.get(config))
            legacy = fit_key(name, config, kind)  # how journals named pinned fits before
            if key not in done and legacy in done and self.compute:
                self.journal.add(key, done[legacy])
            if key not in done and self.compute:
                start = time.perf_counter()
                if kind == "prune":
                    result = run_prune_fit(image, config)
                else:
                    result, _ = run_fit(image, config)
                self.journal.add(key, result)
                print(
                    f"  [{kind} {name} N={config.num_splats} {config.iterations} it. "
                    f"init={config.init}: {result['psnr']:.2f} dB, "
                    f"{time.perf_counter() - start:.0f} s]",
                    file=sys.stderr,
                    flush=True,
                )
            if key in done or legacy in done:
                out.append(done.get(key, done.get(legacy)))
        return out

    def mean(self, config: FitConfig, kind: str = "fit") -> str:
        """Mean PSNR over the photos, marked with the count when some are missing."""
        found = self.results(config, kind)
        if not found:
            return "–"
        text = f"{sum(r['psnr'] for r in found) / len(found):.2f}"
        return (
            text
            if len(found) == len(self.photos)
            else f"{text} ({len(found)}/{len(self.photos)} photos)"
        )


def init_study(study: Study):
    print(f"\n## 1. Structured vs random init, {study.iterations} iterations (paper: 3000)\n")
    print("| N | paper: grid | paper: random | ours: grid | ours: random | ours: default fitter |")
    print("|---:|---:|---:|---:|---:|---:|")
    for budget, (grid_ref, random_ref) in PAPER_INIT.items():
        grid = study.mean(study.paper(num_splats=budget, init="grid"))
        rand = study.mean(study.paper(num_splats=budget, init="random"))
        new = study.mean(FitConfig(num_splats=budget))
        print(
            f"| {budget} | {grid_ref:.2f} | {random_ref:.2f} | {grid} | {rand} | "
            f"{new} ({FitConfig().iterations} it.) |",
            flush=True,
        )


def prune_study(study: Study):
    print(f"\n## 2. Pruning after the fit, N={PRUNE_BUDGET}, {study.iterations} iterations\n")
    fits = study.results(study.paper(num_splats=PRUNE_BUDGET, init_scale=1.0), "prune")
    if not fits:
        print("(no fit finished yet)")
        return
    count = "" if len(fits) == len(study.photos) else f" ({len(fits)}/{len(study.photos)} photos)"
    print(
        "| pruned (lowest luminance) | splats left | PSNR after pruning | fitted directly at "
        "that budget (paper pipeline) |"
    )
    print("|---:|---:|---:|---:|")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(
        f"| 0% | {mean([f['kept'] for f in fits]):.0f} | {mean([f['psnr'] for f in fits]):.2f}"
        f"{count} | |"
    )
    for row, share in enumerate(PRUNE_SHARES):
        left = mean([f["pruned"][row][1] for f in fits])
        after = mean([f["pruned"][row][2] for f in fits])
        # The direct fit's budget is the mean count left over all photos: only once all are in.
        direct = study.mean(study.paper(num_splats=round(left))) if not count else "–"
        print(f"| {share:.1%} | {left:.0f} | {after:.2f}{count} | {direct} |", flush=True)
    print(
        f"\nPaper: {PAPER_PRUNE[0]:.2f} dB pruned by {PAPER_PRUNE[1]:.1%} fell to "
        f"{PAPER_PRUNE[2]:.2f} dB."
    )


def curves(study: Study, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    print(f"\n## 3. PSNR against iterations -> {out}\n")
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for budget in CURVE_BUDGETS:
        for name, config, style in (
            ("paper pipeline", study.paper(num_splats=budget), "--"),
            ("default fitter", FitConfig(num_splats=budget), "-"),
        ):
            found = study.results(config)
            label = f"{name}, N={budget}"
            if len(found) < len(study.photos):
                print(f"- {label}: {len(found)}/{len(study.photos)} photos done", flush=True)
                continue
            points = list(zip(*(r["curve"] for r in found)))  # the same steps for every photo
            steps = [p[0][0] for p in points]
            values = [sum(q[1] for q in p) / len(p) for p in points]
            times = [sum(q[2] for q in p) / len(p) for p in points]
            (line,) = by_step.plot(steps, values, style, label=label)
            by_time.plot(times, values, style, color=line.get_color(), label=label)
            final = sum(r["psnr"] for r in found) / len(found)
            print(
                f"- {label}: {final:.2f} dB after {config.iterations} iterations, "
                f"{times[-1]:.2f} CPU s/image",
                flush=True,
            )
    for axis, xlabel in ((by_step, "iteration"), (by_time, "CPU time per image (s)")):
        axis.set_xlabel(xlabel)
        axis.set_ylabel("mean PSNR during the fit (dB)")
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=18)
    by_step.set_xscale("log")
    by_step.legend(fontsize=8)
    fig.suptitle(f"{len(study.photos)} photos at 224x224 (unclamped render during the fit)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 photos, 600 iterations")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--photos", type=int, default=None)
    parser.add_argument("--out", default="out/paper_fitting/psnr_vs_iterations.png")
    parser.add_argument(
        "--journal",
        default="out/paper_fitting/journal.jsonl",
        help="finished fits (JSON lines): kept across runs, skipped when already there",
    )
    parser.add_argument(
        "--report", action="store_true", help="print the tables from the journal, fit nothing"
    )
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["init", "prune", "curves"],
        choices=["init", "prune", "curves"],
    )
    args = parser.parse_args(argv)
    iterations = args.iterations or (600 if args.quick else 3000)
    count = args.photos or (3 if args.quick else len(SAMPLE_PHOTOS))
    if not (1 <= count <= len(SAMPLE_PHOTOS)) or iterations < 1:
        parser.error(f"--photos must be 1..{len(SAMPLE_PHOTOS)} and --iterations at least 1")
    photos = sample_photos(224, names=SAMPLE_PHOTOS[:count])
    journal = Journal(Path(args.journal))
    print(
        f"# Paper fitting study: {', '.join(photos)} at 224x224, {iterations} iterations for "
        f"the paper pipeline, {torch.get_num_threads()} torch threads; journal {args.journal} "
        f"({len(journal.done)} fits)"
    )
    study = Study(photos, iterations, journal, compute=not args.report)
    if "init" in args.parts:
        init_study(study)
    if "prune" in args.parts:
        prune_study(study)
    if "curves" in args.parts:
        curves(study, Path(args.out))


if __name__ == "__main__":
    main()
