// CUDA kernels of the fused Gaussian dropout (entry points and semantics:
// bdlkern/gaussian/kernels.h). Also compiled under the SIMT emulator (csrc/testing/simt/).
//
// Two launch shapes, one per noise layout of x viewed as [M, C, L]; every block index is on
// gridDim.x (gridDim.y is limited to 65535) and the blocks stride over the work (grid-stride):
//   * L == 1 (noise per element): work item (tile, column block) = a tile of tile_rows rows and
//     4 * kThreads channels; thread j owns the channel quad c0 + 4 j .. +3 (one Philox block, so
//     one Box-Muller pair per two normals, when C % 4 == 0) and walks the rows of the tile,
//     reading x in coalesced runs along c. In backward it sums its channels' grad_y * x * eps
//     over the rows in registers and writes them to partial[tile, c].
//   * L > 1 (noise per (m, c), spatial): one warp per (m, c) pair, lanes striding along the L
//     contiguous elements; backward reduces grad_y * x over the warp with shuffles and lane 0
//     writes partial[m, c] = eps * that sum.
// A second kernel adds the partials in tile order (and, for one alpha per layer, the channels in
// a fixed tree) and multiplies by 0.5 sqrt(alpha): no atomics, so the log_alpha gradient has the
// same bits on every run.
#include <bdlkern/common/device.h>
#include <bdlkern/gaussian/kernels.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include <math.h>
#include <stdint.h>

#include <stdexcept>

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kThreads = 128;             // threads per block, every kernel
constexpr int kQuadsPerBlock = kThreads;  // L == 1: channel quads per block
constexpr int64_t kMaxRowTiles = 256;     // L == 1: at most this many row tiles
constexpr int64_t kMinTileRows = 8;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = 4096;      // grid-stride cap of the map kernels

struct Shape {
  int64_t M, C, L;
  int64_t tile_rows;   // L == 1
  int64_t row_tiles;   // L == 1: partial rows; L > 1: M
  int64_t col_blocks;  // L == 1: blocks of 4 * kThreads channels
};

inline Shape make_shape(const GaussianDropoutParams& p) {
  Shape s{p.rows, p.channels, p.inner, 1, p.rows, 1};
  if (p.inner == 1) {
    s.tile_rows = (p.rows + kMaxRowTiles - 1) / kMaxRowTiles;
    if (s.tile_rows < kMinTileRows) s.tile_rows = kMinTileRows;
    s.row_tiles = (p.rows + s.tile_rows - 1) / s.tile_rows;
    s.col_blocks = (p.channels + 4 * kQuadsPerBlock - 1) / (4 * kQuadsPerBlock);
  }
  return s;
}

// sqrt(alpha) = exp(0.5 log_alpha).
__device__ __forceinline__ float noise_scale(float log_alpha) { return expf(0.5f * log_alpha); }
__device__ __forceinline__ double noise_scale(double log_alpha) { return exp(0.5 * log_alpha); }

// The normals of stream elements first .. first + valid - 1 (valid <= 4): one Philox block when
// they are its four lanes, else one lane pair per element (normal_at), the `normal` op's values.
template <typename T>
__device__ __forceinline__ void quad_normals(const PhiloxStream& stream, uint64_t first, int valid,
                                             T eps[4]) {
  if (valid == 4 && (first & 3u) == 0) {
    normal4<T>(stream.block(first >> 2), eps);
    return;
  }
  for (int j = 0; j < valid; ++j) eps[j] = normal_at<T>(stream, first + j);
}

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    gaussian_rows_kernel(GaussianDropoutParams p, Shape sh, const T* __restrict__ x,
                         const T* __restrict__ g, const T* __restrict__ log_alpha,
                         T* __restrict__ out, T* __restrict__ partial) {
  const PhiloxStream stream = make_stream(p.rng_state, kStreamGaussianDropout);
  const int64_t items = sh.row_tiles * sh.col_blocks;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t tile = item / sh.col_blocks;
    const int64_t c0 = ((item % sh.col_blocks) * kQuadsPerBlock + threadIdx.x) * 4;
    if (c0 >= sh.C) continue;  // no barrier in this kernel
    const int valid = sh.C - c0 >= 4 ? 4 : static_cast<int>(sh.C - c0);
    T s[4];
    for (int j = 0; j < valid; ++j) s[j] = noise_scale(log_alpha[p.per_channel_alpha ? c0 + j : 0]);
    T acc[4] = {T(0), T(0), T(0), T(0)};
    const int64_t m_end = (tile + 1) * sh.tile_rows < sh.M ? (tile + 1) * sh.tile_rows : sh.M;
    for (int64_t m = tile * sh.tile_rows; m < m_end; ++m) {
      T eps[4];
      quad_normals<T>(stream, static_cast<uint64_t>(m * sh.C + c0), valid, eps);
      for (int j = 0; j < valid; ++j) {
        const int64_t e = m * sh.C + c0 + j;
        const T f = T(1) + s[j] * eps[j];
        if (kBackward) {
          out[e] = g[e] * f;
          acc[j] += g[e] * x[e] * eps[j];
        } else {
          out[e] = x[e] * f;
        }
      }
    }
    if (kBackward) {
      for (int j = 0; j < valid; ++j) partial[tile * sh.C + c0 + j] = acc[j];
    }
  }
}

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads)
    gaussian_pairs_kernel(GaussianDropoutParams p, Shape sh, const T* __restrict__ x,
                          const T* __restrict__ g, const T* __restrict__ log_alpha,
                          T* __restrict__ out, T* __restrict__ partial) {
  const PhiloxStream stream = make_stream(p.rng_state, kStreamGaussianDropout);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t pairs = sh.M * sh.C;
  // Every lane of a warp runs the same number of iterations (the shuffles need the whole warp).
  for (int64_t pair = warp; pair < pairs; pair += num_warps) {
    const int64_t c = pair % sh.C;
    const T eps = normal_at<T>(stream, static_cast<uint64_t>(pair));
    const T f = T(1) + noise_scale(log_alpha[p.per_channel_alpha ? c : 0]) * eps;
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
      if (lane == 0) partial[pair] = dot * eps;
    }
  }
}

