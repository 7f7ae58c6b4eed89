"""Which kernels load: a wheel's prebuilt library when it was built for this torch, else the
kernels compiled on first use, else the reference, each with one line that says why."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from timm_splat import extension

ABI = bool(torch._C._GLIBCXX_USE_CXX11_ABI)


def record(**changes):
    info = {"torch": torch.__version__, "cxx11_abi": ABI, "cuda": None, "devices": ["cpu"]}
    return {**info, **changes}


def test_a_library_built_for_this_torch_fits():
    assert extension.prebuilt_mismatch(record()) is None
    # The local tag (+cpu, +cu130) is the CUDA build; a CPU-only library fits either.
    assert extension.prebuilt_mismatch(record(torch=torch.__version__.split("+")[0])) is None


@pytest.mark.parametrize(
    "changes, reason",
    [
        ({"torch": "2.3.0"}, "built for torch 2.3.0, this is torch"),
        ({"cxx11_abi": not ABI}, "_GLIBCXX_USE_CXX11_ABI"),
        ({"cuda": "11.8", "devices": ["cpu", "cuda"]}, "built for CUDA 11.8"),
        ({"torch": None}, "built for torch None"),
    ],
)
def test_a_library_built_for_another_torch_does_not(changes, reason):
    assert reason in extension.prebuilt_mismatch(record(**changes))


def test_cuda_major_must_match():
    cuda = torch.version.cuda
    lib = record(cuda=cuda or "13.0", devices=["cpu", "cuda"])
    if cuda:
        assert extension.prebuilt_mismatch(lib) is None
    else:
        assert "this torch has no CUDA" in extension.prebuilt_mismatch(lib)


def test_find_prebuilt_says_why_not(tmp_path, monkeypatch):
    monkeypatch.setattr(extension, "_PREBUILT_DIR", tmp_path)
    monkeypatch.delenv("TIMM_SPLAT_NO_PREBUILT", raising=False)
    assert "no prebuilt kernels" in extension.find_prebuilt()[2]
    info = tmp_path / extension.PREBUILT_INFO
    for text in (
        "{not json",
        "[]",
        '{"devices": ["cpu"]}',
        '{"library": 3, "devices": "cpu"}',
        "[" * 100_000,  # json.loads raises RecursionError
    ):
        info.write_text(text)
        assert "unreadable" in extension.find_prebuilt()[2], text
    info.write_text(json.dumps(record(library="_kernels.so")))
    assert "is missing" in extension.find_prebuilt()[2]
    (tmp_path / "_kernels.so").write_bytes(b"")
    library, found, why = extension.find_prebuilt()
    assert library == tmp_path / "_kernels.so" and found["devices"] == ["cpu"] and why == ""
    info.write_text(json.dumps(record(library="../../etc/_kernels.so")))  # stays in its folder
    assert extension.find_prebuilt()[0] == tmp_path / "_kernels.so"
    monkeypatch.setenv("TIMM_SPLAT_NO_PREBUILT", "1")
    assert extension.find_prebuilt()[2] == "TIMM_SPLAT_NO_PREBUILT is set"


def test_wheel_cuda_archs_cover_torchs_own_plus_ptx():
    archs = extension.wheel_cuda_archs()
    if torch.cuda.get_arch_list():
        assert archs.endswith("+PTX") and archs.count("+PTX") == 1
        for arch in torch.cuda.get_arch_list():
            if arch.startswith("sm_"):
                number = arch[3:]
                assert f"{number[:-1]}.{number[-1]}" in archs
    else:
        assert archs == extension.DEFAULT_CUDA_ARCHS


def load_in_subprocess(tmp_path, info: dict | None, library: bytes | None):
    """A fresh process whose package 'carries' ``library`` with the record ``info``: which
    backend it reports, its timm_splat warnings, and whether it renders like the reference."""
    prebuilt = tmp_path / "prebuilt"
    prebuilt.mkdir()
    if library is not None:
        (prebuilt / "_kernels.so").write_bytes(library)
    if info is not None:
        (prebuilt / extension.PREBUILT_INFO).write_text(json.dumps(info))
    script = textwrap.dedent(f"""
        import json, warnings
        from pathlib import Path
        import torch
        from timm_splat import extension, ops
        from timm_splat.reference import render_reference
        extension._PREBUILT_DIR = Path({str(prebuilt)!r})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = extension.backend()
        s = torch.rand(2, 5, 8, dtype=torch.float64)
        s[..., 2:5] = 0.1
        same = torch.allclose(ops.render(s, 9, 7, "kernel"), render_reference(s, 9, 7))
        print(json.dumps({{
            "line": line, "prebuilt": extension._state["built"]["prebuilt"], "same": same,
            "warnings": [str(w.message) for w in caught if "timm_splat" in str(w.message)],
        }}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TIMM_SPLAT_NO_PREBUILT"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cpu_library():
    """The CPU kernels compiled (or cached) by the first-use path, as bytes a 'wheel' carries."""
    if not extension.load():
        pytest.skip(f"kernels unavailable: {extension.load_error()}")
    built = extension._state["built"]
    if "cuda" in built["devices"]:
        pytest.skip("this process holds the CUDA library; the test copies a CPU-only one")
    with open(built["library"], "rb") as f:
        return f.read()


def test_a_fitting_prebuilt_library_loads_without_compiling(tmp_path, cpu_library):
    out = load_in_subprocess(tmp_path, record(library="_kernels.so"), cpu_library)
    assert out["prebuilt"] and out["same"] and out["warnings"] == []
    assert (
        out["line"].startswith("timm_splat: prebuilt cpu kernels") and "_kernels.so" in out["line"]
    )


def test_a_prebuilt_library_for_another_torch_is_compiled_instead(tmp_path, cpu_library):
    out = load_in_subprocess(tmp_path, record(torch="2.3.0", library="_kernels.so"), cpu_library)
    assert not out["prebuilt"] and out["same"]
    assert len(out["warnings"]) == 1
    message = out["warnings"][0]
    assert "compiled on first use" in message and "built for torch 2.3.0" in message
    assert "pip wheel . --no-build-isolation" in message  # what to do


def test_a_broken_prebuilt_library_is_compiled_instead(tmp_path, cpu_library):
    out = load_in_subprocess(tmp_path, record(library="_kernels.so"), b"not a library")
    assert not out["prebuilt"] and out["same"]
    assert len(out["warnings"]) == 1 and "failed to load" in out["warnings"][0]


def test_a_source_install_compiles_and_says_so_quietly(tmp_path, cpu_library):
    out = load_in_subprocess(tmp_path, None, None)
    assert not out["prebuilt"] and out["same"] and out["warnings"] == []
    assert "compiled on first use" in out["line"] and "no prebuilt kernels" in out["line"]


def test_the_reference_fallback_says_what_it_costs(tmp_path):
    script = textwrap.dedent("""
        import warnings
        from timm_splat import extension
        extension._SOURCE_DIRS = ()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not extension.load()
        (message,) = [str(w.message) for w in caught]
        print(message)
    """)
    env = {**os.environ, "TIMM_SPLAT_NO_PREBUILT": "1", "TIMM_SPLAT_BUILD_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    message = result.stdout
    assert f"{extension.REFERENCE_SLOWDOWN} slower" in message and "N=400" in message
    assert "pip wheel . --no-build-isolation" in message and "timm-splat build" in message


def test_timm_splat_build_says_when_the_prebuilt_kernels_fit(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from timm_splat.cli import build as build_command

    monkeypatch.setattr(extension, "_PREBUILT_DIR", tmp_path)
    monkeypatch.delenv("TIMM_SPLAT_NO_PREBUILT", raising=False)
    monkeypatch.setattr(extension, "build", lambda **kw: pytest.fail("compiled"))
    (tmp_path / "_kernels.so").write_bytes(b"")
    (tmp_path / extension.PREBUILT_INFO).write_text(json.dumps(record(library="_kernels.so")))
    assert build_command.run(SimpleNamespace(cuda=False, verbose=False)) == 0
    assert "prebuilt cpu kernels fit torch" in capsys.readouterr().out
    # Asking for CUDA kernels a CPU-only wheel lacks compiles them (here: refused, no toolkit).
    monkeypatch.setattr(extension, "build", lambda **kw: (_ for _ in ()).throw(RuntimeError("x")))
    assert build_command.run(SimpleNamespace(cuda=True, verbose=False)) == 1


@pytest.mark.skipif(
    "-fopenmp" not in extension.cxx_flags(), reason="OpenMP builds: Linux, GCC, torch with OpenMP"
)
def test_the_cpu_kernels_run_on_torchs_threads(cpu_library):
    # at::parallel_for is compiled into the library: built without -fopenmp it runs its loop on
    # one thread, silently (the kernels did until 2026-12-07; thread-count invariance of the
    # results is tests/test_render.py's). With OpenMP the library calls the runtime torch loads.
    assert b"GOMP_parallel" in cpu_library


FIT_IN_A_FORKED_CHILD = """
import multiprocessing, numpy, torch
import timm_splat
torch.set_num_threads(2)
torch.randn(4_000_000).exp()  # the parent runs torch's OpenMP threads before it forks
image = numpy.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=numpy.uint8)
def child(_):
    result = timm_splat.fit_splats([image], num_splats=16, iterations=3, progress=False)
    return torch.get_num_threads(), float(result.psnr[0])
with multiprocessing.get_context("fork").Pool(1) as pool:
    threads, psnr = pool.apply_async(child, (0,)).get(timeout=60)
print(threads, torch.get_num_threads(), psnr > 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_after_torchs_threads_ran_still_fits():
    # GNU OpenMP is not fork-safe: without extension's at-fork hook the child's first parallel
    # region (the fit's) hangs, and the pool's get times out (e.g. datasets.map(num_proc=2)).
    out = subprocess.run(
        [sys.executable, "-c", FIT_IN_A_FORKED_CHILD], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr[-2000:]
    child_threads, parent_threads, fitted = out.stdout.split()
    if torch.backends.openmp.is_available():
        assert child_threads == "1"  # the child runs one thread, the parent keeps its own
    assert (parent_threads, fitted) == ("2", "True")


def test_openmp_only_where_the_runtime_is_torchs(monkeypatch):
    # Another compiler's -fopenmp calls its own runtime, which libtorch does not load.
    cpp_extension = extension._import_cpp_extension()
    monkeypatch.setattr(cpp_extension, "check_compiler_is_gcc", lambda compiler: False)
    assert extension.cxx_flags() == extension.CXX_FLAGS
    monkeypatch.setattr(cpp_extension, "check_compiler_is_gcc", lambda compiler: True)
    monkeypatch.setattr(torch.backends.openmp, "is_available", lambda: True)
    monkeypatch.setattr(extension.sys, "platform", "linux")
    assert extension.cxx_flags() == [*extension.CXX_FLAGS, "-fopenmp"]
    monkeypatch.setattr(extension.sys, "platform", "darwin")
    assert extension.cxx_flags() == extension.CXX_FLAGS
