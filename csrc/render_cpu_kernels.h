// The CPU kernels' loops, compiled once per instruction set: render_cpu.cpp includes this file
// in a namespace per ISA (plain x86-64 / aarch64, AVX2 + FMA and AVX-512 under target pragmas)
// and picks one at run time. No include guard on purpose; everything here is in that namespace.
//
// Splats are walked row by row over the span of columns their cut-off ellipse covers on that row
// (SplatRows in splat_math.h), a chunk of kLanes pixels at a time in SIMD registers (GCC / Clang
// vector extensions; a target without SIMD lowers them to scalar code), lanes past the span
// masked to weight 0. The math is splat_math.h's (the same z, cut-off and gradient formulas),
// arranged so that only the chunk loop runs per pixel.

// Pixels per chunk: one SIMD register (TIMM_SPLAT_VEC_BYTES wide, set by the includer).
template <typename T>
constexpr int kLanes = TIMM_SPLAT_VEC_BYTES / sizeof(T);

template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float type __attribute__((vector_size(TIMM_SPLAT_VEC_BYTES)));
};
template <>
struct Simd<double> {
  typedef double type __attribute__((vector_size(TIMM_SPLAT_VEC_BYTES)));
};
template <typename T>
using vec = typename Simd<T>::type;
typedef int32_t vec_i32 __attribute__((vector_size(TIMM_SPLAT_VEC_BYTES)));

template <typename T>
inline vec<T> splat_vec(T x) {
  return vec<T>{} + x;
}

template <typename T>
inline vec<T> lane_index() {
  vec<T> v;
  for (int l = 0; l < kLanes<T>; ++l) v[l] = T(l);
  return v;
}

