// Raw-pointer entry points of the sparse variational dropout kernels (torch-free). The math of one
// weight is in sparse_vd.h. The LRT layer is two GEMMs (done by the binding with ATen) around
// these fused passes:
//
//   forward:  A = alpha theta^2                                         weight_variance
//             mu = x theta^T,  var = x^2 A^T                            (GEMMs)
//             y[s, r, o] = mu[r', o] + bias[o] + std[r', o] eps[s, r, o],
//             std = sqrt(var + 1e-8)                                    lrt_noise_forward
//   backward: grad_mu, grad_var from grad_y and the same eps            lrt_noise_backward
//             grad_x = grad_mu theta + 2 x (grad_var A),
//             G_theta = grad_mu^T x,  G_A = grad_var^T x^2              (GEMMs)
//             grad_theta = G_theta + G_A dA/dtheta,
//             grad_log_sigma2 = G_A dA/dlog_sigma2                      weight_variance_backward
//
// eps is standard normal: element (s, r, o) of the output [S, R, N] is element (s R + r) N + o of
// the logical Philox stream with tag `tag` (kStreamLRT for lrt_linear, kStreamSparseLRT for
// sparse_linear; Box-Muller on lane pairs, random.h). r' = r when
// the input has a sample dimension (mu, var, std are [S, R, N]) and the same [R, N] serves every
// sample when the input is shared.
//
// Every pointer is contiguous in the backend's memory; float32 or float64 (`dtype`).
#pragma once

#include <stdint.h>

#include <bdlkern/common/backend.h>
#include <bdlkern/common/dtype.h>
#include <bdlkern/sparse_vd/math.h>  // KlPrior

namespace bdlkern {

struct LrtParams {
  int64_t num_samples;   // S >= 1
  int64_t rows;          // R: rows per sample
  int64_t out_features;  // N
  bool shared_input;     // mu / var / std are [R, N] for every sample (else [S, R, N])
  uint32_t tag;          // Philox stream tag of the noise (kStreamLRT, or kStreamSparseLRT)
  const int64_t* rng_state;
  DType dtype;
  void* stream;
};

#define BDLKERN_DECLARE_SPARSE_VD_KERNELS(Tag)                                                    \
  /* A[i] = alpha theta^2 of n weights */                                                        \
  void weight_variance(Tag, int64_t n, const void* theta, const void* log_sigma2, void* A,       \
                       DType dtype, void* stream);                                               \
  /* grad_theta = g_theta + g_A dA/dtheta, grad_log_sigma2 = g_A dA/dlog_sigma2 (n weights; the  \
     outputs may alias g_theta and g_A) */                                                       \
  void weight_variance_backward(Tag, int64_t n, const void* theta, const void* log_sigma2,       \
                                const void* g_theta, const void* g_A, void* grad_theta,          \
                                void* grad_log_sigma2, DType dtype, void* stream);               \
  /* y [S, R, N], std like mu; bias [N] or nullptr */                                            \
  void lrt_noise_forward(Tag, const LrtParams& p, const void* mu, const void* var,               \
                         const void* bias, void* y, void* std);                                  \
  /* grad_mu, grad_var like std: sums over the samples (ascending s) when the input is shared */ \
  void lrt_noise_backward(Tag, const LrtParams& p, const void* grad_y, const void* std,          \
                          void* grad_mu, void* grad_var);                                        \
  /* the KL under `prior` (log-uniform: Molchanov's approximation; ARD: exact) summed over n   \
     weights into *out (a 0-dim tensor's storage); fixed-order reduction. workspace:             \
     sparse_vd_kl_workspace(n) bytes (0: none) */                                                \
  int64_t sparse_vd_kl_workspace(Tag, int64_t n, DType dtype);                                   \
  void sparse_vd_kl(Tag, KlPrior prior, int64_t n, const void* theta, const void* log_sigma2,    \
                    void* out, void* workspace, DType dtype, void* stream);                      \
  /* gradients of that sum scaled by *grad (a 0-dim tensor's storage, read in-kernel) */         \
  void sparse_vd_kl_backward(Tag, KlPrior prior, int64_t n, const void* grad,                    \
                             const void* theta, const void* log_sigma2, void* grad_theta,        \
                             void* grad_log_sigma2, DType dtype, void* stream);

BDLKERN_DECLARE_SPARSE_VD_KERNELS(CpuTag)
// CPU: the summed KL and its gradient at grad 1 in one pass (grad_theta, grad_log_sigma2 [n]);
// the other backends compose sparse_vd_kl and sparse_vd_kl_backward.
void sparse_vd_kl_with_grad(CpuTag, KlPrior prior, int64_t n, const void* theta,
                            const void* log_sigma2, void* out, void* grad_theta,
                            void* grad_log_sigma2, DType dtype);
BDLKERN_DECLARE_SPARSE_VD_KERNELS(CudaTag)
BDLKERN_DECLARE_SPARSE_VD_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_SPARSE_VD_KERNELS

}  // namespace bdlkern
