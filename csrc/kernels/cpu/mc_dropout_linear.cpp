// CPU mask passes of the fused multi-sample MC-dropout linear layer (entry points and semantics:
// bdlkern/mc_dropout/kernels.h).
//
// The masked input never exists as an [S, B, K] tensor: the binding (csrc/torch/mc_dropout_cpu.cpp)
// walks the rows in cache-sized chunks and calls these passes to build each chunk's masked copy in
// one reused buffer, straight from the Philox stream (parallel over rows, SIMD Philox, a vectorised
// select), before one multi-threaded GEMM per chunk. Backward re-makes the same chunks from
// rng_state. With shared masks the kept features of a sample are gathered first, so the GEMMs run
// over about (1 - p) K columns.
//
// The per-element mask words of flattened row r are stream elements [r K, r K + K): a chunk of
// consecutive rows is a contiguous piece of the stream (masks.h).
#include <ATen/Parallel.h>

#include <bdlkern/mc_dropout/kernels.h>
#include <bdlkern/rng/masks.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "mask_select.h"
#include "philox_simd.h"
#include "vec_math.h"

namespace bdlkern {
namespace {

using cpu::apply_mask;
using cpu::stream_words;

constexpr int64_t kRowGrain = 4;       // rows per parallel task
constexpr int64_t kColumnGrain = 256;  // columns per task when reducing over samples

MCDropoutMask make_mask(const MCDropoutLinearParams& p) {
  return MCDropoutMask{make_stream(p.rng_state, kStreamMCDropout), p.threshold, p.rows,
                       p.in_features, p.shared_mask};
}

// Input row of flattened row r.
template <typename T>
const T* input_row(const T* x, const MCDropoutLinearParams& p, int64_t r) {
  const int64_t row = p.shared_input ? r % p.rows : r;
  return x + row * p.in_features;
}

template <typename T>
void mask_rows(const MCDropoutLinearParams& p, const T* x, int64_t r0, int64_t count, T* out) {
  const MCDropoutMask mask = make_mask(p);
  const int64_t K = p.in_features;
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(static_cast<size_t>(K));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = r0 + i;
      stream_words(mask.stream, mask.index(r / p.rows, r % p.rows, 0), K, words.data());
      apply_mask(input_row(x, p, r), words.data(), mask.threshold, scale, out + i * K, K);
    }
  });
}

// Split the columns, walk the rows in ascending order: a fixed accumulation order for every
// element, whatever the thread count.
template <typename T>
void mask_accumulate_rows(const MCDropoutLinearParams& p, const T* d, int64_t r0, int64_t count,
                          T* grad_x) {
  const MCDropoutMask mask = make_mask(p);
  const int64_t K = p.in_features, B = p.rows;
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, K, kColumnGrain, [&](int64_t k0, int64_t k1) {
    std::vector<uint32_t> words(static_cast<size_t>(k1 - k0));
    std::vector<T> masked(static_cast<size_t>(k1 - k0));
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = r0 + i;
      stream_words(mask.stream, mask.index(r / B, r % B, k0), k1 - k0, words.data());
      apply_mask(d + i * K + k0, words.data(), mask.threshold, scale, masked.data(), k1 - k0);
      T* dst = grad_x + (r % B) * K + k0;
      for (int64_t k = 0; k < k1 - k0; ++k) dst[k] += masked[static_cast<size_t>(k)];
    }
  });
}

template <typename T>
void gather_kept(const MCDropoutLinearParams& p, const T* x, int64_t s, int64_t b0, int64_t count,
                 const int64_t* kept, int64_t nk, bool ones_column, T* out) {
  const int64_t width = nk + (ones_column ? 1 : 0);
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = input_row(x, p, s * p.rows + b0 + i);
      T* dst = out + i * width;
      for (int64_t j = 0; j < nk; ++j) dst[j] = row[kept[j]] * scale;
      if (ones_column) dst[nk] = T(1);
    }
  });
}

