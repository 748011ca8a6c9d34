// MC-dropout GEMM (csrc/kernels/cuda/mc_dropout_linear.cu), part 2 of 3: the in-register Philox
// mask, the global operand views and the double-buffered tile loaders that apply the mask while
// staging X. Included by that file only.
#pragma once

#include <bdlkern/mc_dropout/kernels.h>
#include <bdlkern/rng/masks.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include "traits.cuh"

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

// ---- the mask ----------------------------------------------------------------------------------
struct MaskCtx {
  MCDropoutMask mask;
  bool all_kept;  // p == 0: threshold 2^32 keeps every word, so no Philox work at all
};

// Keep flags of the `valid` (<= V) consecutive stream elements starting at index i0, as bits
// (bit j = element i0 + j). Makes only the Philox blocks that cover them: V/4 blocks when i0 is a
// multiple of 4 (K % 4 == 0), V/4 + 1 otherwise.
template <int V>
BDL_DI uint32_t keep_bits(const MCDropoutMask& m, uint64_t i0, int valid) {
  uint32_t bits = 0;
  if (valid <= 0) return bits;
  const uint64_t first = i0 >> 2;
  const int lane0 = static_cast<int>(i0 & 3);
  const int num_blocks = (lane0 + valid + 3) >> 2;
  BDL_UNROLL
  for (int j = 0; j < V / 4 + 1; ++j) {
    if (j < num_blocks) {
      const PhiloxBlock blk = m.stream.block(first + static_cast<uint64_t>(j));
      BDL_UNROLL
      for (int l = 0; l < 4; ++l) {
        const int e = 4 * j + l - lane0;  // element offset from i0
        if (e >= 0 && e < valid && keep_element(blk.w[l], m.threshold)) bits |= 1u << e;
      }
    }
  }
  return bits;
}

// ---- global operands ---------------------------------------------------------------------------
// A row-major matrix view: element (row, col) at base[grow * ld + col], col contiguous.
//   masked:      row is a flattened (s, b) = divmod(row, B) and col a feature k; the element is
//                replaced by 0 where the MC-dropout mask drops (s, b, k);
//   shared_rows: the input is shared by all samples: grow = b (else grow = row);
//   gather:      col indexes a list of columns: element (row, col) is base[grow * ld + gather[col]]
//                (a shared-mask sample's kept features; the loads are scalar).
template <typename T>
struct Operand {
  const T* base;
  int64_t ld;
  int64_t rows;  // valid rows [0, rows)
  int64_t cols;  // valid cols [0, cols)
  bool masked;
  bool shared_rows;
  bool vec_ok;  // base 16-byte aligned and ld a multiple of the vector: vector loads
  const int32_t* gather;  // nullptr: col is the column itself
};

template <typename T>
BDL_DI Operand<T> make_operand(const T* base, int64_t ld, int64_t rows, int64_t cols,
                               bool masked, bool shared_rows, const int32_t* gather = nullptr) {
  const bool vec_ok = gather == nullptr && ld % kVec<T> == 0 && is_aligned(base, 16);
  return Operand<T>{base, ld, rows, cols, masked, shared_rows, vec_ok, gather};
}

// Where one row of an operand lives: its global pointer (nullptr past the last row) and, for a
// masked operand, the stream index of feature 0 of its (s, b).
template <typename T>
struct RowRef {
  const T* ptr;
  uint64_t mask_base;
};

template <typename T>
BDL_DI RowRef<T> resolve_row(const Operand<T>& op, const MCDropoutMask& m, int64_t row) {
  RowRef<T> ref{nullptr, 0};
  if (row >= op.rows) return ref;
  int64_t grow = row;
  if (op.masked) {
    const int64_t s = row / m.rows;
    const int64_t b = row - s * m.rows;
    ref.mask_base = m.index(s, b, 0);
    if (op.shared_rows) grow = b;
  }
  ref.ptr = op.base + grow * op.ld;
  return ref;
}

