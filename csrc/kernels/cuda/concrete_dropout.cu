// CUDA kernels of the fused Concrete dropout (entry points and semantics:
// bdlkern/concrete/kernels.h, the math: bdlkern/concrete/math.h). Also compiled under the SIMT
// emulator (csrc/testing/simt/).
//
// Two launch shapes, one per mask layout of x viewed as [M, C, L]:
//   * L == 1 (a mask value per element): a block covers a tile of kTileRows rows and 4 * kThreads
//     channels; thread j owns the channel quad c0 + 4 j .. +3 (one Philox block when C % 4 == 0,
//     so the words of a warp are 32 consecutive blocks) and walks the rows of the tile, reading x
//     in coalesced runs along c. In backward it sums its channels' p_logit gradients over the rows
//     in registers and writes them to partial[tile, c].
//   * L > 1 (a mask value per (m, c), spatial dropout): one warp per (m, c) pair, lanes striding
//     along the L contiguous elements; backward reduces g * x over the warp with shuffles and lane
//     0 writes partial[m, c].
// A second kernel adds the partials in tile order (and, for one p per layer, the channels in a
// fixed tree): no atomics, so the p_logit gradient has the same bits on every run.
#include <bdlkern/concrete/math.h>
#include <bdlkern/concrete/kernels.h>
#include <bdlkern/common/device.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include <stdint.h>

#include <stdexcept>

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kThreads = 128;                // threads per block, every kernel
constexpr int kQuadsPerBlock = kThreads;     // L == 1: channel quads per block
constexpr int64_t kMaxRowTiles = 256;        // L == 1: at most this many row tiles
constexpr int64_t kMinTileRows = 8;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxPairBlocks = 4096;     // L > 1: grid-stride cap

struct Shape {
  int64_t M, C, L;
  int64_t tile_rows;  // L == 1
  int64_t row_tiles;  // L == 1: partial rows; L > 1: M
};

inline Shape make_shape(const ConcreteDropoutParams& p) {
  Shape s{p.rows, p.channels, p.inner, 1, p.rows};
  if (p.inner == 1) {
    s.tile_rows = (p.rows + kMaxRowTiles - 1) / kMaxRowTiles;
    if (s.tile_rows < kMinTileRows) s.tile_rows = kMinTileRows;
    s.row_tiles = (p.rows + s.tile_rows - 1) / s.tile_rows;
  }
  return s;
}

// factor = keep / q and dfactor = d factor / d p_logit of mask value (m, c) with word w.
template <typename T>
__device__ __forceinline__ void mask_factors(uint32_t w, T p_logit, T inv_t, T* f, T* df) {
  const ConcreteRate<T> r = concrete_rate<T>(p_logit, inv_t);
  const T s = (r.log_ratio + concrete_noise<T>(UniformOf<T>::from(w))) * inv_t;
  T keep, z;
  concrete_keep<T>(s, &keep, &z);
  *f = concrete_factor<T>(keep, r);
  *df = concrete_dfactor<T>(keep, z, r);
}

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    concrete_rows_kernel(ConcreteDropoutParams p, Shape sh, const T* __restrict__ x,
                         const T* __restrict__ g, const T* __restrict__ p_logit,
                         T* __restrict__ out, T* __restrict__ partial) {
  const PhiloxStream stream = make_stream(p.rng_state, kStreamConcreteDropout);
  const T inv_t = static_cast<T>(p.inv_temperature);
  // Channel blocks on x (up to 2^31 - 1 of them), row tiles on y (at most kMaxRowTiles, far below
  // gridDim.y's 65535): a long last dimension must not land on the small grid axis.
  const int64_t tile = blockIdx.y;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * kQuadsPerBlock + threadIdx.x) * 4;
  if (c0 >= sh.C) return;  // no barrier in this kernel: idle threads may leave
  const int valid = sh.C - c0 >= 4 ? 4 : static_cast<int>(sh.C - c0);
  T acc[4] = {T(0), T(0), T(0), T(0)};
  const int64_t m_end = (tile + 1) * sh.tile_rows < sh.M ? (tile + 1) * sh.tile_rows : sh.M;
  for (int64_t m = tile * sh.tile_rows; m < m_end; ++m) {
    uint32_t w[4];
    stream.words4(static_cast<uint64_t>(m * sh.C + c0), valid, w);
    for (int j = 0; j < valid; ++j) {
      const int64_t c = c0 + j;
      T f, df;
      mask_factors<T>(w[j], p_logit[p.per_channel_p ? c : 0], inv_t, &f, &df);
      const int64_t e = m * sh.C + c;
      if (kBackward) {
        out[e] = g[e] * f;
        acc[j] += g[e] * x[e] * df;
      } else {
        out[e] = x[e] * f;
      }
    }
  }
  if (kBackward) {
    for (int j = 0; j < valid; ++j) partial[tile * sh.C + c0 + j] = acc[j];
  }
}

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    concrete_pairs_kernel(ConcreteDropoutParams p, Shape sh, const T* __restrict__ x,
                          const T* __restrict__ g, const T* __restrict__ p_logit,
                          T* __restrict__ out, T* __restrict__ partial) {
  const PhiloxStream stream = make_stream(p.rng_state, kStreamConcreteDropout);
  const T inv_t = static_cast<T>(p.inv_temperature);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t pairs = sh.M * sh.C;
  // Every lane of a warp runs the same number of iterations (the shuffles need the whole warp).
  for (int64_t pair = warp; pair < pairs; pair += num_warps) {
    const int64_t c = pair % sh.C;
    const uint32_t w = stream.word(static_cast<uint64_t>(pair));
    T f, df;
    mask_factors<T>(w, p_logit[p.per_channel_p ? c : 0], inv_t, &f, &df);
    const int64_t base = pair * sh.L;
    T dot = T(0);
    for (int64_t l = lane; l < sh.L; l += 32) {
      if (kBackward) {
        out[base + l] = g[base + l] * f;
        dot += g[base + l] * x[base + l];
      } else {
        out[base + l] = x[base + l] * f;
      }
    }
    if (kBackward) {
      for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      if (lane == 0) partial[pair] = dot * df;
    }
  }
}

