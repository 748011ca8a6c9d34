// Self-test kernels for the SIMT emulator (bdlkern/common/simt.h): one small kernel per emulated feature.
// They are ordinary CUDA: nvcc compiles them into the real extension too, so on a GPU the same
// kernels check that the emulator and the hardware agree. Entry points: selftest_kernels.h.
#include <bdlkern/common/device.h>
#include "selftest_kernels.h"

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

__global__ void indices_kernel(int32_t* out) {
  const int64_t block_linear =
      blockIdx.x + static_cast<int64_t>(gridDim.x) * (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z);
  const int64_t threads = static_cast<int64_t>(blockDim.x) * blockDim.y * blockDim.z;
  const int64_t tid = threadIdx.x + static_cast<int64_t>(blockDim.x) * (threadIdx.y + static_cast<int64_t>(blockDim.y) * threadIdx.z);
  int32_t* o = out + (block_linear * threads + tid) * kSelftestIndexFields;
  o[0] = blockIdx.x;
  o[1] = blockIdx.y;
  o[2] = blockIdx.z;
  o[3] = threadIdx.x;
  o[4] = threadIdx.y;
  o[5] = threadIdx.z;
  o[6] = blockDim.x;
  o[7] = blockDim.y;
  o[8] = blockDim.z;
  o[9] = gridDim.x;
  o[10] = gridDim.y;
  o[11] = gridDim.z;
}

__global__ void block_sum_kernel(const float* x, int64_t n, float* block_sums, float* reversed) {
  constexpr int T = kSelftestReduceThreads;
  BDL_SHARED(float, tile, [T]);
  const int t = threadIdx.x;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * T + t;
  tile[t] = i < n ? x[i] : 0.0f;
  __syncthreads();
  // Read a value another thread wrote: wrong without the barrier above.
  if (i < n) reversed[i] = tile[T - 1 - t];
  __syncthreads();
  for (int s = T / 2; s > 0; s >>= 1) {
    if (t < s) tile[t] += tile[t + s];
    __syncthreads();
  }
  if (t == 0) block_sums[blockIdx.x] = tile[0];
}

__global__ void shuffle_kernel(const float* x, int64_t n, float* out) {
  BDL_SHARED(float, mirror, [1024]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const int warp_base = threadIdx.x - lane;
  const float v = i < n ? x[i] : 0.0f;
  const unsigned full = 0xffffffffu;

  float butterfly = v;
  for (int m = 16; m >= 1; m >>= 1) butterfly += __shfl_xor_sync(full, butterfly, m);
  float down = v;
  for (int d = 16; d >= 1; d >>= 1) down += __shfl_down_sync(full, down, d);
  const float broadcast = __shfl_sync(full, v, 3);
  float butterfly8 = v;
  for (int m = 4; m >= 1; m >>= 1) butterfly8 += __shfl_xor_sync(full, butterfly8, m, 8);
  const float down8 = __shfl_down_sync(full, v, 1, 8);

  mirror[threadIdx.x] = v;
  __syncwarp();
  const float mirrored = mirror[warp_base + 31 - lane];

  if (i < n) {
    float* o = out + i * kSelftestShuffleFields;
    o[0] = butterfly;
    o[1] = down;
    o[2] = broadcast;
    o[3] = butterfly8;
    o[4] = down8;
    o[5] = mirrored;
  }
}

__global__ void atomic_kernel(const float* x, const double* xd, int64_t n, float* out_f,
                              double* out_d, int* count_i, unsigned* count_u,
                              unsigned long long* index_sum) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    atomicAdd(out_f, x[i]);
    atomicAdd(out_d, xd[i]);
    atomicAdd(count_i, 1);
    atomicAdd(count_u, 1u);
    atomicAdd(index_sum, static_cast<unsigned long long>(i));
  }
}

// Explicit conversions: torch builds CUDA code with the implicit __half conversions disabled.
BDL_HDI float accumulator_value(float v, const float*) { return v; }
BDL_HDI __half accumulator_value(float v, const __half*) { return __float2half_rn(v); }

