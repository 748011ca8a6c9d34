// CPU kernels of sparse variational dropout's fused passes (entry points and semantics:
// bdlkern/sparse_vd/kernels.h, per-weight math: bdlkern/sparse_vd/math.h).
//
// The weight passes and the KL are elementwise over the weights, parallel over fixed chunks; the
// KL sums each chunk in double and adds the chunk sums in order, so its bits do not depend on the
// thread count. The LRT noise passes walk output rows; each row's normals come from the SIMD
// Philox words of its stream range (stream_words) and the shared Box-Muller of random.h.
#include <ATen/Parallel.h>

#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>
#include <bdlkern/sparse_vd/math.h>
#include <bdlkern/sparse_vd/kernels.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "philox_simd.h"

// Selects and clamps of the float32 loops may run on every lane (see vec_math.h).
#pragma GCC optimize("no-trapping-math")

#include "vec_math.h"

namespace bdlkern {
namespace {

constexpr int64_t kGrain = 4096;    // weights per elementwise task
constexpr int64_t kKlChunk = 4096;  // weights per KL partial sum (fixed: the summation order)
static_assert(kKlChunk == 4096, "kl_chunk_body's buffer holds one chunk");
constexpr int64_t kRowGrain = 4;    // output rows per noise task

template <typename F>
void dispatch(DType dtype, const char* op, F f) {
  if (dtype == DType::kFloat64) return f.template operator()<double>();
  if (dtype == DType::kFloat32) return f.template operator()<float>();
  throw std::invalid_argument(std::string(op) + ": float32 or float64 only");
}

// ---- float32 bodies, vectorised (vec_math.h) ---------------------------------------------------
constexpr float kLaMin = static_cast<float>(kLogAlphaMin), kLaMax = static_cast<float>(kLogAlphaMax);
constexpr float kThEps = static_cast<float>(kThetaEps);

// The weight passes need alpha, not log alpha: alpha = exp(log_sigma2) / (theta^2 + eps), clamped
// to [e^-8, e^8] (the log alpha clamp, moved through the monotone exp), costs one exponential and
// a division instead of a logarithm and an exponential. NaN fails both bounds, as in the clamp of
// log alpha. exp's argument clamp (87, 88) decides nothing unless |theta| > e^40.
constexpr float kAlphaMin = static_cast<float>(__builtin_exp(kLogAlphaMin)),
                kAlphaMax = static_cast<float>(__builtin_exp(kLogAlphaMax));

// alpha before the clamp; clamped_alpha(r) and outside(r) (no gradient through the clamp: NaN
// included, like torch.clamp) finish it. Plain floats and bools: a struct stops GCC vectorising.
inline __attribute__((always_inline)) float raw_alpha(float ls, float t2e) {
  return cpu::vec::exp(ls) / t2e;
}
inline __attribute__((always_inline)) float clamped_alpha(float r) {
  return r < kAlphaMin ? kAlphaMin : (r > kAlphaMax ? kAlphaMax : r);
}
inline __attribute__((always_inline)) bool outside(float r) {
  return !(r >= kAlphaMin && r <= kAlphaMax);
}

inline __attribute__((always_inline)) void weight_variance_body(int64_t n, const float* th,
                                                                 const float* ls, float* a) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = th[i];
    a[i] = clamped_alpha(raw_alpha(ls[i], t * t + kThEps)) * t * t;
  }
}
BDLKERN_SIMD_FUNCTION(void, weight_variance_f32,
                      (int64_t n, const float* th, const float* ls, float* a),
                      weight_variance_body, (n, th, ls, a))

inline __attribute__((always_inline)) void weight_variance_backward_body(
    int64_t n, const float* th, const float* ls, const float* gt, const float* ga, float* out_t,
    float* out_s) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = th[i], g = ga[i], g_t = gt[i];
    const float t2e = t * t + kThEps;
    const float r = raw_alpha(ls[i], t2e);
    const float alpha = clamped_alpha(r);
    const float value = alpha * t * t;
    const float through = outside(r) ? 0.0f : value;
    const float d_theta = through * (-2.0f * t / t2e) + 2.0f * alpha * t;
    out_s[i] = g * through;
    out_t[i] = g_t + g * d_theta;
  }
}
BDLKERN_SIMD_FUNCTION(void, weight_variance_backward_f32,
                      (int64_t n, const float* th, const float* ls, const float* gt,
                       const float* ga, float* out_t, float* out_s),
                      weight_variance_backward_body, (n, th, ls, gt, ga, out_t, out_s))