template <typename T>
inline vec<T> load(const T* p) {
  vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, vec<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// exp(v), v <= 0, float32: Cody-Waite reduction v = n ln2 + r (|r| <= ln2 / 2), Cephes' expf
// polynomial for e^r, 2^n written into the exponent bits. Inputs below -87 are clamped to -87
// (results ~1.6e-38 instead of smaller: the renderer cuts everything below -4.5 off anyway).
// Relative error against the exact exponential: at most 1.2e-7 (about one float32 ulp;
// measured 7.0e-8 with and without FMA), checked on ~60000 arguments in [-4.5, 0] by
// tests/test_render.py::test_fast_exp_error_bound through the renderer.
inline vec<float> exp_nonpositive(vec<float> v) {
  v = v < -87.0f ? splat_vec(-87.0f) : v;
  // n = round(v / ln2): truncating t - 0.5 rounds to nearest for t <= 0.
  const vec_i32 n = __builtin_convertvector(v * 1.44269504088896341f - 0.5f, vec_i32);
  const vec<float> nf = __builtin_convertvector(n, vec<float>);
  // ln2 = C1 - C2 with C1 exact in 9 bits, so n * C1 is exact.
  vec<float> r = v - nf * 0.693359375f;
  r = r + nf * 2.12194440e-4f;
  const vec<float> r2 = r * r;
  vec<float> p = splat_vec(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const vec<float> e = p * r2 + r + 1.0f;
  const vec_i32 bits = (n + 127) << 23;  // 2^n, n in [-126, 0]
  return e * (vec<float>)bits;
}

// float64 keeps libm's exp: it is the path the tests hold to 1e-10 of the reference.
inline vec<double> exp_nonpositive(vec<double> v) {
  for (int l = 0; l < kLanes<double>; ++l) v[l] = std::exp(v[l]);
  return v;
}

// What a chunk of one row needs: px - x = column * inv_w + e0, and c2 = py - y.
template <typename T>
struct RowState {
  T inv_w, e0, c2;
};

// Weights (splat_weight: z, the cut-off, the Gaussian) of pixels xs .. xs + kLanes - 1 of a row,
// zero in lanes past `last` (= span end - xs).
template <typename T>
inline vec<T> chunk_weights(const SplatShape<T>& s, const RowState<T>& row, int xs, int last,
                            vec<T>& z1, vec<T>& z2) {
  const vec<T> lanes = lane_index<T>();
  z1 = ((lanes + T(xs)) * row.inv_w + row.e0) * s.inv11;
  z2 = (row.c2 - s.l21 * z1) * s.inv22;
  const vec<T> m2 = z1 * z1 + z2 * z2;
  const vec<T> e = exp_nonpositive(T(-0.5) * m2);
  const T k2 = T(kCutoffSigma) * T(kCutoffSigma);
  return (m2 <= k2 && lanes <= T(last)) ? e : vec<T>{};
}

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

// One image's splats prepared, and the ones touching each band of rows as CSR
// (offsets[band] .. offsets[band + 1] in ids, in splat order).
template <typename T>
struct ImageBins {
  std::vector<SplatRows<T>> walkers;
  std::vector<int64_t> offsets;
  std::vector<int32_t> ids;
};

template <typename T>
void bin_splats(const T* splats, int64_t n, int height, int width, int bands, ImageBins<T>& bins) {
  bins.walkers.resize(n);
  bins.offsets.assign(bands + 1, 0);
  std::vector<int32_t> live;
  live.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    SplatRows<T>& w = bins.walkers[i];
    if (!splat_rows(splats + i * kSplatChannels, height, width, w)) continue;
    live.push_back(int32_t(i));
    for (int band = w.y0 / kBandRows; band <= w.y1 / kBandRows; ++band) bins.offsets[band + 1]++;
  }
  for (int band = 0; band < bands; ++band) bins.offsets[band + 1] += bins.offsets[band];
  bins.ids.resize(bins.offsets.back());
  std::vector<int64_t> fill(bins.offsets.begin(), bins.offsets.end() - 1);
  for (int32_t i : live) {
    const SplatRows<T>& w = bins.walkers[i];
    for (int band = w.y0 / kBandRows; band <= w.y1 / kBandRows; ++band) bins.ids[fill[band]++] = i;
  }
}

// Adds one splat's rows [y0, y1] into the image's three planes.
template <typename T>
void add_splat_rows(const SplatRows<T>& walker, int y0, int y1, int height, int width,
                    int64_t plane, T* image) {
  // Local copies: stores into the image (also T*) could alias the walker's fields otherwise,
  // and the compiler would reload every constant after every store.
  const SplatShape<T> s = walker.s;
  RowState<T> row{T(1) / T(width), T(0), T(0)};
  row.e0 = T(0.5) * row.inv_w - s.x;
  for (int y = y0; y <= y1; ++y) {
    row.c2 = (T(y) + T(0.5)) / T(height) - s.y;
    int x0, x1;
    if (!splat_row_span(walker, row.c2, width, x0, x1)) continue;
    T* r = image + int64_t(y) * width;
    T* g = r + plane;
    T* b = g + plane;
    for (int xs = x0; xs <= x1; xs += kLanes<T>) {
      vec<T> z1, z2;
      const vec<T> w = chunk_weights(s, row, xs, x1 - xs, z1, z2);
      if (xs + kLanes<T> <= width) {  // the whole chunk lies in the row: masked lanes add 0
        store(r + xs, load(r + xs) + w * s.r);
        store(g + xs, load(g + xs) + w * s.g);
        store(b + xs, load(b + xs) + w * s.b);
      } else {
        for (int l = 0; l <= x1 - xs; ++l) {
          r[xs + l] += w[l] * s.r;
          g[xs + l] += w[l] * s.g;
          b[xs + l] += w[l] * s.b;
        }
      }
    }
  }
}

// One work item per band of kBandRows rows of one image: it zeroes its rows, then adds the rows
// of the band's splats in splat order, so each pixel has one writer and a fixed sum order.
template <typename T>
void forward_kernel(const T* splats, T* out, int64_t batch, int64_t n, int height, int width) {
  const int bands = (height + kBandRows - 1) / kBandRows;
  const int64_t plane = int64_t(height) * width;
  std::vector<ImageBins<T>> bins(batch);
  parallel_dynamic(batch, [&](int64_t b) {
    bin_splats(splats + b * n * kSplatChannels, n, height, width, bands, bins[b]);
  });
  parallel_dynamic(batch * bands, [&](int64_t job) {
    const int64_t b = job / bands;
    const int band = int(job % bands);
    const int by0 = band * kBandRows, by1 = std::min(height, by0 + kBandRows) - 1;
    T* image = out + b * 3 * plane;
    for (int c = 0; c < 3; ++c)
      std::fill(image + c * plane + int64_t(by0) * width,
                image + c * plane + int64_t(by1 + 1) * width, T(0));
    const ImageBins<T>& bin = bins[b];
    for (int64_t k = bin.offsets[band]; k < bin.offsets[band + 1]; ++k) {
      const SplatRows<T>& w = bin.walkers[bin.ids[k]];
      add_splat_rows(w, std::max(w.y0, by0), std::min(w.y1, by1), height, width, plane, image);
    }
  });
}

// The gradient of one splat: splat_accumulate_grad summed over its pixels, with the per-splat
// factors taken out of the sum. Per pixel only dG = (grad_out . colour) G, the moments dG z2,
// dG z1, dG z1^2, dG z1 z2, dG z2^2 and grad_out G are summed (lane-wise); the chain rule
// through z1 = (px - x) / l11, z2 = (py - y - l21 z1) / l22 is applied once at the end.
template <typename T>
void splat_gradient(const T* raw, const T* grad_image, int height, int width, int64_t plane,
                    T* grad_out) {
  SplatRows<T> walker;
  if (!splat_rows(raw, height, width, walker)) {
    std::fill(grad_out, grad_out + kSplatChannels, T(0));
    return;
  }
  const SplatShape<T>& s = walker.s;
  RowState<T> row{T(1) / T(width), T(0), T(0)};
  row.e0 = T(0.5) * row.inv_w - s.x;
  vec<T> m_z2{}, m_z1{}, m_z1z1{}, m_z2z1{}, m_z2z2{}, c_r{}, c_g{}, c_b{};
  for (int y = walker.y0; y <= walker.y1; ++y) {
    row.c2 = (T(y) + T(0.5)) / T(height) - s.y;
    int x0, x1;
    if (!splat_row_span(walker, row.c2, width, x0, x1)) continue;
    const T* gr = grad_image + int64_t(y) * width;
    const T* gg = gr + plane;
    const T* gb = gg + plane;
    for (int xs = x0; xs <= x1; xs += kLanes<T>) {
      vec<T> z1, z2;
      const vec<T> w = chunk_weights(s, row, xs, x1 - xs, z1, z2);
      vec<T> r, g, b;
      if (xs + kLanes<T> <= width) {  // masked lanes have weight 0 and add nothing
        r = load(gr + xs);
        g = load(gg + xs);
        b = load(gb + xs);
      } else {
        r = g = b = vec<T>{};
        for (int l = 0; l < width - xs; ++l) {
          r[l] = gr[xs + l];
          g[l] = gg[xs + l];
          b[l] = gb[xs + l];
        }
      }
      const vec<T> dg = (r * s.r + g * s.g + b * s.b) * w;
      const vec<T> t1 = dg * z1, t2 = dg * z2;
      m_z2 += t2;
      m_z1 += t1;
      m_z1z1 += t1 * z1;
      m_z2z1 += t2 * z1;
      m_z2z2 += t2 * z2;
      c_r += r * w;
      c_g += g * w;
      c_b += b * w;
    }
  }
  auto total = [](vec<T> v) {
    T sum = T(0);
    for (int l = 0; l < kLanes<T>; ++l) sum += v[l];
    return sum;
  };
  // splat_accumulate_grad per pixel: a = dG z2 / l22, b = dG z1 - l21 a; x += b / l11, y += a,
  // l11 += b z1 / l11, l21 += a z1, l22 += a z2.
  const T shear = s.l21 * s.inv22;
  const T sz2 = total(m_z2), sz2z1 = total(m_z2z1);
  SplatGrad<T> grad;
  grad.x = s.inv11 * (total(m_z1) - shear * sz2);
  grad.y = s.inv22 * sz2;
  grad.l11 = s.inv11 * (total(m_z1z1) - shear * sz2z1);
  grad.l21 = s.inv22 * sz2z1;
  grad.l22 = s.inv22 * total(m_z2z2);
  grad.r = total(c_r);
  grad.g = total(c_g);
  grad.b = total(c_b);
  grad.store(grad_out);
}

// Each splat walks the pixels of its own bounding box: every gradient has one writer, so no
// atomics and no per-thread buffers are needed.
template <typename T>
void backward_kernel(const T* splats, const T* grad_image, T* grad_splats, int64_t batch,
                     int64_t n, int height, int width) {
  const int64_t plane = int64_t(height) * width;
  parallel_dynamic(batch * n, [&](int64_t job) {
    splat_gradient(splats + job * kSplatChannels, grad_image + job / n * 3 * plane, height,
                   width, plane, grad_splats + job * kSplatChannels);
  });
}
