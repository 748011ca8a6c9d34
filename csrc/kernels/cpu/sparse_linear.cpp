// CPU kernel of the CSR linear layer (semantics: bdlkern/sparse_linear/kernels.h).
//
// The CPU entry takes row-major operands (x [B, K_in], outputs [B, N]) and does its own layout
// work, since ATen's generic transpose copies cost more than the sparse product at 95% sparsity:
//   1. tasks own chunks of the batch (the register tile, 64 columns, narrowed until every thread
//      has one); a task transposes its rows of x into a cache-line aligned, batch-contiguous
//      [K_in, chunk] buffer of its own (8 x 8 register transposes, zero-padded to whole vectors),
//      so there is one fork/join and no barrier between the copy and the products;
//   2. every output row walks its entries once per chunk and adds weight * (the input row's run
//      of the chunk) into accumulators held in vector registers (GCC vector types); narrow single
//      outputs walk two rows side by side for two independent FMA chains;
//   3. blocks of 16 rows are written back with 8 x 8 transposes, bias folded in.
// Very sparse layers and a batch of one skip the copy and gather x by column (gather_dots).
// At density 0.05 the kernel is bound by L2 bandwidth: each entry reads its run of the chunk from
// anywhere in 128-256 KiB. The float32 loops are compiled for AVX2 and AVX-512 and picked at run
// time (vec_math.h). Every output element is summed in entry order, alone: deterministic.
#include <ATen/Parallel.h>

#include <bdlkern/sparse_linear/kernels.h>

#include <algorithm>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <bdlkern/sparse_linear/kernels.h>

#include "vec_math.h"

