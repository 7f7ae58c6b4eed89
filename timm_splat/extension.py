"""Builds and loads the renderer kernels in csrc/ (compiled on first use, then cached).

Like gsplat, ``pip install`` needs no compiler: the first render compiles csrc/ with
``torch.utils.cpp_extension.load`` into ``~/.cache/timm_splat/<torch version>`` (or
``$TIMM_SPLAT_BUILD_DIR``); later processes only load the cached library. When the compile
fails, one warning says why and the pure-PyTorch reference renders instead.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
# Repository checkout / editable install, then the copy a wheel carries.
_SOURCE_DIRS = (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc")
_CPU_SOURCES = ("ops.cpp", "render_cpu.cpp")

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None}


def source_dir() -> Path:
    for path in _SOURCE_DIRS:
        if (path / "splat_math.h").is_file():
            return path
    raise FileNotFoundError(f"kernel sources not found in any of {[str(p) for p in _SOURCE_DIRS]}")


def build_dir() -> Path:
    """Where compiled kernels are cached: ``$TIMM_SPLAT_BUILD_DIR`` or ~/.cache/timm_splat."""
    root = os.environ.get("TIMM_SPLAT_BUILD_DIR") or Path.home() / ".cache" / "timm_splat"
    tag = f"torch{torch.__version__.replace('+', '_')}"
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def build(verbose: bool = False) -> Path:
    """Compile (or load from the cache) the kernel library and register its ops.

    Returns the build folder. Raises on failure."""
    # Importing cpp_extension on a machine without a CUDA runtime logs a guess at CUDA_HOME;
    # the CPU build does not use it, so keep that line out of the user's terminal.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)

    src = source_dir()
    out = build_dir()
    # torch versions the library itself when sources or flags change, and rebuilds only then.
    cpp_extension.load(
        name="timm_splat_cpu",
        sources=[str(src / name) for name in _CPU_SOURCES],
        extra_cflags=["-O3", "-ffast-math"],  # torch picks the C++ standard its headers need
        extra_include_paths=[str(src)],
        build_directory=str(out),
        with_cuda=False,
        is_python_module=False,
        verbose=verbose,
    )
    return out


def load() -> bool:
    """Load the kernels once per process. True when they are usable, False (after one warning)
    when the reference renderer has to stand in."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        if os.environ.get("TIMM_SPLAT_NO_KERNELS"):
            _state["error"] = "disabled by TIMM_SPLAT_NO_KERNELS"
            return False
        try:
            build()
            from . import ops

            ops.register_autograd()
            _state["loaded"] = True
        except Exception as exc:  # a compiler failure can surface as many exception types
            _state["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                "timm_splat: could not build the renderer kernels in csrc/, falling back to the "
                "pure-PyTorch reference renderer (correct but 30x+ slower). Install a C++ "
                "compiler and ninja (`pip install ninja`), or run `timm-splat build --verbose` to "
                f"see the full error. Reason: {_state['error'][:2000]}",
                RuntimeWarning,
                stacklevel=3,
            )
        return _state["loaded"]


def load_error() -> str | None:
    """Why the kernels are not in use, or None."""
    return _state["error"]

