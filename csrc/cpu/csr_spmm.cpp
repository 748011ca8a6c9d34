// CPU kernel of the CSR linear layer (semantics: bdlkern/csr_kernels.h).
//
// The CPU entry takes row-major operands (x [B, K_in], outputs [B, N]) and does its own layout
// work, since ATen's generic transpose copies cost more than the sparse product at 95% sparsity:
//   1. the inputs are transposed once, in parallel 16 x 16 blocks, to batch-contiguous [K_in, B]
//      (skipped for a batch of one, where both layouts coincide);
//   2. tasks own 16 consecutive output rows; a row walks its entries once per batch tile and adds
//      weight * (the input row's run of the tile) into accumulators held in vector registers (GCC
//      vector types: 8 AVX2 registers of float32 per operand for a 64-wide tile);
//   3. the 16 rows' tiles are written back as [tile, 16] blocks: whole cache lines of the output.
// The float32 row loop is compiled for AVX2 and AVX-512 and picked at run time (vec_math.h).
// Every output element is one accumulator summed in entry order: deterministic.
#include <ATen/Parallel.h>

#include <bdlkern/csr_kernels.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "csr_cpu.h"
#include "vec_math.h"

namespace bdlkern {
namespace {

constexpr int64_t kTile = 64;      // batch columns per register tile
constexpr int64_t kRowBlock = 16;  // output rows per task (one 64-byte line of float32 outputs)
constexpr int64_t kTransposeBlock = 16;
constexpr int64_t kMinTaskWork = int64_t{1} << 17;  // multiply-adds per parallel task, at least
constexpr int64_t kGatherEntriesPerInput = 2;

// dst[k, b] = src[b, k]: [rows, cols] -> [cols, rows], parallel over blocks of columns.
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst) {
  const int64_t blocks = (cols + kTransposeBlock - 1) / kTransposeBlock;
  const int64_t grain = std::max<int64_t>(4, kMinTaskWork / std::max<int64_t>(1, rows * kTransposeBlock));
  at::parallel_for(0, blocks, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t cb = c0 * kTransposeBlock; cb < std::min(cols, c1 * kTransposeBlock);
         cb += kTransposeBlock) {
      const int64_t ce = std::min(cols, cb + kTransposeBlock);
      for (int64_t rb = 0; rb < rows; rb += kTransposeBlock) {
        const int64_t re = std::min(rows, rb + kTransposeBlock);
        for (int64_t r = rb; r < re; ++r) {
          for (int64_t c = cb; c < ce; ++c) dst[c * rows + r] = src[r * cols + c];
        }
      }
    }
  });
}

// One row's tile of `width` batch columns starting at b0 (generic types and the narrow tail):
// dst_a[b] = sum_j theta_j a[col_j, b0 + b] (and dst_b likewise with the variances).
template <typename T, bool kSecond, bool kSquare>
inline __attribute__((always_inline)) void row_tile(const CsrParams& p, int64_t n, int64_t b0,
                                                    int64_t width, const T* in_a, const T* in_b,
                                                    T* dst_a, T* dst_b) {
  const T* values = static_cast<const T*>(p.values);
  const int64_t B = p.batch, vs = p.value_stride;
  for (int64_t b = 0; b < width; ++b) {
    dst_a[b] = T(0);
    if (kSecond) dst_b[b] = T(0);
  }
  for (int64_t j = p.crow[n]; j < p.crow[n + 1]; ++j) {
    const T w = values[j * vs];
    const T* xa = in_a + p.col[j] * B + b0;
    for (int64_t b = 0; b < width; ++b) dst_a[b] += w * xa[b];
    if constexpr (kSecond) {
      const T v = values[j * vs + 1];
      const T* xb = kSquare ? xa : in_b + p.col[j] * B + b0;
      for (int64_t b = 0; b < width; ++b) dst_b[b] += v * (kSquare ? xa[b] * xa[b] : xb[b]);
    }
  }
}

// float32 with GCC vector types, so the accumulators are registers whatever the compiler's loop
// heuristics decide (a plain 64-wide loop got unrolled-and-jammed into scalar code).
typedef float f8 __attribute__((vector_size(32)));