// V elements of a row from column col (zero past the row end, and where the mask drops).
template <typename T, int V>
BDL_DI void load_vector(const Operand<T>& op, const MaskCtx& mk, const RowRef<T>& ref,
                        int64_t col, T out[V]) {
  const T zero = Elem<T>::zero();
  if (ref.ptr == nullptr) {
    BDL_UNROLL
    for (int j = 0; j < V; ++j) out[j] = zero;
    return;
  }
  const int64_t left = op.cols - col;
  const int valid = left >= V ? V : (left > 0 ? static_cast<int>(left) : 0);
  if (op.gather != nullptr) {
    BDL_UNROLL
    for (int j = 0; j < V; ++j) out[j] = j < valid ? ref.ptr[op.gather[col + j]] : zero;
  } else if (valid == V && op.vec_ok) {
    const Vec<T, V> v = *reinterpret_cast<const Vec<T, V>*>(ref.ptr + col);
    BDL_UNROLL
    for (int j = 0; j < V; ++j) out[j] = v.v[j];
  } else {
    BDL_UNROLL
    for (int j = 0; j < V; ++j) out[j] = j < valid ? ref.ptr[col + j] : zero;
  }
  if (op.masked && !mk.all_kept) {
    const uint32_t keep = keep_bits<V>(mk.mask, ref.mask_base + static_cast<uint64_t>(col), valid);
    BDL_UNROLL
    for (int j = 0; j < V; ++j) {
      if (!((keep >> j) & 1u)) out[j] = zero;
    }
  }
}

// Stages a BK x BX operand tile into shared memory stored [BK][LD] (element (l, x) at
// s[l * LD + x]), through registers so the global loads of tile t+1 overlap the math of tile t.
// kContigL: global memory is contiguous along l (X, W in forward, dY in grad_input), so the
// operand's rows are tile columns x and the store to shared memory transposes; consecutive
// threads take consecutive x, so each transposed store of a warp hits 32 consecutive words. A
// thread's x is fixed for the whole block, so its rows are resolved once (prepare).
// Otherwise global memory is contiguous along x, the rows are l (changing every K tile), and
// threads read and store whole vectors along x.
template <typename T, int BK, int BX, int LD, int kThreads, bool kContigL>
struct TileLoader {
  static constexpr int V = kVec<T>;
  static constexpr int kVecs = BK * BX / (V * kThreads);
  static_assert(kVecs >= 1 && kVecs * V * kThreads == BK * BX, "tile must split evenly");
  static_assert(!kContigL || kThreads % BX == 0, "a thread's tile column must be fixed");

  T reg[kVecs][V];
  RowRef<T> rows[kContigL ? kVecs : 1];

  // Slot i of thread tid: (strided index into the operand's rows, contiguous offset).
  BDL_DI static void slot(int tid, int i, int* strided, int* contig) {
    const int v = tid + i * kThreads;
    if (kContigL) {
      *strided = v % BX;
      *contig = (v / BX) * V;
    } else {
      *strided = v / (BX / V);
      *contig = (v % (BX / V)) * V;
    }
  }

  BDL_DI void prepare(const Operand<T>& op, const MaskCtx& mk, int64_t x0, int tid) {
    if (kContigL) {
      BDL_UNROLL
      for (int i = 0; i < kVecs; ++i) {
        int st, ct;
        slot(tid, i, &st, &ct);
        rows[i] = resolve_row(op, mk.mask, x0 + st);
      }
    }
  }

  BDL_DI void load(const Operand<T>& op, const MaskCtx& mk, int64_t l0, int64_t x0, int tid) {
    BDL_UNROLL
    for (int i = 0; i < kVecs; ++i) {
      int st, ct;
      slot(tid, i, &st, &ct);
      if (kContigL) {
        load_vector<T, V>(op, mk, rows[i], l0 + ct, reg[i]);
      } else {
        load_vector<T, V>(op, mk, resolve_row(op, mk.mask, l0 + st), x0 + ct, reg[i]);
      }
    }
  }

  BDL_DI void store(T* s, int tid) const {
    BDL_UNROLL
    for (int i = 0; i < kVecs; ++i) {
      int st, ct;
      slot(tid, i, &st, &ct);
      if (kContigL) {
        BDL_UNROLL
        for (int j = 0; j < V; ++j) s[(ct + j) * LD + st] = reg[i][j];
      } else {
        Vec<T, V> v;
        BDL_UNROLL
        for (int j = 0; j < V; ++j) v.v[j] = reg[i][j];
        *reinterpret_cast<Vec<T, V>*>(s + st * LD + ct) = v;
      }
    }
  }
};

}  // namespace
}  // namespace BDLKERN_DEVICE_NS
}  // namespace bdlkern
