// CPU kernels of the sparse (CSR) convolution (entry points and semantics:
// bdlkern/sparse_conv/kernels.h).
//
// Stride 1 (the common case) works on zero-padded planes with the output laid out at the padded
// row pitch: then every kept weight is ONE contiguous AXPY over the whole plane,
//   acc[q] += w * x_pad[q + shift],   shift = (a dil_d Hp + b dil_h) Wp + e dil_w,
// with no bounds and no per-row work (the few extra columns per row are computed and dropped).
// The taps' offsets are computed once per call; the AXPYs run in SIMD code picked at run time
// (AVX-512 / AVX2 / baseline, vec_math.h). Forward: output planes (image, output channel) in
// parallel, accumulated in an L1-sized buffer, then cropped into y (plus the bias). grad_input:
// images in parallel; the output gradient at the padded pitch is scattered by the same AXPYs
// into a padded input-gradient plane in a fixed order (deterministic for any thread count), then
// cropped. Other strides take a row-by-row path with per-row bounds.
#include <ATen/Parallel.h>

#include <bdlkern/sparse_conv/kernels.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "vec_math.h"

namespace bdlkern {
namespace {

struct Geometry {
  int64_t in_plane, out_plane, cin_g, cout_g;
};

Geometry geometry(const SparseConvParams& p) {
  return Geometry{p.in_size[0] * p.in_size[1] * p.in_size[2],
                  p.out_size[0] * p.out_size[1] * p.out_size[2], p.in_channels / p.groups,
                  p.out_channels / p.groups};
}

// The output positions [lo, hi) along depth, height and width that tap t reads inside the input.
struct TapRange {
  int64_t lo[3], hi[3];
};

TapRange tap_range(const SparseConvParams& p, const SparseConvTap& t) {
  TapRange r;
  const int64_t k[3] = {t.a, t.b, t.e};
  for (int d = 0; d < 3; ++d) {
    sparse_conv_range(p.in_size[d], p.out_size[d], k[d], p.stride[d], p.padding[d], p.dilation[d],
                      &r.lo[d], &r.hi[d]);
  }
  return r;
}

// dst[i] += w * f(src[i * stride]), i < n; f squares with kSquare.
template <typename T, bool kSquare>
inline void axpy_row(T w, const T* __restrict__ src, int64_t stride, T* __restrict__ dst,
                     int64_t n) {
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) dst[i] += w * (kSquare ? src[i] * src[i] : src[i]);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T v = src[i * stride];
      dst[i] += w * (kSquare ? v * v : v);
    }
  }
}

// Adds w * f(x_plane shifted by tap t) into out_plane.
template <typename T, bool kSquare>
void add_tap(const SparseConvParams& p, const SparseConvTap& t, T w, const T* x_plane,
             T* out_plane) {
  const TapRange r = tap_range(p, t);
  const int64_t d0 = r.lo[0], d1 = r.hi[0], h0 = r.lo[1], h1 = r.hi[1], w0 = r.lo[2], w1 = r.hi[2];
  if (w1 <= w0) return;
  const int64_t iw0 = w0 * p.stride[2] - p.padding[2] + t.e * p.dilation[2];
  for (int64_t od = d0; od < d1; ++od) {
    const int64_t id = od * p.stride[0] - p.padding[0] + t.a * p.dilation[0];
    for (int64_t oh = h0; oh < h1; ++oh) {
      const int64_t ih = oh * p.stride[1] - p.padding[1] + t.b * p.dilation[1];
      const T* src = x_plane + (id * p.in_size[1] + ih) * p.in_size[2] + iw0;
      T* dst = out_plane + (od * p.out_size[1] + oh) * p.out_size[2] + w0;
      axpy_row<T, kSquare>(w, src, p.stride[2], dst, w1 - w0);
    }
  }
}

template <typename T, bool kSquare>
void forward_typed(const SparseConvParams& p, const T* x, T* y) {
  const Geometry g = geometry(p);
  const T* values = static_cast<const T*>(p.values);
  const T* bias = static_cast<const T*>(p.bias);
  at::parallel_for(0, p.batch * p.out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.out_channels, o = item % p.out_channels;
      T* out = y + item * g.out_plane;
      std::fill(out, out + g.out_plane, bias != nullptr ? bias[o] : T(0));
      const T* x_group = x + (n * p.in_channels + (o / g.cout_g) * g.cin_g) * g.in_plane;
      for (int64_t j = p.crow[o]; j < p.crow[o + 1]; ++j) {
        const SparseConvTap t = sparse_conv_tap(p, p.col[j]);
        const T w = values[j * p.value_stride + p.value_offset];
        add_tap<T, kSquare>(p, t, w, x_group + t.channel * g.in_plane, out);
      }
    }
  });
}

