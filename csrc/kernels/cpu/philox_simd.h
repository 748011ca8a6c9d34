// Philox4x32-10 for 16 consecutive blocks at once, with SIMD paths picked at run time.
//
// One SIMD lane per block: AVX-512 computes all 16 blocks in one register per counter word, AVX2
// in two, and a portable scalar loop is the fallback. The 32x32 -> 64-bit products use
// (v)pmuludq on the even and odd lanes separately. The bits are those of PhiloxStream::block()
// on every path (tests/test_rng.py checks each path the CPU has against the scalar one).
#pragma once

#include <stdint.h>

#include <bdlkern/rng/philox.h>

namespace bdlkern {
namespace cpu {

constexpr int kBatchBlocks = 16;
constexpr int kBatchWords = 4 * kBatchBlocks;

// words[4 * j + l] = lane l of block (first_block + j) of `stream`, j < kBatchBlocks.
using PhiloxBatchFn = void (*)(const PhiloxStream& stream, uint64_t first_block, uint32_t* words);

enum class SimdPath : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest path this CPU supports, unless BDLKERN_CPU_SIMD=scalar|avx2|avx512 narrows it.
SimdPath best_simd_path();

// The batch function of best_simd_path(), chosen once.
PhiloxBatchFn default_philox_batch();

// out[j] = word (begin + j) of `stream`, j < count: any start, any length, SIMD batches.
void stream_words(const PhiloxStream& stream, uint64_t begin, int64_t count, uint32_t* out);
PhiloxBatchFn philox_batch_fn(SimdPath path);

// z[2k], z[2k + 1] = the standard normals of stream words (2k, 2k + 1), k < pairs: Box-Muller on
// lane pairs as random.h's box_muller, with the vectorised float32 math of vec_math.h (defined in
// csrc/kernels/cpu/rng.cpp; a few ulp from libm).
void normals_f32(int64_t pairs, const uint32_t* words, float* z);
// out[i] = mean[i] + scale[i] * z[i], z the normals normals_f32 would write (i < 2 pairs).
void normals_affine_f32(int64_t pairs, const uint32_t* words, const float* mean,
                        const float* scale, float* out);
const char* simd_path_name(SimdPath path);

}  // namespace cpu
}  // namespace bdlkern