template <typename T>
void scatter_kept(const MCDropoutLinearParams& p, const T* d, int64_t s, int64_t b0, int64_t count,
                  const int64_t* kept, int64_t nk, T* grad_x) {
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = b0 + i;
      T* dst = grad_x + (p.shared_input ? b : s * p.rows + b) * p.in_features;
      for (int64_t j = 0; j < nk; ++j) dst[kept[j]] += d[i * nk + j] * scale;
    }
  });
}

// ---- small problems: the whole op in one pass ------------------------------------------------------
// Below a few tens of thousands of multiply-adds the GEMM path's fixed costs (buffers, views, the
// BLAS call) outweigh its arithmetic, so these kernels do everything in one single-threaded pass:
// for each flattened row, make its mask words, apply them, and accumulate with AXPYs over a
// contiguous dimension (which the compiler vectorises without reassociating anything). Every sum
// runs in a fixed order (rows ascending, then the reduction index ascending): deterministic.

// out[:cols] += sum_i v[i] m[i, :cols] (m row-major [rows, cols]), i ascending.
template <typename T>
inline __attribute__((always_inline)) void vec_mat_body(const T* __restrict__ v, const T* __restrict__ m, int64_t rows,
                                                      int64_t cols, T* __restrict__ out) {
  for (int64_t i = 0; i < rows; ++i) {
    const T a = v[i];
    const T* __restrict__ mi = m + i * cols;
    for (int64_t j = 0; j < cols; ++j) out[j] += a * mi[j];
  }
}
// m[i, :cols] += u[i] v[:cols] for i < rows.
template <typename T>
inline __attribute__((always_inline)) void rank1_body(const T* __restrict__ u, const T* __restrict__ v, int64_t rows,
                               int64_t cols, T* __restrict__ m) {
  for (int64_t i = 0; i < rows; ++i) {
    const T a = u[i];
    T* __restrict__ mi = m + i * cols;
    for (int64_t j = 0; j < cols; ++j) mi[j] += a * v[j];
  }
}
// Compiled for the baseline, AVX2 and AVX-512 and picked at run time. No FMA contraction (ISO
// C++ mode): every path rounds the product and the sum separately, so all give the same bits.
#define BDL_SMALL_PARAMS(T) (const T* a, const T* b, int64_t rows, int64_t cols, T* out)
BDLKERN_SIMD_FUNCTION(void, vec_mat_f32, BDL_SMALL_PARAMS(float), vec_mat_body<float>, (a, b, rows, cols, out))
BDLKERN_SIMD_FUNCTION(void, vec_mat_f64, BDL_SMALL_PARAMS(double), vec_mat_body<double>, (a, b, rows, cols, out))
BDLKERN_SIMD_FUNCTION(void, rank1_f32, BDL_SMALL_PARAMS(float), rank1_body<float>, (a, b, rows, cols, out))
BDLKERN_SIMD_FUNCTION(void, rank1_f64, BDL_SMALL_PARAMS(double), rank1_body<double>, (a, b, rows, cols, out))
#undef BDL_SMALL_PARAMS

void vec_mat(const float* v, const float* m, int64_t rows, int64_t cols, float* out) {
  vec_mat_f32(v, m, rows, cols, out);
}
void vec_mat(const double* v, const double* m, int64_t rows, int64_t cols, double* out) {
  vec_mat_f64(v, m, rows, cols, out);
}
void rank1(const float* u, const float* v, int64_t rows, int64_t cols, float* m) {
  rank1_f32(u, v, rows, cols, m);
}
void rank1(const double* u, const double* v, int64_t rows, int64_t cols, double* m) {
  rank1_f64(u, v, rows, cols, m);
}

// The mask words of every row at once: rows are consecutive pieces of the stream (per-element
// masks: R K words from 0; shared masks: S K words, row r using sample r / B's). One call keeps the
// SIMD Philox batches full, where a call per short row would waste most of each batch.
struct SmallMaskWords {
  std::vector<uint32_t> words;
  int64_t K, B;
  bool shared;
  SmallMaskWords(const MCDropoutLinearParams& p, const MCDropoutMask& mask)
      : K(p.in_features), B(p.rows), shared(p.shared_mask) {
    const int64_t rows = shared ? p.num_samples : p.num_samples * p.rows;
    words.resize(static_cast<size_t>(rows * K));
    stream_words(mask.stream, mask.index(0, 0, 0), rows * K, words.data());
  }
  const uint32_t* row(int64_t r) const { return words.data() + (shared ? r / B : r) * K; }
};

