// CPU kernels of the splat renderer: forward (band-binned, each band of rows adds up the splat
// rows that cross it) and backward (splat-major, each splat reduces its own gradient).
//
// The loops live in render_cpu_kernels.h, compiled here for the baseline instruction set and, on
// x86-64 with GCC, for AVX2 + FMA (8 floats a chunk) and AVX-512 (16); the first call picks the
// widest build the CPU has. The builds give the same results up to rounding (FMA contracts
// a * b + c; the backward's lane sums are split 8 or 16 ways). 16 lanes pay even where the CPU
// runs 512-bit operations as two halves (AMD Zen 4: 1.05-1.21x over AVX2 from N=3136 to 400,
// docs/benchmarks.md 2026-12-07): half the instructions per pixel, and 32 registers.
//
// Parallelism comes from ATen's thread pool (OpenMP in the PyTorch builds), so the kernels obey
// torch.set_num_threads and never oversubscribe the cores torch already uses. at::parallel_for
// is a header template: this file must be compiled with -fopenmp (extension.cxx_flags()) or it
// runs serially. Work items are handed out through an atomic counter: bands and splats vary
// wildly in cost, and a static split would leave cores idle. Every output element has one writer
// and a fixed order of additions, so results are bitwise reproducible whatever the thread count
// or schedule.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "splat_math.h"

namespace timm_splat {
namespace {

// The forward hands out one band of kBandRows image rows of one image per work item.
constexpr int kBandRows = kTileSize;

// The kernels pass SIMD vectors between inlined helpers only; GCC's note that a 32-byte vector
// argument's ABI depends on -mavx is about calls across object files, which never happen here.
#pragma GCC diagnostic ignored "-Wpsabi"
// 16-byte vectors: SSE2 on any x86-64, NEON on aarch64.
#define TIMM_SPLAT_VEC_BYTES 16
namespace baseline {
#include "render_cpu_kernels.h"
}  // namespace baseline
#undef TIMM_SPLAT_VEC_BYTES

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TIMM_SPLAT_CPU_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define TIMM_SPLAT_VEC_BYTES 32
namespace avx2 {
#include "render_cpu_kernels.h"
}  // namespace avx2
#undef TIMM_SPLAT_VEC_BYTES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512vl")
#define TIMM_SPLAT_VEC_BYTES 64
namespace avx512 {
#include "render_cpu_kernels.h"
}  // namespace avx512
#undef TIMM_SPLAT_VEC_BYTES
#pragma GCC pop_options
#endif

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest build this CPU runs, found once. libgcc's checks (GCC 8 and later, bug 85100)
// include that the OS saves the AVX-512 registers.
Isa cpu_isa() {
  static const Isa isa = [] {
#ifdef TIMM_SPLAT_CPU_AVX2
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
    return Isa::kBaseline;
  }();
  return isa;
}

template <typename T>
void forward(const T* splats, T* out, int64_t batch, int64_t n, int height, int width) {
#ifdef TIMM_SPLAT_CPU_AVX2
  if (cpu_isa() == Isa::kAvx512)
    return avx512::forward_kernel(splats, out, batch, n, height, width);
  if (cpu_isa() == Isa::kAvx2) return avx2::forward_kernel(splats, out, batch, n, height, width);
#endif
  baseline::forward_kernel(splats, out, batch, n, height, width);
}

template <typename T>
void backward(const T* splats, const T* grad_image, T* grad, int64_t batch, int64_t n,
              int height, int width) {
#ifdef TIMM_SPLAT_CPU_AVX2
  if (cpu_isa() == Isa::kAvx512)
    return avx512::backward_kernel(splats, grad_image, grad, batch, n, height, width);
  if (cpu_isa() == Isa::kAvx2)
    return avx2::backward_kernel(splats, grad_image, grad, batch, n, height, width);
#endif
  baseline::backward_kernel(splats, grad_image, grad, batch, n, height, width);
}

void check_splats(const torch::Tensor& splats) {
  TORCH_CHECK(splats.dim() == 3 && splats.size(2) == kSplatChannels,
              "splats must be [B, N, 8], got ", splats.sizes());
}

torch::Tensor render_forward_cpu(const torch::Tensor& splats_in, int64_t height, int64_t width) {
  check_splats(splats_in);
  TORCH_CHECK(height > 0 && width > 0, "height and width must be positive");
  const auto splats = splats_in.contiguous();
  auto out = torch::empty({splats.size(0), 3, height, width}, splats.options());
  AT_DISPATCH_FLOATING_TYPES(splats.scalar_type(), "render_forward_cpu", [&] {
    forward<scalar_t>(splats.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), splats.size(0),
                      splats.size(1), int(height), int(width));
  });
  return out;
}

torch::Tensor render_backward_cpu(const torch::Tensor& grad_out_in, const torch::Tensor& splats_in,
                                  int64_t height, int64_t width) {
  check_splats(splats_in);
  const auto splats = splats_in.contiguous();
  const auto grad_out = grad_out_in.to(splats.scalar_type()).contiguous();
  TORCH_CHECK(grad_out.sizes() == torch::IntArrayRef({splats.size(0), 3, height, width}),
              "grad_out must be [B, 3, H, W], got ", grad_out.sizes());
  auto grad = torch::empty_like(splats);
  AT_DISPATCH_FLOATING_TYPES(splats.scalar_type(), "render_backward_cpu", [&] {
    backward<scalar_t>(splats.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                       grad.data_ptr<scalar_t>(), splats.size(0), splats.size(1), int(height),
                       int(width));
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(timm_splat, CPU, m) {
  m.impl("render_forward", &render_forward_cpu);
  m.impl("render_backward", &render_backward_cpu);
}

}  // namespace timm_splat
