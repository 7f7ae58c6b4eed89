"""Builds the renderer kernels in csrc/ into the wheel, the way torchvision and gsplat ship theirs.

    pip wheel . --no-build-isolation      # or: python -m build --wheel --no-isolation

The kernels link against the torch that is installed, so the build must see it: without
``--no-build-isolation`` pip builds in a fresh environment without torch, and the wheel comes
out pure Python (kernels compiled on first use, as from a source checkout). Knobs:

    TIMM_SPLAT_PREBUILD    auto (default): CPU kernels, plus CUDA ones when torch has CUDA and a
                           toolkit is found; cpu: CPU only; cuda: CUDA required; 0: none
    TORCH_CUDA_ARCH_LIST   the GPU archs (default: those the installed torch was built for,
                           plus PTX of the newest, which newer GPUs JIT-compile)
    CUDA_HOME              the CUDA toolkit (default: found from nvcc on PATH or /usr/local/cuda*)
    MAX_JOBS               parallel compile jobs (ninja)

Editable installs (``pip install -e .``) never build here: they compile on first use.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
LIBRARY = "timm_splat._kernels"  # loaded with torch.ops.load_library, never imported
INFO_FILE = "_kernels.json"  # what the library was built against, checked at import


def _extension_module():
    """timm_splat/extension.py by path (it imports only torch): its sources, flags and arch
    defaults are the ones the first-use compile uses, so both builds are the same."""
    spec = importlib.util.spec_from_file_location(
        "_timm_splat_extension", ROOT / "timm_splat" / "extension.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"timm-splat setup: {message}", file=sys.stderr, flush=True)


def _mode() -> str:
    mode = os.environ.get("TIMM_SPLAT_PREBUILD", "auto").strip().lower() or "auto"
    if mode not in ("auto", "cpu", "cuda", "0"):
        raise SystemExit(f"TIMM_SPLAT_PREBUILD must be auto, cpu, cuda or 0, got {mode!r}")
    if mode != "0" and any(cmd in sys.argv for cmd in ("editable_wheel", "develop")):
        _say("editable install: the kernels compile on first use instead")
        return "0"
    return mode


def kernel_build() -> dict:
    """``setup()`` arguments that build the kernels, or none (a pure-Python wheel)."""
    mode = _mode()
    if mode == "0":
        return {}
    try:
        import torch
    except ImportError:
        why = (
            "torch is not importable here (pip's build isolation?): building a pure-Python "
            "wheel whose kernels compile on first use; for prebuilt kernels build with "
            "`pip wheel . --no-build-isolation` next to the torch they are for"
        )
        if mode != "auto":
            raise SystemExit(f"TIMM_SPLAT_PREBUILD={mode}: {why}") from None
        if "bdist_wheel" in sys.argv:  # not while pip only asks for metadata
            _say(why)
        return {}
    ext = _extension_module()
    cuda_home = ext.find_cuda_home()
    cuda = mode == "cuda" or (mode == "auto" and torch.version.cuda and cuda_home)
    if cuda and not torch.version.cuda:
        raise SystemExit(f"TIMM_SPLAT_PREBUILD=cuda, but torch {torch.__version__} has no CUDA")
    if cuda and not cuda_home:
        raise SystemExit("TIMM_SPLAT_PREBUILD=cuda, but no CUDA toolkit found: set CUDA_HOME")
    if cuda:
        os.environ["CUDA_HOME"] = cuda_home  # torch's cpp_extension reads it at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", ext.wheel_cuda_archs())
    from torch.utils import cpp_extension

    sources = [f"csrc/{name}" for name in (ext.CUDA_SOURCES if cuda else ext.CPU_SOURCES)]
    kind = cpp_extension.CUDAExtension if cuda else cpp_extension.CppExtension
    cxx_flags = ext.cxx_flags()
    library = kind(
        LIBRARY,
        sources,
        include_dirs=[str(ROOT / "csrc")],
        # -g0: no debug info (setuptools passes Python's -g), a few MB less per wheel.
        extra_compile_args={"cxx": [*cxx_flags, "-g0"], "nvcc": ext.NVCC_FLAGS},
    )
    info = {
        "torch": torch.__version__,
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "cuda": torch.version.cuda if cuda else None,
        "devices": ["cpu", "cuda"] if cuda else ["cpu"],
        "cuda_archs": os.environ["TORCH_CUDA_ARCH_LIST"] if cuda else None,
        "cxx_flags": cxx_flags,
    }

    class BuildKernels(cpp_extension.BuildExtension):
        def run(self):
            devices = " + ".join(info["devices"])
            _say(f"building the {devices} kernels for torch {info['torch']}")
            if cuda:
                _say(f"CUDA archs {info['cuda_archs']} (toolkit {cuda_home})")
            super().run()
            library_path = Path(self.get_ext_fullpath(LIBRARY))
            record = dict(info, library=library_path.name)
            (library_path.parent / INFO_FILE).write_text(json.dumps(record, indent=1) + "\n")

        def get_outputs(self):
            return [
                *super().get_outputs(),
                str(Path(self.get_ext_fullpath(LIBRARY)).parent / INFO_FILE),
            ]

    return {"ext_modules": [library], "cmdclass": {"build_ext": BuildKernels}}


setup(**kernel_build())