// grad_p[c] = sum_t partial[t, c] (per-channel p), or one block adding every channel of that in a
// fixed tree (one p for the layer).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const T* __restrict__ partial, int64_t tiles, int64_t C,
                           bool per_channel, T* __restrict__ grad_p) {
  BDL_SHARED(T, tree, [kThreads]);
  if (per_channel) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
    if (c >= C) return;  // per-channel launches use no barrier
    T sum = T(0);
    for (int64_t t = 0; t < tiles; ++t) sum += partial[t * C + c];
    grad_p[c] = sum;
    return;
  }
  T sum = T(0);
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    T col = T(0);
    for (int64_t t = 0; t < tiles; ++t) col += partial[t * C + c];
    sum += col;
  }
  tree[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) tree[threadIdx.x] += tree[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) grad_p[0] = tree[0];
}

template <typename T, bool kBackward>
void run_map(const ConcreteDropoutParams& p, const Shape& sh, const T* x, const T* g,
             const T* p_logit, T* out, T* partial) {
  if (sh.M == 0) return;
  if (sh.L == 1) {
    const int64_t col_blocks = (sh.C + 4 * kQuadsPerBlock - 1) / (4 * kQuadsPerBlock);
    static_assert(kMaxRowTiles <= 65535, "row tiles go on gridDim.y");
    if (col_blocks > 0x7fffffffLL) {
      throw std::invalid_argument("concrete_dropout: too many channels for one launch");
    }
    launch(concrete_rows_kernel<T, kBackward>,
           dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(sh.row_tiles)),
           dim3(kThreads), 0, p.stream, p, sh, x, g, p_logit, out, partial);
  } else {
    const int64_t pairs = sh.M * sh.C;
    int64_t blocks = (pairs + kWarpsPerBlock - 1) / kWarpsPerBlock;
    if (blocks > kMaxPairBlocks) blocks = kMaxPairBlocks;
    launch(concrete_pairs_kernel<T, kBackward>, dim3(static_cast<unsigned>(blocks)),
           dim3(kThreads), 0, p.stream, p, sh, x, g, p_logit, out, partial);
  }
}

template <typename T>
void forward_typed(const ConcreteDropoutParams& p, const void* x, const void* p_logit, void* y) {
  const Shape sh = make_shape(p);
  run_map<T, false>(p, sh, static_cast<const T*>(x), nullptr, static_cast<const T*>(p_logit),
                    static_cast<T*>(y), nullptr);
}

template <typename T>
void backward_typed(const ConcreteDropoutParams& p, const void* g, const void* x,
                    const void* p_logit, void* grad_x, void* grad_p, void* workspace) {
  const Shape sh = make_shape(p);
  T* partial = static_cast<T*>(workspace);
  const int64_t tiles = sh.M == 0 ? 0 : sh.row_tiles;
  run_map<T, true>(p, sh, static_cast<const T*>(x), static_cast<const T*>(g),
                   static_cast<const T*>(p_logit), static_cast<T*>(grad_x), partial);
  const int64_t blocks = p.per_channel_p ? (p.channels + kThreads - 1) / kThreads : 1;
  launch(reduce_partials_kernel<T>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0,
         p.stream, static_cast<const T*>(partial), tiles, p.channels, p.per_channel_p,
         static_cast<T*>(grad_p));
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using DeviceTag = BDLKERN_DEVICE_TAG;

void concrete_dropout_forward(DeviceTag, const ConcreteDropoutParams& p, const void* x,
                              const void* p_logit, void* y) {
  using namespace BDLKERN_DEVICE_NS;
  if (p.dtype == DType::kFloat64) return forward_typed<double>(p, x, p_logit, y);
  if (p.dtype == DType::kFloat32) return forward_typed<float>(p, x, p_logit, y);
  throw std::invalid_argument("concrete_dropout: float32 or float64 only");
}

int64_t concrete_dropout_backward_workspace(DeviceTag, const ConcreteDropoutParams& p) {
  const BDLKERN_DEVICE_NS::Shape sh = BDLKERN_DEVICE_NS::make_shape(p);
  const int64_t elem = p.dtype == DType::kFloat64 ? 8 : 4;
  const int64_t n = sh.row_tiles * sh.C;
  return (n > 0 ? n : 1) * elem;
}

void concrete_dropout_backward(DeviceTag, const ConcreteDropoutParams& p, const void* grad_y,
                               const void* x, const void* p_logit, void* grad_x,
                               void* grad_p_logit, void* workspace) {
  using namespace BDLKERN_DEVICE_NS;
  if (p.dtype == DType::kFloat64) {
    return backward_typed<double>(p, grad_y, x, p_logit, grad_x, grad_p_logit, workspace);
  }
  if (p.dtype == DType::kFloat32) {
    return backward_typed<float>(p, grad_y, x, p_logit, grad_x, grad_p_logit, workspace);
  }
  throw std::invalid_argument("concrete_dropout: float32 or float64 only");
}

}  // namespace bdlkern
