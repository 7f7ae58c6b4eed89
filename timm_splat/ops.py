"""The renderer op: ``splats [..., N, 8] -> image [..., 3, H, W]``, kernel or reference.

The kernels are PyTorch custom ops (``torch.ops.timm_splat.render_forward`` / ``_backward``,
defined in csrc/ and loaded by :mod:`.extension`, which imports nothing of ours); autograd and
fake-tensor rules are registered here, the first time a kernel is used, so autograd and
``torch.compile`` see through them.
"""

from __future__ import annotations

import torch

from . import extension
from .reference import render_reference
from .splats import check_splats

_registered = False


def register_autograd() -> None:
    """Attach backward and fake-tensor rules to the kernel ops (once, after they are loaded)."""
    global _registered
    if _registered:
        return

    def setup_context(ctx, inputs, output):
        splats, height, width = inputs
        ctx.save_for_backward(splats)
        ctx.size = (height, width)

    def backward(ctx, grad_out):
        (splats,) = ctx.saved_tensors
        grad = torch.ops.timm_splat.render_backward(grad_out.contiguous(), splats, *ctx.size)
        return grad, None, None

    torch.library.register_autograd(
        "timm_splat::render_forward", backward, setup_context=setup_context
    )

    @torch.library.register_fake("timm_splat::render_forward")
    def _(splats, height, width):
        return splats.new_empty(splats.shape[0], 3, height, width)

    @torch.library.register_fake("timm_splat::render_backward")
    def _(grad_out, splats, height, width):
        return torch.empty_like(splats)

    _registered = True


def _load_kernels() -> bool:
    """Load the compiled ops (once) and attach their autograd rules; False: use the reference."""
    if not extension.load():
        return False
    register_autograd()
    return True


def kernel_supports(splats: torch.Tensor) -> bool:
    """True when a compiled kernel exists for this tensor's device and dtype."""
    if splats.dtype not in (torch.float32, torch.float64) or not _load_kernels():
        return False
    if splats.device.type == "cuda":
        return extension.cuda_kernels_loaded()
    return splats.device.type == "cpu"


def _use_kernel(splats: torch.Tensor, backend: str) -> bool:
    if backend == "reference" or (backend == "auto" and not kernel_supports(splats)):
        return False
    if backend not in ("kernel", "auto"):
        raise ValueError(f"backend must be 'auto', 'kernel' or 'reference', got {backend!r}")
    if not kernel_supports(splats):
        raise RuntimeError(
            f"no renderer kernel for {splats.device.type} / {splats.dtype}"
            + (f" ({extension.load_error()})" if extension.load_error() else "")
        )
    return True


def render(splats: torch.Tensor, height: int, width: int, backend: str = "auto") -> torch.Tensor:
    """Unchecked batched render of ``[B, N, 8]`` splats; the fitter's hot path.

    ``backend``: "kernel", "reference" or "auto" (the kernel where one exists)."""
    if not _use_kernel(splats, backend):
        return render_reference(splats, height, width)
    return torch.ops.timm_splat.render_forward(splats.contiguous(), height, width)


def render_vjp(
    splats: torch.Tensor, grad_image: torch.Tensor, height: int, width: int, backend: str = "auto"
) -> torch.Tensor:
    """Gradient of ``(grad_image * render(splats)).sum()`` with respect to ``[B, N, 8]`` splats,
    without building an autograd graph: the fitter passes its residual straight in."""
    if _use_kernel(splats, backend):
        return torch.ops.timm_splat.render_backward(
            grad_image.contiguous(), splats.contiguous(), height, width
        )
    with torch.enable_grad():
        leaf = splats.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(render_reference(leaf, height, width), leaf, grad_image)
    return grad


def render_splats(
    splats: torch.Tensor, height: int, width: int, backend: str = "auto"
) -> torch.Tensor:
    """Render splats ``[..., N, 8]`` to images ``[..., 3, height, width]``.

    The image is the plain (unclamped) sum of the colour-weighted Gaussians. fp16 / bf16 splats
    (the storage format) render in float32. Differentiable with respect to ``splats``."""
    check_splats(splats)
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if splats.dtype in (torch.float16, torch.bfloat16):
        splats = splats.float()
    lead = splats.shape[:-2]
    if splats.shape[-2] == 0 or lead.numel() == 0:  # no splats (a black image's fit): black
        return splats.new_zeros(*lead, 3, height, width) + 0 * splats.sum()  # keeps autograd
    flat = splats.reshape(-1, *splats.shape[-2:])
    return render(flat, height, width, backend).reshape(*lead, 3, height, width)
