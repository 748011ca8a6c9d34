#include "philox_simd.h"

#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ < 13
// GCC 12's avx512fintrin.h trips -Wuninitialized inside _mm512_set1_epi32 & co (a known false
// positive, fixed in GCC 13).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define BDLKERN_X86 1
#endif

namespace bdlkern {
namespace cpu {
namespace {

using philox_detail::kMul0;
using philox_detail::kMul1;
using philox_detail::kWeyl0;
using philox_detail::kWeyl1;

// Counter words 0 and 1 of the 16 blocks (the 64-bit block index, offset added, wrapping).
inline void block_counters(const PhiloxStream& s, uint64_t first, uint32_t lo[kBatchBlocks],
                           uint32_t hi[kBatchBlocks]) {
  for (int j = 0; j < kBatchBlocks; ++j) {
    const uint64_t b = first + static_cast<uint64_t>(j) + s.offset;
    lo[j] = static_cast<uint32_t>(b);
    hi[j] = static_cast<uint32_t>(b >> 32);
  }
}

void batch_scalar(const PhiloxStream& s, uint64_t first, uint32_t* words) {
  for (int j = 0; j < kBatchBlocks; ++j) {
    const PhiloxBlock blk = s.block(first + static_cast<uint64_t>(j));
    for (int l = 0; l < 4; ++l) words[4 * j + l] = blk.w[l];
  }
}

#if defined(BDLKERN_X86)

__attribute__((target("avx2"))) inline void mulhilo8(__m256i a, __m256i m, __m256i* lo,
                                                      __m256i* hi) {
  const __m256i even = _mm256_mul_epu32(a, m);                         // lanes 0,2,4,6
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);  // lanes 1,3,5,7
  *lo = _mm256_mullo_epi32(a, m);  // one multiply instead of a shift and a blend
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// 16 blocks as two groups of 8 (c[g][0..3] hold one counter word each, lane j = block 8 g + j),
// their rounds interleaved: each round's multiply-xor chain is serial, two independent ones keep
// the vector units busy.
__attribute__((target("avx2"))) void rounds16(__m256i (&c)[2][4], uint32_t k0, uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kMul0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kMul1));
  for (int round = 0; round < 10; ++round) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0));
    const __m256i key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int g = 0; g < 2; ++g) {
      __m256i lo0, hi0, lo1, hi1;
      mulhilo8(c[g][0], m0, &lo0, &hi0);
      mulhilo8(c[g][2], m1, &lo1, &hi1);
      c[g][0] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[g][1]), key0);
      c[g][1] = lo1;
      c[g][2] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[g][3]), key1);
      c[g][3] = lo0;
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

// Interleave four word-vectors (8 blocks) into words[4 j + l].
__attribute__((target("avx2"))) void store_interleaved8(__m256i c0, __m256i c1, __m256i c2,
                                                        __m256i c3, uint32_t* words) {
  const __m256i t0 = _mm256_unpacklo_epi32(c0, c1);  // b0w0 b0w1 b1w0 b1w1 | b4.. b5..
  const __m256i t1 = _mm256_unpackhi_epi32(c0, c1);  // b2.. b3.. | b6.. b7..
  const __m256i t2 = _mm256_unpacklo_epi32(c2, c3);
  const __m256i t3 = _mm256_unpackhi_epi32(c2, c3);
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2);  // b0 (4 words) | b4
  const __m256i u1 = _mm256_unpackhi_epi64(t0, t2);  // b1 | b5
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3);  // b2 | b6
  const __m256i u3 = _mm256_unpackhi_epi64(t1, t3);  // b3 | b7
  auto* out = reinterpret_cast<__m256i*>(words);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(u0, u1, 0x20));  // b0 b1
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(u2, u3, 0x20));  // b2 b3
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(u0, u1, 0x31));  // b4 b5
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(u2, u3, 0x31));  // b6 b7
}

__attribute__((target("avx2"))) void batch_avx2(const PhiloxStream& s, uint64_t first,
                                                uint32_t* words) {
  uint32_t lo[kBatchBlocks], hi[kBatchBlocks];
  block_counters(s, first, lo, hi);
  __m256i c[2][4];
  for (int g = 0; g < 2; ++g) {
    c[g][0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + 8 * g));
    c[g][1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + 8 * g));
    c[g][2] = _mm256_set1_epi32(static_cast<int>(s.tag));
    c[g][3] = _mm256_setzero_si256();
  }
  rounds16(c, static_cast<uint32_t>(s.seed), static_cast<uint32_t>(s.seed >> 32));
  for (int g = 0; g < 2; ++g) store_interleaved8(c[g][0], c[g][1], c[g][2], c[g][3], words + 32 * g);
}

