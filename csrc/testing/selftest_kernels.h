// Raw-pointer entry points of the SIMT emulator's self-test kernels (csrc/testing/selftest.cu).
// They exercise every emulated feature: run under SimtTag they test the emulator against a
// reference in tests/test_simt.py; run under CudaTag on a GPU they check that the emulator and
// the hardware agree. All pointers are in the backend's memory.
#pragma once

#include <stdint.h>

#include <bdlkern/common/backend.h>

namespace bdlkern {

// Number of int32 values selftest_indices writes per thread.
constexpr int kSelftestIndexFields = 12;
// Threads per block of selftest_block_sum (static shared-memory size).
constexpr int kSelftestReduceThreads = 256;
constexpr int kSelftestPoisonThreads = 4;  // threads of selftest_shared_poison's blocks
// Values selftest_shuffle writes per thread.
constexpr int kSelftestShuffleFields = 6;

enum SelftestWmmaType : int { kWmmaHalfFloat = 0, kWmmaHalfHalf = 1, kWmmaBf16Float = 2 };

// Every entry point launches on `stream` (the current stream of the op's device, as the kernels
// of bdlkern._C do; the emulator checks nothing about it).
#define BDLKERN_DECLARE_SELFTEST_KERNELS(Tag)                                                      \
  /* out[t, 0:12] = blockIdx.xyz, threadIdx.xyz, blockDim.xyz, gridDim.xyz for every thread t    \
     (t = linear block id * threads per block + linear thread id) */                              \
  void selftest_indices(Tag, void* stream, int32_t* out, const uint32_t grid[3], const uint32_t block[3]);     \
  /* static __shared__ + __syncthreads: block_sums[b] = tree sum of x[256 b, 256 b + 256),        \
     reversed[i] = x[mirror of i within its 256-block] (zero-padded past n) */                    \
  void selftest_block_sum(Tag, void* stream, const float* x, int64_t n, float* block_sums, float* reversed);    \
  /* warp shuffles and __syncwarp over n threads in blocks of `threads` (a multiple of 32);       \
     out[i, 0:6] = xor-butterfly sum, shfl_down sum, broadcast of lane 3, width-8 xor sum,         \
     width-8 shfl_down by 1, __syncwarp-ordered mirror through shared memory */                    \
  void selftest_shuffle(Tag, void* stream, const float* x, int64_t n, int threads, float* out);                 \
  /* atomicAdd of every element into totals: out_f += x, out_d += xd, counts of int, unsigned and \
     sum of indices as unsigned long long */                                                      \
  void selftest_atomic_add(Tag, void* stream, const float* x, const double* xd, int64_t n, int blocks,          \
                           int threads, float* out_f, double* out_d, int* count_i,                \
                           unsigned* count_u, unsigned long long* index_sum);                     \
  /* a barrier the emulator must refuse (mode 0: a thread exits before it; mode 1: divergent);   \
     the emulator only (it throws on a GPU) */                                                    \
  void selftest_bad_barrier(Tag, void* stream, int mode, int threads, int* out);                   \
  void selftest_shared_poison(Tag, void* stream, int blocks, uint32_t* out);                       \
  void selftest_big_shared(Tag, void* stream, float* out);                                         \
  /* one warp: d = a b + c with nvcuda::wmma m16n16k16. a, b: 16x16 tiles (half or bfloat16 by    \
     `type`) with leading dimensions lda, ldb, column-major when a_col / b_col; c, d: float or     \
     half tiles (ldc, ldd; col-major when c_col / d_col); c is ignored and the accumulator is      \
     filled with `fill` when use_fill */                                                           \
  void selftest_wmma(Tag, void* stream, int type, const void* a, int lda, bool a_col, const void* b, int ldb,   \
                     bool b_col, const void* c, int ldc, bool c_col, bool use_fill, float fill,   \
                     void* d, int ldd, bool d_col);

BDLKERN_DECLARE_SELFTEST_KERNELS(CudaTag)
BDLKERN_DECLARE_SELFTEST_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_SELFTEST_KERNELS

}  // namespace bdlkern