constexpr float kK1 = static_cast<float>(kKlK1), kK2 = static_cast<float>(kKlK2),
                kK3 = static_cast<float>(kKlK3);

// The float32 KL of one weight under prior P from e = exp(-la) (and, for the log-uniform prior,
// sg = sigmoid(k2 + k3 la)), and its derivative in la: the one float32 definition behind the fused
// KL + gradient pass and the backward kernel. The ARD prior needs no sigmoid: its KL is the
// shared term 0.5 log1p(e), its derivative -0.5 sigmoid(-la) = -0.5 e / (1 + e).
//
// 0.5 log1p(e). kExact: as log(u) e / (u - 1) with u = 1 + e (Goldberg's trick: the rounding of
// u cancels), so a small e (large la) keeps its relative accuracy; u > 1 always, as la <= 8 gives
// e >= exp(-8). The ARD KL is this term alone, small at large la, so it needs it. The log-uniform
// KL adds it to k1 (1 - sg), whose cancellation costs more than log(1 + e)'s rounding: it keeps
// the plain log, one division less per weight (and its bits from before the ARD prior).
template <bool kExact>
inline __attribute__((always_inline)) float half_log1p(float e) {
  const float u = 1.0f + e;
  if constexpr (kExact) {
    return 0.5f * cpu::vec::log(u) * (e / (u - 1.0f));
  } else {
    return 0.5f * cpu::vec::log(u);
  }
}
template <KlPrior P>
inline __attribute__((always_inline)) float kl_term_f32(float sg, float e) {
  if constexpr (P == KlPrior::kArd) {
    return half_log1p<true>(e);
  } else {
    return -(kK1 * sg - half_log1p<false>(e) - kK1);
  }
}
template <KlPrior P>
inline __attribute__((always_inline)) float kl_dlog_alpha_f32(float sg, float e) {
  const float half_sig_neg = 0.5f * e / (1.0f + e);
  if constexpr (P == KlPrior::kArd) {
    return -half_sig_neg;
  } else {
    return -(kK1 * kK3 * sg * (1.0f - sg) + half_sig_neg);
  }
}
template <KlPrior P>
inline __attribute__((always_inline)) float kl_sigmoid_f32(float la) {
  if constexpr (P == KlPrior::kArd) {
    return 0.0f;  // unused
  } else {
    return cpu::vec::sigmoid(kK2 + kK3 * la);
  }
}

// KL of a chunk of at most kKlChunk weights, summed in 8 double lanes combined in a fixed order;
// with kGrad also its gradient at grad 1 (gt, gs: d/dtheta, d/dlog_sigma2), from the same
// exponentials: sigmoid(-la) = e / (1 + e) with e = exp(-la), which the term needs anyway.
template <bool kGrad, KlPrior P>
inline __attribute__((always_inline)) double kl_chunk_body(int64_t n, const float* th,
                                                           const float* ls, float* gt, float* gs) {
  alignas(64) float term[4096];
  for (int64_t i = 0; i < n; ++i) {
    const float t = th[i];
    const float t2e = t * t + kThEps;
    const float raw = ls[i] - cpu::vec::log(t2e);
    const float la = raw < kLaMin ? kLaMin : (raw > kLaMax ? kLaMax : raw);
    const float sg = kl_sigmoid_f32<P>(la);
    const float e = cpu::vec::exp(-la);
    term[i] = kl_term_f32<P>(sg, e);
    if constexpr (kGrad) {
      const bool clamped = !(raw >= kLaMin && raw <= kLaMax);  // NaN too, as torch.clamp
      const float d = clamped ? 0.0f : kl_dlog_alpha_f32<P>(sg, e);
      gt[i] = d * (-2.0f * t / t2e);
      gs[i] = d;
    }
  }
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(term[i + l]);
  }
  for (; i < n; ++i) lanes[i & 7] += static_cast<double>(term[i]);
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
// The prior picked once per chunk, outside the loop: each SIMD path holds both loops.
inline __attribute__((always_inline)) double kl_only_body(int64_t n, const float* th,
                                                          const float* ls, KlPrior prior) {
  return prior == KlPrior::kArd ? kl_chunk_body<false, KlPrior::kArd>(n, th, ls, nullptr, nullptr)
                                : kl_chunk_body<false, KlPrior::kLogUniform>(n, th, ls, nullptr, nullptr);
}
inline __attribute__((always_inline)) double kl_grad_body(int64_t n, const float* th,
                                                          const float* ls, float* gt, float* gs,
                                                          KlPrior prior) {
  return prior == KlPrior::kArd ? kl_chunk_body<true, KlPrior::kArd>(n, th, ls, gt, gs)
                                : kl_chunk_body<true, KlPrior::kLogUniform>(n, th, ls, gt, gs);
}
BDLKERN_SIMD_FUNCTION(double, kl_chunk_f32,
                      (int64_t n, const float* th, const float* ls, KlPrior prior), kl_only_body,
                      (n, th, ls, prior))
