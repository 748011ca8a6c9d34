// CPU kernels of the random-stream ops: the same per-block conversions as csrc/kernels/cuda/rng.cu, run
// over chunks of Philox blocks with at::parallel_for. Each output depends only on its logical
// index, so any chunking and any thread count give the same bits.
//
// Philox runs 16 blocks at a time on the widest SIMD path of the CPU (philox_simd.h); the
// per-block conversions are the shared ones of random.h.
#include <ATen/Parallel.h>

#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>
#include <bdlkern/rng/kernels.h>

#include "philox_simd.h"

// Selects of the vectorised float32 normals may run on every lane (see vec_math.h); the scheduler
// pass interleaves the independent log and sincos polynomial chains of each vector (normals_x8).
#pragma GCC optimize("no-trapping-math", "schedule-insns")

#include "vec_math.h"

namespace bdlkern {
namespace {

// The radius sqrt(-2 log u1): the AVX paths take the vector unit's square root (correctly
// rounded, and off the multiply pipes the Newton steps of sqrt_positive would occupy).
template <cpu::SimdPath kPath>
struct RadiusSqrt {
  __attribute__((always_inline)) cpu::vec::f8 operator()(cpu::vec::f8 v) const {
    if constexpr (kPath == cpu::SimdPath::kScalar) {
      return cpu::vec::sqrt_positive(v);
    } else {
      return cpu::vec::sqrt_avx(v);
    }
  }
};

// z[i .. i + 15] = Box-Muller of words i .. i + 15 (pairs (i + 2k, i + 2k + 1)); with kAffine,
// mean + scale * z instead (the LRT noise without a pass over a scratch row). mean and scale are
// null without kAffine: no offsets are taken from them.
//
// Eight pairs per vector: two vectors of words hold them interleaved (a0 b0 a1 b1 ...); one
// in-lane shuffle (shufps) splits them into the a's and the b's, in the lane order
// 0 1 4 5 | 2 3 6 7, and the unpacks that interleave cos and sin invert exactly that order, so
// the pairs need no cross-lane permutes.
template <cpu::SimdPath kPath, bool kAffine>
inline __attribute__((always_inline)) void normals_x8(int64_t i, const uint32_t* words,
                                                      const float* mean, const float* scale,
                                                      float* z) {
  using cpu::vec::f8;
  using cpu::vec::u8;
  u8 w0, w1;
  __builtin_memcpy(&w0, words + i, sizeof(w0));
  __builtin_memcpy(&w1, words + i + 8, sizeof(w1));
  const u8 a = __builtin_shufflevector(w0, w1, 0, 2, 8, 10, 4, 6, 12, 14);
  const u8 b = __builtin_shufflevector(w0, w1, 1, 3, 9, 11, 5, 7, 13, 15);
  f8 zc, zs;
  cpu::vec::box_muller(a, b, &zc, &zs, RadiusSqrt<kPath>{});
  f8 out[2] = {__builtin_shufflevector(zc, zs, 0, 8, 1, 9, 4, 12, 5, 13),
               __builtin_shufflevector(zc, zs, 2, 10, 3, 11, 6, 14, 7, 15)};
  for (int h = 0; h < 2; ++h) {
    if constexpr (kAffine) {
      f8 m, sc;
      __builtin_memcpy(&m, mean + i + 8 * h, sizeof(m));
      __builtin_memcpy(&sc, scale + i + 8 * h, sizeof(sc));
      out[h] = m + sc * out[h];
    }
    __builtin_memcpy(z + i + 8 * h, &out[h], sizeof(out[h]));
  }
}

// Every pair goes through the same vector code, the last < 8 from zero-padded copies: a
// normal's bits do not depend on where a call starts or ends.
template <cpu::SimdPath kPath, bool kAffine>
inline __attribute__((always_inline)) void normals_body(int64_t pairs, const uint32_t* words,
                                                        const float* mean, const float* scale,
                                                        float* z) {
  int64_t i = 0;
  for (; i + 16 <= 2 * pairs; i += 16) normals_x8<kPath, kAffine>(i, words, mean, scale, z);
  const int64_t rest = 2 * pairs - i;
  if (rest == 0) return;
  uint32_t w[16] = {};
  float m[16] = {}, sc[16] = {}, out[16];
  for (int64_t j = 0; j < rest; ++j) {
    w[j] = words[i + j];
    if constexpr (kAffine) {
      m[j] = mean[i + j];
      sc[j] = scale[i + j];
    }
  }
  normals_x8<kPath, kAffine>(0, w, m, sc, out);
  for (int64_t j = 0; j < rest; ++j) z[i + j] = out[j];
}
template <cpu::SimdPath kPath>
inline __attribute__((always_inline)) void normals_plain(int64_t pairs, const uint32_t* words,
                                                         float* z) {
  normals_body<kPath, false>(pairs, words, nullptr, nullptr, z);
}
template <cpu::SimdPath kPath>
inline __attribute__((always_inline)) void normals_affine(int64_t pairs, const uint32_t* words,
                                                          const float* mean, const float* scale,
                                                          float* out) {
  normals_body<kPath, true>(pairs, words, mean, scale, out);
}
BDLKERN_SIMD_FUNCTION_PATH(void, normals_f32_impl, (int64_t pairs, const uint32_t* words, float* z),
                           normals_plain, (pairs, words, z))
BDLKERN_SIMD_FUNCTION_PATH(void, normals_affine_f32_impl,
                           (int64_t pairs, const uint32_t* words, const float* mean,
                            const float* scale, float* out),
                           normals_affine, (pairs, words, mean, scale, out))

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
void normals_affine_f32(int64_t pairs, const uint32_t* words, const float* mean,
                        const float* scale, float* out) {
  normals_affine_f32_impl(pairs, words, mean, scale, out);
}
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
