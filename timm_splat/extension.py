"""Finds, builds and loads the renderer kernels in csrc/; says which backend renders and why.

In order: the library a platform wheel carries (built by setup.py, used when it was built for
the running torch: version, C++ ABI, CUDA major); else the kernels compiled on first use with
``torch.utils.cpp_extension.load`` into ``~/.cache/timm_splat/<torch version>`` (or
``$TIMM_SPLAT_BUILD_DIR``), which later processes load from the cache (source and editable
installs, or a wheel built for another torch); else the pure-PyTorch reference. One line says
which: a log record (logger ``timm_splat``) when all is well, a warning when not.
Knobs: ``TIMM_SPLAT_NO_KERNELS=1`` (the reference), ``TIMM_SPLAT_NO_PREBUILT=1`` (compile even
when the wheel has a library), ``TIMM_SPLAT_BUILD_DIR``, ``CUDA_HOME``, ``TORCH_CUDA_ARCH_LIST``.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent
# Repository checkout / editable install, then the copy a wheel carries.
_SOURCE_DIRS = (_PACKAGE_DIR.parent / "csrc", _PACKAGE_DIR / "csrc")
# Where a platform wheel puts the library setup.py built, and the record of what it was built for.
_PREBUILT_DIR = _PACKAGE_DIR
PREBUILT_INFO = "_kernels.json"
CPU_SOURCES = ("ops.cpp", "render_cpu.cpp")
CUDA_SOURCES = CPU_SOURCES + ("render_cuda.cu",)
# Fast math, but NaN and infinity keep their meaning: the bounding-box test rejects non-finite
# splats by comparisons that -ffinite-math-only may fold away. (torch picks the C++ standard.)
# cxx_flags() adds OpenMP where it can.
CXX_FLAGS = ["-O3", "-ffast-math", "-fno-finite-math-only"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]
# First-use compiles: Hopper SASS plus PTX for the oldest GPU CUDA 13 supports, which the driver
# JIT-compiles for any newer GPU. Wheels: see wheel_cuda_archs. TORCH_CUDA_ARCH_LIST overrides.
DEFAULT_CUDA_ARCHS = "7.5+PTX;9.0"
# What the reference costs against the kernels (benchmarks/reference_cost.py: a fit step, i.e.
# render forward + backward, N=400, 224x224, batch 64, one CPU thread; docs/benchmarks.md).
REFERENCE_SLOWDOWN = "about 800x"
_log = logging.getLogger("timm_splat")


def cxx_flags() -> list[str]:
    """The C++ flags of the kernel library: CXX_FLAGS, and -fopenmp on Linux when torch has
    OpenMP and the compiler is GCC. at::parallel_for, which spreads the CPU kernels over torch's
    threads, is a header template compiled into the library: without -fopenmp its parallel
    region is dropped and the kernels run on one thread whatever torch.set_num_threads says.
    Its calls go to the GNU OpenMP runtime libtorch loads; another compiler's -fopenmp would
    call its own runtime, so elsewhere the kernels keep one thread."""
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cpp_extension = _import_cpp_extension()
        if cpp_extension.check_compiler_is_gcc(cpp_extension.get_cxx_compiler()):
            return [*CXX_FLAGS, "-fopenmp"]
    return list(CXX_FLAGS)


def _one_thread_after_fork() -> None:
    """A process forked after torch's OpenMP threads ran hangs in its first parallel region
    (GNU OpenMP is not fork-safe), so a fit inside ``datasets.map(num_proc=...)`` or a fork
    ``multiprocessing`` pool never returned. The child runs one thread instead, as torch's
    DataLoader workers do."""
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)


if hasattr(os, "register_at_fork") and torch.backends.openmp.is_available():
    os.register_at_fork(after_in_child=_one_thread_after_fork)


def wheel_cuda_archs() -> str:
    """The archs a wheel's CUDA kernels are built for: those the installed torch was built for
    (its wheels: sm_75 to sm_120 for CUDA 13), plus PTX of the newest, so later GPUs JIT it."""
    archs = [re.fullmatch(r"sm_(\d+)(\d)([a-z]?)", a) for a in torch.cuda.get_arch_list()]
    archs = [f"{m[1]}.{m[2]}{m[3]}" for m in archs if m]  # sm_90a -> 9.0a
    return ";".join(archs) + "+PTX" if archs else DEFAULT_CUDA_ARCHS


_lock = threading.Lock()
_state: dict = {"loaded": False, "error": None, "built": None, "backend": None}


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
        sources=[str(src / f) for f in (CUDA_SOURCES if cuda else CPU_SOURCES)],
        extra_cflags=cxx_flags(),
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(src)],
        build_directory=str(out),
        with_cuda=cuda,
        is_python_module=False,
        verbose=verbose,
    )
    _state["built"] = {
        "name": name,
        "folder": str(out),
        "library": str(out / f"{name}.so"),
        "prebuilt": False,
        "devices": ["cpu", "cuda"] if cuda else ["cpu"],
        "cuda_archs": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None,
        "cuda_home": os.environ.get("CUDA_HOME") if cuda else None,
    }
    return _state["built"]


def prebuilt_mismatch(info: dict) -> str | None:
    """Why a library built against ``info`` (setup.py's record) cannot load into the running
    torch, or None when it can: libtorch's C++ API changes with every release, the C++ ABI
    flag must agree, and CUDA code needs the CUDA major it was compiled for."""
    running = torch.__version__.split("+")[0]
    if str(info.get("torch", "")).split("+")[0] != running:
        return f"they were built for torch {info.get('torch')}, this is torch {torch.__version__}"
    if info.get("cxx11_abi") != bool(torch._C._GLIBCXX_USE_CXX11_ABI):
        return f"they were built with _GLIBCXX_USE_CXX11_ABI={info.get('cxx11_abi')}, unlike torch"
    if "cuda" in info.get("devices", []):
        built, have = str(info.get("cuda")).split(".")[0], (torch.version.cuda or "").split(".")[0]
        if built != have:
            return f"they were built for CUDA {info.get('cuda')}, this torch has " + (
                f"CUDA {torch.version.cuda}" if have else "no CUDA"
            )
    return None


def find_prebuilt() -> tuple[Path | None, dict | None, str]:
    """The wheel's library, its build record and ''; or None, None and why it is not used."""
    record = _PREBUILT_DIR / PREBUILT_INFO
    if os.environ.get("TIMM_SPLAT_NO_PREBUILT"):
        return None, None, "TIMM_SPLAT_NO_PREBUILT is set"
    if not record.is_file():
        return None, None, "this install has no prebuilt kernels (a source or editable install)"
    try:  # the file came with the wheel; read it as untrusted all the same
        info = json.loads(record.read_text())
        library = _PREBUILT_DIR / Path(str(info["library"])).name
        if not isinstance(info.get("devices"), list):
            raise ValueError("no device list")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        return None, None, f"the prebuilt kernels' record {record} is unreadable ({exc})"
    mismatch = prebuilt_mismatch(info)
    if mismatch:
        return None, info, f"the wheel's prebuilt kernels do not fit: {mismatch}"
    if not library.is_file():
        return None, info, f"the prebuilt library {library} is missing"
    return library, info, ""


def _load_prebuilt() -> str:
    """Load the wheel's library when it fits; '' on success, else why not."""
    library, info, why = find_prebuilt()
    if library is None:
        return why
    if torch.cuda.is_available() and "cuda" not in info["devices"] and find_cuda_home():
        return "the wheel's prebuilt kernels are CPU-only and a GPU and CUDA toolkit are here"
    try:
        torch.ops.load_library(str(library))
    except Exception as exc:  # OSError from dlopen, RuntimeError from op registration
        return f"the wheel's prebuilt library failed to load ({type(exc).__name__}: {exc})"
    _state["built"] = {
        "name": library.name,
        "folder": str(library.parent),
        "library": str(library),
        "devices": list(info["devices"]),
        "cuda_archs": info.get("cuda_archs"),
        "cuda_home": None,
        "prebuilt": True,
    }
    return ""


_FIX_WHEEL = (
    "install the timm-splat wheel built for your torch, or build one next to it: "
    "`pip wheel . --no-build-isolation` (README, 'Building wheels')"
)


def load() -> bool:
    """Load the kernels once per process: prebuilt, else compiled, else none. True when they are
    usable, False (after one warning) when the reference renderer has to stand in."""
    if _state["loaded"] or _state["error"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return _state["loaded"]
        if os.environ.get("TIMM_SPLAT_NO_KERNELS"):
            _state["error"] = "disabled by TIMM_SPLAT_NO_KERNELS"
            _state["backend"] = "timm_splat: reference renderer (TIMM_SPLAT_NO_KERNELS is set)"
            _log.info(_state["backend"])
            return False
        why = _load_prebuilt()
        if not why:
            built = _state["built"]
            _state["backend"] = (
                f"timm_splat: prebuilt {' + '.join(built['devices'])} kernels "
                f"({built['library']}), built for this torch"
            )
            _log.info(_state["backend"])
            _warn_if_gpu_uncovered(built, "the wheel's kernels are CPU-only")
            _state["loaded"] = True
            return True
        try:
            built = build()
        except Exception as exc:  # a compiler failure can surface as many exception types
            _state["error"] = f"{type(exc).__name__}: {exc}"
            _state["backend"] = (
                "timm_splat: falling back to the pure-PyTorch reference renderer, correct but "
                f"{REFERENCE_SLOWDOWN} slower than the kernels (a fit step at N=400, 224x224, "
                f"batch 64 on a CPU). Why: {why}, and compiling them failed. To fix: "
                f"{_FIX_WHEEL}; or install a C++ compiler and ninja (`pip install ninja`) and "
                "run `timm-splat build --verbose` to see the full error. Reason: "
                f"{_state['error'][:2000]}"
            )
            warnings.warn(_state["backend"], RuntimeWarning, stacklevel=3)
            return False
        _state["backend"] = (
            f"timm_splat: {' + '.join(built['devices'])} kernels compiled on first use, cached "
            f"in {built['folder']} ({why})"
        )
        if "do not fit" in why or "failed to load" in why:
            warnings.warn(
                f"{_state['backend']}; to skip the compile: {_FIX_WHEEL}",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            _log.info(_state["backend"])
        _warn_if_gpu_uncovered(built, "no CUDA toolkit (nvcc) found")
        _state["loaded"] = True
        return True


def _warn_if_gpu_uncovered(built: dict, why: str) -> None:
    if torch.cuda.is_available() and "cuda" not in built["devices"]:
        warnings.warn(
            f"timm_splat: {why}, so GPU tensors render with the pure-PyTorch reference "
            f"({REFERENCE_SLOWDOWN} slower on a CPU); install the CUDA toolkit or set CUDA_HOME "
            "for the CUDA kernels.",
            RuntimeWarning,
            stacklevel=4,
        )


def backend() -> str:
    """The line that says which renderer runs and why (loads the kernels first)."""
    load()
    return _state["backend"]


def cuda_kernels_loaded() -> bool:
    return load() and "cuda" in _state["built"]["devices"]


def load_error() -> str | None:
    """Why the kernels are not in use, or None."""
    return _state["error"]
