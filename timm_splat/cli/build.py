"""``timm-splat build [--cuda]``: compile the renderer kernels now instead of on first use (or
say that the wheel's prebuilt ones fit this torch and nothing needs compiling)."""

from __future__ import annotations

import sys
import time

import torch


def add_arguments(parser) -> None:
    parser.add_argument(
        "--cuda", action="store_true", help="build the CUDA kernels too (needs nvcc, not a GPU)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")


def run(args) -> int:
    from .. import extension

    library, info, why = extension.find_prebuilt()
    if library is not None and (not args.cuda or "cuda" in info["devices"]):
        print(
            f"prebuilt {' + '.join(info['devices'])} kernels fit torch {torch.__version__}: "
            f"{library}; nothing to compile (TIMM_SPLAT_NO_PREBUILT=1 compiles anyway)"
        )
        if info.get("cuda_archs"):
            print(f"CUDA archs: {info['cuda_archs']}")
        return 0
    kind = "CPU and CUDA" if args.cuda else "CPU"
    print(f"building the {kind} renderer kernels (torch {torch.__version__})...", flush=True)
    if library is None and "source or editable" not in why:
        print(f"(not the prebuilt ones: {why})", flush=True)
    start = time.perf_counter()
    try:
        built = extension.build(verbose=args.verbose, cuda=args.cuda or None)
    except Exception as exc:
        print(
            f"kernel build failed: {exc}\n(rerun with --verbose for the compiler's output)",
            file=sys.stderr,
        )
        return 1
    print(
        f"built {built['name']} for {' + '.join(built['devices'])} in "
        f"{time.perf_counter() - start:.0f} s, cached in {built['folder']}"
    )
    if built["cuda_archs"]:
        print(f"CUDA archs: {built['cuda_archs']} (toolkit {built['cuda_home']})")
    return 0