inline __attribute__((always_inline)) f8 load8(const float* p) {
  f8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void store8(float* p, f8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

template <int kVecs, bool kSecond, bool kSquare>
inline __attribute__((always_inline)) void row_tile_f32(const CsrParams& p, int64_t n, int64_t b0,
                                                        const float* in_a, const float* in_b,
                                                        float* dst_a, float* dst_b) {
  const float* values = static_cast<const float*>(p.values);
  const int64_t B = p.batch, vs = p.value_stride;
  f8 acc_a[kVecs], acc_b[kVecs];
  for (int v = 0; v < kVecs; ++v) acc_a[v] = acc_b[v] = f8{};
  for (int64_t j = p.crow[n]; j < p.crow[n + 1]; ++j) {
    const f8 w = f8{} + values[j * vs];
    const float* xa = in_a + p.col[j] * B + b0;
    if constexpr (kSecond) {
      const f8 var = f8{} + values[j * vs + 1];
      const float* xb = kSquare ? xa : in_b + p.col[j] * B + b0;
      for (int v = 0; v < kVecs; ++v) {
        const f8 a = load8(xa + 8 * v);
        acc_a[v] += w * a;
        acc_b[v] += var * (kSquare ? a * a : load8(xb + 8 * v));
      }
    } else {
      for (int v = 0; v < kVecs; ++v) acc_a[v] += w * load8(xa + 8 * v);
    }
  }
  for (int v = 0; v < kVecs; ++v) store8(dst_a + 8 * v, acc_a[v]);
  if constexpr (kSecond) {
    for (int v = 0; v < kVecs; ++v) store8(dst_b + 8 * v, acc_b[v]);
  }
}

// `width` columns of one row from b0: the widest register tile that fits (kVecs vectors of 8),
// then the narrower ones (one pass over the row's entries each), then a scalar tail of < 8.
template <int kVecs, bool kSecond, bool kSquare>
inline __attribute__((always_inline)) void row_tiles_f32(const CsrParams& p, int64_t n, int64_t b0,
                                                         int64_t width, const float* in_a,
                                                         const float* in_b, float* da, float* db) {
  int64_t e = 0;
  if (width >= 8 * kVecs) {
    row_tile_f32<kVecs, kSecond, kSquare>(p, n, b0, in_a, in_b, da, db);
    e = 8 * kVecs;
  }
  if constexpr (kVecs > 1) {
    row_tiles_f32<kVecs / 2, kSecond, kSquare>(p, n, b0 + e, width - e, in_a, in_b, da + e, db + e);
  } else if (e < width) {
    row_tile<float, kSecond, kSquare>(p, n, b0 + e, width - e, in_a, in_b, da + e, db + e);
  }
}

// Output rows [n0, n1) (at most kRowBlock) of the batch-contiguous inputs, written row-major into
// out_a / out_b [B, N] through the per-task block buffers buf_a / buf_b [kRowBlock, kTile].
template <typename T, bool kSecond, bool kSquare>
inline __attribute__((always_inline)) void row_block(const CsrParams& p, int64_t n0, int64_t n1,
                                                     const T* in_a, const T* in_b, T* out_a,
                                                     T* out_b, T* buf_a, T* buf_b) {
  const int64_t B = p.batch, N = p.rows;
  for (int64_t b0 = 0; b0 < B; b0 += kTile) {
    const int64_t width = std::min(kTile, B - b0);
    for (int64_t n = n0; n < n1; ++n) {
      T* da = buf_a + (n - n0) * kTile;
      T* db = buf_b + (n - n0) * kTile;
      if constexpr (std::is_same_v<T, float>) {
        row_tiles_f32<kTile / 8, kSecond, kSquare>(p, n, b0, width, in_a, in_b, da, db);
      } else {
        row_tile<T, kSecond, kSquare>(p, n, b0, width, in_a, in_b, da, db);
      }
    }
    const T* bias = static_cast<const T*>(p.bias);
    T bias_block[kRowBlock];
    for (int64_t n = n0; n < n1; ++n) bias_block[n - n0] = bias != nullptr ? bias[n] : T(0);
    for (int64_t b = 0; b < width; ++b) {  // [rows, tile] -> out[b0 + b, n0 .. n1) (+ bias)
      for (int64_t n = n0; n < n1; ++n) {
        out_a[(b0 + b) * N + n] = buf_a[(n - n0) * kTile + b] + bias_block[n - n0];
      }
      if (kSecond) {
        for (int64_t n = n0; n < n1; ++n) out_b[(b0 + b) * N + n] = buf_b[(n - n0) * kTile + b];
      }
    }
  }
}

template <typename T, bool kSecond, bool kSquare>
inline __attribute__((always_inline)) void rows_body(const CsrParams& p, int64_t n0, int64_t n1,
                                                     const T* in_a, const T* in_b, T* out_a,
                                                     T* out_b) {
  alignas(64) T buf_a[kRowBlock * kTile];
  alignas(64) T buf_b[kRowBlock * kTile];
  for (int64_t r = n0; r < n1; r += kRowBlock) {
    row_block<T, kSecond, kSquare>(p, r, std::min(n1, r + kRowBlock), in_a, in_b, out_a, out_b,
                                   buf_a, buf_b);
  }
}

// The three products the ops need: y (deterministic), (mu, var) with var from the squared input
// (stochastic forward), and two separate inputs (the gradient of x).
template <typename T>
inline __attribute__((always_inline)) void rows_any(const CsrParams& p, int64_t n0, int64_t n1,
                                                    const T* in_a, const T* in_b, T* out_a,
                                                    T* out_b) {
  if (out_b == nullptr) return rows_body<T, false, false>(p, n0, n1, in_a, in_b, out_a, out_b);
  if (in_b == nullptr) return rows_body<T, true, true>(p, n0, n1, in_a, in_b, out_a, out_b);
  return rows_body<T, true, false>(p, n0, n1, in_a, in_b, out_a, out_b);
}

BDLKERN_SIMD_FUNCTION(void, rows_f32,
                      (const CsrParams& p, int64_t n0, int64_t n1, const float* in_a,
                       const float* in_b, float* out_a, float* out_b),
                      rows_any<float>, (p, n0, n1, in_a, in_b, out_a, out_b))

// Row-wise gathers: out[b, n] = the dot product of row n's values with the inputs of batch row b
// at its columns. No transposed copy: the path for a batch of one, and for layers so sparse that
// copying x costs more than the products (see linear()).
template <typename T>
void gather_dots(const CsrParams& p, int64_t k_in, const T* in_a, const T* in_b, T* out_a,
                 T* out_b) {
  const T* values = static_cast<const T*>(p.values);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t vs = p.value_stride, N = p.rows, B = p.batch, nnz = p.crow[p.rows];
  auto rows = [&](int64_t b, int64_t n0, int64_t n1) {
    const T* xa = in_a + b * k_in;
    const T* xb = in_b != nullptr ? in_b + b * k_in : nullptr;
    for (int64_t n = n0; n < n1; ++n) {
      T a = T(0), v = T(0);
      for (int64_t j = p.crow[n]; j < p.crow[n + 1]; ++j) {
        const T x = xa[p.col[j]];
        a += values[j * vs] * x;
        if (out_b != nullptr) v += values[j * vs + 1] * (xb != nullptr ? xb[p.col[j]] : x * x);
      }
      out_a[b * N + n] = a + (bias != nullptr ? bias[n] : T(0));
      if (out_b != nullptr) out_b[b * N + n] = v;
    }
  };
  if (B == 1) {
    const int64_t grain = std::max<int64_t>(16, kMinTaskWork / std::max<int64_t>(1, nnz / std::max<int64_t>(1, N)));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(0, n0, n1); });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, nnz + N));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows(b, 0, N);
  });
}

