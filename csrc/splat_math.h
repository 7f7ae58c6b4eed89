// Per-splat / per-pixel math of the 2D Gaussian splat renderer.
//
// Shared by the CPU kernel (render_cpu.cpp) and the CUDA kernel, so the CPU path that CI runs
// exercises exactly the arithmetic the GPU runs. Keep it free of torch and of any allocation.
//
// A splat is 8 numbers (x, y, l11, l21, l22, r, g, b) in normalised image coordinates: pixel
// (row i, col j) of an H x W image has its centre at ((j + 0.5) / W, (i + 0.5) / H). The
// covariance is L L^T with L = [[l11, 0], [l21, l22]]. A splat is real iff l11 > 0 (zero rows
// are padding); a row with l22 <= 0 is degenerate and contributes nothing.
//
// The Gaussian is cut off at Mahalanobis distance kCutoffSigma: that ellipse's axis-aligned
// bounding box is exactly what the tiles cull with, so culling never changes the image and the
// dense reference renderer (timm_splat/reference.py) applies the same cut-off.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SPLAT_HD __host__ __device__ __forceinline__
#else
#define SPLAT_HD inline
#endif

namespace timm_splat {

constexpr int kTileSize = 16;
constexpr float kCutoffSigma = 3.0f;
constexpr int kSplatChannels = 8;

template <typename T>
SPLAT_HD bool splat_is_real(const T* s) {
  return s[2] > T(0) && s[4] > T(0);
}

// Inclusive pixel range [x0, x1] x [y0, y1] that the splat's cut-off ellipse touches, clipped
// to the image. Returns false when the splat is padding, degenerate or entirely off the image.
template <typename T>
SPLAT_HD bool splat_pixel_bbox(const T* s, int height, int width, int& x0, int& x1, int& y0,
                               int& y1) {
  if (!splat_is_real(s)) return false;
  const T k = T(kCutoffSigma);
  // Half extents of the ellipse {d : |L^-1 d| <= k}: k * sqrt(Sigma_xx), k * sqrt(Sigma_yy).
  const T rx = k * s[2];
  const T ry = k * std::sqrt(s[3] * s[3] + s[4] * s[4]);
  // Pixel j is touched iff |(j + 0.5) / W - x| <= rx.
  const T fx0 = std::ceil((s[0] - rx) * width - T(0.5));
  const T fx1 = std::floor((s[0] + rx) * width - T(0.5));
  const T fy0 = std::ceil((s[1] - ry) * height - T(0.5));
  const T fy1 = std::floor((s[1] + ry) * height - T(0.5));
  // Compare in floating point first: huge or non-finite splats must not overflow an int.
  if (!(fx1 >= T(0) && fy1 >= T(0) && fx0 <= T(width - 1) && fy0 <= T(height - 1))) return false;
  x0 = fx0 < T(0) ? 0 : int(fx0);
  y0 = fy0 < T(0) ? 0 : int(fy0);
  x1 = fx1 > T(width - 1) ? width - 1 : int(fx1);
  y1 = fy1 > T(height - 1) ? height - 1 : int(fy1);
  return x0 <= x1 && y0 <= y1;
}

SPLAT_HD float splat_exp(float v) {
#if defined(__CUDA_ARCH__)
  return __expf(v);
#else
  return std::exp(v);
#endif
}
SPLAT_HD double splat_exp(double v) {
#if defined(__CUDA_ARCH__)
  return ::exp(v);
#else
  return std::exp(v);
#endif
}

// What the per-pixel math needs of a splat, with the divisions done once per splat.
template <typename T>
struct SplatShape {
  T x, y, inv11, l21, inv22, r, g, b;
};

template <typename T>
SPLAT_HD SplatShape<T> splat_shape(const T* s) {
  return {s[0], s[1], T(1) / s[2], s[3], T(1) / s[4], s[5], s[6], s[7]};
}

// A splat prepared for walking its rows (the CPU kernels): its shape, its pixel bounding box
// and the constants of its row spans. On the row at vertical offset dy from the mean the cut-off
// ellipse is an interval of x: solving |L^-1 (p - mu)|^2 = k^2 for x gives centre x + cx dy and
// half width hx sqrt(k2a - dy^2), with A = l21^2 + l22^2, cx = l11 l21 / A, hx = l11 l22 / A,
// k2a = k^2 A. The divisions are done once per splat.
template <typename T>
struct SplatRows {
  SplatShape<T> s;
  T cx, hx, k2a;
  int x0, x1, y0, y1;
};

// False when the splat is padding, degenerate or entirely off the image.
template <typename T>
SPLAT_HD bool splat_rows(const T* raw, int height, int width, SplatRows<T>& w) {
  if (!splat_pixel_bbox(raw, height, width, w.x0, w.x1, w.y0, w.y1)) return false;
  w.s = splat_shape(raw);
  const T a = raw[3] * raw[3] + raw[4] * raw[4];
  const T inv_a = T(1) / a;
  w.cx = raw[2] * raw[3] * inv_a;
  w.hx = raw[2] * raw[4] * inv_a;
  w.k2a = T(kCutoffSigma) * T(kCutoffSigma) * a;
  return true;
}

// Columns [x0, x1] of the row at offset dy = py - y that can lie inside the cut-off ellipse,
// clipped to the bounding box. One pixel of slack on each side keeps rounding from dropping a
// pixel the weight test would keep. Returns false for an empty span.
template <typename T>
SPLAT_HD bool splat_row_span(const SplatRows<T>& w, T dy, int width, int& x0, int& x1) {
  const T q = w.k2a - dy * dy;
  const T centre = w.s.x + w.cx * dy;
  const T half = q > T(0) ? w.hx * std::sqrt(q) : T(0);
  const T lo = std::ceil((centre - half) * T(width) - T(0.5)) - T(1);
  const T hi = std::floor((centre + half) * T(width) - T(0.5)) + T(1);
  // Clamp before converting: a long sheared splat can put a row's span ~1e10 pixels away while
  // its bounding box crosses the image, and int() of that is undefined. NaN keeps the box.
  x0 = lo > T(w.x0) ? (lo <= T(w.x1) ? int(lo) : w.x1 + 1) : w.x0;
  x1 = hi < T(w.x1) ? (hi >= T(w.x0) ? int(hi) : w.x0 - 1) : w.x1;
  return x0 <= x1;
}

// Gaussian weight of the splat at (px, py), zero outside the cut-off ellipse; also returns the
// whitened offset z = L^-1 (p - mu) that the gradient needs. The Gaussian is exp(-|z|^2 / 2).
template <typename T>
SPLAT_HD T splat_weight(const SplatShape<T>& s, T px, T py, T& z1, T& z2) {
  z1 = (px - s.x) * s.inv11;
  z2 = (py - s.y - s.l21 * z1) * s.inv22;
  const T m2 = z1 * z1 + z2 * z2;
  const T k = T(kCutoffSigma);
  return m2 <= k * k ? splat_exp(T(-0.5) * m2) : T(0);
}

// Gradient of a splat's 8 channels, as named scalars so compilers keep them in registers.
template <typename T>
struct SplatGrad {
  T x = 0, y = 0, l11 = 0, l21 = 0, l22 = 0, r = 0, g = 0, b = 0;
  SPLAT_HD void operator+=(const SplatGrad& o) {
    x += o.x; y += o.y; l11 += o.l11; l21 += o.l21; l22 += o.l22; r += o.r; g += o.g; b += o.b;
  }
  SPLAT_HD void store(T* out) const {
    out[0] = x; out[1] = y; out[2] = l11; out[3] = l21; out[4] = l22; out[5] = r; out[6] = g;
    out[7] = b;
  }
};

// Adds the gradient of one pixel's contribution c * G(p) to grad, given the upstream gradient
// (gr, gg, gb) of that pixel's rgb. The weight G and z must come from splat_weight; a zero
// weight adds nothing, so callers need not branch on it.
template <typename T>
SPLAT_HD void splat_accumulate_grad(const SplatShape<T>& s, T weight, T z1, T z2, T gr, T gg,
                                    T gb, SplatGrad<T>& grad) {
  grad.r += gr * weight;
  grad.g += gg * weight;
  grad.b += gb * weight;
  // dLoss/dG, then dG/dz = -z G; dz/dparam from z1 = dx / l11, z2 = (dy - l21 z1) / l22.
  const T dG = (gr * s.r + gg * s.g + gb * s.b) * weight;
  // a = -dLoss/dz2 / l22 and b = -dLoss/dz1 once z2's dependence on z1 is folded in.
  const T a = dG * z2 * s.inv22;
  const T b = dG * z1 - a * s.l21;
  grad.x += b * s.inv11;
  grad.y += a;
  grad.l11 += b * z1 * s.inv11;
  grad.l21 += a * z1;
  grad.l22 += a * z2;
}

}  // namespace timm_splat