// Adds w * g_plane into the shifted gx_plane (the transpose of add_tap).
template <typename T>
void add_tap_transposed(const SparseConvParams& p, const SparseConvTap& t, T w, const T* g_plane,
                        T* gx_plane) {
  const TapRange r = tap_range(p, t);
  const int64_t d0 = r.lo[0], d1 = r.hi[0], h0 = r.lo[1], h1 = r.hi[1], w0 = r.lo[2], w1 = r.hi[2];
  if (w1 <= w0) return;
  const int64_t iw0 = w0 * p.stride[2] - p.padding[2] + t.e * p.dilation[2];
  const int64_t sw = p.stride[2], n = w1 - w0;
  for (int64_t od = d0; od < d1; ++od) {
    const int64_t id = od * p.stride[0] - p.padding[0] + t.a * p.dilation[0];
    for (int64_t oh = h0; oh < h1; ++oh) {
      const int64_t ih = oh * p.stride[1] - p.padding[1] + t.b * p.dilation[1];
      const T* __restrict__ src = g_plane + (od * p.out_size[1] + oh) * p.out_size[2] + w0;
      T* __restrict__ dst = gx_plane + (id * p.in_size[1] + ih) * p.in_size[2] + iw0;
      if (sw == 1) {
        for (int64_t i = 0; i < n; ++i) dst[i] += w * src[i];
      } else {
        for (int64_t i = 0; i < n; ++i) dst[i * sw] += w * src[i];
      }
    }
  }
}

template <typename T>
void grad_input_typed(const SparseConvParams& p, const T* gy, T* gx) {
  const Geometry g = geometry(p);
  const T* values = static_cast<const T*>(p.values);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* gx_n = gx + n * p.in_channels * g.in_plane;
      std::fill(gx_n, gx_n + p.in_channels * g.in_plane, T(0));
      for (int64_t o = 0; o < p.out_channels; ++o) {
        const T* g_plane = gy + (n * p.out_channels + o) * g.out_plane;
        T* gx_group = gx_n + (o / g.cout_g) * g.cin_g * g.in_plane;
        for (int64_t j = p.crow[o]; j < p.crow[o + 1]; ++j) {
          const SparseConvTap t = sparse_conv_tap(p, p.col[j]);
          const T w = values[j * p.value_stride + p.value_offset];
          add_tap_transposed<T>(p, t, w, g_plane, gx_group + t.channel * g.in_plane);
        }
      }
    }
  });
}


// ---- stride 1: padded planes, one AXPY per kept weight ------------------------------------------
struct Padded {
  int64_t dp, hp, wp, plane;  // padded input sizes and plane size
  int64_t flat;               // output positions at the padded pitch: ((OD-1) Hp + OH-1) Wp + OW
  int64_t span;               // flat rounded up to whole 64-byte vectors (the AXPY length)
};

// The AXPYs run over `span` >= flat positions, whole vectors with no scalar tail; the positions
// past `flat` are computed and dropped. The padded buffers end in kSlack spare zeros so those reads
// (and, in the transpose, additions of zeros) stay inside them.
constexpr int64_t kSlack = 16;

Padded padded(const SparseConvParams& p) {
  Padded g;
  g.dp = p.in_size[0] + 2 * p.padding[0];
  g.hp = p.in_size[1] + 2 * p.padding[1];
  g.wp = p.in_size[2] + 2 * p.padding[2];
  g.plane = g.dp * g.hp * g.wp;
  g.flat = ((p.out_size[0] - 1) * g.hp + p.out_size[1] - 1) * g.wp + p.out_size[2];
  g.span = (g.flat + kSlack - 1) / kSlack * kSlack;
  return g;
}

bool unit_stride(const SparseConvParams& p) {
  return p.stride[0] == 1 && p.stride[1] == 1 && p.stride[2] == 1;
}

// A kept weight: its value and the offset of the padded input it reads (channel plane + shift).
template <typename T>
struct PaddedTap {
  int64_t offset;
  T w;
};