__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i m, __m512i* lo,
                                                         __m512i* hi) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

__attribute__((target("avx512f"))) void batch_avx512(const PhiloxStream& s, uint64_t first,
                                                     uint32_t* words) {
  uint32_t lo[kBatchBlocks], hi[kBatchBlocks];
  block_counters(s, first, lo, hi);
  __m512i c0 = _mm512_loadu_si512(lo);
  __m512i c1 = _mm512_loadu_si512(hi);
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(s.tag));
  __m512i c3 = _mm512_setzero_si512();
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kMul0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kMul1));
  uint32_t k0 = static_cast<uint32_t>(s.seed);
  uint32_t k1 = static_cast<uint32_t>(s.seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i lo0, hi0, lo1, hi1;
    mulhilo16(c0, m0, &lo0, &hi0);
    mulhilo16(c2, m1, &lo1, &hi1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  // Interleave: first pair words (0,1) and (2,3) of each block, then pairs of pairs.
  const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i pair_hi =
      _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i p01_lo = _mm512_permutex2var_epi32(c0, pair_lo, c1);  // blocks 0-7, words 0,1
  const __m512i p01_hi = _mm512_permutex2var_epi32(c0, pair_hi, c1);  // blocks 8-15
  const __m512i p23_lo = _mm512_permutex2var_epi32(c2, pair_lo, c3);
  const __m512i p23_hi = _mm512_permutex2var_epi32(c2, pair_hi, c3);
  const __m512i quad_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i quad_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  _mm512_storeu_si512(words + 0, _mm512_permutex2var_epi64(p01_lo, quad_lo, p23_lo));
  _mm512_storeu_si512(words + 16, _mm512_permutex2var_epi64(p01_lo, quad_hi, p23_lo));
  _mm512_storeu_si512(words + 32, _mm512_permutex2var_epi64(p01_hi, quad_lo, p23_hi));
  _mm512_storeu_si512(words + 48, _mm512_permutex2var_epi64(p01_hi, quad_hi, p23_hi));
}

#endif  // BDLKERN_X86

}  // namespace

SimdPath best_simd_path() {
  SimdPath best = SimdPath::kScalar;
#if defined(BDLKERN_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) {
    best = SimdPath::kAvx512;
  } else if (__builtin_cpu_supports("avx2")) {
    best = SimdPath::kAvx2;
  }
#endif
  const char* env = getenv("BDLKERN_CPU_SIMD");
  if (env != nullptr) {
    SimdPath cap = best;
    if (strcmp(env, "scalar") == 0) cap = SimdPath::kScalar;
    if (strcmp(env, "avx2") == 0) cap = SimdPath::kAvx2;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

PhiloxBatchFn philox_batch_fn(SimdPath path) {
#if defined(BDLKERN_X86)
  if (path == SimdPath::kAvx512) return batch_avx512;
  if (path == SimdPath::kAvx2) return batch_avx2;
#endif
  (void)path;
  return batch_scalar;
}

PhiloxBatchFn default_philox_batch() {
  static const PhiloxBatchFn fn = philox_batch_fn(best_simd_path());
  return fn;
}

void stream_words(const PhiloxStream& stream, uint64_t begin, int64_t count, uint32_t* out) {
  const PhiloxBatchFn batch = default_philox_batch();
  alignas(64) uint32_t words[kBatchWords];
  uint64_t block = begin >> 2;
  int64_t skip = static_cast<int64_t>(begin & 3);
  for (int64_t done = 0; done < count; block += kBatchBlocks, skip = 0) {
    if (skip == 0 && count - done >= kBatchWords) {  // a whole batch: straight into out
      batch(stream, block, out + done);
      done += kBatchWords;
      continue;
    }
    batch(stream, block, words);
    const int64_t take = count - done < kBatchWords - skip ? count - done : kBatchWords - skip;
    memcpy(out + done, words + skip, static_cast<size_t>(take) * sizeof(uint32_t));
    done += take;
  }
}

const char* simd_path_name(SimdPath path) {
  switch (path) {
    case SimdPath::kAvx512:
      return "avx512";
    case SimdPath::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace cpu
}  // namespace bdlkern
