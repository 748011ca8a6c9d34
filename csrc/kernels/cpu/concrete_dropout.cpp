// CPU kernels of the fused Concrete dropout (semantics and shapes:
// bdlkern/concrete/kernels.h, the math: bdlkern/concrete/math.h).
//
// Work is split into fixed row tiles (a pure function of the shape, never of the thread count):
// each tile makes the Philox words of its rows (SIMD Philox, stream_words), turns them into the
// per-(m, c) factors keep / q and d(keep / q) / dp_logit in one vectorised pass, and applies them.
// Backward writes one partial p_logit gradient per tile and channel; the partials are added in
// tile order at the end, so the gradient has the same bits for any thread count.
//
// float32 runs the factor pass on the branch-free log / exp of vec_math.h so the compiler
// vectorises it; the loop is compiled for AVX-512 and AVX2 and picked at run time
// (BDLKERN_SIMD_FUNCTION; no -march in the build). float64 (the gradcheck dtype) uses libm.
#include <ATen/Parallel.h>

#include <bdlkern/concrete/math.h>
#include <bdlkern/concrete/kernels.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "philox_simd.h"

// The float comparisons of the factor pass (selects, clamps) may be evaluated on every lane: with
// the default -ftrapping-math GCC refuses to if-convert them and the loop stays scalar. This only
// concerns floating-point exception flags, never values.
#pragma GCC optimize("no-trapping-math")

#include "vec_math.h"

namespace bdlkern {
namespace {

// A tile holds at least this many elements (amortises a task), and there are at most kMaxTiles
// tiles (bounds the [tiles, C] buffer of partial p_logit gradients).
constexpr int64_t kTileElements = int64_t{1} << 14;
constexpr int64_t kMaxTiles = 64;

struct Tiles {
  int64_t rows_per_tile;
  int64_t count;
};

Tiles make_tiles(const ConcreteDropoutParams& p) {
  const int64_t row_elems = std::max<int64_t>(1, p.channels * p.inner);
  int64_t rows = std::max<int64_t>(1, (kTileElements + row_elems - 1) / row_elems);
  rows = std::max(rows, (p.rows + kMaxTiles - 1) / kMaxTiles);
  return Tiles{rows, p.rows == 0 ? 0 : (p.rows + rows - 1) / rows};
}

// Per-channel constants, as arrays of length C (a scalar p_logit is broadcast once).
// With an integer inverse temperature n = 1 / t (t = 0.1, the paper's default, gives 10), the
// relaxation needs no log or exp at all: exp(a / t) = (odds * r)^n with odds = (p + eps) / (q + eps)
// and r = (u + eps) / (1 - u + eps), so the float32 pass takes that route (int_power > 0).
constexpr int kMaxIntPower = 63;

template <typename T>
struct RateArrays {
  std::vector<T> log_ratio, inv_q, p_over_q, p_dadp_t, odds;
  int int_power = 0;  // n = 1 / t when that is an integer in [1, kMaxIntPower], else 0