namespace bdlkern {
namespace {

constexpr int64_t kTile = 64;      // batch columns per register tile
constexpr int64_t kRowBlock = 16;  // output rows per task (one 64-byte line of float32 outputs)
constexpr int64_t kMinTaskWork = int64_t{1} << 17;  // multiply-adds per parallel task, at least
constexpr int64_t kGatherEntriesPerInput = 2;

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
using cpu::vec::f8;

inline __attribute__((always_inline)) f8 load8(const float* p) {
  f8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline __attribute__((always_inline)) void store8(float* p, f8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

// dst[c, r] = src[r, c] (+ add[r] if given) for an 8 x 8 block: unpack pairs of rows, then pairs
// of pairs, then swap the 128-bit halves (the shuffles AVX2 has; GCC lowers them for baseline).
inline __attribute__((always_inline)) void transpose8x8(const float* src, int64_t src_stride,
                                                        float* dst, int64_t dst_stride,
                                                        const float* add = nullptr) {
  f8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load8(src + i * src_stride);
  if (add != nullptr) {
    for (int i = 0; i < 8; ++i) r[i] += add[i];
  }
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int j = 0; j < 4; ++j) {
    store8(dst + j * dst_stride, __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    store8(dst + (j + 4) * dst_stride,
           __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

// dst[c, r] = src[r, c]: [rows, cols] -> [cols, ld] (one task's chunk of x), columns rows .. ld
// of dst zeroed: 8 x 8 register blocks for float32, element by element for the edges and other
// types.
template <typename T>
inline __attribute__((always_inline)) void transpose_body(const T* src, int64_t rows, int64_t cols,
                                                          T* dst, int64_t ld) {
  int64_t r8 = 0, c8 = 0;
  if constexpr (std::is_same_v<T, float>) {
    r8 = rows & ~int64_t{7};
    c8 = cols & ~int64_t{7};
    // Eight source rows at a time, swept along: rows of x are k_in apart (often 4 KiB, one cache
    // set), so a column strip over more than 8 rows would evict its own lines before their use.
    for (int64_t r = 0; r < r8; r += 8) {
      for (int64_t c = 0; c < c8; c += 8) transpose8x8(src + r * cols + c, cols, dst + c * ld + r, ld);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < r8 ? c8 : 0; c < cols; ++c) dst[c * ld + r] = src[r * cols + c];
  }
  for (int64_t c = 0; c < cols && rows < ld; ++c) {
    for (int64_t r = rows; r < ld; ++r) dst[c * ld + r] = T(0);
  }
}
BDLKERN_SIMD_FUNCTION(void, transpose_f32,
                      (const float* src, int64_t rows, int64_t cols, float* dst, int64_t ld),
                      transpose_body<float>, (src, rows, cols, dst, ld))

template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, T* dst, int64_t ld) {
  if constexpr (std::is_same_v<T, float>) {
    transpose_f32(src, rows, cols, dst, ld);
  } else {
    transpose_body<T>(src, rows, cols, dst, ld);
  }
}

// acc += theta_j * (the tile's run of input row col_j): one entry of one row.
template <int kVecs>
inline __attribute__((always_inline)) void add_entry_f32(const CsrParams& p, int64_t j,
                                                         const float* in, f8* acc) {
  const f8 w = f8{} + static_cast<const float*>(p.values)[j * p.value_stride];
  const float* x = in + p.col[j] * p.batch;
  for (int v = 0; v < kVecs; ++v) acc[v] += w * load8(x + 8 * v);
}

// One register tile (kVecs vectors of 8 batch columns from b0) of rows n .. n + kRows - 1, the
// rows' tiles kTile apart in dst_a / dst_b. Two rows walk their entries side by side: twice the
// independent accumulator chains (an FMA's latency, not its throughput, bounds one narrow row)
// and twice the loads in flight; each row still sums in entry order.
template <int kVecs, bool kSecond, bool kSquare, int kRows>
inline __attribute__((always_inline)) void row_tile_f32(const CsrParams& p, int64_t n, int64_t b0,
                                                        const float* in_a, const float* in_b,
                                                        float* dst_a, float* dst_b) {
  in_a += b0;
  if constexpr (kSecond) {
    static_assert(kRows == 1, "mu and var tiles already hold two accumulator sets");
    const float* values = static_cast<const float*>(p.values);
    const int64_t B = p.batch, vs = p.value_stride;
    if (!kSquare) in_b += b0;
    f8 acc_a[kVecs], acc_b[kVecs];
    for (int v = 0; v < kVecs; ++v) acc_a[v] = acc_b[v] = f8{};
    for (int64_t j = p.crow[n]; j < p.crow[n + 1]; ++j) {
      const f8 w = f8{} + values[j * vs];
      const f8 var = f8{} + values[j * vs + 1];
      const float* xa = in_a + p.col[j] * B;
      const float* xb = kSquare ? xa : in_b + p.col[j] * B;
      for (int v = 0; v < kVecs; ++v) {
        const f8 a = load8(xa + 8 * v);
        acc_a[v] += w * a;
        acc_b[v] += var * (kSquare ? a * a : load8(xb + 8 * v));
      }
    }
    for (int v = 0; v < kVecs; ++v) store8(dst_a + 8 * v, acc_a[v]);
    for (int v = 0; v < kVecs; ++v) store8(dst_b + 8 * v, acc_b[v]);
  } else {
    f8 acc[kRows][kVecs];
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVecs; ++v) acc[r][v] = f8{};
    }
    int64_t j0 = p.crow[n];
    const int64_t e0 = p.crow[n + 1];
    if constexpr (kRows == 2) {
      int64_t j1 = e0;
      const int64_t e1 = p.crow[n + 2];
      for (; j0 < e0 && j1 < e1; ++j0, ++j1) {
        add_entry_f32<kVecs>(p, j0, in_a, acc[0]);
        add_entry_f32<kVecs>(p, j1, in_a, acc[1]);
      }
      for (; j1 < e1; ++j1) add_entry_f32<kVecs>(p, j1, in_a, acc[1]);
    }
    for (; j0 < e0; ++j0) add_entry_f32<kVecs>(p, j0, in_a, acc[0]);
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVecs; ++v) store8(dst_a + r * kTile + 8 * v, acc[r][v]);
    }
  }
}

// `width` columns of rows n .. n + kRows - 1 from b0: the widest register tile that fits (kVecs
// vectors of 8), then the narrower ones (one pass over the entries each), then a scalar tail of
// < 8. Rows are paired only where the tile leaves registers for it (single output, <= 4 vectors).
template <int kVecs, bool kSecond, bool kSquare, int kRows>
inline __attribute__((always_inline)) void row_tiles_f32(const CsrParams& p, int64_t n, int64_t b0,
                                                         int64_t width, const float* in_a,
                                                         const float* in_b, float* da, float* db) {
  int64_t e = 0;
  if (width >= 8 * kVecs) {
    if constexpr (kRows == 2 && (kSecond || kVecs > 4)) {
      for (int r = 0; r < 2; ++r) {
        row_tile_f32<kVecs, kSecond, kSquare, 1>(p, n + r, b0, in_a, in_b, da + r * kTile,
                                                 db + r * kTile);
      }
    } else {
      row_tile_f32<kVecs, kSecond, kSquare, kRows>(p, n, b0, in_a, in_b, da, db);
    }
    e = 8 * kVecs;
  }
  if constexpr (kVecs > 1) {
    row_tiles_f32<kVecs / 2, kSecond, kSquare, kRows>(p, n, b0 + e, width - e, in_a, in_b, da + e,
                                                      db + e);
  } else if (e < width) {
    for (int r = 0; r < kRows; ++r) {
      row_tile<float, kSecond, kSquare>(p, n + r, b0 + e, width - e, in_a, in_b,
                                        da + r * kTile + e, db + r * kTile + e);
    }
  }
}

// out[b, n] = buf[n, b] (+ bias[n]) for a block buf [rows, kTile] of rows <= kRowBlock: 8 x 8
// register transposes where float32 blocks are whole, element by element for the rest.
template <typename T>
inline __attribute__((always_inline)) void write_back(const T* buf, int64_t rows, int64_t width,
                                                      T* out, int64_t N, const T* bias) {
  int64_t r8 = 0, w8 = 0;
  if constexpr (std::is_same_v<T, float>) {
    r8 = rows & ~int64_t{7};
    w8 = width & ~int64_t{7};
    for (int64_t b = 0; b < w8; b += 8) {  // both halves of an output line back to back
      for (int64_t r = 0; r < r8; r += 8) {
        transpose8x8(buf + r * kTile + b, kTile, out + b * N + r, N, bias != nullptr ? bias + r : nullptr);
      }
    }
  }
  for (int64_t b = 0; b < width; ++b) {
    for (int64_t n = b < w8 ? r8 : 0; n < rows; ++n) {
      out[b * N + n] = buf[n * kTile + b] + (bias != nullptr ? bias[n] : T(0));
    }
  }
}

// Output rows [n0, n1) (at most kRowBlock) of the batch-contiguous inputs [K, p.batch], the first
// `valid` batch columns written row-major into out_a / out_b [valid, N] through the per-task block
// buffers buf_a / buf_b [kRowBlock, kTile] (the other columns are padding).
template <typename T, bool kSecond, bool kSquare>
inline __attribute__((always_inline)) void row_block(const CsrParams& p, int64_t valid, int64_t n0,
                                                     int64_t n1, const T* in_a, const T* in_b,
                                                     T* out_a, T* out_b, T* buf_a, T* buf_b) {
  const int64_t B = p.batch, N = p.rows;
  for (int64_t b0 = 0; b0 < B; b0 += kTile) {
    const int64_t width = std::min(kTile, B - b0);
    int64_t n = n0;
    if constexpr (std::is_same_v<T, float>) {
      for (; n + 2 <= n1; n += 2) {
        row_tiles_f32<kTile / 8, kSecond, kSquare, 2>(p, n, b0, width, in_a, in_b,
                                                      buf_a + (n - n0) * kTile, buf_b + (n - n0) * kTile);
      }
      if (n < n1) {
        row_tiles_f32<kTile / 8, kSecond, kSquare, 1>(p, n, b0, width, in_a, in_b,
                                                      buf_a + (n - n0) * kTile, buf_b + (n - n0) * kTile);
      }
    } else {
      for (; n < n1; ++n) {
        row_tile<T, kSecond, kSquare>(p, n, b0, width, in_a, in_b, buf_a + (n - n0) * kTile,
                                      buf_b + (n - n0) * kTile);
      }
    }
    const T* bias = static_cast<const T*>(p.bias);
    T bias_block[kRowBlock];
    for (int64_t n = n0; n < n1; ++n) bias_block[n - n0] = bias != nullptr ? bias[n] : T(0);
    const int64_t written = std::min(width, valid - b0);
    write_back<T>(buf_a, n1 - n0, written, out_a + b0 * N + n0, N, bias_block);
    if constexpr (kSecond) write_back<T>(buf_b, n1 - n0, written, out_b + b0 * N + n0, N, nullptr);
  }
}

// Every output row of one batch chunk: in_a / in_b [K, p.batch] (p.batch a multiple of 8 for
// float32, the columns from `valid` on zero padding), out_a / out_b [valid, N].
template <typename T, bool kSecond, bool kSquare>
inline __attribute__((always_inline)) void rows_body(const CsrParams& p, int64_t valid,
                                                     const T* in_a, const T* in_b, T* out_a,
                                                     T* out_b) {
  alignas(64) T buf_a[kRowBlock * kTile];
  alignas(64) T buf_b[kRowBlock * kTile];
  for (int64_t r = 0; r < p.rows; r += kRowBlock) {
    row_block<T, kSecond, kSquare>(p, valid, r, std::min(p.rows, r + kRowBlock), in_a, in_b, out_a,
                                   out_b, buf_a, buf_b);
  }
}

// The three products the ops need: y (deterministic), (mu, var) with var from the squared input
// (stochastic forward), and two separate inputs (the gradient of x).
template <typename T>
inline __attribute__((always_inline)) void rows_any(const CsrParams& p, int64_t valid,
                                                    const T* in_a, const T* in_b, T* out_a,
                                                    T* out_b) {
  if (out_b == nullptr) return rows_body<T, false, false>(p, valid, in_a, in_b, out_a, out_b);
  if (in_b == nullptr) return rows_body<T, true, true>(p, valid, in_a, in_b, out_a, out_b);
  return rows_body<T, true, false>(p, valid, in_a, in_b, out_a, out_b);
}

BDLKERN_SIMD_FUNCTION(void, rows_f32,
                      (const CsrParams& p, int64_t valid, const float* in_a, const float* in_b,
                       float* out_a, float* out_b),
                      rows_any<float>, (p, valid, in_a, in_b, out_a, out_b))

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
    // A gathered entry costs ~1 ns, ten times a tiled multiply-add: tasks of kMinTaskWork / 8.
    const int64_t grain = std::max<int64_t>(16, kMinTaskWork / 8 / std::max<int64_t>(1, nnz / std::max<int64_t>(1, N)));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) { rows(0, n0, n1); });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, nnz + N));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) rows(b, 0, N);
  });
}

