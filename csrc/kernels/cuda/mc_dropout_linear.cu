// CUDA kernels of the fused multi-sample MC-dropout linear layer (entry points and semantics:
// bdlkern/mc_dropout/kernels.h). Also compiled under the SIMT emulator (csrc/testing/simt/).
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
//
// Layout: mc_dropout/traits.cuh (element types, tilings), mc_dropout/loaders.cuh (mask, operands,
// tile loaders), mc_dropout/cores.cuh (compute cores); this file holds the kernel and its launch.
#include <bdlkern/common/device.h>
#include <bdlkern/mc_dropout/kernels.h>

#include <stdint.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "mc_dropout/cores.cuh"
#include "mc_dropout/loaders.cuh"
#include "mc_dropout/traits.cuh"

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

// ---- the kernel --------------------------------------------------------------------------------
enum class Mode { kForward, kGradInput, kGradWeight, kForwardCompact };

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
  const int32_t* kept;        // [S, K]: sample s's kept features first (forward_compact)
  const int32_t* kept_count;  // [S]: how many (forward_compact)
};

// GEMM extents (see the table at the top): C is P x Q, the reduction has length L.
template <Mode kMode>
BDL_HDI void gemm_extents(int64_t S, int64_t B, int64_t K, int64_t N, bool shared_input,
                          int64_t* P, int64_t* Q, int64_t* L) {
  if (kMode == Mode::kForward) {
    *P = S * B, *Q = N, *L = K;
  } else if (kMode == Mode::kForwardCompact) {  // per sample; L is at most K (its kept count)
    *P = B, *Q = N, *L = K;
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
  constexpr bool kBContigL = kMode == Mode::kForward || kMode == Mode::kForwardCompact;
  using LoaderA = TileLoader<T, kBK, kBM, Core::kLdA, Cfg::kThreads, kAContigL>;
  using LoaderB = TileLoader<T, kBK, kBN, Core::kLdB, Cfg::kThreads, kBContigL>;

  BDL_SHARED(typename Core::Smem, smem, );

  const int tid = static_cast<int>(threadIdx.x);
  const int64_t S = args.S, B = args.B, K = args.K, N = args.N;
  int64_t P, Q, L;
  gemm_extents<kMode>(S, B, K, N, args.shared_input, &P, &Q, &L);
  int64_t p0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * kBN;
  // forward_compact: blockIdx.x enumerates (sample, row tile of its B rows).
  int64_t sample = 0;
  if (kMode == Mode::kForwardCompact) {
    const int64_t row_tiles = (B + kBM - 1) / kBM;
    sample = static_cast<int64_t>(blockIdx.x) / row_tiles;
    p0 = (static_cast<int64_t>(blockIdx.x) - sample * row_tiles) * kBM;
  }

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
    } else if (kMode == Mode::kForwardCompact) {
      // One shared-mask sample over its kept features only: both operands gather the columns of
      // the list, nothing is masked, and the reduction is as long as the list (read here, on the
      // device: the host never learns it).
      const int32_t* kept = args.kept + sample * K;
      L = args.kept_count[sample];
      opa = make_operand(args.shared_input ? args.x : args.x + sample * B * K, K, B, L, false,
                         false, kept);
      opb = make_operand(args.w, K, N, L, false, false, kept);
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
      if (kMode == Mode::kForward || kMode == Mode::kForwardCompact) {
        BDL_UNROLL
        for (int j = 0; j < 4; ++j) {
          const Acc bias = (args.bias != nullptr && j < qvalid) ? Elem<T>::to_acc(args.bias[q + j])
                                                                 : Acc(0);
          v[j] = v[j] * scale + bias;
        }
        T* dst = args.out + (sample * B + p) * N + q;
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

// Shared masks: sample s's kept features, ascending, into kept[s, 0 .. count[s]) (one block per
// sample, 256 features per step, an inclusive scan of the keep flags in shared memory). Costs
// S * K Philox words, once, instead of re-making the mask in every tile.
constexpr int kListThreads = 256;

__global__ void __launch_bounds__(kListThreads)
    kept_list_kernel(const int64_t* rng_state, uint64_t threshold, int64_t K, int32_t* kept,
                     int32_t* count) {
  BDL_SHARED(int32_t, scan, [2][kListThreads]);
  const MCDropoutMask m{make_stream(rng_state, kStreamMCDropout), threshold, 1, K, true};
  const int64_t s = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  int32_t base = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kListThreads) {
    const int64_t k = k0 + tid;
    const int32_t flag = (k < K && m.keep(s, 0, k)) ? 1 : 0;
    scan[0][tid] = flag;
    __syncthreads();
    int src = 0;
    for (int off = 1; off < kListThreads; off <<= 1) {
      scan[src ^ 1][tid] = scan[src][tid] + (tid >= off ? scan[src][tid - off] : 0);
      src ^= 1;
      __syncthreads();
    }
    if (flag) kept[s * K + base + scan[src][tid] - 1] = static_cast<int32_t>(k);
    base += scan[src][kListThreads - 1];
    __syncthreads();  // the next step rewrites scan[0]
  }
  if (tid == 0) count[s] = base;
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
  args.kept = nullptr;
  args.kept_count = nullptr;
  // Shared masks in forward: list each sample's kept features, then multiply over those only
  // (about 1 - p of the products, and no Philox in the tiles).
  if (kMode == Mode::kForward && p.shared_mask && p.threshold <= 0xffffffffull &&
      p.workspace != nullptr) {
    const int64_t row_tiles = (p.rows + Cfg::kBM - 1) / Cfg::kBM;
    if (p.num_samples * row_tiles <= 0x7fffffffLL) {
      int32_t* kept = p.workspace;
      int32_t* count = p.workspace + p.num_samples * p.in_features;
      launch(kept_list_kernel, dim3(static_cast<unsigned>(p.num_samples)), dim3(kListThreads), 0,
             p.stream, p.rng_state, p.threshold, p.in_features, kept, count);
      args.kept = kept;
      args.kept_count = count;
      const dim3 grid(static_cast<unsigned>(p.num_samples * row_tiles), static_cast<unsigned>(gy));
      launch(mc_dropout_gemm_kernel<T, Mode::kForwardCompact>, grid, dim3(Cfg::kThreads), 0,
             p.stream, args);
      return;
    }
  }
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