// Barriers the emulator must refuse (tests/test_simt.py, in a child process: it aborts). mode 0:
// thread 0 exits before the __syncthreads the others reach; mode 1: the two halves of the block
// wait at two different __syncthreads. Undefined behaviour on a GPU (a hang or an early release):
// the entry point runs it under the emulator only.
__global__ void bad_barrier_kernel(int mode, int* out) {
  if (mode == 0) {
    if (threadIdx.x == 0) return;
    __syncthreads();
  } else if (threadIdx.x < blockDim.x / 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

// Reads shared memory before writing it (tests/test_simt.py): thread t of block b stores what
// s[t] held at the block's start, then writes its own value. Under the emulator every read is
// the poison (0xffffffff), never 0 (a static's zero initialisation) nor an earlier block's or
// launch's 42 + t. Reading unwritten shared memory is undefined on a GPU: emulator only.
__global__ void shared_poison_kernel(uint32_t* out) {
  BDL_SHARED(uint32_t, s, [kSelftestPoisonThreads]);
  const unsigned t = threadIdx.x;
  out[blockIdx.x * kSelftestPoisonThreads + t] = s[t];
  __syncthreads();
  s[t] = 42u + t;
}

#ifdef BDLKERN_SIMT
// 48 KiB + 4 bytes of static shared memory: ptxas refuses it, the emulator must too (emulator only:
// it would not compile for a GPU).
__global__ void big_shared_kernel(float* out) {
  BDL_SHARED(float, big, [12 * 1024 + 1]);
  big[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = big[threadIdx.x];
}
#endif

template <typename TIn, typename LayoutA, typename LayoutB, typename TAcc>
__global__ void wmma_kernel(const TIn* a, int lda, const TIn* b, int ldb, const TAcc* c, int ldc,
                            bool c_col, bool use_fill, float fill, TAcc* d, int ldd, bool d_col) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, TIn, LayoutA> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, TIn, LayoutB> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, TAcc> acc;
  wmma::load_matrix_sync(fa, a, lda);
  wmma::load_matrix_sync(fb, b, ldb);
  if (use_fill) {
    wmma::fill_fragment(acc, accumulator_value(fill, d));
  } else {
    wmma::load_matrix_sync(acc, c, ldc, c_col ? wmma::mem_col_major : wmma::mem_row_major);
  }
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(d, acc, ldd, d_col ? wmma::mem_col_major : wmma::mem_row_major);
}

template <typename TIn, typename LayoutA, typename LayoutB, typename TAcc>
void run_wmma(void* stream, const void* a, int lda, const void* b, int ldb, const void* c,
              int ldc, bool c_col, bool use_fill, float fill, void* d, int ldd, bool d_col) {
  launch(wmma_kernel<TIn, LayoutA, LayoutB, TAcc>, dim3(1), dim3(32), 0, stream,
         static_cast<const TIn*>(a), lda, static_cast<const TIn*>(b), ldb,
         static_cast<const TAcc*>(c), ldc, c_col, use_fill, fill, static_cast<TAcc*>(d), ldd,
         d_col);
}

template <typename TIn, typename TAcc>
void run_wmma_layouts(void* stream, bool a_col, bool b_col, const void* a, int lda,
                      const void* b, int ldb, const void* c, int ldc, bool c_col, bool use_fill,
                      float fill, void* d, int ldd, bool d_col) {
  using R = nvcuda::wmma::row_major;
  using C = nvcuda::wmma::col_major;
  if (!a_col && !b_col) {
    run_wmma<TIn, R, R, TAcc>(stream, a, lda, b, ldb, c, ldc, c_col, use_fill, fill, d, ldd, d_col);
  } else if (!a_col && b_col) {
    run_wmma<TIn, R, C, TAcc>(stream, a, lda, b, ldb, c, ldc, c_col, use_fill, fill, d, ldd, d_col);
  } else if (a_col && !b_col) {
    run_wmma<TIn, C, R, TAcc>(stream, a, lda, b, ldb, c, ldc, c_col, use_fill, fill, d, ldd, d_col);
  } else {
    run_wmma<TIn, C, C, TAcc>(stream, a, lda, b, ldb, c, ldc, c_col, use_fill, fill, d, ldd, d_col);
  }
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using SelftestTag = BDLKERN_DEVICE_TAG;

void selftest_indices(SelftestTag, void* stream, int32_t* out, const uint32_t grid[3], const uint32_t block[3]) {
  BDLKERN_DEVICE_NS::launch(BDLKERN_DEVICE_NS::indices_kernel, dim3(grid[0], grid[1], grid[2]),
                            dim3(block[0], block[1], block[2]), 0, stream, out);
}

void selftest_block_sum(SelftestTag, void* stream, const float* x, int64_t n, float* block_sums,
                        float* reversed) {
  const int64_t blocks = (n + kSelftestReduceThreads - 1) / kSelftestReduceThreads;
  if (blocks == 0) return;
  BDLKERN_DEVICE_NS::launch(BDLKERN_DEVICE_NS::block_sum_kernel, dim3(static_cast<unsigned>(blocks)),
                            dim3(kSelftestReduceThreads), 0, stream, x, n, block_sums, reversed);
}

void selftest_shuffle(SelftestTag, void* stream, const float* x, int64_t n, int threads, float* out) {
  const int64_t blocks = (n + threads - 1) / threads;
  if (blocks == 0) return;
  BDLKERN_DEVICE_NS::launch(BDLKERN_DEVICE_NS::shuffle_kernel, dim3(static_cast<unsigned>(blocks)),
                            dim3(threads), 0, stream, x, n, out);
}

void selftest_atomic_add(SelftestTag, void* stream, const float* x, const double* xd, int64_t n, int blocks,
                         int threads, float* out_f, double* out_d, int* count_i,
                         unsigned* count_u, unsigned long long* index_sum) {
  BDLKERN_DEVICE_NS::launch(BDLKERN_DEVICE_NS::atomic_kernel, dim3(blocks), dim3(threads), 0,
                            stream, x, xd, n, out_f, out_d, count_i, count_u, index_sum);
}

void selftest_bad_barrier(SelftestTag, void* stream, int mode, int threads, int* out) {
#ifdef BDLKERN_SIMT
  BDLKERN_DEVICE_NS::launch(BDLKERN_DEVICE_NS::bad_barrier_kernel, dim3(1),
                            dim3(static_cast<unsigned>(threads)), 0, stream, mode, out);
#else
  (void)stream, (void)mode, (void)threads, (void)out;
  throw std::invalid_argument("selftest_bad_barrier: an emulator self-test; undefined behaviour on a GPU");
#endif
}

void selftest_shared_poison(SelftestTag, void* stream, int blocks, uint32_t* out) {
#ifdef BDLKERN_SIMT
  BDLKERN_DEVICE_NS::launch(BDLKERN_DEVICE_NS::shared_poison_kernel,
                            dim3(static_cast<unsigned>(blocks)), dim3(kSelftestPoisonThreads), 0,
                            stream, out);
#else
  (void)stream, (void)blocks, (void)out;
  throw std::invalid_argument("selftest_shared_poison: an emulator self-test; undefined behaviour on a GPU");
#endif
}

void selftest_big_shared(SelftestTag, void* stream, float* out) {
#ifdef BDLKERN_SIMT
  BDLKERN_DEVICE_NS::launch(BDLKERN_DEVICE_NS::big_shared_kernel, dim3(1), dim3(2), 0, stream, out);
#else
  (void)stream, (void)out;
  throw std::invalid_argument("selftest_big_shared: an emulator self-test; it does not compile for a GPU");
#endif
}

void selftest_wmma(SelftestTag, void* stream, int type, const void* a, int lda, bool a_col, const void* b,
                   int ldb, bool b_col, const void* c, int ldc, bool c_col, bool use_fill,
                   float fill, void* d, int ldd, bool d_col) {
  using namespace BDLKERN_DEVICE_NS;
  switch (type) {
    case kWmmaHalfFloat:
      run_wmma_layouts<__half, float>(stream, a_col, b_col, a, lda, b, ldb, c, ldc, c_col,
                                      use_fill, fill, d, ldd, d_col);
      break;
    case kWmmaHalfHalf:
      run_wmma_layouts<__half, __half>(stream, a_col, b_col, a, lda, b, ldb, c, ldc, c_col, use_fill,
                                       fill, d, ldd, d_col);
      break;
    case kWmmaBf16Float:
      run_wmma_layouts<__nv_bfloat16, float>(stream, a_col, b_col, a, lda, b, ldb, c, ldc, c_col,
                                             use_fill, fill, d, ldd, d_col);
      break;
    default:
      throw std::invalid_argument("selftest_wmma: unknown type");
  }
}

}  // namespace bdlkern