  RateArrays(const T* p_logit, const ConcreteDropoutParams& p)
      : log_ratio(p.channels),
        inv_q(p.channels),
        p_over_q(p.channels),
        p_dadp_t(p.channels),
        odds(p.channels) {
    const double n = std::nearbyint(p.inv_temperature);
    if (n >= 1.0 && n <= kMaxIntPower && std::fabs(p.inv_temperature - n) <= 1e-12 * n) {
      int_power = static_cast<int>(n);
    }
    const double inv_t = static_cast<double>(static_cast<T>(p.inv_temperature));
    const int64_t distinct = p.per_channel_p ? p.channels : 1;
    for (int64_t c = 0; c < distinct; ++c) {
      // The constants in double, rounded once: exact to the last bit in float32.
      const ConcreteRate<double> r = concrete_rate<double>(static_cast<double>(p_logit[c]), inv_t);
      log_ratio[c] = static_cast<T>(r.log_ratio);
      inv_q[c] = static_cast<T>(r.inv_q);
      p_over_q[c] = static_cast<T>(r.p_over_q);
      p_dadp_t[c] = static_cast<T>(r.p_dadp_t);
      odds[c] = static_cast<T>(std::exp(r.log_ratio));
    }
    if (!p.per_channel_p) {  // one rate for the layer: broadcast it
      std::fill(odds.begin() + 1, odds.end(), odds[0]);
      std::fill(log_ratio.begin() + 1, log_ratio.end(), log_ratio[0]);
      std::fill(inv_q.begin() + 1, inv_q.end(), inv_q[0]);
      std::fill(p_over_q.begin() + 1, p_over_q.end(), p_over_q[0]);
      std::fill(p_dadp_t.begin() + 1, p_dadp_t.end(), p_dadp_t[0]);
    }
  }
};

// One pass over the C mask values of a row, from its stream words:
//   kFactors:  out[c] = keep / q,              aux[c] = d(keep / q) / dp_logit   (spatial rows)
//   kForward:  out[c] = x[c] * keep / q                                          (L == 1)
//   kBackward: out[c] = g[c] * keep / q,       aux[c] += g[c] x[c] d(keep/q)/dp_logit
enum class Pass { kFactors, kForward, kBackward };

template <typename T>
struct RowArgs {
  const uint32_t* words;
  const T* x;
  const T* g;
  T* out;
  T* aux;
  int64_t n;
};

// v^n for v in [0, 1] and n in [1, 63] by squaring. kN > 0 fixes n at compile time (the selects
// and unused squarings fold away: t = 0.1 costs four multiplies); kN = 0 reads n at run time, the
// exponent's bits loop invariant so the selects still vectorise.
template <int kN>
inline __attribute__((always_inline)) float pow_small_int(float v, int n) {
  if constexpr (kN > 0) n = kN;
  float e = 1.0f;
  for (int bit = 0; bit < 6; ++bit) {
    if (kN > 0 && (kN >> bit) == 0) break;
    e = ((n >> bit) & 1) ? e * v : e;
    v = v * v;
  }
  return e;
}

// The float32 body: every load unconditional and every choice a select, so it vectorises.
// positive: a / t >= 0 (z >= 1/2); e = exp(-|a / t|) in (0, 1].
// kPower: -1 = log / exp route; 0 = integer power read at run time; > 0 = that power.
template <Pass kPass, int kPower>
inline __attribute__((always_inline)) void row_f32_body(const RowArgs<float>& a,
                                                         const RateArrays<float>& r, float inv_t) {
  const float eps = static_cast<float>(kConcreteEps);
  const float* lr = r.log_ratio.data();
  const float* od = r.odds.data();
  const float* iq = r.inv_q.data();
  const float* pq = r.p_over_q.data();
  const float* pd = r.p_dadp_t.data();
  const int n = r.int_power;
  const uint32_t* words = a.words;
  const float* x = a.x;
  const float* g = a.g;
  float* out = a.out;
  float* aux = a.aux;
#pragma GCC ivdep
  for (int64_t c = 0; c < a.n; ++c) {
    const float iqc = iq[c];
    const float u = cpu::vec::uniform(words[c]);
    bool positive;
    float e;
    if constexpr (kPower >= 0) {
      // exp(a) = num / den; its smaller side min(exp(a), exp(-a)) with one division.
      const float num = od[c] * (u + eps);
      const float den = 1.0f - u + eps;
      positive = num >= den;
      const float hi = positive ? num : den;
      const float lo = positive ? den : num;
      e = pow_small_int<kPower>(lo / hi, n);
    } else {
      const float s = (lr[c] + cpu::vec::log((u + eps) / (1.0f - u + eps))) * inv_t;
      positive = s >= 0.0f;
      e = cpu::vec::exp(-__builtin_fabsf(s));
    }
    const float big = 1.0f / (1.0f + e);
    const float small = e * big;
    const float keep = positive ? small : big;
    const bool alive = keep > 0.0f;
    const float fk = keep * iqc;
    const float f = alive ? fk : 0.0f;
    if constexpr (kPass == Pass::kForward) {
      out[c] = x[c] * f;
    } else {
      const float pqc = pq[c], pdc = pd[c];
      const float z = positive ? big : small;
      const float dk = keep * (pqc - pdc * z);
      const float df = alive ? dk : 0.0f;
      if constexpr (kPass == Pass::kFactors) {
        out[c] = f;
        aux[c] = df;
      } else {
        const float gc = g[c];
        out[c] = gc * f;
        aux[c] += gc * x[c] * df;
      }
    }
  }
}

template <Pass kPass>
inline __attribute__((always_inline)) void row_f32_dispatch(const RowArgs<float>& a,
                                                             const RateArrays<float>& r,
                                                             float inv_t) {
  switch (r.int_power) {
    case 0:
      return row_f32_body<kPass, -1>(a, r, inv_t);
    case 1:  // t = 1
      return row_f32_body<kPass, 1>(a, r, inv_t);
    case 2:  // t = 0.5
      return row_f32_body<kPass, 2>(a, r, inv_t);
    case 10:  // t = 0.1, the paper's default
      return row_f32_body<kPass, 10>(a, r, inv_t);
    default:
      return row_f32_body<kPass, 0>(a, r, inv_t);
  }
}

BDLKERN_SIMD_FUNCTION(void, row_f32_factors,
                      (const RowArgs<float>& a, const RateArrays<float>& r, float inv_t),
                      row_f32_dispatch<Pass::kFactors>, (a, r, inv_t))
BDLKERN_SIMD_FUNCTION(void, row_f32_forward,
                      (const RowArgs<float>& a, const RateArrays<float>& r, float inv_t),
                      row_f32_dispatch<Pass::kForward>, (a, r, inv_t))
BDLKERN_SIMD_FUNCTION(void, row_f32_backward,
                      (const RowArgs<float>& a, const RateArrays<float>& r, float inv_t),
                      row_f32_dispatch<Pass::kBackward>, (a, r, inv_t))

template <Pass kPass>
void row_pass(const RowArgs<float>& a, const RateArrays<float>& r, float inv_t) {
  if constexpr (kPass == Pass::kFactors) {
    row_f32_factors(a, r, inv_t);
  } else if constexpr (kPass == Pass::kForward) {
    row_f32_forward(a, r, inv_t);
  } else {
    row_f32_backward(a, r, inv_t);
  }
}

// float64: libm through the shared functions of concrete.h.
template <Pass kPass>
void row_pass(const RowArgs<double>& a, const RateArrays<double>& r, double inv_t) {
  for (int64_t c = 0; c < a.n; ++c) {
    const ConcreteRate<double> rate{r.log_ratio[c], r.inv_q[c], r.p_over_q[c], r.p_dadp_t[c]};
    const double s = (rate.log_ratio + concrete_noise(uniform_double(a.words[c]))) * inv_t;
    double keep, z;
    concrete_keep(s, &keep, &z);
    const double f = concrete_factor(keep, rate);
    if constexpr (kPass == Pass::kForward) {
      a.out[c] = a.x[c] * f;
    } else {
      const double df = concrete_dfactor(keep, z, rate);
      if constexpr (kPass == Pass::kFactors) {
        a.out[c] = f;
        a.aux[c] = df;
      } else {
        a.out[c] = a.g[c] * f;
        a.aux[c] += a.g[c] * a.x[c] * df;
      }
    }
  }
}

// Runs body(tile, row, words, scratch) over the rows of the fixed tiles in parallel, after making
// each row's C stream words; tile_end(tile, scratch) after the last row of a tile. scratch holds 3 C
// values per task (factors, their derivatives, the tile's p_logit gradient).
template <typename T, typename Body, typename TileEnd>
void for_each_row(const ConcreteDropoutParams& p, const Tiles& tiles, Body body, TileEnd tile_end) {
  const PhiloxStream stream = make_stream(p.rng_state, kStreamConcreteDropout);
  const int64_t C = p.channels;
  at::parallel_for(0, tiles.count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> words(static_cast<size_t>(C));
    std::vector<T> scratch(static_cast<size_t>(3 * C));
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(scratch.begin() + 2 * C, scratch.end(), T(0));
      const int64_t m0 = t * tiles.rows_per_tile;
      const int64_t m1 = std::min(p.rows, m0 + tiles.rows_per_tile);
      for (int64_t m = m0; m < m1; ++m) {
        cpu::stream_words(stream, static_cast<uint64_t>(m * C), C, words.data());
        body(m, words.data(), scratch.data());
      }
      tile_end(t, scratch.data());
    }
  });
}

