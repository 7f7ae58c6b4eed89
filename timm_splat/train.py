"""Train a splat CLIP with accelerate: stage 1 distils the RGB teacher into the GS stem, stage 2
adapts with open_clip's contrastive loss.

    accelerate launch -m timm_splat.train --stage distill --model splat-ViT-B-16 \\
        --teacher ViT-B-16 --teacher-pretrained <tag | hf-hub:... | path> \\
        --train-data <image folder | pre-fitted splat dataset> --epochs 2 --output runs/gs400
    accelerate launch -m timm_splat.train --stage clip --resume runs/gs400 --train-data ...

A run directory holds one folder per stage: ``<stage>/checkpoints/step_XXXXXXX`` (accelerate
state: model, optimiser, scheduler, RNG, data position), ``<stage>/log.jsonl`` and
``<stage>/final`` (``model.safetensors`` + ``run.json``); ``final/`` at the top is the last
finished stage, what ``timm-splat eval`` and ``timm-splat push`` read. Starting a stage resumes
its latest checkpoint if there is one; stage 2 starts from stage 1's final weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .models import freeze, from_rgb
from .models.convert import set_quick_gelu, uses_quick_gelu
from .models.clip import register_open_clip_configs, splat_trunk
from .transforms import SplatTransform

# --------------------------------------------------------------------------------- data

def _sample(item, class_names) -> dict:
    """A training sample of a pre-fit source item; the image decodes later, in the collate
    step, for the samples this process trains on only."""
    caption = item.caption
    if caption is None and class_names and item.label is not None and item.label >= 0:
        caption = f"a photo of a {class_names[item.label].replace('_', ' ')}"
    return {"image": item.image, "caption": caption or "", "id": item.source_id}


class FolderImages(Dataset):
    """A local image folder (captions from ``.txt`` files beside the images, else "a photo of a
    <class folder>"), read through the pre-fit sources; map-style, so it shuffles per epoch."""

    def __init__(self, source):
        self.items = list(source.items())  # file paths and captions, nothing decoded
        self.class_names = source.class_names

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return _sample(self.items[index], self.class_names)


class PrefitSplats(Dataset):
    """A pre-fitted splat dataset (``timm-splat prefit`` output or its Hub copy) with captions."""

    def __init__(self, path: str, split: str):
        from .data import load_prefit

        self.data = load_prefit(path, split)
        if "caption" not in self.data.column_names:
            raise ValueError(f"{path} has no caption column: contrastive training needs captions")

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        row = self.data[index]
        return {"splats": row["splats"].float(), "caption": row["caption"], "id": row["source_id"]}


class StreamedImages(IterableDataset):
    """Images streamed from a pre-fit source (webdataset tars as img2dataset writes them, HF
    datasets, image / caption parquet), in order."""

    def __init__(self, source):
        self.source = source
        self.num_items = source.num_items

    def __iter__(self):
        for item in self.source.items():
            yield _sample(item, self.source.class_names)


def open_train_data(path: str, split: str) -> Dataset | IterableDataset:
    """Pre-fitted splats, a local image folder (shuffled each epoch), or a streamed source."""
    from .data.sources import open_source

    folder = Path(path)
    if not (folder.is_dir() and not any(folder.rglob("*.parquet"))):
        try:
            return PrefitSplats(path, split)
        except (ValueError, FileNotFoundError) as error:
            if "no caption column" in str(error):
                raise
    source = open_source(path, split)
    return FolderImages(source) if source.kind == "imagefolder" else StreamedImages(source)


class Collate:
    """Batches for both stages: student splats (pre-fitted, or all images of the batch fitted in
    one call), teacher pixels (stage 1) and caption tokens (stage 2)."""

    def __init__(self, splat_transform, teacher_preprocess=None, tokenizer=None):
        self.splat_transform = splat_transform
        self.teacher_preprocess = teacher_preprocess
        self.tokenizer = tokenizer

    def __call__(self, rows):
        batch = {}
        for row in rows:  # streamed sources decode here, for this process's samples only
            if callable(row.get("image")):
                row["image"] = row["image"]().convert("RGB")
        if "splats" in rows[0]:
            batch["splats"] = torch.stack([self.splat_transform.image_transform(r["splats"]) for r in rows])
        else:
            batch["splats"] = self.splat_transform.collate([self.splat_transform.image_transform(r["image"]) for r in rows])
        if self.teacher_preprocess is not None:
            if "image" not in rows[0]:
                raise ValueError("distillation needs the images for the teacher: train on an "
                                 "image source, not pre-fitted splats")
            batch["pixels"] = torch.stack([self.teacher_preprocess(r["image"]) for r in rows])
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer([r["caption"] for r in rows])
        batch["ids"] = [r["id"] for r in rows]  # last: accelerate sizes batches by the first
        return batch


# ------------------------------------------------------------------------------ run state

class TrainState:
    """Step and epoch, saved with accelerate's state so a resume knows where it was."""

    def __init__(self):
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state):
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]


