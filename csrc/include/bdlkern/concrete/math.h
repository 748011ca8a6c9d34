// The relaxed Bernoulli ("Concrete") drop mask of Gal, Hron & Kendall (2017), shared by the CPU and
// CUDA kernels.
//
// With p = sigmoid(p_logit), q = 1 - p = sigmoid(-p_logit), eps = 1e-7 and u uniform in (0, 1):
//   a    = log(p + eps) - log(q + eps) + log(u + eps) - log(1 - u + eps)
//   z    = sigmoid(a / t)                    (the relaxed "drop" indicator)
//   keep = 1 - z = sigmoid(-a / t)
//   y    = x * keep / q
// and the derivative of y with respect to p_logit (dp/dp_logit = p q):
//   dy/dp_logit = x * keep * (p / q - p * da/dp * z / t),   da/dp = 1/(p + eps) + 1/(q + eps).
//
// Everything that depends only on p_logit (one value per layer or per channel) is folded into a
// ConcreteRate once; the per-element work is one log, one exp and a few multiplies. keep and z are
// computed from exp(-|a / t|), never as 1 - the other, so neither overflows nor cancels for
// extreme logits or small temperatures.
#pragma once

#include <math.h>

#include <bdlkern/common/macros.h>

namespace bdlkern {

constexpr double kConcreteEps = 1e-7;

template <typename T>
struct ConcreteRate {
  T log_ratio;  // log(p + eps) - log(q + eps)
  T inv_q;      // 1 / q: the rescaling of kept inputs
  T p_over_q;   // p / q
  T p_dadp_t;   // p * (1/(p + eps) + 1/(q + eps)) / t
};

template <typename T>
BDL_HDI T concrete_sigmoid(T v) {
  return T(1) / (T(1) + exp(-v));
}

// The per-rate constants of logit `p_logit` at inverse temperature `inv_t`.
template <typename T>
BDL_HDI ConcreteRate<T> concrete_rate(T p_logit, T inv_t) {
  const T eps = static_cast<T>(kConcreteEps);
  const T p = concrete_sigmoid(p_logit);
  const T q = concrete_sigmoid(-p_logit);
  ConcreteRate<T> r;
  r.log_ratio = log(p + eps) - log(q + eps);
  r.inv_q = T(1) / q;
  r.p_over_q = p / q;
  r.p_dadp_t = p * (T(1) / (p + eps) + T(1) / (q + eps)) * inv_t;
  return r;
}

// log(u + eps) - log(1 - u + eps) for u in (0, 1): the logistic noise of the relaxation.
template <typename T>
BDL_HDI T concrete_noise(T u) {
  const T eps = static_cast<T>(kConcreteEps);
  return log(u + eps) - log(T(1) - u + eps);
}

// keep = sigmoid(-s) and z = sigmoid(s) for s = a / t, both from e = exp(-|s|) in (0, 1].
template <typename T>
BDL_HDI void concrete_keep(T s, T* keep, T* z) {
  const T e = exp(-fabs(s));
  const T big = T(1) / (T(1) + e);  // sigmoid(|s|)
  const T small = e * big;          // sigmoid(-|s|)
  *keep = s >= T(0) ? small : big;
  *z = s >= T(0) ? big : small;
}

// Output factor keep / q; 0 where keep underflowed to 0 (so an infinite 1 / q at an extreme
// logit never turns a dropped input into NaN). A NaN keep (from a NaN rate, which only the device
// kernels let through) stays NaN instead of reading as dropped.
template <typename T>
BDL_HDI T concrete_factor(T keep, const ConcreteRate<T>& r) {
  return keep == T(0) ? T(0) : keep * r.inv_q;
}

// d factor / d p_logit (multiply by x and the incoming gradient for the p_logit gradient).
template <typename T>
BDL_HDI T concrete_dfactor(T keep, T z, const ConcreteRate<T>& r) {
  return keep == T(0) ? T(0) : keep * (r.p_over_q - r.p_dadp_t * z);
}

}  // namespace bdlkern