// y[r, :] = bias + sum_k xm[r, k] W^T[k, :] (W^T made once per call).
template <typename T>
void forward_small(const MCDropoutLinearParams& p, const T* x, const T* w, const T* bias,
                   T* __restrict__ y) {
  const MCDropoutMask mask = make_mask(p);
  const SmallMaskWords words(p, mask);
  const int64_t K = p.in_features, N = p.out_features, R = p.num_samples * p.rows;
  const T scale = static_cast<T>(p.scale);
  std::vector<T> wt_buf(static_cast<size_t>(K * N));
  T* wt = wt_buf.data();
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t k = 0; k < K; ++k) wt[k * N + n] = w[n * K + k];
  }
  std::vector<T> xm(static_cast<size_t>(K));
  for (int64_t r = 0; r < R; ++r) {
    apply_mask(input_row(x, p, r), words.row(r), mask.threshold, scale, xm.data(), K);
    T* out = y + r * N;
    if (bias != nullptr) {
      std::copy(bias, bias + N, out);
    } else {
      std::fill(out, out + N, T(0));
    }
    vec_mat(xm.data(), wt, K, N, out);
  }
}

// grad_x[row(r), :] (+)= mask(r) * scale * sum_n dY[r, n] W[n, :].
template <typename T>
void grad_input_small(const MCDropoutLinearParams& p, const T* gy, const T* w, T* __restrict__ gx) {
  const MCDropoutMask mask = make_mask(p);
  const SmallMaskWords words(p, mask);
  const int64_t K = p.in_features, N = p.out_features, B = p.rows, R = p.num_samples * B;
  const T scale = static_cast<T>(p.scale);
  if (p.shared_input) std::fill(gx, gx + B * K, T(0));
  std::vector<T> acc_buf(static_cast<size_t>(K));
  T* __restrict__ acc = acc_buf.data();
  for (int64_t r = 0; r < R; ++r) {
    std::fill(acc, acc + K, T(0));
    vec_mat(gy + r * N, w, N, K, acc);
    if (p.shared_input) {  // summed over the samples, in ascending s for every row
      T* __restrict__ dst = gx + (r % B) * K;
      apply_mask(acc, words.row(r), mask.threshold, scale, acc, K);
      for (int64_t k = 0; k < K; ++k) dst[k] += acc[k];
    } else {
      apply_mask(acc, words.row(r), mask.threshold, scale, gx + r * K, K);
    }
  }
}

// grad_w[n, :] = sum_r dY[r, n] xm[r, :]. The AXPYs run along the longer of K and N: along K
// straight into grad_w, or along N into grad_w^T, transposed at the end (an AXPY of 13 floats
// would leave AVX-512 all tail).
template <typename T>
void grad_weight_small(const MCDropoutLinearParams& p, const T* gy, const T* x, T* __restrict__ gw) {
  const MCDropoutMask mask = make_mask(p);
  const SmallMaskWords words(p, mask);
  const int64_t K = p.in_features, N = p.out_features, R = p.num_samples * p.rows;
  const T scale = static_cast<T>(p.scale);
  const bool along_n = N > K;
  std::vector<T> acc_buf(along_n ? static_cast<size_t>(K * N) : 0);
  T* acc = along_n ? acc_buf.data() : gw;  // [K, N] or [N, K]
  std::fill(acc, acc + N * K, T(0));
  std::vector<T> xm_buf(static_cast<size_t>(K));
  T* __restrict__ xm = xm_buf.data();
  for (int64_t r = 0; r < R; ++r) {
    apply_mask(input_row(x, p, r), words.row(r), mask.threshold, scale, xm, K);
    if (along_n) {
      rank1(xm, gy + r * N, K, N, acc);  // grad_w^T[k, :] += xm[k] dY[r, :]
    } else {
      rank1(gy + r * N, xm, N, K, acc);  // grad_w[n, :] += dY[r, n] xm
    }
  }
  if (along_n) {
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t k = 0; k < K; ++k) gw[n * K + k] = acc[k * N + n];
    }
  }
}