BDLKERN_SIMD_FUNCTION(double, kl_grad_chunk_f32,
                      (int64_t n, const float* th, const float* ls, float* gt, float* gs,
                       KlPrior prior),
                      kl_grad_body, (n, th, ls, gt, gs, prior))

template <KlPrior P>
inline __attribute__((always_inline)) void kl_backward_loop(int64_t n, float g, const float* th,
                                                            const float* ls, float* gt,
                                                            float* gs) {
  for (int64_t i = 0; i < n; ++i) {
    const float t = th[i];
    const float t2e = t * t + kThEps;
    const float raw = ls[i] - cpu::vec::log(t2e);
    const bool clamped = !(raw >= kLaMin && raw <= kLaMax);  // NaN too, as torch.clamp
    const float la = raw < kLaMin ? kLaMin : (raw > kLaMax ? kLaMax : raw);
    const float sg = kl_sigmoid_f32<P>(la);
    const float d = clamped ? 0.0f : g * kl_dlog_alpha_f32<P>(sg, cpu::vec::exp(-la));
    gt[i] = d * (-2.0f * t / t2e);
    gs[i] = d;
  }
}
inline __attribute__((always_inline)) void kl_backward_body(int64_t n, float g, const float* th,
                                                            const float* ls, float* gt, float* gs,
                                                            KlPrior prior) {
  if (prior == KlPrior::kArd) {
    kl_backward_loop<KlPrior::kArd>(n, g, th, ls, gt, gs);
  } else {
    kl_backward_loop<KlPrior::kLogUniform>(n, g, th, ls, gt, gs);
  }
}
BDLKERN_SIMD_FUNCTION(void, kl_backward_f32,
                      (int64_t n, float g, const float* th, const float* ls, float* gt, float* gs,
                       KlPrior prior),
                      kl_backward_body, (n, g, th, ls, gt, gs, prior))

// Calls f.template operator()<P>() with P the compile-time prior.
template <typename F>
void dispatch_prior(KlPrior prior, F f) {
  if (prior == KlPrior::kArd) return f.template operator()<KlPrior::kArd>();
  return f.template operator()<KlPrior::kLogUniform>();
}

// The op names for error messages.
inline const char* kl_op_name(KlPrior prior) {
  return prior == KlPrior::kArd ? "ard_kl" : "sparse_vd_kl";
}
inline const char* kl_backward_op_name(KlPrior prior) {
  return prior == KlPrior::kArd ? "ard_kl_backward" : "sparse_vd_kl_backward";
}

// sd[i] = sqrt(v[i] + eps), i < n: vsqrtps on the AVX paths, std::sqrt on the baseline (the same
// correctly rounded bits either way).
template <cpu::SimdPath kPath>
inline __attribute__((always_inline)) void std_body(int64_t n, const float* v, float eps, float* sd) {
  int64_t i = 0;
  if constexpr (kPath != cpu::SimdPath::kScalar) {
    for (; i + 8 <= n; i += 8) {
      cpu::vec::f8 x;
      __builtin_memcpy(&x, v + i, sizeof(x));
      x = cpu::vec::sqrt_avx(x + eps);
      __builtin_memcpy(sd + i, &x, sizeof(x));
    }
  }
  for (; i < n; ++i) sd[i] = std::sqrt(v[i] + eps);
}
BDLKERN_SIMD_FUNCTION_PATH(void, std_f32, (int64_t n, const float* v, float eps, float* sd),
                           std_body, (n, v, eps, sd))

