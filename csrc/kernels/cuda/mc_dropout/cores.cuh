// MC-dropout GEMM (csrc/kernels/cuda/mc_dropout_linear.cu), part 3 of 3: the two compute cores
// behind one interface, FMA (float32/float64) and WMMA (float16/bfloat16). Included by that file
// only.
#pragma once

#include "traits.cuh"

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

// ---- compute cores -----------------------------------------------------------------------------
// Each core owns its accumulators and, for the epilogue, hands every thread kOwnedRows runs of 4
// consecutive outputs (a quad) of the block tile: row owned_row(i), columns owned_col() .. +3.

// FMA: thread (ty, tx) of a 16 x 16 grid owns rows ty*4 .. +3 and columns tx*4 .. +3.
template <typename T>
struct FmaCore {
  using Acc = typename Elem<T>::Acc;
  using Cfg = Tiling<T>;
  static constexpr int kLdA = Cfg::kBM + Cfg::kPad;
  static constexpr int kLdB = Cfg::kBN + Cfg::kPad;
  static constexpr int kOwnedRows = 4;
  static_assert(Cfg::kThreads == 256 && Cfg::kBM == 64 && Cfg::kBN == 64,
                "16 x 16 threads of 4 x 4 outputs");

  struct alignas(128) Smem {
    T a[2][Cfg::kBK][kLdA];
    T b[2][Cfg::kBK][kLdB];
  };

  Acc acc[4][4];
  int tx, ty;

  BDL_DI explicit FmaCore(int tid) : tx(tid % 16), ty(tid / 16) {}

  BDL_DI void zero() {
    BDL_UNROLL
    for (int i = 0; i < 4; ++i) {
      BDL_UNROLL
      for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);
    }
  }

  BDL_DI void multiply(const Smem& sm, int buf) {
    BDL_UNROLL
    for (int l = 0; l < Cfg::kBK; ++l) {
      // A warp reads 2 distinct A quads (broadcast) and 16 consecutive B quads per l.
      const Quad<T> a = *reinterpret_cast<const Quad<T>*>(&sm.a[buf][l][ty * 4]);
      const Quad<T> b = *reinterpret_cast<const Quad<T>*>(&sm.b[buf][l][tx * 4]);
      BDL_UNROLL
      for (int i = 0; i < 4; ++i) {
        BDL_UNROLL
        for (int j = 0; j < 4; ++j) acc[i][j] += a.v[i] * b.v[j];
      }
    }
  }

  BDL_DI void begin_epilogue(Smem&) {}
  BDL_DI void end_epilogue() {}
  BDL_DI int owned_row(int i) const { return ty * 4 + i; }
  BDL_DI int owned_col() const { return tx * 4; }
  BDL_DI void owned_values(int i, Acc v[4]) const {
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) v[j] = acc[i][j];
  }
};

// WMMA: warp w of 4 owns the 32 x 32 sub-tile (w / 2, w % 2) as 2 x 2 fragments m16n16k16 with
// fp32 accumulators. The fragment-to-lane layout is opaque, so the epilogue goes through a per-warp
// fp32 scratch tile; there lane owns rows lane/8 + 4i (i < 8) and columns (lane % 8) * 4 .. +3.
template <typename T>
struct WmmaCore {
  using Acc = float;
  using Cfg = Tiling<T>;
  static constexpr int kLdA = Cfg::kBM + Cfg::kPad;
  static constexpr int kLdB = Cfg::kBN + Cfg::kPad;
  static constexpr int kLdScratch = 32 + 4;  // floats; a multiple of 4 as WMMA requires
  static constexpr int kOwnedRows = 8;
  static constexpr int kWarps = Cfg::kThreads / 32;
  static_assert(kWarps == 4 && Cfg::kBM == 64 && Cfg::kBN == 64, "2 x 2 warps of 32 x 32");
  static_assert(Cfg::kBK % 16 == 0, "K tile is a whole number of WMMA k steps");

  struct alignas(128) Smem {
    T a[2][Cfg::kBK][kLdA];
    T b[2][Cfg::kBK][kLdB];
    float scratch[kWarps][32][kLdScratch];
  };

  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  int warp, lane, wm, wn;
  const float* scratch;

  BDL_DI explicit WmmaCore(int tid)
      : warp(tid / 32), lane(tid % 32), wm(warp / 2), wn(warp % 2), scratch(nullptr) {}

  BDL_DI void zero() {
    BDL_UNROLL
    for (int i = 0; i < 2; ++i) {
      BDL_UNROLL
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
    }
  }

  BDL_DI void multiply(const Smem& sm, int buf) {
    namespace wmma = nvcuda::wmma;
    BDL_UNROLL
    for (int kk = 0; kk < Cfg::kBK; kk += 16) {
      // A is stored [l][m]: for the fragment, element (m, k) at ptr[k * ld + m] -> col_major.
      // B is stored [l][n]: element (k, n) at ptr[k * ld + n] -> row_major.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
      BDL_UNROLL
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], &sm.a[buf][kk][wm * 32 + i * 16], kLdA);
      }
      BDL_UNROLL
      for (int j = 0; j < 2; ++j) {
        wmma::load_matrix_sync(fb[j], &sm.b[buf][kk][wn * 32 + j * 16], kLdB);
      }
      BDL_UNROLL
      for (int i = 0; i < 2; ++i) {
        BDL_UNROLL
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }

  BDL_DI void begin_epilogue(Smem& sm) {
    namespace wmma = nvcuda::wmma;
    BDL_UNROLL
    for (int i = 0; i < 2; ++i) {
      BDL_UNROLL
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(&sm.scratch[warp][i * 16][j * 16], acc[i][j], kLdScratch,
                                wmma::mem_row_major);
      }
    }
    __syncwarp();  // lanes read what other lanes stored
    scratch = &sm.scratch[warp][0][0];
  }
  // The scratch tile is rewritten by the next sample's epilogue (grad_input, shared input).
  BDL_DI void end_epilogue() { __syncwarp(); }

  BDL_DI int owned_row(int i) const { return wm * 32 + lane / 8 + 4 * i; }
  BDL_DI int owned_col() const { return wn * 32 + (lane % 8) * 4; }
  BDL_DI void owned_values(int i, float v[4]) const {
    const float* src = scratch + (lane / 8 + 4 * i) * kLdScratch + (lane % 8) * 4;
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) v[j] = src[j];
  }
};

template <typename T>
using CoreOf = typename std::conditional<Elem<T>::kTensorCore, WmmaCore<T>, FmaCore<T>>::type;

}  // namespace
}  // namespace BDLKERN_DEVICE_NS
}  // namespace bdlkern
