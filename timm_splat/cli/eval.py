"""``timm-splat eval``: zero-shot classification of a splat CLIP (see
:mod:`timm_splat.evaluation`)."""

from __future__ import annotations

import json
from pathlib import Path

from .. import evaluation
from ..evaluation import EvalConfig, evaluate, format_table
from .options import add_config_arguments, config_from_args


def add_arguments(parser) -> None:
    parser.description = evaluation.__doc__
    add_config_arguments(parser, EvalConfig)
    parser.add_argument("--output", default=None, help="write the results as JSON here")


def run(args) -> int:
    result = evaluate(config_from_args(EvalConfig, args))
    print(format_table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0
