"""``timm-splat train``: one training stage (see :mod:`timm_splat.training`); on several GPUs
``accelerate launch -m timm_splat train ...``."""

from __future__ import annotations

import os

from .. import training
from ..training import TrainConfig, train
from .options import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
    parser.description = training.__doc__
    add_config_arguments(parser, TrainConfig)


def run(args) -> int:
    config = config_from_args(TrainConfig, args)
    if config.cpu:
        # Hide GPUs before anything initialises CUDA: with several CPU processes on a GPU host,
        # rank 1 otherwise died on "invalid device ordinal" (cuda:<local rank>) on an H100 box.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    train(config)
    return 0
