// CPU kernels of the random-stream ops: the same per-block conversions as csrc/cuda/rng.cu, run
// over chunks of Philox blocks with at::parallel_for. Each output depends only on its logical
// index, so any chunking and any thread count give the same bits.
//
// Philox runs 16 blocks at a time on the widest SIMD path of the CPU (philox_simd.h); the
// per-block conversions are the shared ones of random.h.
#include <ATen/Parallel.h>

#include <bdlkern/philox.h>
#include <bdlkern/random.h>
#include <bdlkern/rng_kernels.h>

#include "philox_simd.h"

// Selects of the vectorised float32 normals may run on every lane (see vec_math.h); the scheduler
// pass interleaves independent polynomial chains (normals_body).
#pragma GCC optimize("no-trapping-math", "schedule-insns")

#include "vec_math.h"

namespace bdlkern {
namespace {

// z[2k], z[2k + 1] = Box-Muller of words (2k, 2k + 1): the normals of whole Philox blocks.
inline __attribute__((always_inline)) void normal_pair(const uint32_t* words, float* z, int64_t k) {
  const uint32_t a = words[2 * k], b = words[2 * k + 1];
  const float r = cpu::vec::sqrt_positive(-2.0f * cpu::vec::log(cpu::vec::uniform(a)));
  float c, sn;
  cpu::vec::sincos_2pi(cpu::vec::uniform(b), &c, &sn);
  z[2 * k] = r * c;
  z[2 * k + 1] = r * sn;
}

// The polynomials are long serial chains: the loop takes the two halves' pairs side by side, and
// this file is compiled with the pre-register-allocation scheduler (pragma above), which
// interleaves the two chains (about 20% fewer cycles per normal on AVX2).
inline __attribute__((always_inline)) void normals_body(int64_t pairs, const uint32_t* words,
                                                        float* z) {
  const int64_t h = pairs / 2;
  for (int64_t k = 0; k < h; ++k) {
    normal_pair(words, z, k);
    normal_pair(words, z, h + k);
  }
  if (pairs & 1) normal_pair(words, z, pairs - 1);
}
BDLKERN_SIMD_FUNCTION(void, normals_f32_impl, (int64_t pairs, const uint32_t* words, float* z),
                      normals_body, (pairs, words, z))



// 4096 blocks (16K elements) per task: enough work to amortise a task, small enough to balance.
constexpr int64_t kGrainBlocks = 4096;

template <typename Op, typename T>
void fill_stream(T* out, int64_t n, const int64_t* rng_state, uint32_t tag, Op op) {
  if (n == 0) return;
  const PhiloxStream stream = make_stream(rng_state, tag);
  const cpu::PhiloxBatchFn batch = cpu::default_philox_batch();
  const int64_t num_blocks = (n + 3) / 4;
  at::parallel_for(0, num_blocks, kGrainBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[cpu::kBatchWords];
    for (int64_t b0 = begin; b0 < end; b0 += cpu::kBatchBlocks) {
      batch(stream, static_cast<uint64_t>(b0), words);
      const int64_t count = end - b0 < cpu::kBatchBlocks ? end - b0 : cpu::kBatchBlocks;
      for (int64_t j = 0; j < count; ++j) {
        const PhiloxBlock blk{{words[4 * j], words[4 * j + 1], words[4 * j + 2], words[4 * j + 3]}};
        const int64_t first = 4 * (b0 + j);
        if (first + 4 <= n) {
          op(blk, out + first);
        } else {  // the last, partial block of the tensor
          T tail[4];
          op(blk, tail);
          for (int64_t i = first; i < n; ++i) out[i] = tail[i - first];
        }
      }
    }
  });
}

}  // namespace

namespace cpu {
void normals_f32(int64_t pairs, const uint32_t* words, float* z) { normals_f32_impl(pairs, words, z); }
}  // namespace cpu

void philox4x32(CpuTag, const int64_t* counter, const int64_t* key, int64_t* out, int64_t n,
                void*) {
  for (int64_t i = 0; i < n; ++i) {
    philox4x32_int64(counter + 4 * i, key + 2 * i, out + 4 * i);
  }
}

void philox_bits(CpuTag, uint32_t* out, int64_t n, const int64_t* rng_state, uint32_t tag,
                 void*) {
  fill_stream(out, n, rng_state, tag, BitsOp{});
}

void dropout_mask(CpuTag, bool* out, int64_t n, const int64_t* rng_state, uint32_t tag,
                  uint64_t threshold, void*) {
  fill_stream(out, n, rng_state, tag, MaskOp{threshold});
}

void uniform(CpuTag, float* out, int64_t n, const int64_t* rng_state, uint32_t tag, void*) {
  fill_stream(out, n, rng_state, tag, UniformOp<float>{});
}

void uniform(CpuTag, double* out, int64_t n, const int64_t* rng_state, uint32_t tag, void*) {
  fill_stream(out, n, rng_state, tag, UniformOp<double>{});
}

void normal(CpuTag, float* out, int64_t n, const int64_t* rng_state, uint32_t tag, void*) {
  // Whole batches of 16 blocks: the vectorised Box-Muller straight into out; the last, partial
  // batch through a buffer.
  if (n == 0) return;
  const PhiloxStream stream = make_stream(rng_state, tag);
  const cpu::PhiloxBatchFn batch = cpu::default_philox_batch();
  const int64_t num_batches = (n + cpu::kBatchWords - 1) / cpu::kBatchWords;
  at::parallel_for(0, num_batches, kGrainBlocks / cpu::kBatchBlocks, [&](int64_t begin, int64_t end) {
    alignas(64) uint32_t words[cpu::kBatchWords];
    alignas(64) float z[cpu::kBatchWords];
    for (int64_t b = begin; b < end; ++b) {
      batch(stream, static_cast<uint64_t>(b * cpu::kBatchBlocks), words);
      const int64_t first = b * cpu::kBatchWords;
      if (first + cpu::kBatchWords <= n) {
        cpu::normals_f32(cpu::kBatchWords / 2, words, out + first);
      } else {
        cpu::normals_f32(cpu::kBatchWords / 2, words, z);
        for (int64_t i = first; i < n; ++i) out[i] = z[i - first];
      }
    }
  });
}

void normal(CpuTag, double* out, int64_t n, const int64_t* rng_state, uint32_t tag, void*) {
  fill_stream(out, n, rng_state, tag, NormalOp<double>{});
}

}  // namespace bdlkern