// A 64-byte aligned scratch array (new[] gives 16): the kernel reads it in whole cache lines.
template <typename T>
struct LineBuffer {
  T* data;
  explicit LineBuffer(size_t n)
      : data(n == 0 ? nullptr : static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{64}))) {}
  ~LineBuffer() {
    if (data != nullptr) ::operator delete(data, std::align_val_t{64});
  }
  LineBuffer(const LineBuffer&) = delete;
  LineBuffer& operator=(const LineBuffer&) = delete;
};

template <typename T>
void linear(const CsrParams& p, int64_t k_in, const T* in_a, const T* in_b, T* out_a, T* out_b) {
  const int64_t B = p.batch, nnz = p.crow[p.rows];
  // Gathers when the batch-contiguous copy of x would cost more than it saves: per batch row the
  // copy moves k_in values (~2 ns each) and the register tiles save under 1 ns per entry, so for
  // a batch of one, or fewer than kGatherEntriesPerInput * k_in entries in all.
  if (B == 1 || nnz < kGatherEntriesPerInput * k_in) {
    return gather_dots(p, k_in, in_a, in_b, out_a, out_b);
  }
  // Tasks own batch chunks, not rows: each transposes only its own rows of x (into its own cache,
  // no barrier between the copy and the products) and runs every output row over them. The
  // chunk is the register tile, narrowed until every thread has one; a task must still hold
  // kMinTaskWork multiply-adds, so a small layer runs on one thread.
  const int64_t threads = at::get_num_threads();
  int64_t width = kTile;
  while (width > 8 && (B + width - 1) / width < threads) width /= 2;
  const int64_t chunks = (B + width - 1) / width;
  const int64_t grain = std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, (nnz + p.rows) * width));
  // float32 chunks are padded to whole vectors (zero columns), so a ragged batch costs no scalar
  // pass over the entries.
  const int64_t ld = std::is_same_v<T, float> ? (width + 7) / 8 * 8 : width;
  at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
    // Cache-line aligned: a 32-float run of the chunk is then 2 lines, not 3.
    const LineBuffer<T> ta(static_cast<size_t>(k_in * ld));
    const LineBuffer<T> tb(in_b != nullptr ? static_cast<size_t>(k_in * ld) : 0);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b0 = c * width, valid = std::min(width, B - b0);
      CsrParams q = p;  // the chunk as a batch of its own: operands [k_in, ld], outputs from row b0
      q.batch = std::is_same_v<T, float> ? (valid + 7) / 8 * 8 : valid;
      transpose(in_a + b0 * k_in, valid, k_in, ta.data, q.batch);
      if (in_b != nullptr) transpose(in_b + b0 * k_in, valid, k_in, tb.data, q.batch);
      T* oa = out_a + b0 * p.rows;
      T* ob = out_b != nullptr ? out_b + b0 * p.rows : nullptr;
      if constexpr (std::is_same_v<T, float>) {
        rows_f32(q, valid, ta.data, tb.data, oa, ob);
      } else {
        rows_any<T>(q, valid, ta.data, tb.data, oa, ob);
      }
    }
  });
}

}  // namespace

void csr_spmm_rows(CpuTag, const CsrParams& p, int64_t k_in, const void* in_a, const void* in_b,
                   void* out_a, void* out_b) {
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

}  // namespace bdlkern