template <typename T>
std::vector<PaddedTap<T>> padded_taps(const SparseConvParams& p, const Padded& g) {
  const T* values = static_cast<const T*>(p.values);
  const int64_t nnz = p.crow[p.out_channels];
  std::vector<PaddedTap<T>> taps(static_cast<size_t>(nnz));
  for (int64_t j = 0; j < nnz; ++j) {
    const SparseConvTap t = sparse_conv_tap(p, p.col[j]);
    const int64_t shift =
        (t.a * p.dilation[0] * g.hp + t.b * p.dilation[1]) * g.wp + t.e * p.dilation[2];
    taps[j] = PaddedTap<T>{t.channel * g.plane + shift, values[j * p.value_stride + p.value_offset]};
  }
  return taps;
}

// 64-byte vectors of T as GCC vector types: one zmm under AVX-512, two ymm under AVX2, four xmm on
// the baseline (the SIMD_FUNCTION instances compile the same code for each). The loop vectoriser
// does not keep a register-blocked accumulator in registers across the taps, so the blocks are
// written with these types explicitly.
template <typename T>
struct Vec64 {
  typedef T type __attribute__((vector_size(64)));
  typedef T unaligned __attribute__((vector_size(64), aligned(alignof(T))));
  static constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));
};

template <typename T>
inline __attribute__((always_inline)) typename Vec64<T>::type load_v(const T* p) {
  return *reinterpret_cast<const typename Vec64<T>::unaligned*>(p);
}
template <typename T>
inline __attribute__((always_inline)) void store_v(T* p, typename Vec64<T>::type v) {
  *reinterpret_cast<typename Vec64<T>::unaligned*>(p) = v;
}

// acc[q0, q0 + K vectors) += w_j * f(base[offset_j + q]) for every tap, f squaring with kSquare:
// K vectors of the accumulator stay in registers while the taps are applied (a load and an FMA
// per vector and tap, no accumulator traffic); each element sums the taps in entry order.
template <typename T, bool kSquare, int K>
inline __attribute__((always_inline)) void gather_block(const PaddedTap<T>* taps, int64_t count,
                                                        const T* base, T* acc) {
  using V = typename Vec64<T>::type;
  constexpr int64_t L = Vec64<T>::kLanes;
  V a[K];
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) a[k] = load_v(acc + k * L);
  for (int64_t j = 0; j < count; ++j) {
    const V w = V{} + taps[j].w;
    const T* src = base + taps[j].offset;
#pragma GCC unroll 8
    for (int k = 0; k < K; ++k) {
      V v = load_v(src + k * L);
      if constexpr (kSquare) v *= v;
      a[k] += w * v;
    }
  }
#pragma GCC unroll 8
  for (int k = 0; k < K; ++k) store_v(acc + k * L, a[k]);
}

// acc[q] += w_j * f(base[offset_j + q]) for the taps [0, count), q < n: blocks of six vectors
// (a 3x3 conv on 16x16 planes at the padded pitch is 18 vectors: three blocks), then two, one, and
// a scalar tail (none when n is a whole number of vectors, as the callers arrange).
template <typename T, bool kSquare>
inline __attribute__((always_inline)) void gather_taps_body(const PaddedTap<T>* taps,
                                                            int64_t count, const T* base, T* acc,
                                                            int64_t n) {
  constexpr int64_t L = Vec64<T>::kLanes;
  int64_t q0 = 0;
  for (; q0 + 6 * L <= n; q0 += 6 * L) gather_block<T, kSquare, 6>(taps, count, base + q0, acc + q0);
  for (; q0 + 2 * L <= n; q0 += 2 * L) gather_block<T, kSquare, 2>(taps, count, base + q0, acc + q0);
  for (; q0 + L <= n; q0 += L) gather_block<T, kSquare, 1>(taps, count, base + q0, acc + q0);
  for (; q0 < n; ++q0) {
    T a = acc[q0];
    for (int64_t j = 0; j < count; ++j) {
      const T v = base[taps[j].offset + q0];
      a += taps[j].w * (kSquare ? v * v : v);
    }
    acc[q0] = a;
  }
}
// base[offset_j + q] += w_j * g[q] for the taps [0, count), q < n (the transpose): a block of g
// stays in registers while it is scattered through every tap.
template <typename T>
inline __attribute__((always_inline)) void scatter_taps_body(const PaddedTap<T>* taps,
                                                             int64_t count, const T* g, T* base,
                                                             int64_t n) {
  using V = typename Vec64<T>::type;
  constexpr int64_t L = Vec64<T>::kLanes;
  int64_t q0 = 0;
  for (; q0 + 2 * L <= n; q0 += 2 * L) {
    const V g0 = load_v(g + q0), g1 = load_v(g + q0 + L);
    for (int64_t j = 0; j < count; ++j) {
      const V w = V{} + taps[j].w;
      T* dst = base + taps[j].offset + q0;
      store_v(dst, load_v(dst) + w * g0);
      store_v(dst + L, load_v(dst + L) + w * g1);
    }
  }
  for (; q0 < n; ++q0) {
    for (int64_t j = 0; j < count; ++j) base[taps[j].offset + q0] += taps[j].w * g[q0];
  }
}

