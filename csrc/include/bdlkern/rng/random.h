// Conversions from raw Philox words to the distributions bdlkern uses (docs/design.md
// section 2.6).
//
// Every conversion is a pure function of the 32-bit words of the logical stream, written once
// for all devices. Integer rules (the Bernoulli threshold) are bit-exact everywhere; float rules
// use only correctly rounded IEEE operations (uniform) or libm/libdevice calls (normal), so the
// normal values agree across devices to a few ulp.
#pragma once

#include <math.h>
#include <stdint.h>

#include <bdlkern/common/macros.h>
#include <bdlkern/rng/philox.h>

namespace bdlkern {

// Stream tags (Philox counter word 2). Each op family draws from its own tag so that one
// rng_state can feed several ops without correlated bits. Tags are part of the reproducibility
// contract: never renumber one, only append.
enum StreamTag : uint32_t {
  kStreamUser = 0,             // dropout_mask / uniform / normal / philox_bits by default
  kStreamMCDropout = 1,        // mc_dropout_linear masks
  kStreamConcreteDropout = 2,  // concrete_dropout uniforms
  kStreamLRT = 3,              // lrt_linear output noise
  kStreamSparseLRT = 4,        // sparse_linear stochastic output noise
  kStreamGaussianDropout = 5,  // gaussian_dropout multiplicative noise
  kNumStreams = 6,
};

// Bernoulli keep rule: element kept iff word < threshold, threshold = round(keep * 2^32) held in
// 64 bits so that it spans [0, 2^32]: keep = 1 (p = 0) keeps every word, keep = 0 drops all.
// Computed once on the host from the double p, then compared as integers on every device.
inline uint64_t keep_threshold(double p) {
  const double t = nearbyint((1.0 - p) * 4294967296.0);
  if (!(t > 0.0)) return 0;  // also maps a NaN to "drop" (callers reject NaN before)
  if (t >= 4294967296.0) return 4294967296ull;
  return static_cast<uint64_t>(t);
}

BDL_HDI bool keep_element(uint32_t word, uint64_t threshold) {
  return static_cast<uint64_t>(word) < threshold;
}

// Uniform in (0, 1) from the top 24 bits: (w >> 8) * 2^-24 + 2^-25.
// In double this is exact and lies in [2^-25, 1 - 2^-25]. In float the upper half rounds to
// the 2^-24 grid, so the top value would round to 1.0f; it is clamped to the largest float
// below one, keeping the open interval (the clamp is a pure function of w: still bit-exact).
BDL_HDI float uniform_float(uint32_t w) {
  const float u = static_cast<float>(w >> 8) * 0x1p-24f + 0x1p-25f;
  return u < 0x1.fffffep-1f ? u : 0x1.fffffep-1f;
}
BDL_HDI double uniform_double(uint32_t w) {
  return static_cast<double>(w >> 8) * 0x1p-24 + 0x1p-25;
}

template <typename T>
struct UniformOf;
template <>
struct UniformOf<float> {
  BDL_HDI static float from(uint32_t w) { return uniform_float(w); }
};
template <>
struct UniformOf<double> {
  BDL_HDI static double from(uint32_t w) { return uniform_double(w); }
};

// Box-Muller on a pair of words (lanes 0,1 or 2,3 of one block): z0 = r cos(2 pi u2),
// z1 = r sin(2 pi u2), r = sqrt(-2 log u1). u1 > 0 always, so r is finite.
BDL_HDI void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = uniform_float(a);
  const float u2 = uniform_float(b);
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = 6.28318530717958647692f * u2;
  *z0 = r * cosf(theta);
  *z1 = r * sinf(theta);
}
BDL_HDI void box_muller(uint32_t a, uint32_t b, double* z0, double* z1) {
  const double u1 = uniform_double(a);
  const double u2 = uniform_double(b);
  const double r = sqrt(-2.0 * log(u1));
  const double theta = 6.28318530717958647692 * u2;
  *z0 = r * cos(theta);
  *z1 = r * sin(theta);
}

// The four standard normals of one Philox block (lanes 0..3).
template <typename T>
BDL_HDI void normal4(const PhiloxBlock& blk, T out[4]) {
  box_muller(blk.w[0], blk.w[1], &out[0], &out[1]);
  box_muller(blk.w[2], blk.w[3], &out[2], &out[3]);
}

// The standard normal of logical stream element i: Box-Muller on the lane pair of its block
// (lanes 0,1 or 2,3), so element i has the value normal4 gives it when filling whole blocks.
template <typename T>
BDL_HDI T normal_at(const PhiloxStream& stream, uint64_t i) {
  const PhiloxBlock blk = stream.block(i >> 2);
  const int pair = static_cast<int>(i & 2);
  T z0, z1;
  box_muller(blk.w[pair], blk.w[pair + 1], &z0, &z1);
  return (i & 1) ? z1 : z0;
}

}  // namespace bdlkern

namespace bdlkern {

// Per-block conversions used by the stream-filling kernels: each turns one Philox block into the
// four output elements of its lanes. Shared by the CPU kernel and the CUDA kernel.
struct BitsOp {
  BDL_HDI void operator()(const PhiloxBlock& blk, uint32_t out[4]) const {
    for (int l = 0; l < 4; ++l) out[l] = blk.w[l];
  }
};

struct MaskOp {
  uint64_t threshold;
  BDL_HDI void operator()(const PhiloxBlock& blk, bool out[4]) const {
    for (int l = 0; l < 4; ++l) out[l] = keep_element(blk.w[l], threshold);
  }
};

template <typename T>
struct UniformOp {
  BDL_HDI void operator()(const PhiloxBlock& blk, T out[4]) const {
    for (int l = 0; l < 4; ++l) out[l] = UniformOf<T>::from(blk.w[l]);
  }
};

template <typename T>
struct NormalOp {
  BDL_HDI void operator()(const PhiloxBlock& blk, T out[4]) const { normal4(blk, out); }
};

}  // namespace bdlkern