template <typename T>
void forward_impl(const ConcreteDropoutParams& p, const T* x, const T* p_logit, T* y) {
  const Tiles tiles = make_tiles(p);
  const RateArrays<T> rates(p_logit, p);
  const T inv_t = static_cast<T>(p.inv_temperature);
  const int64_t C = p.channels, L = p.inner;
  for_each_row<T>(
      p, tiles,
      [&](int64_t m, const uint32_t* words, T* scratch) {
        const T* xr = x + m * C * L;
        T* yr = y + m * C * L;
        if (L == 1) {
          row_pass<Pass::kForward>(RowArgs<T>{words, xr, nullptr, yr, nullptr, C}, rates, inv_t);
          return;
        }
        T* f = scratch;
        row_pass<Pass::kFactors>(RowArgs<T>{words, nullptr, nullptr, f, scratch + C, C}, rates,
                                 inv_t);
        for (int64_t c = 0; c < C; ++c) {
          const T fc = f[c];
          for (int64_t l = 0; l < L; ++l) yr[c * L + l] = xr[c * L + l] * fc;
        }
      },
      [](int64_t, T*) {});
}

template <typename T>
void backward_impl(const ConcreteDropoutParams& p, const T* g, const T* x, const T* p_logit,
                   T* grad_x, T* grad_p) {
  const Tiles tiles = make_tiles(p);
  const RateArrays<T> rates(p_logit, p);
  const T inv_t = static_cast<T>(p.inv_temperature);
  const int64_t C = p.channels, L = p.inner;
  // partial[t, c] (one rate per channel) or partial[t] (one rate for the layer, channels added in
  // order): tile t's share of the p_logit gradient, in double.
  const int64_t width = p.per_channel_p ? C : 1;
  std::vector<double> partial(static_cast<size_t>(tiles.count * width), 0.0);
  for_each_row<T>(
      p, tiles,
      [&](int64_t m, const uint32_t* words, T* scratch) {
        const T* gr = g + m * C * L;
        const T* xr = x + m * C * L;
        T* gxr = grad_x + m * C * L;
        T* acc = scratch + 2 * C;  // this tile's p_logit gradient per channel
        if (L == 1) {
          row_pass<Pass::kBackward>(RowArgs<T>{words, xr, gr, gxr, acc, C}, rates, inv_t);
          return;
        }
        T* f = scratch;
        T* df = scratch + C;
        row_pass<Pass::kFactors>(RowArgs<T>{words, nullptr, nullptr, f, df, C}, rates, inv_t);
        for (int64_t c = 0; c < C; ++c) {
          const T fc = f[c];
          T dot = T(0);
          for (int64_t l = 0; l < L; ++l) {
            gxr[c * L + l] = gr[c * L + l] * fc;
            dot += gr[c * L + l] * xr[c * L + l];
          }
          acc[c] += dot * df[c];
        }
      },
      [&](int64_t t, T* scratch) {
        const T* acc = scratch + 2 * C;
        double* dst = partial.data() + t * width;
        for (int64_t c = 0; c < C; ++c) dst[p.per_channel_p ? c : 0] += acc[c];
      });
  // Tile order: fixed whatever ran where.
  for (int64_t c = 0; c < width; ++c) {
    double sum = 0.0;
    for (int64_t t = 0; t < tiles.count; ++t) sum += partial[static_cast<size_t>(t * width + c)];
    grad_p[c] = static_cast<T>(sum);
  }
}

}  // namespace

