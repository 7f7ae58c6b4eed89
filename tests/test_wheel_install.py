"""Checks of an installed platform wheel, run by .ci/run from a fresh install apart from the
checkout with no compiler reachable (TIMM_SPLAT_WHEEL_TEST=1; skipped elsewhere): the kernels
load from the wheel, nothing is compiled, and the CUDA ones are in the library (compiled, not
verified: CI has no GPU)."""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import timm_splat
from timm_splat import extension

pytestmark = pytest.mark.skipif(
    not os.environ.get("TIMM_SPLAT_WHEEL_TEST"), reason="checks an installed wheel (.ci/run)"
)


def test_the_package_comes_from_the_wheel_not_the_checkout():
    checkout = os.environ.get("TIMM_SPLAT_CHECKOUT")
    assert checkout and not Path(timm_splat.__file__).resolve().is_relative_to(checkout)
    assert (Path(timm_splat.__file__).parent / extension.PREBUILT_INFO).is_file()


def test_no_compiler_is_reachable():
    assert not any(shutil.which(tool) for tool in ("c++", "g++", "gcc", "cc", "nvcc", "ninja"))
    assert "CXX" not in os.environ and "CC" not in os.environ


def test_the_prebuilt_kernels_load_and_nothing_compiles():
    assert extension.load(), extension.backend()
    assert extension._state["built"]["prebuilt"], extension.backend()
    assert extension.backend().startswith("timm_splat: prebuilt")
    cache = Path(os.environ["TIMM_SPLAT_BUILD_DIR"])
    assert not [p for p in cache.rglob("*") if p.is_file()], "something was compiled"


def test_the_wheel_carries_the_cuda_kernels_when_torch_has_cuda():
    devices = extension._state["built"]["devices"] if extension.load() else []
    if torch.version.cuda is None:
        pytest.skip("a CPU-only torch: a CPU-only wheel")
    assert devices == ["cpu", "cuda"]
    for op in ("timm_splat::render_forward", "timm_splat::render_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op


def test_the_wheels_cpu_kernels_run_on_torchs_threads():
    # Wheels are built on Linux with GCC, so with OpenMP (extension.cxx_flags): the library
    # calls the runtime libtorch loads, and the kernels use torch's threads.
    if not (sys.platform.startswith("linux") and torch.backends.openmp.is_available()):
        pytest.skip("OpenMP kernels: Linux with a torch built with OpenMP")
    assert extension.load(), extension.backend()
    library = Path(extension._state["built"]["library"])
    record = json.loads((library.parent / extension.PREBUILT_INFO).read_text())
    assert "-fopenmp" in record["cxx_flags"]
    assert b"GOMP_parallel" in library.read_bytes()
