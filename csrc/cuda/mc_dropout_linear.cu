// CUDA kernels of the fused multi-sample MC-dropout linear layer (entry points and semantics:
// bdlkern/mc_dropout_kernels.h). Also compiled under the SIMT emulator (csrc/simt/).
//
// All three entry points are one tiled GEMM, C[P, Q] = sum_l A[P, l] B[l, Q], whose operand
// loaders and epilogue differ by mode. S samples and B rows flatten into R = S * B GEMM rows
// (row r = s * B + b), so one staged W tile serves every sample whose rows fall in the block, and
// the rest of the samples through L2.
//
//   mode         P                Q  L  A[p, l]               B[l, q]               epilogue
//   forward      R                N  K  X[r, l] * keep(r, l)  W[q, l]               * scale + bias
//   grad_input   R (B if shared)  K  N  dY[r, l]              W[l, q]               * keep * scale
//   grad_weight  N                K  R  dY[l, p]              X[l, q] * keep(l, q)  * scale
//
// The dropout mask is never stored: the loaders re-make it from Philox (masks.h) in registers
// while staging an X tile into shared memory (forward: A operand, grad_weight: B operand), and the
// grad_input epilogue makes it for the output tile. Dropped inputs are replaced by 0 (a select,
// so the operand tile is exact in every dtype) and the scalar 1 / keep is applied once to the
// accumulator in the epilogue.
//
// When the input is shared by all samples, grad_input loops over s inside the block: per sample a
// full reduction over N into fresh accumulators, then the masked, scaled result is added to a
// running sum in registers, in ascending s. No atomics anywhere: every output element is written
// by exactly one thread, after a reduction in a fixed order, so results are deterministic.
//
// Two compute cores behind one interface (owned output quads, see FmaCore / WmmaCore):
//   float32 / float64: 64x64 block tile, K tile 16, 256 threads, 4x4 outputs per thread, FMA,
//                      accumulation in the element type (double for float64);
//   float16 / bfloat16: 64x64 block tile, K tile 32, 128 threads = 4 warps in 2x2, each warp a
//                      32x32 tile of 2x2 WMMA m16n16k16 fragments, fp32 accumulation.
// Shared memory is static (the emulator has no dynamic shared memory) and double buffered: while
// the block multiplies K tile t, each thread holds tile t+1 in registers and stores it into the
// other buffer, so there is one barrier per K tile.
#include <bdlkern/device.h>
#include <bdlkern/masks.h>
#include <bdlkern/mc_dropout_kernels.h>
#include <bdlkern/philox.h>
#include <bdlkern/random.h>

#include <stdint.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#if defined(__CUDACC__)
#define BDL_UNROLL _Pragma("unroll")
#define BDL_NO_UNROLL _Pragma("unroll 1")
#else
#define BDL_UNROLL
#define BDL_NO_UNROLL
#endif
// Kernel-side helpers (WMMA and warp barriers are device-only under nvcc).
#define BDL_DI __device__ __forceinline__

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

