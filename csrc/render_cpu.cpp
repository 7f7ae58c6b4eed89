// CPU kernels of the splat renderer: forward (tile-binned gather) and backward (splat-major).
//
// Parallelism comes from ATen's thread pool (OpenMP in the PyTorch builds), so the kernels obey
// torch.set_num_threads and never oversubscribe the cores torch already uses. Work items are
// handed out through an atomic counter: tiles and splats vary wildly in cost, and a static split
// would leave cores idle.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <atomic>
#include <vector>

#include "splat_math.h"

namespace timm_splat {
namespace {

// Runs fn(i) for i in [0, n) on ATen's threads, dynamically load-balanced.
template <typename Fn>
void parallel_dynamic(int64_t n, Fn fn) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    for (int64_t i = next++; i < n; i = next++) fn(i);
  });
}

// For one image: the splats touching each tile, as CSR (offsets[t] .. offsets[t + 1] in ids).
template <typename T>
void bin_splats(const T* splats, int64_t n, int height, int width, int tiles_x, int tiles_y,
                std::vector<int64_t>& offsets, std::vector<int32_t>& ids) {
  offsets.assign(int64_t(tiles_x) * tiles_y + 1, 0);
  std::vector<int> boxes;  // tile box per splat, -1 when culled
  boxes.resize(n * 4);
  for (int64_t i = 0; i < n; ++i) {
    int x0, x1, y0, y1;
    int* box = &boxes[i * 4];
    if (!splat_pixel_bbox(splats + i * kSplatChannels, height, width, x0, x1, y0, y1)) {
      box[0] = -1;
      continue;
    }
    box[0] = x0 / kTileSize;
    box[1] = x1 / kTileSize;
    box[2] = y0 / kTileSize;
    box[3] = y1 / kTileSize;
    for (int ty = box[2]; ty <= box[3]; ++ty)
      for (int tx = box[0]; tx <= box[1]; ++tx) offsets[int64_t(ty) * tiles_x + tx + 1]++;
  }
  for (size_t t = 1; t < offsets.size(); ++t) offsets[t] += offsets[t - 1];
  ids.resize(offsets.back());
  std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int* box = &boxes[i * 4];
    if (box[0] < 0) continue;
    for (int ty = box[2]; ty <= box[3]; ++ty)
      for (int tx = box[0]; tx <= box[1]; ++tx) ids[fill[int64_t(ty) * tiles_x + tx]++] = int32_t(i);
  }
}

template <typename T>
void forward_kernel(const T* splats, T* out, int64_t batch, int64_t n, int height, int width) {
  const int tiles_x = (width + kTileSize - 1) / kTileSize;
  const int tiles_y = (height + kTileSize - 1) / kTileSize;
  const int64_t tiles = int64_t(tiles_x) * tiles_y;
  const int64_t plane = int64_t(height) * width;

  std::vector<std::vector<int64_t>> offsets(batch);
  std::vector<std::vector<int32_t>> ids(batch);
  parallel_dynamic(batch, [&](int64_t b) {
    bin_splats(splats + b * n * kSplatChannels, n, height, width, tiles_x, tiles_y, offsets[b],
               ids[b]);
  });

  parallel_dynamic(batch * tiles, [&](int64_t job) {
    const int64_t b = job / tiles;
    const int64_t t = job % tiles;
    const int tx0 = int(t % tiles_x) * kTileSize, ty0 = int(t / tiles_x) * kTileSize;
    const int tw = std::min(kTileSize, width - tx0), th = std::min(kTileSize, height - ty0);
    T acc[3][kTileSize][kTileSize] = {};
    const T* image_splats = splats + b * n * kSplatChannels;
    for (int64_t k = offsets[b][t]; k < offsets[b][t + 1]; ++k) {
      const T* raw = image_splats + int64_t(ids[b][k]) * kSplatChannels;
      int x0, x1, y0, y1;
      splat_pixel_bbox(raw, height, width, x0, x1, y0, y1);
      const SplatShape<T> s = splat_shape(raw);
      x0 = std::max(x0, tx0);
      x1 = std::min(x1, tx0 + tw - 1);
      y0 = std::max(y0, ty0) - ty0;
      y1 = std::min(y1, ty0 + th - 1) - ty0;
      for (int y = y0; y <= y1; ++y) {
        const T py = (T(ty0 + y) + T(0.5)) / T(height);
        int sx0, sx1;
        if (!splat_row_span(raw, py, width, x0, x1, sx0, sx1)) continue;
        for (int x = sx0 - tx0; x <= sx1 - tx0; ++x) {
          const T px = (T(tx0 + x) + T(0.5)) / T(width);
          T z1, z2;
          const T w = splat_weight(s, px, py, z1, z2);
          acc[0][y][x] += w * s.r;
          acc[1][y][x] += w * s.g;
          acc[2][y][x] += w * s.b;
        }
      }
    }
    T* image_out = out + b * 3 * plane;
    for (int c = 0; c < 3; ++c)
      for (int y = 0; y < th; ++y)
        for (int x = 0; x < tw; ++x)
          image_out[c * plane + int64_t(ty0 + y) * width + tx0 + x] = acc[c][y][x];
  });
}

// Each splat walks the pixels of its own bounding box: every gradient has one writer, so no
// atomics and no per-thread buffers are needed.
template <typename T>
void backward_kernel(const T* splats, const T* grad_out, T* grad_splats, int64_t batch,
                     int64_t n, int height, int width) {
  const int64_t plane = int64_t(height) * width;
  parallel_dynamic(batch * n, [&](int64_t job) {
    const int64_t b = job / n;
    const T* raw = splats + job * kSplatChannels;
    SplatGrad<T> grad;
    int x0, x1, y0, y1;
    if (splat_pixel_bbox(raw, height, width, x0, x1, y0, y1)) {
      const SplatShape<T> s = splat_shape(raw);
      const T* gr = grad_out + b * 3 * plane;
      const T* gg = gr + plane;
      const T* gb = gg + plane;
      for (int y = y0; y <= y1; ++y) {
        const T py = (T(y) + T(0.5)) / T(height);
        const int64_t row = int64_t(y) * width;
        int sx0, sx1;
        if (!splat_row_span(raw, py, width, x0, x1, sx0, sx1)) continue;
        SplatGrad<T> row_grad;  // a per-row reduction the compiler can vectorise
        for (int x = sx0; x <= sx1; ++x) {
          const T px = (T(x) + T(0.5)) / T(width);
          T z1, z2;
          const T w = splat_weight(s, px, py, z1, z2);
          splat_accumulate_grad(s, w, z1, z2, gr[row + x], gg[row + x], gb[row + x], row_grad);
        }
        grad += row_grad;
      }
    }
    grad.store(grad_splats + job * kSplatChannels);
  });
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
    forward_kernel<scalar_t>(splats.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                             splats.size(0), splats.size(1), int(height), int(width));
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
    backward_kernel<scalar_t>(splats.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                              grad.data_ptr<scalar_t>(), splats.size(0), splats.size(1),
                              int(height), int(width));
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(timm_splat, CPU, m) {
  m.impl("render_forward", &render_forward_cpu);
  m.impl("render_backward", &render_backward_cpu);
}

}  // namespace timm_splat