BDLKERN_SIMD_FUNCTION(void, gather_taps_f32,
                      (const PaddedTap<float>* taps, int64_t count, const float* base, float* acc,
                       int64_t n),
                      (gather_taps_body<float, false>), (taps, count, base, acc, n))
BDLKERN_SIMD_FUNCTION(void, gather_taps_sq_f32,
                      (const PaddedTap<float>* taps, int64_t count, const float* base, float* acc,
                       int64_t n),
                      (gather_taps_body<float, true>), (taps, count, base, acc, n))
BDLKERN_SIMD_FUNCTION(void, gather_taps_f64,
                      (const PaddedTap<double>* taps, int64_t count, const double* base,
                       double* acc, int64_t n),
                      (gather_taps_body<double, false>), (taps, count, base, acc, n))
BDLKERN_SIMD_FUNCTION(void, gather_taps_sq_f64,
                      (const PaddedTap<double>* taps, int64_t count, const double* base,
                       double* acc, int64_t n),
                      (gather_taps_body<double, true>), (taps, count, base, acc, n))
BDLKERN_SIMD_FUNCTION(void, scatter_taps_f32,
                      (const PaddedTap<float>* taps, int64_t count, const float* g, float* base,
                       int64_t n),
                      scatter_taps_body<float>, (taps, count, g, base, n))
BDLKERN_SIMD_FUNCTION(void, scatter_taps_f64,
                      (const PaddedTap<double>* taps, int64_t count, const double* g,
                       double* base, int64_t n),
                      scatter_taps_body<double>, (taps, count, g, base, n))

template <typename T, bool kSquare>
void gather_taps(const PaddedTap<T>* taps, int64_t count, const T* base, T* acc, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    (kSquare ? gather_taps_sq_f32 : gather_taps_f32)(taps, count, base, acc, n);
  } else {
    (kSquare ? gather_taps_sq_f64 : gather_taps_f64)(taps, count, base, acc, n);
  }
}

template <typename T>
void scatter_taps(const PaddedTap<T>* taps, int64_t count, const T* g, T* base, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    scatter_taps_f32(taps, count, g, base, n);
  } else {
    scatter_taps_f64(taps, count, g, base, n);
  }
}

// x [B, C, D, H, W] into the zero-padded xp [B, C, Dp, Hp, Wp].
template <typename T>
void pad_input(const SparseConvParams& p, const Padded& g, const T* x, T* xp) {
  const int64_t in_plane = p.in_size[0] * p.in_size[1] * p.in_size[2];
  at::parallel_for(0, p.batch * p.in_channels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t pl = begin; pl < end; ++pl) {
      T* dst = xp + pl * g.plane;
      std::fill(dst, dst + g.plane, T(0));
      const T* src = x + pl * in_plane;
      for (int64_t d = 0; d < p.in_size[0]; ++d) {
        for (int64_t h = 0; h < p.in_size[1]; ++h) {
          const T* row = src + (d * p.in_size[1] + h) * p.in_size[2];
          T* out = dst + ((d + p.padding[0]) * g.hp + h + p.padding[1]) * g.wp + p.padding[2];
          std::copy(row, row + p.in_size[2], out);
        }
      }
    }
  });
}

template <typename T, bool kSquare>
void forward_padded(const SparseConvParams& p, const T* x, T* y) {
  const Geometry geo = geometry(p);
  const Padded g = padded(p);
  // Not value-initialised: pad_input writes every plane (zeros and the input), the slack is zeroed
  // here; a zero-filled vector would write the whole buffer twice.
  const int64_t padded_size = p.batch * p.in_channels * g.plane;
  std::unique_ptr<T[]> xp_buffer(new T[static_cast<size_t>(padded_size + kSlack)]);
  T* const xp = xp_buffer.get();
  std::fill(xp + padded_size, xp + padded_size + kSlack, T(0));
  pad_input(p, g, x, xp);
  const std::vector<PaddedTap<T>> taps = padded_taps<T>(p, g);
  const T* bias = static_cast<const T*>(p.bias);
  at::parallel_for(0, p.batch * p.out_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(static_cast<size_t>(g.span));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / p.out_channels, o = item % p.out_channels;
      std::fill(acc.begin(), acc.end(), T(0));
      const T* base = xp + (n * p.in_channels + (o / geo.cout_g) * geo.cin_g) * g.plane;
      gather_taps<T, kSquare>(taps.data() + p.crow[o], p.crow[o + 1] - p.crow[o], base,
                              acc.data(), g.span);
      T* out = y + item * geo.out_plane;
      const T b = bias != nullptr ? bias[o] : T(0);
      for (int64_t d = 0; d < p.out_size[0]; ++d) {
        for (int64_t h = 0; h < p.out_size[1]; ++h) {
          const T* src = acc.data() + (d * g.hp + h) * g.wp;
          T* dst = out + (d * p.out_size[1] + h) * p.out_size[2];
          for (int64_t w = 0; w < p.out_size[2]; ++w) dst[w] = src[w] + b;
        }
      }
    }
  });
}

