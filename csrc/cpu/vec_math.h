// Branch-free float32 math the compiler vectorises, and run-time SIMD dispatch for the CPU kernels.
//
// GCC only vectorises a loop if every call in it is inlined and every choice is a select; libm's
// logf / expf / sinf are calls, and with the default -ftrapping-math GCC will not if-convert float
// comparisons. So the elementwise float32 loops of the CPU kernels use these Cephes-style
// polynomials (about 1 ulp on the ranges they serve) and live in files that say
//   #pragma GCC optimize("no-trapping-math")
// before their code (floating-point exception flags only; never a value). This header, included
// after that pragma, sets it for its own functions too.
//
// BDLKERN_SIMD_FUNCTION compiles one always-inline body three times (baseline x86-64, AVX2+FMA,
// AVX-512) and dispatches at run time on cpu::best_simd_path(), which BDLKERN_CPU_SIMD can cap: a
// built wheel never executes an instruction its CPU lacks (no -march in the build).
#pragma once

#include <stdint.h>

#include "philox_simd.h"

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")

namespace bdlkern {
namespace cpu {
namespace vec {

#define BDL_VEC_INLINE inline __attribute__((always_inline))

// log(v) for positive normal v: v = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a polynomial
// in m - 1 (Cephes logf), plus e log(2) in two parts.
BDL_VEC_INLINE float log(float v) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, v);
  int e = static_cast<int>((bits >> 23) & 0xffu) - 126;
  float m = __builtin_bit_cast(float, (bits & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// exp(v), v clamped to [-87, 88] (the float range): v = n log(2) + r, exp(r) by a polynomial, times
// 2^n built from the bits.
BDL_VEC_INLINE float exp(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float n = __builtin_floorf(v * 1.44269504088896341f + 0.5f);
  float r = v - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const uint32_t scale = static_cast<uint32_t>(static_cast<int>(n) + 127) << 23;
  return y * __builtin_bit_cast(float, scale);
}

BDL_VEC_INLINE float sigmoid(float v) { return 1.0f / (1.0f + exp(-v)); }

// sqrt(v) for positive normal v. __builtin_sqrtf keeps errno semantics (a call for v < 0) unless
// the whole build says -fno-math-errno, which the optimize pragma cannot, so: the bit-level guess
// of 1 / sqrt(v), three Newton steps (relative error below 1e-9 before rounding), times v.
BDL_VEC_INLINE float sqrt_positive(float v) {
  float y = __builtin_bit_cast(float, 0x5f3759dfu - (__builtin_bit_cast(uint32_t, v) >> 1));
  const float h = 0.5f * v;
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  return v * y;
}

// cos(2 pi u) and sin(2 pi u) for any float u: reduce to t = u - round(u) in [-1/2, 1/2], then to a
// quadrant q = round(4 t) and b = 2 pi (t - q / 4) in [-pi/4, pi/4], where Cephes' sinf / cosf
// polynomials hold, and rotate by q quarter turns.
BDL_VEC_INLINE void sincos_2pi(float u, float* c, float* s) {
  const float t = u - __builtin_floorf(u + 0.5f);
  const float q = __builtin_floorf(4.0f * t + 0.5f);  // -2 .. 2
  const float b = (t - 0.25f * q) * 6.28318530717958647692f;
  const float b2 = b * b;
  const float sb = b + b * b2 * (-1.6666654611e-1f + b2 * (8.3321608736e-3f + b2 * -1.9515295891e-4f));
  const float cb = 1.0f - 0.5f * b2 +
                   b2 * b2 * (4.166664568298827e-2f + b2 * (-1.388731625493765e-3f + b2 * 2.443315711809948e-5f));
  const int quadrant = static_cast<int>(q) & 3;  // -2 -> 2, -1 -> 3
  const bool swap = (quadrant & 1) != 0;
  const float cc = swap ? sb : cb;
  const float ss = swap ? cb : sb;
  *c = (quadrant == 1 || quadrant == 2) ? -cc : cc;
  *s = (quadrant == 2 || quadrant == 3) ? -ss : ss;
}

// uniform_float of random.h: (w >> 8) 2^-24 + 2^-25, capped below 1. (w >> 8) < 2^24 converts
// exactly through int32, which the vector units do in one instruction.
BDL_VEC_INLINE float uniform(uint32_t w) {
  const float u = static_cast<float>(static_cast<int32_t>(w >> 8)) * 0x1p-24f + 0x1p-25f;
  return u < 0x1.fffffep-1f ? u : 0x1.fffffep-1f;
}

// Box-Muller on one lane pair (random.h box_muller, these polynomials instead of libm).
BDL_VEC_INLINE void box_muller(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float r = sqrt_positive(-2.0f * log(uniform(a)));
  float c, s;
  sincos_2pi(uniform(b), &c, &s);
  *z0 = r * c;
  *z1 = r * s;
}

#undef BDL_VEC_INLINE

}  // namespace vec

// Picks the variant of the widest SIMD path allowed (best_simd_path), once.
template <typename Fn>
Fn pick_simd(Fn baseline, Fn avx2, Fn avx512) {
  switch (best_simd_path()) {
    case SimdPath::kAvx512:
      return avx512;
    case SimdPath::kAvx2:
      return avx2;
    default:
      return baseline;
  }
}

}  // namespace cpu
}  // namespace bdlkern

#pragma GCC pop_options

// Defines `ret name params` that runs `body args` (an always-inline function, or a template
// instance) compiled for the baseline, AVX2 + FMA and AVX-512, picked at run time.
#if defined(__x86_64__) && defined(__GNUC__)
#define BDLKERN_SIMD_FUNCTION(ret, name, params, body, args)                                      \
  static ret name##_baseline params { return body args; }                                         \
  __attribute__((target("avx2,fma"))) static ret name##_avx2 params { return body args; }        \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))) static ret name##_avx512     \
      params {                                                                                    \
    return body args;                                                                             \
  }                                                                                               \
  static ret name params {                                                                        \
    static const auto fn = ::bdlkern::cpu::pick_simd(&name##_baseline, &name##_avx2,              \
                                                     &name##_avx512);                             \
    return fn args;                                                                               \
  }
#else
#define BDLKERN_SIMD_FUNCTION(ret, name, params, body, args) \
  static ret name params { return body args; }
#endif
