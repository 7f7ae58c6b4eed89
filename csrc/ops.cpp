// Schemas of the renderer ops. Each device registers its kernels with TORCH_LIBRARY_IMPL in its
// own file (render_cpu.cpp, render_cuda.cu); autograd and fake tensors live in timm_splat/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(timm_splat, m) {
  // splats [B, N, 8] -> image [B, 3, height, width], the plain sum of the Gaussians.
  m.def("render_forward(Tensor splats, int height, int width) -> Tensor");
  // grad_out [B, 3, height, width] -> grad_splats [B, N, 8].
  m.def("render_backward(Tensor grad_out, Tensor splats, int height, int width) -> Tensor");
}