template <typename T>
void linear(const CsrParams& p, int64_t k_in, const T* in_a, const T* in_b, T* out_a, T* out_b) {
  const int64_t B = p.batch;
  // Gathers when the batch-contiguous copy of x would cost more than it saves: per batch row the
  // copy moves k_in values (~2 ns each) and the register tiles save under 1 ns per entry, so for
  // a batch of one, or fewer than kGatherEntriesPerInput * k_in entries in all.
  if (B == 1 || p.crow[p.rows] < kGatherEntriesPerInput * k_in) {
    return gather_dots(p, k_in, in_a, in_b, out_a, out_b);
  }
  std::vector<T> ta, tb;
  if (B > 1) {  // batch-contiguous copies of the inputs
    ta.resize(static_cast<size_t>(k_in * B));
    transpose(in_a, B, k_in, ta.data());
    in_a = ta.data();
    if (in_b != nullptr) {
      tb.resize(static_cast<size_t>(k_in * B));
      transpose(in_b, B, k_in, tb.data());
      in_b = tb.data();
    }
  }
  // Tasks of at least kMinTaskWork multiply-adds: a small layer runs on one thread, where the
  // fork/join would cost more than the products.
  const int64_t groups = (p.rows + kRowBlock - 1) / kRowBlock;
  const int64_t work_per_group = std::max<int64_t>(1, p.crow[p.rows] / groups * B);
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / work_per_group);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    const int64_t n0 = g0 * kRowBlock, n1 = std::min(p.rows, g1 * kRowBlock);
    if constexpr (std::is_same_v<T, float>) {
      rows_f32(p, n0, n1, in_a, in_b, out_a, out_b);
    } else {
      rows_any<T>(p, n0, n1, in_a, in_b, out_a, out_b);
    }
  });
}

}  // namespace

namespace cpu {

void csr_linear(const CsrParams& p, int64_t k_in, const void* in_a, const void* in_b, void* out_a,
                void* out_b) {
  if (p.rows == 0 || p.batch == 0) return;
  if (p.dtype == DType::kFloat64) {
    linear(p, k_in, static_cast<const double*>(in_a), static_cast<const double*>(in_b),
           static_cast<double*>(out_a), static_cast<double*>(out_b));
  } else if (p.dtype == DType::kFloat32) {
    linear(p, k_in, static_cast<const float*>(in_a), static_cast<const float*>(in_b),
           static_cast<float*>(out_a), static_cast<float*>(out_b));
  } else {
    throw std::invalid_argument("sparse_linear: float32 or float64 only");
  }
}

}  // namespace cpu

}  // namespace bdlkern