// Per-task scratch of stream_normals, reused from row to row (no allocation per row).
struct NormalScratch {
  std::vector<uint32_t> words;
  std::vector<float> z;
  std::vector<float> eps;
};

// out[j] = the standard normal of stream element begin + j, j < count (Box-Muller on the lane
// pairs of each block).
template <typename T>
void stream_normals(const PhiloxStream& stream, uint64_t begin, int64_t count, T* out,
                    NormalScratch& scratch) {
  const uint64_t first = begin & ~uint64_t{3};
  const int64_t skip = static_cast<int64_t>(begin - first);
  const int64_t n_words = (skip + count + 3) & ~int64_t{3};
  std::vector<uint32_t>& words = scratch.words;
  words.resize(static_cast<size_t>(n_words));
  cpu::stream_words(stream, first, n_words, words.data());
  if constexpr (std::is_same_v<T, float>) {
    if (skip == 0 && count == n_words) {  // whole blocks: straight into out
      cpu::normals_f32(n_words / 2, words.data(), out);
      return;
    }
    scratch.z.resize(static_cast<size_t>(n_words));
    cpu::normals_f32(n_words / 2, words.data(), scratch.z.data());
    std::copy(scratch.z.begin() + skip, scratch.z.begin() + skip + count, out);
    return;
  }
  for (int64_t b = 0; b < n_words; b += 4) {
    T z[4];
    normal4(PhiloxBlock{{words[b], words[b + 1], words[b + 2], words[b + 3]}}, z);
    for (int l = 0; l < 4; ++l) {
      const int64_t j = b + l - skip;
      if (j >= 0 && j < count) out[j] = z[l];
    }
  }
}

// out[j] = mean[j] + scale[j] * (the standard normal of stream element begin + j), j < count:
// whole blocks straight from the words (no pass over a row of normals), else through eps.
void stream_normals_affine(const PhiloxStream& stream, uint64_t begin, int64_t count,
                           const float* mean, const float* scale, float* out,
                           NormalScratch& scratch) {
  if (begin % 4 == 0 && count % 4 == 0) {
    scratch.words.resize(static_cast<size_t>(count));
    cpu::stream_words(stream, begin, count, scratch.words.data());
    cpu::normals_affine_f32(count / 2, scratch.words.data(), mean, scale, out);
    return;
  }
  scratch.eps.resize(static_cast<size_t>(count));
  stream_normals(stream, begin, count, scratch.eps.data(), scratch);
  for (int64_t j = 0; j < count; ++j) out[j] = mean[j] + scale[j] * scratch.eps[j];
}

}  // namespace

void weight_variance(CpuTag, int64_t n, const void* theta, const void* log_sigma2, void* A,
                     DType dtype, void*) {
  dispatch(dtype, "weight_variance", [&]<typename T>() {
    const T* th = static_cast<const T*>(theta);
    const T* ls = static_cast<const T*>(log_sigma2);
    T* a = static_cast<T*>(A);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<T, float>) {
        weight_variance_f32(e - b, th + b, ls + b, a + b);
      } else {
        for (int64_t i = b; i < e; ++i) a[i] = weight_variance<T>(th[i], ls[i]).value;
      }
    });
  });
}

void weight_variance_backward(CpuTag, int64_t n, const void* theta, const void* log_sigma2,
                              const void* g_theta, const void* g_A, void* grad_theta,
                              void* grad_log_sigma2, DType dtype, void*) {
  dispatch(dtype, "weight_variance_backward", [&]<typename T>() {
    const T* th = static_cast<const T*>(theta);
    const T* ls = static_cast<const T*>(log_sigma2);
    const T* gt = static_cast<const T*>(g_theta);
    const T* ga = static_cast<const T*>(g_A);
    T* out_t = static_cast<T*>(grad_theta);
    T* out_s = static_cast<T*>(grad_log_sigma2);
    at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<T, float>) {
        weight_variance_backward_f32(e - b, th + b, ls + b, gt + b, ga + b, out_t + b, out_s + b);
        return;
      }
      for (int64_t i = b; i < e; ++i) {
        const WeightVariance<T> w = weight_variance<T>(th[i], ls[i]);
        const T g = ga[i];  // read both inputs before writing: the outputs may alias them
        const T t = gt[i] + g * w.d_theta;
        out_s[i] = g * w.d_log_s2;
        out_t[i] = t;
      }
    });
  });
}

