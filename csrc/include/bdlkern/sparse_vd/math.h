// Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017): the per-weight math shared by the
// CPU and CUDA kernels.
//
// Each weight has a mean theta and a log-variance log_sigma2. Its dropout rate is
//   log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)
// and the local reparameterisation trick (Kingma, Salimans & Welling 2015) needs the variance of
// the weight, alpha theta^2 (exp(log_alpha) theta^2). The KL term of the variational objective is
// approximated by
//   -KL ~= k1 sigmoid(k2 + k3 log_alpha) - 0.5 log1p(exp(-log_alpha)) - k1
// with k1 = 0.63576, k2 = 1.87320, k3 = 1.48695 (the log-uniform prior). With the Gaussian ARD
// prior N(0, lambda^2) and lambda^2 = theta^2 + sigma^2 (its closed-form optimum; Kharitonov,
// Molchanov & Vetrov 2018, "Variational Dropout via Empirical Bayes") the KL is exact:
//   KL = 0.5 log(1 + theta^2 / sigma^2) = 0.5 log1p(exp(-log_alpha)),
// the second term of the log-uniform approximation. Derivatives follow the clamp as autograd's
// torch.clamp does: a log_alpha outside [-8, 8] passes no gradient to log_sigma2, and theta's
// then reaches the variance only through the theta^2 factor.
#pragma once

#include <math.h>

#include <bdlkern/common/macros.h>

namespace bdlkern {

constexpr double kLogAlphaMin = -8.0;
constexpr double kLogAlphaMax = 8.0;
constexpr double kThetaEps = 1e-8;     // inside the log of theta^2
constexpr double kVarianceEps = 1e-8;  // inside the square root of the LRT variance
constexpr double kKlK1 = 0.63576;
constexpr double kKlK2 = 1.87320;
constexpr double kKlK3 = 1.48695;

template <typename T>
struct LogAlpha {
  T value;       // clamped log alpha
  bool clamped;  // the unclamped value lay outside [-8, 8] or was NaN: no gradient through the clamp
};

template <typename T>
BDL_HDI LogAlpha<T> log_alpha_of(T theta, T log_sigma2) {
  const T raw = log_sigma2 - log(theta * theta + static_cast<T>(kThetaEps));
  const T lo = static_cast<T>(kLogAlphaMin), hi = static_cast<T>(kLogAlphaMax);
  LogAlpha<T> la;
  // As torch.clamp's gradient: only a value inside [lo, hi] passes it, so a NaN passes none.
  la.clamped = !(raw >= lo && raw <= hi);
  la.value = raw < lo ? lo : (raw > hi ? hi : raw);
  return la;
}

// d log_alpha / d theta where the clamp passes gradient.
template <typename T>
BDL_HDI T dlog_alpha_dtheta(T theta) {
  return T(-2) * theta / (theta * theta + static_cast<T>(kThetaEps));
}

// The weight variance alpha theta^2 and its derivatives.
template <typename T>
struct WeightVariance {
  T value;      // alpha theta^2
  T d_theta;    // d value / d theta
  T d_log_s2;   // d value / d log_sigma2
};

template <typename T>
BDL_HDI WeightVariance<T> weight_variance(T theta, T log_sigma2) {
  const LogAlpha<T> la = log_alpha_of(theta, log_sigma2);
  const T alpha = exp(la.value);
  WeightVariance<T> w;
  w.value = alpha * theta * theta;
  // value = exp(la) theta^2: d/dtheta = value * dla/dtheta + 2 alpha theta.
  const T through_clamp = la.clamped ? T(0) : w.value;
  w.d_theta = through_clamp * dlog_alpha_dtheta(theta) + T(2) * alpha * theta;
  w.d_log_s2 = through_clamp;
  return w;
}

// The prior of the KL term: the kernels are one body each, templated on it.
enum class KlPrior { kLogUniform = 0, kArd = 1 };

// 0.5 log1p(exp(-log_alpha)): the whole ARD KL, and one term of the log-uniform approximation.
template <typename T>
BDL_HDI T half_softplus_neg(T log_alpha) {
  return T(0.5) * log1p(exp(-log_alpha));
}

// Its derivative in log_alpha: -0.5 sigmoid(-log_alpha).
template <typename T>
BDL_HDI T half_softplus_neg_dlog_alpha(T log_alpha) {
  return T(-0.5) / (T(1) + exp(log_alpha));
}

// The KL of one weight under prior P (positive: the term added to the loss).
template <KlPrior P, typename T>
BDL_HDI T kl_term(T log_alpha) {
  if constexpr (P == KlPrior::kArd) {
    return half_softplus_neg(log_alpha);
  } else {
    const T k1 = static_cast<T>(kKlK1), k2 = static_cast<T>(kKlK2), k3 = static_cast<T>(kKlK3);
    const T s = T(1) / (T(1) + exp(-(k2 + k3 * log_alpha)));
    return -(k1 * s - half_softplus_neg(log_alpha) - k1);
  }
}

// d KL / d log_alpha under prior P.
template <KlPrior P, typename T>
BDL_HDI T kl_dlog_alpha(T log_alpha) {
  if constexpr (P == KlPrior::kArd) {
    return half_softplus_neg_dlog_alpha(log_alpha);
  } else {
    const T k1 = static_cast<T>(kKlK1), k2 = static_cast<T>(kKlK2), k3 = static_cast<T>(kKlK3);
    const T s = T(1) / (T(1) + exp(-(k2 + k3 * log_alpha)));
    return -(k1 * k3 * s * (T(1) - s)) + half_softplus_neg_dlog_alpha(log_alpha);
  }
}

// KL gradients of one weight under prior P, scaled by the upstream gradient `g` of the summed KL.
template <KlPrior P, typename T>
BDL_HDI void kl_grads(T theta, T log_sigma2, T g, T* grad_theta, T* grad_log_s2) {
  const LogAlpha<T> la = log_alpha_of(theta, log_sigma2);
  const T d = la.clamped ? T(0) : g * kl_dlog_alpha<P>(la.value);
  *grad_theta = d * dlog_alpha_dtheta(theta);
  *grad_log_s2 = d;
}

}  // namespace bdlkern
