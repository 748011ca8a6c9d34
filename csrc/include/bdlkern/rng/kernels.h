// Raw-pointer entry points of the random-stream kernels (torch-free).
//
// Each fills `out[0, n)` with element i of the logical Philox stream (docs/design.md section 2.3)
// after a per-element conversion. Arguments common to all:
//   out        device memory of the backend (host memory for CpuTag / SimtTag), n elements,
//              contiguous, allocated by the caller (16-byte aligned, as ATen allocations are);
//   n          number of elements, may exceed 2^31;
//   rng_state  int64[2] = (seed, offset) in the same memory as `out`; read inside the kernel so a
//              captured CUDA graph replays with whatever state the tensor holds at replay time;
//   tag        the stream tag (Philox counter word 2), < kNumStreams;
//   stream     cudaStream_t to launch on (CudaTag only; ignored elsewhere).
#pragma once

#include <stdint.h>

#include <bdlkern/common/backend.h>

namespace bdlkern {

#define BDLKERN_DECLARE_RNG_KERNELS(Tag)                                                          \
  /* raw Philox4x32-10 of n (counter, key) pairs: counter int64 [n, 4], key int64 [n, 2] with     \
     values in [0, 2^32), out int64 [n, 4] (for known-answer tests of the shared function) */    \
  void philox4x32(Tag, const int64_t* counter, const int64_t* key, int64_t* out, int64_t n,     \
                  void* stream);                                                                 \
  /* raw 32-bit words */                                                                          \
  void philox_bits(Tag, uint32_t* out, int64_t n, const int64_t* rng_state, uint32_t tag,        \
                   void* stream);                                                                 \
  /* keep mask: out[i] = word_i < threshold (see keep_threshold in random.h) */                   \
  void dropout_mask(Tag, bool* out, int64_t n, const int64_t* rng_state, uint32_t tag,           \
                    uint64_t threshold, void* stream);                                            \
  /* uniform in (0, 1) from the top 24 bits of each word */                                       \
  void uniform(Tag, float* out, int64_t n, const int64_t* rng_state, uint32_t tag, void* stream); \
  void uniform(Tag, double* out, int64_t n, const int64_t* rng_state, uint32_t tag,              \
               void* stream);                                                                     \
  /* standard normal, Box-Muller on lanes (0,1) and (2,3) of each block */                        \
  void normal(Tag, float* out, int64_t n, const int64_t* rng_state, uint32_t tag, void* stream);  \
  void normal(Tag, double* out, int64_t n, const int64_t* rng_state, uint32_t tag, void* stream);

BDLKERN_DECLARE_RNG_KERNELS(CpuTag)
BDLKERN_DECLARE_RNG_KERNELS(CudaTag)
BDLKERN_DECLARE_RNG_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_RNG_KERNELS

}  // namespace bdlkern