// Calls fn with a typed null pointer of p.dtype's element type (float or double).
template <class Fn>
void dispatch(const MCDropoutLinearParams& p, const char* pass, Fn&& fn) {
  switch (p.dtype) {
    case DType::kFloat32:
      return fn(static_cast<float*>(nullptr));
    case DType::kFloat64:
      return fn(static_cast<double*>(nullptr));
    default:
      throw std::invalid_argument(std::string(pass) + ": the CPU passes run in float32 or float64");
  }
}

}  // namespace

void mc_dropout_linear_forward(CpuTag, const MCDropoutLinearParams& p, const void* x,
                               const void* weight, const void* bias, void* y) {
  dispatch(p, "mc_dropout_linear_forward", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    forward_small<T>(p, static_cast<const T*>(x), static_cast<const T*>(weight),
                     static_cast<const T*>(bias), static_cast<T*>(y));
  });
}

void mc_dropout_linear_grad_input(CpuTag, const MCDropoutLinearParams& p, const void* grad_y,
                                  const void* weight, void* grad_x) {
  dispatch(p, "mc_dropout_linear_grad_input", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    grad_input_small<T>(p, static_cast<const T*>(grad_y), static_cast<const T*>(weight),
                        static_cast<T*>(grad_x));
  });
}

void mc_dropout_linear_grad_weight(CpuTag, const MCDropoutLinearParams& p, const void* grad_y,
                                   const void* x, void* grad_w) {
  dispatch(p, "mc_dropout_linear_grad_weight", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    grad_weight_small<T>(p, static_cast<const T*>(grad_y), static_cast<const T*>(x),
                         static_cast<T*>(grad_w));
  });
}

void mc_dropout_mask_rows(CpuTag, const MCDropoutLinearParams& p, const void* x, int64_t r0,
                          int64_t count, void* out) {
  dispatch(p, "mc_dropout_mask_rows", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mask_rows<T>(p, static_cast<const T*>(x), r0, count, static_cast<T*>(out));
  });
}

void mc_dropout_mask_accumulate_rows(CpuTag, const MCDropoutLinearParams& p, const void* d,
                                     int64_t r0, int64_t count, void* grad_x) {
  dispatch(p, "mc_dropout_mask_accumulate_rows", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mask_accumulate_rows<T>(p, static_cast<const T*>(d), r0, count, static_cast<T*>(grad_x));
  });
}

int64_t mc_dropout_kept_features(CpuTag, const MCDropoutLinearParams& p, int64_t s, int64_t* kept) {
  const MCDropoutMask mask = make_mask(p);
  const int64_t K = p.in_features;
  std::vector<uint32_t> words(static_cast<size_t>(K));
  stream_words(mask.stream, mask.index(s, 0, 0), K, words.data());
  int64_t nk = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (keep_element(words[static_cast<size_t>(k)], mask.threshold)) kept[nk++] = k;
  }
  return nk;
}

void mc_dropout_gather_kept(CpuTag, const MCDropoutLinearParams& p, const void* x, int64_t s,
                            int64_t b0, int64_t count, const int64_t* kept, int64_t nk,
                            bool ones_column, void* out) {
  dispatch(p, "mc_dropout_gather_kept", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gather_kept<T>(p, static_cast<const T*>(x), s, b0, count, kept, nk, ones_column,
                   static_cast<T*>(out));
  });
}

void mc_dropout_scatter_kept(CpuTag, const MCDropoutLinearParams& p, const void* d, int64_t s,
                             int64_t b0, int64_t count, const int64_t* kept, int64_t nk,
                             void* grad_x) {
  dispatch(p, "mc_dropout_scatter_kept", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    scatter_kept<T>(p, static_cast<const T*>(d), s, b0, count, kept, nk, static_cast<T*>(grad_x));
  });
}

}  // namespace bdlkern
