"""Builds and loads the renderer kernels in csrc/ (compiled on first use, then cached).

Like gsplat, ``pip install`` needs no compiler: the first render compiles csrc/ with
``torch.utils.cpp_extension.load`` into ``~/.cache/timm_splat/<torch version>`` (or
``$TIMM_SPLAT_BUILD_DIR``); later processes only load the cached library. When the compile
fails, one warning says why and the pure-PyTorch reference renders instead.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
# Repository checkout / editable install, then the copy a wheel carries.
_SOURCE_DIRS = (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc")
_CPU_SOURCES = ("ops.cpp", "render_cpu.cpp")
_CUDA_SOURCES = _CPU_SOURCES + ("render_cuda.cu",)
# Hopper SASS plus PTX for the oldest GPU CUDA 13 supports, which the driver JIT-compiles for
# any newer GPU. Set TORCH_CUDA_ARCH_LIST to build for others.
DEFAULT_CUDA_ARCHS = "7.5+PTX;9.0"

_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "built": None}


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


def find_cuda_home() -> str | None:
    """The CUDA toolkit folder: $CUDA_HOME / $CUDA_PATH, the folder nvcc lives in, or a
    /usr/local/cuda* install. An nvcc on PATH may be a wrapper script, so a candidate counts only
    when it holds both bin/nvcc and include/cuda_runtime.h."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in filter(None, candidates):
        if (Path(home) / "bin" / "nvcc").exists() and (
            Path(home) / "include" / "cuda_runtime.h"
        ).exists():
            return home
    return None


def _import_cpp_extension():
    # Importing cpp_extension on a machine without a CUDA runtime logs a guess at CUDA_HOME;
    # the CPU build does not use it, so keep that line out of the user's terminal.
    quiet = logging.getLogger("torch.utils.cpp_extension")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        quiet.setLevel(level)
    return cpp_extension


def build(verbose: bool = False, cuda: bool | None = None) -> dict:
    """Compile (or load from the cache) the kernel library and register its ops.

    ``cuda``: True builds the CUDA kernels too (needs nvcc and a CUDA build of torch, not a
    GPU), False only the CPU kernels, None the CUDA ones when a GPU and nvcc are present.
    Returns what was built: name, folder, devices, CUDA archs. Raises on failure."""
    if _state["built"]:  # a process can hold only one library defining the ops
        if cuda and "cuda" not in _state["built"]["devices"]:
            raise RuntimeError(
                "the CPU-only kernels are already loaded in this process; "
                "build the CUDA kernels in a fresh process"
            )
        return _state["built"]
    cuda_home = find_cuda_home()
    if cuda is None:
        cuda = torch.cuda.is_available() and cuda_home is not None
    if cuda and torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build: no CUDA kernels")
    if cuda and cuda_home is None:
        raise RuntimeError("no CUDA toolkit found (nvcc): install it or set CUDA_HOME")
    if cuda:
        os.environ.setdefault("CUDA_HOME", cuda_home)
    cpp_extension = _import_cpp_extension()
    if cuda:
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]  # read once at import; may be a guess
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)

    src = source_dir()
    name = "timm_splat_cuda" if cuda else "timm_splat_cpu"
    out = build_dir() / name  # one folder per library: their ninja files must not collide
    out.mkdir(exist_ok=True)
    # torch versions the library itself when sources or flags change, and rebuilds only then.
    cpp_extension.load(
        name=name,
        sources=[str(src / f) for f in (_CUDA_SOURCES if cuda else _CPU_SOURCES)],
        # Fast math, but NaN and infinity keep their meaning: the bounding-box test rejects
        # non-finite splats by comparisons that -ffinite-math-only may fold away. (torch picks
        # the C++ standard its headers need.)
        extra_cflags=["-O3", "-ffast-math", "-fno-finite-math-only"],
        extra_cuda_cflags=["-O3", "--use_fast_math"],
        extra_include_paths=[str(src)],
        build_directory=str(out),
        with_cuda=cuda,
        is_python_module=False,
        verbose=verbose,
    )
    _state["built"] = {
        "name": name,
        "folder": str(out),
        "devices": ["cpu", "cuda"] if cuda else ["cpu"],
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None,
        "cuda_home": os.environ.get("CUDA_HOME") if cuda else None,
    }
    return _state["built"]


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
            built = build()
            if torch.cuda.is_available() and "cuda" not in built["devices"]:
                warnings.warn(
                    "timm_splat: no CUDA toolkit (nvcc) found, so GPU tensors render with the "
                    "pure-PyTorch reference; install the CUDA toolkit or set CUDA_HOME for the "
                    "CUDA kernels.",
                    RuntimeWarning,
                    stacklevel=3,
                )
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


def cuda_kernels_loaded() -> bool:
    return load() and "cuda" in _state["built"]["devices"]


def load_error() -> str | None:
    """Why the kernels are not in use, or None."""
    return _state["error"]
