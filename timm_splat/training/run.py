"""Building a stage's run: accelerate, data, models, loss, optimiser and schedule, prepared."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from ..models import freeze, register_open_clip_configs
from .config import TrainConfig
from .data import budget_of, build_loader, num_classes_of, open_dataset
from .losses import StageLoss
from .models import build_model, build_teacher
from .optim import build_optimizer, build_scheduler


@dataclasses.dataclass
class Run:
    config: TrainConfig
    accelerator: object
    run_dir: Path
    stage_dir: Path
    dataset: object
    loader: object
    model: torch.nn.Module  # unwrapped: what is saved and what losses call
    prepared_model: torch.nn.Module  # accelerate's wrapper: what accumulate / backward see
    teacher: torch.nn.Module | None
    loss: StageLoss
    params: list
    optimizer: object
    scheduler: object
    total: int  # optimiser steps of the stage
    steps_per_epoch: int | None  # None: a stream of unknown length
    batches_per_epoch: int | None  # per process
    num_classes: int | None


def build_run(config: TrainConfig) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    register_open_clip_configs()
    run_dir = Path(config.output)
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
    dataset = open_dataset(config)
    config = dataclasses.replace(config, num_splats=budget_of(config, dataset))
    num_classes = num_classes_of(config, dataset)

    teacher = build_teacher(config, run_dir, num_classes)
    model = build_model(config, run_dir, teacher, num_classes)
    if config.stage != "distill":
        teacher = None  # only stage 1 keeps one beside the model
    if config.stage != "pixel":  # the baseline trains what a student's stage 2 trains
        preset = "finetune" if config.stage == "baseline" else config.stage
        freeze(model, preset, verbose=accelerator.is_main_process)

    # Batches are fitted in the collate step: on the GPU when it runs in this process (CUDA
    # cannot start in forked workers).
    fit_device = accelerator.device if config.workers == 0 else "cpu"
    rgb = teacher if teacher is not None else None if config.reads_splats else model
    loader = build_loader(config, dataset, rgb, fit_device)
    streamed = isinstance(dataset, IterableDataset)
    batches = (dataset.num_items or 0) // config.batch_size if streamed else len(loader)
    if batches == 0 and not (streamed and config.max_steps):
        raise ValueError(
            f"{config.train_data}: no full batch of {config.batch_size} samples"
            + (" (or an unknown length: pass --max-steps)" if streamed else "")
        )

    optimizer = build_optimizer(config, model, accelerator.device)
    batches_per_epoch = math.ceil(batches / accelerator.num_processes) if batches else None
    steps_per_epoch = math.ceil(batches_per_epoch / config.accum_steps) if batches else None
    total = config.max_steps or steps_per_epoch * config.epochs
    scheduler = build_scheduler(config, optimizer, accelerator, total)
    if isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        prepared, optimizer, loader, scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )
    else:  # timm's schedule steps itself once per update
        prepared, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    if teacher is not None:
        teacher.to(accelerator.device)
    if streamed or not batches:
        batches_per_epoch = steps_per_epoch = None
    else:
        batches_per_epoch = len(loader)
        steps_per_epoch = math.ceil(batches_per_epoch / config.accum_steps)
    return Run(
        config=config,
        accelerator=accelerator,
        run_dir=run_dir,
        stage_dir=run_dir / config.stage,
        dataset=dataset,
        loader=loader,
        model=accelerator.unwrap_model(prepared),
        prepared_model=prepared,
        teacher=teacher,
        loss=StageLoss(config, accelerator, teacher, num_classes),
        params=[p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        scheduler=scheduler,
        total=total,
        steps_per_epoch=steps_per_epoch,
        batches_per_epoch=batches_per_epoch,
        num_classes=num_classes,
    )