void concrete_dropout_forward(CpuTag, const ConcreteDropoutParams& p, const void* x,
                              const void* p_logit, void* y) {
  if (p.dtype == DType::kFloat64) {
    forward_impl(p, static_cast<const double*>(x), static_cast<const double*>(p_logit),
                 static_cast<double*>(y));
  } else {
    forward_impl(p, static_cast<const float*>(x), static_cast<const float*>(p_logit),
                 static_cast<float*>(y));
  }
}

int64_t concrete_dropout_backward_workspace(CpuTag, const ConcreteDropoutParams&) { return 0; }

void concrete_dropout_backward(CpuTag, const ConcreteDropoutParams& p, const void* grad_y,
                               const void* x, const void* p_logit, void* grad_x,
                               void* grad_p_logit, void*) {
  if (p.dtype == DType::kFloat64) {
    backward_impl(p, static_cast<const double*>(grad_y), static_cast<const double*>(x),
                  static_cast<const double*>(p_logit), static_cast<double*>(grad_x),
                  static_cast<double*>(grad_p_logit));
  } else {
    backward_impl(p, static_cast<const float*>(grad_y), static_cast<const float*>(x),
                  static_cast<const float*>(p_logit), static_cast<float*>(grad_x),
                  static_cast<float*>(grad_p_logit));
  }
}

}  // namespace bdlkern