void lrt_noise_forward(CpuTag, const LrtParams& p, const void* mu, const void* var,
                       const void* bias, void* y, void* std) {
  dispatch(p.dtype, "lrt_linear", [&]<typename T>() {
    const T* m = static_cast<const T*>(mu);
    const T* v = static_cast<const T*>(var);
    const T* bs = static_cast<const T*>(bias);
    T* out = static_cast<T*>(y);
    T* sd = static_cast<T*>(std);
    const int64_t R = p.rows, N = p.out_features;
    const int64_t src_rows = p.shared_input ? R : p.num_samples * R;
    // std once per element of mu / var; float32 also folds the bias into the mean once, so the
    // samples are mean + std * eps straight from the stream words.
    constexpr bool kFused = std::is_same_v<T, float>;
    // Uninitialised: every element is written below (a vector would zero it in a pass of its own).
    const std::unique_ptr<T[]> mean_bias(kFused && bs != nullptr ? new T[static_cast<size_t>(src_rows * N)] : nullptr);
    at::parallel_for(0, src_rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(1, N)),
                     [&](int64_t r0, int64_t r1) {
      if constexpr (kFused) {
        std_f32((r1 - r0) * N, v + r0 * N, static_cast<float>(kVarianceEps), sd + r0 * N);
      } else {
        for (int64_t i = r0 * N; i < r1 * N; ++i) sd[i] = std::sqrt(v[i] + static_cast<T>(kVarianceEps));
      }
      if (mean_bias != nullptr) {
        for (int64_t r = r0; r < r1; ++r) {
          for (int64_t o = 0; o < N; ++o) mean_bias[r * N + o] = m[r * N + o] + bs[o];
        }
      }
    });
    const T* mean = mean_bias != nullptr ? mean_bias.get() : m;
    const PhiloxStream stream = make_stream(p.rng_state, p.tag);
    at::parallel_for(0, p.num_samples * R, kRowGrain, [&](int64_t r0, int64_t r1) {
      NormalScratch scratch;
      std::vector<T> eps(kFused ? 0 : static_cast<size_t>(N));
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t src = (p.shared_input ? r % R : r) * N;
        T* yr = out + r * N;
        if constexpr (kFused) {
          stream_normals_affine(stream, static_cast<uint64_t>(r * N), N, mean + src, sd + src, yr, scratch);
        } else {
          stream_normals(stream, static_cast<uint64_t>(r * N), N, eps.data(), scratch);
          const T* mr = m + src;
          const T* sr = sd + src;
          for (int64_t o = 0; o < N; ++o) yr[o] = mr[o] + (bs != nullptr ? bs[o] : T(0)) + sr[o] * eps[o];
        }
      }
    });
  });
}

void lrt_noise_backward(CpuTag, const LrtParams& p, const void* grad_y, const void* std,
                        void* grad_mu, void* grad_var) {
  dispatch(p.dtype, "lrt_linear_backward", [&]<typename T>() {
    const T* g = static_cast<const T*>(grad_y);
    const T* sd = static_cast<const T*>(std);
    T* gm = static_cast<T*>(grad_mu);
    T* gv = static_cast<T*>(grad_var);
    const int64_t R = p.rows, N = p.out_features;
    const int64_t samples = p.shared_input ? p.num_samples : 1;
    const int64_t dst_rows = p.shared_input ? R : p.num_samples * R;
    const PhiloxStream stream = make_stream(p.rng_state, p.tag);
    // Parallel over destination rows; a shared input's samples are added in ascending order.
    at::parallel_for(0, dst_rows, kRowGrain, [&](int64_t r0, int64_t r1) {
      NormalScratch scratch;
      std::vector<T> eps(static_cast<size_t>(N));
      for (int64_t r = r0; r < r1; ++r) {
        T* gmr = gm + r * N;
        T* gvr = gv + r * N;
        std::fill(gmr, gmr + N, T(0));
        std::fill(gvr, gvr + N, T(0));
        for (int64_t s = 0; s < samples; ++s) {
          const int64_t row = s * R + r;  // the output row (s, r) when shared, else r itself
          stream_normals(stream, static_cast<uint64_t>(row * N), N, eps.data(), scratch);
          const T* gr = g + row * N;
          for (int64_t o = 0; o < N; ++o) {
            gmr[o] += gr[o];
            gvr[o] += gr[o] * eps[o];
          }
        }
        const T* sdr = sd + r * N;
        for (int64_t o = 0; o < N; ++o) gvr[o] /= T(2) * sdr[o];
      }
    });
  });
}