def latest_checkpoint(stage_dir: Path) -> Path | None:
    checkpoints = sorted((stage_dir / "checkpoints").glob("step_*"))
    return checkpoints[-1] if checkpoints else None


def warmup_cosine(warmup: int, total: int):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ---------------------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="timm_splat.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=("distill", "clip"), required=True)
    parser.add_argument("--model", default="splat-ViT-B-16", help="a splat-ViT-* open_clip config")
    parser.add_argument("--teacher", help="open_clip name of the RGB teacher (stage 1, from_rgb)")
    parser.add_argument("--teacher-pretrained", help="open_clip tag, hf-hub: id or file")
    parser.add_argument("--train-data", required=True,
                        help="an image folder (captions from .txt files), webdataset tars "
                             "(img2dataset), an HF image dataset or parquet, or a pre-fitted "
                             "splat dataset (stage 2 only: stage 1's teacher reads pixels)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--output", help="run directory (default: --resume)")
    parser.add_argument("--resume", help="run directory to continue (a stage's checkpoint, or "
                                         "stage 1's final weights for stage 2)")
    parser.add_argument("--num-splats", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--fit-iterations", type=int, default=None,
                        help="iterations of on-the-fly fitting (default: the fitter's)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--batch-size", type=int, default=64, help="per process")
    parser.add_argument("--accum-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=100, help="warm-up steps")
    parser.add_argument("--precision", default=None,
                        help="accelerate mixed precision (default: bf16 on GPU, no on CPU)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--record-samples", action="store_true",
                        help="write the ids each process trained on to <stage>/samples-<rank>.txt")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU")
    args = parser.parse_args(argv)
    args.output = args.output or args.resume
    if not args.output:
        parser.error("give --output (a new run) or --resume (an existing one)")
    if args.resume and not Path(args.resume).is_dir():
        parser.error(f"--resume {args.resume}: no such run directory")
    if args.stage == "distill" and not args.teacher:
        parser.error("stage distill needs --teacher (the RGB CLIP whose embeddings the stem learns)")
    return args


def build_student(args, stage_dir: Path, run_dir: Path, teacher):
    import open_clip

    previous = run_dir / "distill" / "final" / "model.safetensors"
    if teacher is not None:
        student = from_rgb(teacher, num_splats=args.num_splats)
    else:
        student = open_clip.create_model(args.model)
    if args.stage == "clip" and previous.exists():
        # Stage 2 starts where stage 1 ended (a stage-2 checkpoint, if any, overrides below).
        if json.loads((previous.parent / "run.json").read_text()).get("quick_gelu"):
            set_quick_gelu(student)
        student.load_state_dict(load_file(previous))
    trunk = splat_trunk(student)
    if trunk is None:
        raise ValueError(f"{args.model} is not a splat model")
    trunk.num_splats = trunk.pretrained_cfg["num_splats"] = args.num_splats
    return student


def train(args) -> dict:
    import open_clip
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed

    register_open_clip_configs()
    run_dir = Path(args.output)
    stage_dir = run_dir / args.stage
    cpu = args.cpu or not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=args.precision or ("no" if cpu else "bf16"),
        gradient_accumulation_steps=args.accum_steps,
        # Streams: every process reads the stream and keeps its own share of the batches (no
        # dispatching of batches that hold strings); decoding and fitting touch only that share.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed,
                                                  dispatch_batches=False),
    )
    set_seed(args.seed)

    teacher = None
    if args.teacher:
        teacher = open_clip.create_model(args.teacher, pretrained=args.teacher_pretrained)
        teacher.eval().requires_grad_(False)
    student = build_student(args, stage_dir, run_dir, teacher if args.stage == "distill" else None)
    if args.stage == "clip":
        teacher = None  # stage 2 has no teacher
    freeze(student, args.stage, verbose=accelerator.is_main_process)

    fit_options = {"iterations": args.fit_iterations} if args.fit_iterations else {}
    # Batches are fitted in the collate step: on the GPU when it runs in this process (CUDA
    # cannot start in forked workers).
    fit_device = accelerator.device if args.workers == 0 else "cpu"
    splat_transform = SplatTransform(args.num_splats, args.image_size, device=fit_device,
                                     **fit_options)
    teacher_preprocess = None
    if teacher is not None:
        cfg = teacher.visual.preprocess_cfg
        teacher_preprocess = open_clip.image_transform(cfg["size"], is_train=False,
                                                       mean=cfg["mean"], std=cfg["std"])
    tokenizer = open_clip.get_tokenizer(args.model) if args.stage == "clip" else None
    dataset = open_train_data(args.train_data, args.split)
    streamed = isinstance(dataset, IterableDataset)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=not streamed, drop_last=True,
                        num_workers=args.workers,
                        collate_fn=Collate(splat_transform, teacher_preprocess, tokenizer))
    batches = (dataset.num_items or 0) // args.batch_size if streamed else len(loader)
    if batches == 0 and not (streamed and args.max_steps):
        raise ValueError(f"{args.train_data}: no full batch of {args.batch_size} samples"
                         + (" (or an unknown length: pass --max-steps)" if streamed else ""))

    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    steps_per_epoch = math.ceil(batches / accelerator.num_processes / args.accum_steps)
    total = args.max_steps or steps_per_epoch * args.epochs
    # accelerate steps a prepared scheduler once per process per step: count in those units.
    ticks = accelerator.num_processes
    warmup = min(args.warmup, max(1, total // 10))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(warmup * ticks, total * ticks))
    student, optimizer, loader, scheduler = accelerator.prepare(student, optimizer, loader, scheduler)
    if teacher is not None:
        teacher.to(accelerator.device)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    checkpoint = latest_checkpoint(stage_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed {checkpoint} at step {state.step}")

    clip_loss = open_clip.ClipLoss(gather_with_grad=True, rank=accelerator.process_index,
                                   world_size=accelerator.num_processes)
    model = accelerator.unwrap_model(student)
    log_file = stage_dir / "log.jsonl"
    stage_dir.mkdir(parents=True, exist_ok=True)

    def save_checkpoint():
        accelerator.save_state(str(stage_dir / "checkpoints" / f"step_{state.step:07d}"))

    last_loss, seen, start = None, 0, time.perf_counter()
    while state.step < total and state.epoch < args.epochs:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(loader, state.batch_in_epoch) \
            if state.batch_in_epoch else loader
        for batch in batches:
            with accelerator.accumulate(student):
                image = F.normalize(model.encode_image(batch["splats"]), dim=-1)
                if args.stage == "distill":
                    with torch.no_grad():
                        target = F.normalize(teacher.encode_image(batch["pixels"]), dim=-1)
                    loss = F.mse_loss(image.float(), target.float())
                else:
                    with torch.no_grad():  # the text tower is frozen
                        text = F.normalize(model.encode_text(batch["tokens"]), dim=-1)
                    loss = clip_loss(image, text, model.logit_scale.exp())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batch_in_epoch += 1
            seen += len(batch["splats"]) * accelerator.num_processes
            if args.record_samples:  # an audit trail: which process saw which samples
                with (stage_dir / f"samples-{accelerator.process_index}.txt").open("a") as f:
                    f.write("".join(f"{state.epoch} {i}\n" for i in batch["ids"]))
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            last_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
            if state.step % args.log_every == 0 or state.step == 1:
                record = {"step": state.step, "epoch": state.epoch, "loss": last_loss,
                          "lr": scheduler.get_last_lr()[0],
                          "images_per_s": seen / (time.perf_counter() - start)}
                accelerator.print(json.dumps(record))
                if accelerator.is_main_process:
                    with log_file.open("a") as f:
                        f.write(json.dumps(record) + "\n")
            if state.step % args.checkpoint_every == 0:
                save_checkpoint()
            if state.step >= total:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    save_checkpoint()

    result = {"model": args.model, "stage": args.stage, "num_splats": args.num_splats,
              "steps": state.step, "final_loss": last_loss, "data": args.train_data,
              "teacher": args.teacher, "teacher_pretrained": args.teacher_pretrained,
              "quick_gelu": uses_quick_gelu(model)}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = stage_dir / "final"
        final.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, final / "model.safetensors")
        (final / "run.json").write_text(json.dumps(result, indent=2) + "\n")
        shutil.copytree(final, run_dir / "final", dirs_exist_ok=True)
    accelerator.end_training()
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.cpu:
        # Hide GPUs before anything initialises CUDA: with several CPU processes on a GPU host,
        # rank 1 otherwise died on "invalid device ordinal" (cuda:<local rank>) on an H100 box.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    train(args)


if __name__ == "__main__":
    main()
