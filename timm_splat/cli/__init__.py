"""The ``timm-splat`` command (also ``python -m timm_splat``, ``accelerate launch -m
timm_splat``): one module per subcommand, each with ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit code``. Bad input exits with code 2 and a one-line error, no traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand name -> module in this package (imported only when that subcommand runs).
COMMANDS = {
    "demo": "demo",
    "fit": "fit",
    "encode": "encode",
    "decode": "decode",
    "build": "build",
    "prefit": "prefit",
    "train": "train",
    "eval": "eval",
    "push": "push",
    "reproduce": "reproduce",
    "serve": "serve",
    "send": "send",
}
HELP = {
    "demo": "fit scikit-image's sample photos at several budgets",
    "fit": "fit splats to image files",
    "encode": "compact .splat files (the codec) from images or splat files",
    "decode": "render .splat files (and write them as fp16 splat files)",
    "build": "compile the renderer kernels now (else: on first use)",
    "prefit": "fit a dataset once into parquet shards of splats",
    "train": "train a splat CLIP (stage distill, then clip)",
    "eval": "zero-shot ImageNet-1K (or any labelled set) evaluation",
    "push": "publish a training run to the Hugging Face Hub",
    "reproduce": "the paper's experiment: teacher, students per budget, accuracy vs compression",
    "serve": "an inference service for a splat model (needs the serve extra)",
    "send": "fit and encode images here, post them to a service, time it",
}
# What a program reports as bad input (exit 2) rather than as a crash.
INPUT_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, only that subcommand's module is imported."""
    parser = argparse.ArgumentParser(prog="timm-splat", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        sub_parser = sub.add_parser(
            name,
            help=HELP[name],
            description=HELP[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if command in (None, name):
            module = importlib.import_module(f"{__name__}.{module_name}")
            module.add_arguments(sub_parser)
            sub_parser.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    try:
        return args.run(args) or 0
    except INPUT_ERRORS as exc:  # bad input: say what was wrong, no traceback
        print(f"timm-splat {args.command}: error: {exc}", file=sys.stderr)
        return 2
