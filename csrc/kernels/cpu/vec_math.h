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

#include <type_traits>

#include "philox_simd.h"

#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
// f8 values passed between always-inline functions never cross an ABI boundary.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace bdlkern {
namespace cpu {
namespace vec {

#define BDL_VEC_INLINE inline __attribute__((always_inline))

// Eight float32 lanes as a GCC vector type: explicit SIMD where the data layout needs shuffles the
// vectoriser would not find (the Box-Muller lanes of csrc/kernels/cpu/rng.cpp). Compiled for the baseline it
// is two SSE registers; for AVX2 and AVX-512, one ymm.
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef uint32_t u8 __attribute__((vector_size(32)));

// The functions below are templates over F = float or f8, one definition for both: the same
// operations in the same order, lane by lane. Lanes<F> names the integer types of F's bits.
template <typename F>
struct Lanes;
template <>
struct Lanes<float> {
  using I = int32_t;
  using U = uint32_t;
};
template <>
struct Lanes<f8> {
  using I = i8;
  using U = u8;
};

BDL_VEC_INLINE float to_float(int32_t v) { return static_cast<float>(v); }
BDL_VEC_INLINE f8 to_float(i8 v) { return __builtin_convertvector(v, f8); }
// Conversion toward zero (a cast between vector types would reinterpret the bits instead).
BDL_VEC_INLINE int32_t to_int(float v) { return static_cast<int32_t>(v); }
BDL_VEC_INLINE i8 to_int(f8 v) { return __builtin_convertvector(v, i8); }
// floor(v) for |v| < 2^31 (vectors: truncate, then step down where that rounded up).
BDL_VEC_INLINE float floor_small(float v) { return __builtin_floorf(v); }
BDL_VEC_INLINE f8 floor_small(f8 v) {
  const f8 t = to_float(to_int(v));
  return t > v ? t - 1.0f : t;
}

// log(v) for positive normal v: v = m 2^e with m in [sqrt(1/2), sqrt(2)), log(m) by a polynomial
// in m - 1 (Cephes logf), plus e log(2) in two parts.
template <typename F>
BDL_VEC_INLINE F log(F v) {
  using I = typename Lanes<F>::I;
  using U = typename Lanes<F>::U;
  const U bits = __builtin_bit_cast(U, v);
  I e = (I)(bits >> 23) - 126;  // v > 0: the sign bit is clear
  F m = __builtin_bit_cast(F, (U)((bits & 0x007fffffu) | 0x3f000000u));  // [0.5, 1)
  const auto small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const F z = m * m;
  F y = m * 7.0376836292e-2f - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const F fe = to_float(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return m + y + 0.693359375f * fe;
}

// exp(v), v clamped to [-87, 88] (the float range): v = n log(2) + r, exp(r) by a polynomial, times
// 2^n built from the bits.
template <typename F>
BDL_VEC_INLINE F exp(F v) {
  using U = typename Lanes<F>::U;
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const F n = floor_small(v * 1.44269504088896341f + 0.5f);
  F r = v - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const F z = r * r;
  F y = r * 1.9875691500e-4f + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const U scale = (U)(to_int(n) + 127) << 23;
  return y * __builtin_bit_cast(F, scale);
}

template <typename F>
BDL_VEC_INLINE F sigmoid(F v) {
  return 1.0f / (1.0f + exp(-v));
}

// sqrt(v) for positive normal v. __builtin_sqrtf keeps errno semantics (a call for v < 0) unless
// the whole build says -fno-math-errno, which the optimize pragma cannot, so: the bit-level guess
// of 1 / sqrt(v), three Newton steps (relative error below 1e-9 before rounding), times v.
template <typename F>
BDL_VEC_INLINE F sqrt_positive(F v) {
  using U = typename Lanes<F>::U;
  F y = __builtin_bit_cast(F, (U)(0x5f3759dfu - (__builtin_bit_cast(U, v) >> 1)));
  const F h = 0.5f * v;
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  y = y * (1.5f - h * y * y);
  return v * y;
}

// The IEEE square root of every lane (sqrtf's bits, NaN below zero) in one vsqrtps. Only for code
// compiled for AVX (the AVX2 / AVX-512 instances of a BDLKERN_SIMD_FUNCTION_PATH body): inline asm,
// because a target("avx") builtin cannot be inlined through these target-less always-inline
// helpers, and GCC will not vectorise sqrtf itself under -fmath-errno.
BDL_VEC_INLINE f8 sqrt_avx(f8 v) {
  f8 r;
  asm("vsqrtps %1, %0" : "=x"(r) : "x"(v));
  return r;
}

// cos(2 pi u) and sin(2 pi u) for u in [0, 1] (a uniform): the quadrant q = round(4 u) and
// b = 2 pi (u - q / 4) in [-pi/4, pi/4] (u - q / 4 is exact), where Cephes' sinf / cosf
// polynomials hold, then a rotation by q quarter turns: quadrants 1 and 3 swap the two, and a
// sign bit flips cos in quadrants 1 and 2, sin in 2 and 3.
template <typename F>
BDL_VEC_INLINE void sincos_2pi(F u, F* c, F* s) {
  using U = typename Lanes<F>::U;
  const F q = floor_small(4.0f * u + 0.5f);  // 0 .. 4
  const F b = (u - 0.25f * q) * 6.28318530717958647692f;
  const F b2 = b * b;
  const F sb = b + b * b2 * (-1.6666654611e-1f + b2 * (8.3321608736e-3f + b2 * -1.9515295891e-4f));
  const F cb = 1.0f - 0.5f * b2 +
               b2 * b2 * (4.166664568298827e-2f + b2 * (-1.388731625493765e-3f + b2 * 2.443315711809948e-5f));
  const U quadrant = (U)to_int(q) & 3u;
  const auto swap = (quadrant & 1u) != 0u;
  const F cc = swap ? sb : cb;
  const F ss = swap ? cb : sb;
  *c = __builtin_bit_cast(F, __builtin_bit_cast(U, cc) ^ (((quadrant + 1u) & 2u) << 30));
  *s = __builtin_bit_cast(F, __builtin_bit_cast(U, ss) ^ ((quadrant & 2u) << 30));
}

// uniform_float of random.h: (w >> 8) 2^-24 + 2^-25, capped below 1. (w >> 8) < 2^24 converts
// exactly through int32, which the vector units do in one instruction.
template <typename U>
BDL_VEC_INLINE auto uniform(U w) {
  using F = std::conditional_t<std::is_same_v<U, u8>, f8, float>;
  using I = typename Lanes<F>::I;
  const F u = to_float((I)(w >> 8)) * 0x1p-24f + 0x1p-25f;
  return u < 0x1.fffffep-1f ? u : 0x1.fffffep-1f;
}

struct NewtonSqrt {
  template <typename F>
  BDL_VEC_INLINE F operator()(F v) const {
    return sqrt_positive(v);
  }
};

// Box-Muller on lane pairs (random.h box_muller, these polynomials instead of libm): a, b one
// pair's words, or eight pairs' in the lanes of u8; `sqrt` takes the square root of the radius.
template <typename U, typename F, typename Sqrt = NewtonSqrt>
BDL_VEC_INLINE void box_muller(U a, U b, F* z0, F* z1, Sqrt sqrt = {}) {
  const F r = sqrt(-2.0f * log(uniform(a)));
  F c, s;
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

#pragma GCC diagnostic pop
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
// The same for a body template over the cpu::SimdPath it is compiled for: `body<path> args`, for
// bodies that use an instruction only some paths have.
#define BDLKERN_SIMD_FUNCTION_PATH(ret, name, params, body, args)                                 \
  static ret name##_baseline params { return body<::bdlkern::cpu::SimdPath::kScalar> args; }    \
  __attribute__((target("avx2,fma"))) static ret name##_avx2 params {                            \
    return body<::bdlkern::cpu::SimdPath::kAvx2> args;                                          \
  }                                                                                               \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,fma"))) static ret name##_avx512     \
      params {                                                                                    \
    return body<::bdlkern::cpu::SimdPath::kAvx512> args;                                        \
  }                                                                                               \
  static ret name params {                                                                        \
    static const auto fn = ::bdlkern::cpu::pick_simd(&name##_baseline, &name##_avx2,              \
                                                     &name##_avx512);                             \
    return fn args;                                                                               \
  }
#else
#define BDLKERN_SIMD_FUNCTION(ret, name, params, body, args) \
  static ret name params { return body args; }
#define BDLKERN_SIMD_FUNCTION_PATH(ret, name, params, body, args) \
  static ret name params { return body<::bdlkern::cpu::SimdPath::kScalar> args; }
#endif