int64_t sparse_vd_kl_workspace(CpuTag, int64_t, DType) { return 0; }

// The KL (and with grads, its gradient at grad 1): parallel over fixed chunks, each summed in
// double, the chunk sums added in order (the bits do not depend on the thread count).
static void kl_sum(KlPrior prior, int64_t n, const void* theta, const void* log_sigma2, void* out,
                   void* grad_theta, void* grad_log_sigma2, DType dtype) {
  dispatch(dtype, kl_op_name(prior), [&]<typename T>() {
    dispatch_prior(prior, [&]<KlPrior P>() {
      const T* th = static_cast<const T*>(theta);
      const T* ls = static_cast<const T*>(log_sigma2);
      T* gt = static_cast<T*>(grad_theta);
      T* gs = static_cast<T*>(grad_log_sigma2);
      const int64_t chunks = (n + kKlChunk - 1) / kKlChunk;
      std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t b = c * kKlChunk, end = std::min(n, b + kKlChunk);
          if constexpr (std::is_same_v<T, float>) {
            partial[static_cast<size_t>(c)] = gt != nullptr
                ? kl_grad_chunk_f32(end - b, th + b, ls + b, gt + b, gs + b, P)
                : kl_chunk_f32(end - b, th + b, ls + b, P);
            continue;
          }
          double sum = 0.0;
          for (int64_t i = b; i < end; ++i) {
            sum += static_cast<double>(kl_term<P, T>(log_alpha_of<T>(th[i], ls[i]).value));
            if (gt != nullptr) kl_grads<P, T>(th[i], ls[i], T(1), &gt[i], &gs[i]);
          }
          partial[static_cast<size_t>(c)] = sum;
        }
      });
      double total = 0.0;
      for (const double v : partial) total += v;
      *static_cast<T*>(out) = static_cast<T>(total);
    });
  });
}

void sparse_vd_kl(CpuTag, KlPrior prior, int64_t n, const void* theta, const void* log_sigma2,
                  void* out, void*, DType dtype, void*) {
  kl_sum(prior, n, theta, log_sigma2, out, nullptr, nullptr, dtype);
}

void sparse_vd_kl_with_grad(CpuTag, KlPrior prior, int64_t n, const void* theta,
                            const void* log_sigma2, void* out, void* grad_theta,
                            void* grad_log_sigma2, DType dtype) {
  kl_sum(prior, n, theta, log_sigma2, out, grad_theta, grad_log_sigma2, dtype);
}

void sparse_vd_kl_backward(CpuTag, KlPrior prior, int64_t n, const void* grad, const void* theta,
                           const void* log_sigma2, void* grad_theta, void* grad_log_sigma2,
                           DType dtype, void*) {
  dispatch(dtype, kl_backward_op_name(prior), [&]<typename T>() {
    dispatch_prior(prior, [&]<KlPrior P>() {
      const T g = *static_cast<const T*>(grad);
      const T* th = static_cast<const T*>(theta);
      const T* ls = static_cast<const T*>(log_sigma2);
      T* gt = static_cast<T*>(grad_theta);
      T* gs = static_cast<T*>(grad_log_sigma2);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        if constexpr (std::is_same_v<T, float>) {
          kl_backward_f32(e - b, g, th + b, ls + b, gt + b, gs + b, P);
        } else {
          for (int64_t i = b; i < e; ++i) kl_grads<P, T>(th[i], ls[i], g, &gt[i], &gs[i]);
        }
      });
    });
  });
}

}  // namespace bdlkern
