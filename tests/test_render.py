import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_splats

from timm_splat import extension, ops, render_splats
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
    assert torch.autograd.gradcheck(
        lambda t: ops.render(t, 12, 14, "kernel"),
        (s,),
        eps=1e-7,
        atol=1e-4,
        rtol=1e-3,
        nondet_tol=0,
    )


def border_splats(batch, n, height, width, dtype=torch.float64, seed=0):
    """random_splats plus splats centred on each border and corner, tiny ones (under a pixel)
    and huge ones: spans that end on the image edge, inside a SIMD chunk or none at all."""
    s = random_splats(batch, n, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    edges = torch.tensor(
        [
            [0.0, 0.5],
            [1.0, 0.5],
            [0.5, 0.0],
            [0.5, 1.0],
            [0.0, 0.0],
            [1.0, 1.0],
            [1.0 - 0.5 / width, 0.3],
            [0.02, 1.0 - 0.5 / height],
        ],
        dtype=dtype,
    )
    k = len(edges)
    s[:, 4 : 4 + k, 0:2] = edges
    s[:, 4 : 4 + k, 2:5] = torch.rand(batch, k, 3, generator=g, dtype=dtype) * 0.2 + 0.01
    s[:, 4 + k, 2:5] = torch.tensor([1e-4, 0.0, 1e-4], dtype=dtype)  # far under a pixel
    s[:, 5 + k, 2:5] = torch.tensor([0.3 / width, 0.0, 0.3 / height], dtype=dtype)  # ~1 pixel
    s[:, 6 + k, 2:5] = torch.tensor([40.0, -30.0, 25.0], dtype=dtype)  # covers everything
    # A long, thin, sheared line: on most rows its span lies ~1e10 pixels off the image.
    s[:, 7 + k, :5] = torch.tensor([0.5, 0.5, 1e8, 0.1, 0.01], dtype=dtype)
    return s


@pytest.mark.parametrize(
    "batch, height, width", [(2, 5, 9), (3, 17, 8), (1, 40, 23), (2, 3, 130), (1, 70, 1)]
)
def test_kernel_matches_reference_on_borders(batch, height, width):
    s = border_splats(batch, 24, height, width, seed=height + width).requires_grad_()
    out = ops.render(s, height, width, "kernel")
    ref = render_reference(s, height, width)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * g).sum(), s)
    (grad_ref,) = torch.autograd.grad((ref * g).sum(), s)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("height, width", [(48, 40), (23, 67)])
def test_kernel_float32_on_borders(height, width):
    from conftest import away_from_cutoff

    s64 = away_from_cutoff(border_splats(2, 40, height, width, seed=5), height, width)
    s = s64.float().requires_grad_()
    out = ops.render(s, height, width, "kernel")
    ref = render_reference(s.detach().double(), height, width)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad((out * g).sum(), s)
    leaf = s.detach().double().requires_grad_()
    (grad_ref,) = torch.autograd.grad(
        (render_reference(leaf, height, width) * g.double()).sum(), leaf
    )
    assert (grad.double() - grad_ref).abs().max() <= 1e-3 * grad_ref.abs().max()


# The float32 kernel evaluates the Gaussian with a polynomial exponential (csrc/
# render_cpu_kernels.h, exp_nonpositive); its documented relative error bound.
FAST_EXP_REL_ERROR = 1.2e-7


def test_fast_exp_error_bound():
    """Splats whose whitened offsets z and |z|^2 are exact in float32 at every pixel of a 64 x 64
    image, so each rendered pixel is exactly the kernel's exp(-|z|^2 / 2): compare it with the
    exact exponential over ~60000 distinct arguments in [-4.5, 0]."""
    rows = [
        [0.5 + off / 1024, 0.5 - off / 2048, 2.0**-k, 0.0, 2.0**-k, 1.0, 0.0, 0.0]
        for k in (2, 3, 4)
        for off in range(16)
    ]
    s = torch.tensor(rows, dtype=torch.float32).unsqueeze(1)  # one splat per image
    out = ops.render(s, 64, 64, "kernel")[:, 0].double()
    c = (torch.arange(64, dtype=torch.float64) + 0.5) / 64
    sd = s.double()[:, 0, :, None, None]
    z1 = (c.view(1, 1, -1) - sd[:, 0]) / sd[:, 2]
    z2 = (c.view(1, -1, 1) - sd[:, 1]) / sd[:, 4]
    m2 = z1 * z1 + z2 * z2
    assert torch.equal(m2.float().double(), m2)  # the arguments really are exact in float32
    inside = m2 <= 9
    assert torch.unique(m2[inside]).numel() > 50000
    rel = (out - torch.exp(-0.5 * m2)).abs() / torch.exp(-0.5 * m2)
    assert rel[inside].max() <= FAST_EXP_REL_ERROR
    assert torch.count_nonzero(out[~inside]) == 0  # and the cut-off is exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_are_deterministic_across_thread_counts(dtype):
    s = border_splats(3, 300, 50, 61, dtype=dtype, seed=11)
    g = torch.randn(3, 3, 50, 61, dtype=dtype, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1, 3):
            torch.set_num_threads(n)
            results.append(
                (
                    ops.render(s, 50, 61, "kernel"),
                    torch.ops.timm_splat.render_backward(g, s, 50, 61),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(grad, results[0][1])


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
    torch.testing.assert_close(
        out[1, 2], render_reference(s[1, 2:3], 10, 12)[0], rtol=1e-4, atol=1e-4
    )
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
    # A wheel's prebuilt library would load without compiling: this test is about compiling.
    env = {
        **os.environ,
        "TIMM_SPLAT_BUILD_DIR": str(tmp_path / "build"),
        "TIMM_SPLAT_NO_PREBUILT": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


def test_no_splats_render_black():
    """A black image's fit can keep no splat at all: its render is black, not an error."""
    for splats in (torch.zeros(0, 8), torch.zeros(2, 0, 8, requires_grad=True)):
        image = render_splats(splats, 5, 7)
        assert image.shape == (*splats.shape[:-2], 3, 5, 7) and not image.any()
    image.sum().backward()  # differentiable like any render
