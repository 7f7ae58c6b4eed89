import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import random_splats
from timm_splat import render_splats
from timm_splat import extension, ops
from timm_splat.reference import render_reference

pytestmark = pytest.mark.skipif(not extension.load(), reason="kernels unavailable")


@pytest.mark.parametrize("height, width", [(37, 53), (16, 16), (1, 70), (64, 33)])
def test_kernel_matches_reference_float64(height, width):
    s = random_splats(3, 40, seed=height * width).requires_grad_()
    out = ops.render(s, height, width, "kernel")
    ref = render_reference(s, height, width)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * g).sum(), s)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), s)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-8)
    assert torch.count_nonzero(grad[:, -3:]) == 0  # padding rows get no gradient


def test_kernel_matches_reference_float32():
    s = random_splats(2, 60, dtype=torch.float32, seed=7).requires_grad_()
    out = ops.render(s, 48, 40, "kernel")
    ref = render_reference(s.double(), 48, 40)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * g).sum(), s)
    (grad_ref,) = torch.autograd.grad((ref * g.double()).sum(), s)
    assert (grad.double() - grad_ref).abs().max() <= 1e-3 * grad_ref.abs().max()


def test_gradcheck_small():
    s = random_splats(1, 5, seed=3, padding=1)
    s[0, :4, 0:2] = torch.tensor([[0.3, 0.4], [0.6, 0.5], [0.5, 0.2], [0.8, 0.8]], dtype=s.dtype)
    s[0, :4, 2:5] = torch.tensor([[0.1, 0.02, 0.15]] * 4, dtype=s.dtype)
    # Finite differences across the cut-off ellipse's edge are not smooth: keep splats well
    # inside the image and compare analytic with numeric gradients.
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ops.render(t, 12, 14, "kernel"), (s,),
                                    eps=1e-7, atol=1e-4, rtol=1e-3, nondet_tol=0)


def test_no_cap_on_splats_per_tile():
    n = 3000  # all in one 16x16 tile
    s = torch.zeros(1, n, 8, dtype=torch.float64)
    s[0, :, 0:2] = 7.5 / 16  # the centre of pixel (7, 7)
    s[0, :, 2] = s[0, :, 4] = 0.05
    s[0, :, 5:] = 1.0 / n
    out = ops.render(s, 16, 16, "kernel")
    torch.testing.assert_close(out, render_reference(s, 16, 16))
    assert out.max() == pytest.approx(1.0, rel=0.05)


def test_empty_batch_and_no_splats():
    assert ops.render(torch.zeros(0, 5, 8), 8, 8, "kernel").shape == (0, 3, 8, 8)
    assert torch.count_nonzero(ops.render(torch.zeros(2, 0, 8), 8, 8, "kernel")) == 0


def test_render_splats_leading_dims_and_fp16():
    s = random_splats(6, 20, dtype=torch.float32).reshape(2, 3, 20, 8)
    out = render_splats(s, 10, 12)
    assert out.shape == (2, 3, 3, 10, 12)
    torch.testing.assert_close(out[1, 2], render_reference(s[1, 2:3], 10, 12)[0], rtol=1e-4, atol=1e-4)
    half = render_splats(s.half(), 10, 12)
    assert half.dtype == torch.float32


@pytest.mark.parametrize("height, width", [(0, 5), (5, -1), (2.5, 4)])
def test_render_splats_rejects_bad_sizes(height, width):
    with pytest.raises(ValueError, match="positive int"):
        render_splats(random_splats(1, 6), height, width)


def test_torch_compile_sees_the_op():
    s = random_splats(1, 10, dtype=torch.float32)
    compiled = torch.compile(lambda t: ops.render(t, 9, 9, "kernel") * 2, backend="eager")
    torch.testing.assert_close(compiled(s), ops.render(s, 9, 9, "kernel") * 2)


def test_failed_build_falls_back_with_one_warning(tmp_path):
    bad = tmp_path / "csrc"
    bad.mkdir()
    for name in ("splat_math.h", "ops.cpp"):
        (bad / name).write_text((extension.source_dir() / name).read_text())
    (bad / "render_cpu.cpp").write_text("this is not C++\n")
    script = textwrap.dedent(f"""
        import warnings
        from pathlib import Path
        import torch
        from timm_splat import extension, render_splats
        from timm_splat.reference import render_reference
        extension._SOURCE_DIRS = (Path({str(bad)!r}),)
        s = torch.rand(1, 4, 8)
        s[..., 2:5] = 0.1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = render_splats(s, 8, 8)
            b = render_splats(s, 8, 8)
        messages = [str(w.message) for w in caught if "timm_splat" in str(w.message)]
        assert len(messages) == 1, messages
        assert "falling back" in messages[0]
        assert torch.allclose(a, render_reference(s, 8, 8)) and torch.equal(a, b)
        print("OK")
    """)
    env = {**os.environ, "TIMM_SPLAT_BUILD_DIR": str(tmp_path / "build")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