// grad_log_alpha[c] = 0.5 sqrt(alpha_c) sum_t partial[t, c] (one alpha per channel), or one block
// adding every channel in a fixed tree (one alpha for the layer). Channel blocks stride over C.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const T* __restrict__ partial, int64_t tiles, int64_t C,
                           bool per_channel, const T* __restrict__ log_alpha,
                           T* __restrict__ grad_log_alpha) {
  BDL_SHARED(T, tree, [kThreads]);
  if (per_channel) {  // per-channel launches use no barrier
    for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
         c += static_cast<int64_t>(gridDim.x) * kThreads) {
      T sum = T(0);
      for (int64_t t = 0; t < tiles; ++t) sum += partial[t * C + c];
      grad_log_alpha[c] = T(0.5) * noise_scale(log_alpha[c]) * sum;
    }
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
  if (threadIdx.x == 0) grad_log_alpha[0] = T(0.5) * noise_scale(log_alpha[0]) * tree[0];
}

inline unsigned grid_for(int64_t work) {
  return static_cast<unsigned>(work < kMaxBlocks ? (work > 0 ? work : 1) : kMaxBlocks);
}

template <typename T, bool kBackward>
void run_map(const GaussianDropoutParams& p, const Shape& sh, const T* x, const T* g,
             const T* log_alpha, T* out, T* partial) {
  if (sh.M == 0 || sh.C == 0) return;
  if (sh.L == 1) {
    launch(gaussian_rows_kernel<T, kBackward>, dim3(grid_for(sh.row_tiles * sh.col_blocks)),
           dim3(kThreads), 0, p.stream, p, sh, x, g, log_alpha, out, partial);
  } else {
    const int64_t pairs = sh.M * sh.C;
    launch(gaussian_pairs_kernel<T, kBackward>,
           dim3(grid_for((pairs + kWarpsPerBlock - 1) / kWarpsPerBlock)), dim3(kThreads), 0,
           p.stream, p, sh, x, g, log_alpha, out, partial);
  }
}

template <typename T>
void forward_typed(const GaussianDropoutParams& p, const void* x, const void* log_alpha,
                   void* y) {
  const Shape sh = make_shape(p);
  run_map<T, false>(p, sh, static_cast<const T*>(x), nullptr, static_cast<const T*>(log_alpha),
                    static_cast<T*>(y), nullptr);
}

template <typename T>
void backward_typed(const GaussianDropoutParams& p, const void* g, const void* x,
                    const void* log_alpha, void* grad_x, void* grad_log_alpha, void* workspace) {
  const Shape sh = make_shape(p);
  T* partial = static_cast<T*>(workspace);
  const int64_t tiles = sh.M == 0 ? 0 : sh.row_tiles;
  run_map<T, true>(p, sh, static_cast<const T*>(x), static_cast<const T*>(g),
                   static_cast<const T*>(log_alpha), static_cast<T*>(grad_x), partial);
  const int64_t blocks = p.per_channel_alpha ? (p.channels + kThreads - 1) / kThreads : 1;
  launch(reduce_partials_kernel<T>, dim3(grid_for(blocks)), dim3(kThreads), 0, p.stream,
         static_cast<const T*>(partial), tiles, p.channels, p.per_channel_alpha,
         static_cast<const T*>(log_alpha), static_cast<T*>(grad_log_alpha));
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using DeviceTag = BDLKERN_DEVICE_TAG;

void gaussian_dropout_forward(DeviceTag, const GaussianDropoutParams& p, const void* x,
                              const void* log_alpha, void* y) {
  using namespace BDLKERN_DEVICE_NS;
  if (p.dtype == DType::kFloat64) return forward_typed<double>(p, x, log_alpha, y);
  if (p.dtype == DType::kFloat32) return forward_typed<float>(p, x, log_alpha, y);
  throw std::invalid_argument("gaussian_dropout: float32 or float64 only");
}

int64_t gaussian_dropout_backward_workspace(DeviceTag, const GaussianDropoutParams& p) {
  const BDLKERN_DEVICE_NS::Shape sh = BDLKERN_DEVICE_NS::make_shape(p);
  const int64_t elem = p.dtype == DType::kFloat64 ? 8 : 4;
  const int64_t n = sh.row_tiles * sh.C;
  return (n > 0 ? n : 1) * elem;
}

void gaussian_dropout_backward(DeviceTag, const GaussianDropoutParams& p, const void* grad_y,
                               const void* x, const void* log_alpha, void* grad_x,
                               void* grad_log_alpha, void* workspace) {
  using namespace BDLKERN_DEVICE_NS;
  if (p.dtype == DType::kFloat64) {
    return backward_typed<double>(p, grad_y, x, log_alpha, grad_x, grad_log_alpha, workspace);
  }
  if (p.dtype == DType::kFloat32) {
    return backward_typed<float>(p, grad_y, x, log_alpha, grad_x, grad_log_alpha, workspace);
  }
  throw std::invalid_argument("gaussian_dropout: float32 or float64 only");
}

}  // namespace bdlkern