template <typename T>
void grad_input_padded(const SparseConvParams& p, const T* gy, T* gx) {
  const Geometry geo = geometry(p);
  const Padded g = padded(p);
  const std::vector<PaddedTap<T>> taps = padded_taps<T>(p, g);
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> gw(static_cast<size_t>(g.span));  // one output-gradient plane at the pitch
    std::vector<T> gxp(static_cast<size_t>(p.in_channels * g.plane + kSlack));
    for (int64_t n = begin; n < end; ++n) {
      std::fill(gxp.begin(), gxp.end(), T(0));
      for (int64_t o = 0; o < p.out_channels; ++o) {
        const T* src = gy + (n * p.out_channels + o) * geo.out_plane;
        std::fill(gw.begin(), gw.end(), T(0));
        for (int64_t d = 0; d < p.out_size[0]; ++d) {
          for (int64_t h = 0; h < p.out_size[1]; ++h) {
            const T* row = src + (d * p.out_size[1] + h) * p.out_size[2];
            std::copy(row, row + p.out_size[2], gw.data() + (d * g.hp + h) * g.wp);
          }
        }
        T* base = gxp.data() + (o / geo.cout_g) * geo.cin_g * g.plane;
        scatter_taps<T>(taps.data() + p.crow[o], p.crow[o + 1] - p.crow[o], gw.data(), base,
                        g.span);
      }
      for (int64_t c = 0; c < p.in_channels; ++c) {
        const T* plane = gxp.data() + c * g.plane;
        T* dst = gx + (n * p.in_channels + c) * geo.in_plane;
        for (int64_t d = 0; d < p.in_size[0]; ++d) {
          for (int64_t h = 0; h < p.in_size[1]; ++h) {
            const T* row = plane + ((d + p.padding[0]) * g.hp + h + p.padding[1]) * g.wp + p.padding[2];
            std::copy(row, row + p.in_size[2], dst + (d * p.in_size[1] + h) * p.in_size[2]);
          }
        }
      }
    }
  });
}

}  // namespace

void sparse_conv_forward(CpuTag, const SparseConvParams& p, const void* x, void* y) {
  if (p.batch == 0 || p.out_channels == 0) return;
  const bool fast = unit_stride(p);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* xt = static_cast<const T*>(x);
    T* yt = static_cast<T*>(y);
    if (fast) {
      return p.square_input ? forward_padded<T, true>(p, xt, yt) : forward_padded<T, false>(p, xt, yt);
    }
    return p.square_input ? forward_typed<T, true>(p, xt, yt) : forward_typed<T, false>(p, xt, yt);
  };
  if (p.dtype == DType::kFloat64) return run(static_cast<double*>(nullptr));
  if (p.dtype == DType::kFloat32) return run(static_cast<float*>(nullptr));
  throw std::invalid_argument("sparse_conv: float32 or float64 only");
}

void sparse_conv_grad_input(CpuTag, const SparseConvParams& p, const void* grad_y, void* grad_x) {
  if (p.batch == 0 || p.in_channels == 0) return;
  const bool fast = unit_stride(p);
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const T* g = static_cast<const T*>(grad_y);
    T* gx = static_cast<T*>(grad_x);
    return fast ? grad_input_padded<T>(p, g, gx) : grad_input_typed<T>(p, g, gx);
  };
  if (p.dtype == DType::kFloat64) return run(static_cast<double*>(nullptr));
  if (p.dtype == DType::kFloat32) return run(static_cast<float*>(nullptr));
  throw std::invalid_argument("sparse_conv: float32 or float64 only");
}

}  // namespace bdlkern
