// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) and the logical-stream addressing of docs/design.md section 2.3.
//
// Header-only and torch-free: the CPU kernels, the CUDA kernels and the SIMT emulation build all
// include this one definition, which is what makes the bits identical on every device.
#pragma once

#include <stdint.h>

#include <bdlkern/common/macros.h>

namespace bdlkern {

struct PhiloxBlock {
  uint32_t w[4];
};

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kWeyl1 = 0xBB67AE85u;  // sqrt(3) - 1

// 32x32 -> 64-bit product split into its high and low words.
BDL_HDI uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  *hi = __umulhi(a, b);
  return a * b;
#else
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}
}  // namespace philox_detail

// Philox4x32 with 10 rounds: counter c[0..3], key k[0..1].
BDL_HDI PhiloxBlock philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                  uint32_t k1) {
  using namespace philox_detail;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo(kMul0, c0, &hi0);
    const uint32_t lo1 = mulhilo(kMul1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;  // the key bump after the last round is never used
    k1 += kWeyl1;
  }
  return PhiloxBlock{{c0, c1, c2, c3}};
}

// One block of an explicit (counter, key) held as int64 words with values in [0, 2^32): the
// per-element work of the raw philox4x32 op (known-answer tests).
BDL_HDI void philox4x32_int64(const int64_t counter[4], const int64_t key[2], int64_t out[4]) {
  const PhiloxBlock blk =
      philox4x32_10(static_cast<uint32_t>(counter[0]), static_cast<uint32_t>(counter[1]),
                    static_cast<uint32_t>(counter[2]), static_cast<uint32_t>(counter[3]),
                    static_cast<uint32_t>(key[0]), static_cast<uint32_t>(key[1]));
  for (int l = 0; l < 4; ++l) out[l] = blk.w[l];
}

// The logical stream. Element i of a stream owns lane (i mod 4) of Philox block
//   counter = (lo32(b), hi32(b), stream_tag, 0),  b = i div 4 + offset (mod 2^64),
//   key     = (lo32(seed), hi32(seed)).
// The counter depends only on the element's logical index, never on which thread computes it.
struct PhiloxStream {
  uint64_t seed;
  uint64_t offset;
  uint32_t tag;

  BDL_HDI PhiloxBlock block(uint64_t block_index) const {
    const uint64_t b = block_index + offset;
    return philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), tag, 0u,
                         static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  }

  // The 32-bit word of logical element i (costs a whole block: use block() in loops).
  BDL_HDI uint32_t word(uint64_t i) const { return block(i >> 2).w[i & 3]; }

  // Words of the `valid` (1..4) consecutive logical elements i0, i0 + 1, ... into w[0..valid).
  // One block when they share it (always when i0 % 4 == 0), else two; w[valid..4) is unspecified.
  BDL_HDI void words4(uint64_t i0, int valid, uint32_t w[4]) const {
    const int lane0 = static_cast<int>(i0 & 3);
    const PhiloxBlock lo = block(i0 >> 2);
    if (lane0 == 0) {
      for (int j = 0; j < 4; ++j) w[j] = lo.w[j];
      return;
    }
    // Block i0/4 + 1 carries into the high counter word (and wraps mod 2^64) like any other.
    const PhiloxBlock hi = lane0 + valid > 4 ? block((i0 >> 2) + 1) : lo;
    for (int j = 0; j < 4; ++j) {
      const int lane = lane0 + j;
      w[j] = lane < 4 ? lo.w[lane] : hi.w[lane - 4];
    }
  }
};

// Reads the (seed, offset) pair of an int64[2] rng_state tensor's storage.
BDL_HDI PhiloxStream make_stream(const int64_t* rng_state, uint32_t tag) {
  return PhiloxStream{static_cast<uint64_t>(rng_state[0]), static_cast<uint64_t>(rng_state[1]),
                      tag};
}

}  // namespace bdlkern