// ---- element types ------------------------------------------------------------------------------
// Explicit conversions only: torch compiles CUDA with the implicit __half / __nv_bfloat16
// conversions and operators disabled.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  static constexpr bool kTensorCore = false;
  BDL_DI static float to_acc(float v) { return v; }
  BDL_DI static float from_acc(float v) { return v; }
  BDL_DI static float zero() { return 0.0f; }
};
template <>
struct Elem<double> {
  using Acc = double;
  static constexpr bool kTensorCore = false;
  BDL_DI static double to_acc(double v) { return v; }
  BDL_DI static double from_acc(double v) { return v; }
  BDL_DI static double zero() { return 0.0; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  BDL_DI static float to_acc(__half v) { return __half2float(v); }
  BDL_DI static __half from_acc(float v) { return __float2half_rn(v); }
  BDL_DI static __half zero() { return __ushort_as_half(static_cast<unsigned short>(0)); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  BDL_DI static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  BDL_DI static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
  BDL_DI static __nv_bfloat16 zero() {
    return __ushort_as_bfloat16(static_cast<unsigned short>(0));
  }
};

// Elements per global load: 16 bytes for 4-byte and 2-byte types; 4 doubles (two 16-byte loads)
// for float64, so that one thread's run of features still covers a whole Philox block.
template <typename T>
constexpr int kVec = sizeof(T) >= 4 ? 4 : 16 / static_cast<int>(sizeof(T));

template <typename T, int V>
struct alignas(16) Vec {
  T v[V];
};

// Four consecutive outputs of one row (the epilogue's unit): 8 bytes for half, 16 for float,
// 32 (two 16-byte stores) for double.
template <typename T>
struct alignas(4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16) Quad {
  T v[4];
};

BDL_DI bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// ---- tiling ------------------------------------------------------------------------------------
template <typename T, bool kTensorCore = Elem<T>::kTensorCore>
struct Tiling;

template <typename T>
struct Tiling<T, false> {  // FMA path
  static constexpr int kBM = 64, kBN = 64, kBK = 16;
  static constexpr int kThreads = 256;
  static constexpr int kPad = 0;  // transposed stores hit consecutive banks; reads broadcast
};

template <typename T>
struct Tiling<T, true> {  // WMMA path
  static constexpr int kBM = 64, kBN = 64, kBK = 32;
  static constexpr int kThreads = 128;
  // 16 bytes of padding per shared row: keeps WMMA pointers 32-byte aligned (ldm 72 is a multiple
  // of 8) and staggers the rows a fragment load reads across banks.
  static constexpr int kPad = 8;
};

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
//   shared_rows: the input is shared by all samples: grow = b (else grow = row).
template <typename T>
struct Operand {
  const T* base;
  int64_t ld;
  int64_t rows;  // valid rows [0, rows)
  int64_t cols;  // valid cols [0, cols)
  bool masked;
  bool shared_rows;
  bool vec_ok;  // base 16-byte aligned and ld a multiple of the vector: vector loads
};

template <typename T>
BDL_DI Operand<T> make_operand(const T* base, int64_t ld, int64_t rows, int64_t cols,
                               bool masked, bool shared_rows) {
  const bool vec_ok = ld % kVec<T> == 0 && is_aligned(base, 16);
  return Operand<T>{base, ld, rows, cols, masked, shared_rows, vec_ok};
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
  if (valid == V && op.vec_ok) {
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

// ---- the kernel --------------------------------------------------------------------------------
enum class Mode { kForward, kGradInput, kGradWeight };

template <typename T>
struct GemmArgs {
  int64_t S, B, K, N;
  bool shared_input, shared_mask;
  uint64_t threshold;
  double scale;
  const int64_t* rng_state;
  const T* x;     // [S, B, K] or [B, K]      (forward, grad_weight)
  const T* w;     // [N, K]                   (forward, grad_input)
  const T* bias;  // [N] or nullptr           (forward)
  const T* dy;    // [S, B, N]                (grad_input, grad_weight)
  T* out;         // y [S, B, N] / grad_x like x / grad_w [N, K]
};

// GEMM extents (see the table at the top): C is P x Q, the reduction has length L.
template <Mode kMode>
BDL_HDI void gemm_extents(int64_t S, int64_t B, int64_t K, int64_t N, bool shared_input,
                          int64_t* P, int64_t* Q, int64_t* L) {
  if (kMode == Mode::kForward) {
    *P = S * B, *Q = N, *L = K;
  } else if (kMode == Mode::kGradInput) {
    *P = shared_input ? B : S * B, *Q = K, *L = N;
  } else {
    *P = N, *Q = K, *L = S * B;
  }
}

// Writes up to 4 consecutive outputs (whole-quad store when aligned and in range).
template <typename T>
BDL_DI void store_quad(T* dst, const typename Elem<T>::Acc v[4], int valid, bool vec_ok) {
  if (valid == 4 && vec_ok) {
    Quad<T> q;
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) q.v[j] = Elem<T>::from_acc(v[j]);
    *reinterpret_cast<Quad<T>*>(dst) = q;
  } else {
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (j < valid) dst[j] = Elem<T>::from_acc(v[j]);
    }
  }
}

// One block computes the BM x BN tile (blockIdx.x, blockIdx.y) of C.
template <typename T, Mode kMode>
__global__ void __launch_bounds__(Tiling<T>::kThreads) mc_dropout_gemm_kernel(GemmArgs<T> args) {
  using Cfg = Tiling<T>;
  using Core = CoreOf<T>;
  using Acc = typename Elem<T>::Acc;
  constexpr int kBM = Cfg::kBM, kBN = Cfg::kBN, kBK = Cfg::kBK;
  // A operand tile: BK x BM; B operand tile: BK x BN (see the mode table for contiguity).
  constexpr bool kAContigL = kMode != Mode::kGradWeight;
  constexpr bool kBContigL = kMode == Mode::kForward;
  using LoaderA = TileLoader<T, kBK, kBM, Core::kLdA, Cfg::kThreads, kAContigL>;
  using LoaderB = TileLoader<T, kBK, kBN, Core::kLdB, Cfg::kThreads, kBContigL>;

  __shared__ typename Core::Smem smem;

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t S = args.S, B = args.B, K = args.K, N = args.N;
  int64_t P, Q, L;
  gemm_extents<kMode>(S, B, K, N, args.shared_input, &P, &Q, &L);
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kBN;

  // rng_state is read here, at run time, so a captured CUDA graph replays with the current state.
  MaskCtx mk;
  mk.mask = MCDropoutMask{make_stream(args.rng_state, kStreamMCDropout), args.threshold, B, K,
                          args.shared_mask};
  mk.all_kept = args.threshold > 0xffffffffull;
  const Acc scale = static_cast<Acc>(args.scale);

  Core core(tid);
  LoaderA la;
  LoaderB lb;
  // grad_input with a shared input sums S per-sample products; everything else is one pass.
  const int64_t passes = (kMode == Mode::kGradInput && args.shared_input) ? S : 1;
  Acc sum[Core::kOwnedRows][4];
  BDL_UNROLL
  for (int i = 0; i < Core::kOwnedRows; ++i) {
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) sum[i][j] = Acc(0);
  }

  for (int64_t s = 0; s < passes; ++s) {
    Operand<T> opa, opb;
    if (kMode == Mode::kForward) {
      opa = make_operand(args.x, K, P, K, true, args.shared_input);
      opb = make_operand(args.w, K, N, K, false, false);
    } else if (kMode == Mode::kGradInput) {
      // Shared input: GEMM row p is batch row b of sample s, dY rows s*B .. s*B + B - 1.
      const T* dy = args.shared_input ? args.dy + s * B * N : args.dy;
      opa = make_operand(dy, N, P, N, false, false);
      opb = make_operand(args.w, K, N, K, false, false);
    } else {
      opa = make_operand(args.dy, N, L, N, false, false);
      opb = make_operand(args.x, K, L, K, true, args.shared_input);
    }
    la.prepare(opa, mk, p0, tid);
    lb.prepare(opb, mk, q0, tid);

    // Main loop over K tiles, double buffered (one barrier per tile; see the file comment).
    core.zero();
    const int64_t tiles = (L + kBK - 1) / kBK;
    if (tiles > 0) {
      la.load(opa, mk, 0, p0, tid);
      lb.load(opb, mk, 0, q0, tid);
      la.store(&smem.a[0][0][0], tid);
      lb.store(&smem.b[0][0][0], tid);
      __syncthreads();
    }
    for (int64_t t = 0; t < tiles; ++t) {
      const int buf = static_cast<int>(t & 1);
      const bool more = t + 1 < tiles;
      if (more) {
        la.load(opa, mk, (t + 1) * kBK, p0, tid);
        lb.load(opb, mk, (t + 1) * kBK, q0, tid);
      }
      core.multiply(smem, buf);
      if (more) {
        // The other buffer was last read in iteration t-1, which ended with a barrier.
        la.store(&smem.a[buf ^ 1][0][0], tid);
        lb.store(&smem.b[buf ^ 1][0][0], tid);
      }
      __syncthreads();
    }

    // Epilogue on the owned quads.
    const int64_t q = q0 + core.owned_col();
    const int qvalid = Q - q >= 4 ? 4 : (Q - q > 0 ? static_cast<int>(Q - q) : 0);
    // grad_input: keep flags of the owned quads of sample s, bit 4i + j for row i, feature
    // q + j (at most 8 x 4 bits). Made in a loop that is not unrolled: unrolled, the compiler
    // interleaves up to 16 Philox blocks and doubles the kernel's registers.
    uint32_t keep_owned = 0xffffffffu;
    if (kMode == Mode::kGradInput && !mk.all_kept) {
      keep_owned = 0;
      BDL_NO_UNROLL
      for (int i = 0; i < Core::kOwnedRows; ++i) {
        const int64_t p = p0 + core.owned_row(i);
        if (p >= P || qvalid == 0) continue;
        const int64_t ss = args.shared_input ? s : p / B;
        const int64_t b = args.shared_input ? p : p - ss * B;
        keep_owned |= keep_bits<4>(mk.mask, mk.mask.index(ss, b, q), qvalid) << (4 * i);
      }
    }
    core.begin_epilogue(smem);
    BDL_UNROLL
    for (int i = 0; i < Core::kOwnedRows; ++i) {
      const int64_t p = p0 + core.owned_row(i);
      if (p >= P || qvalid == 0) continue;
      Acc v[4];
      core.owned_values(i, v);
      if (kMode == Mode::kForward) {
        BDL_UNROLL
        for (int j = 0; j < 4; ++j) {
          const Acc bias = (args.bias != nullptr && j < qvalid) ? Elem<T>::to_acc(args.bias[q + j])
                                                                 : Acc(0);
          v[j] = v[j] * scale + bias;
        }
        T* dst = args.out + p * N + q;
        store_quad<T>(dst, v, qvalid, N % 4 == 0 && is_aligned(args.out, alignof(Quad<T>)));
      } else if (kMode == Mode::kGradWeight) {
        BDL_UNROLL
        for (int j = 0; j < 4; ++j) v[j] *= scale;
        T* dst = args.out + p * K + q;
        store_quad<T>(dst, v, qvalid, K % 4 == 0 && is_aligned(args.out, alignof(Quad<T>)));
      } else {
        // dX = (dY W) * keep(s, b, k) * scale for features k = q .. q+3 of row (s, b).
        BDL_UNROLL
        for (int j = 0; j < 4; ++j) {
          if ((keep_owned >> (4 * i + j)) & 1u) sum[i][j] += v[j] * scale;
        }
      }
    }
    core.end_epilogue();
  }

  if (kMode == Mode::kGradInput) {
    const int64_t q = q0 + core.owned_col();
    const int qvalid = Q - q >= 4 ? 4 : (Q - q > 0 ? static_cast<int>(Q - q) : 0);
    BDL_UNROLL
    for (int i = 0; i < Core::kOwnedRows; ++i) {
      const int64_t p = p0 + core.owned_row(i);
      if (p >= P || qvalid == 0) continue;
      store_quad<T>(args.out + p * K + q, sum[i], qvalid,
                    K % 4 == 0 && is_aligned(args.out, alignof(Quad<T>)));
    }
  }
}

template <typename T, Mode kMode>
void run_typed(const MCDropoutLinearParams& p, const void* x, const void* w, const void* bias,
               const void* dy, void* out) {
  using Cfg = Tiling<T>;
  int64_t P, Q, L;
  gemm_extents<kMode>(p.num_samples, p.rows, p.in_features, p.out_features, p.shared_input, &P,
                      &Q, &L);
  if (P == 0 || Q == 0) return;  // nothing to write (B == 0 in forward / grad_input)
  const int64_t gx = (P + Cfg::kBM - 1) / Cfg::kBM;
  const int64_t gy = (Q + Cfg::kBN - 1) / Cfg::kBN;
  if (gx > 0x7fffffffLL || gy > 65535) {
    throw std::invalid_argument("mc_dropout_linear: problem too large for one launch (" +
                                std::to_string(P) + " x " + std::to_string(Q) + " outputs)");
  }
  GemmArgs<T> args;
  args.S = p.num_samples;
  args.B = p.rows;
  args.K = p.in_features;
  args.N = p.out_features;
  args.shared_input = p.shared_input;
  args.shared_mask = p.shared_mask;
  args.threshold = p.threshold;
  args.scale = p.scale;
  args.rng_state = p.rng_state;
  args.x = static_cast<const T*>(x);
  args.w = static_cast<const T*>(w);
  args.bias = static_cast<const T*>(bias);
  args.dy = static_cast<const T*>(dy);
  args.out = static_cast<T*>(out);
  // Row tiles on x (up to 2^31 - 1): consecutive blocks share a W / column tile in L2.
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  launch(mc_dropout_gemm_kernel<T, kMode>, grid, dim3(Cfg::kThreads), 0, p.stream, args);
}

template <Mode kMode>
void run(const MCDropoutLinearParams& p, const void* x, const void* w, const void* bias,
         const void* dy, void* out) {
  switch (p.dtype) {
    case DType::kFloat32:
      return run_typed<float, kMode>(p, x, w, bias, dy, out);
    case DType::kFloat64:
      return run_typed<double, kMode>(p, x, w, bias, dy, out);
    case DType::kFloat16:
      return run_typed<__half, kMode>(p, x, w, bias, dy, out);
    case DType::kBFloat16:
      return run_typed<__nv_bfloat16, kMode>(p, x, w, bias, dy, out);
  }
  throw std::invalid_argument("mc_dropout_linear: unknown dtype");
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using DeviceTag = BDLKERN_DEVICE_TAG;

void mc_dropout_linear_forward(DeviceTag, const MCDropoutLinearParams& p, const void* x,
                               const void* weight, const void* bias, void* y) {
  using namespace BDLKERN_DEVICE_NS;
  run<Mode::kForward>(p, x, weight, bias, nullptr, y);
}

void mc_dropout_linear_grad_input(DeviceTag, const MCDropoutLinearParams& p, const void* grad_y,
                                  const void* weight, void* grad_x) {
  using namespace BDLKERN_DEVICE_NS;
  run<Mode::kGradInput>(p, nullptr, weight, nullptr, grad_y, grad_x);
}

void mc_dropout_linear_grad_weight(DeviceTag, const MCDropoutLinearParams& p, const void* grad_y,
                                   const void* x, void* grad_w) {
  using namespace BDLKERN_DEVICE_NS;
  run<Mode::kGradWeight>(p, x, nullptr, nullptr, grad_y, grad_w);
}

}  // namespace bdlkern

#undef BDL_UNROLL
#undef BDL_NO_UNROLL
#undef BDL_DI
