// Raw-pointer entry points of the fused Gaussian-dropout kernels (torch-free).
//
// Multiplicative Gaussian noise (Kingma, Salimans & Welling 2015, "Variational dropout and the
// local reparameterization trick"), with alpha = exp(log_alpha) and s = sqrt(alpha) =
// exp(0.5 log_alpha):
//
//   forward:   y[m, c, l]      = x[m, c, l] * (1 + s(c) eps(m, c))
//   backward:  grad_x[m, c, l] = grad_y[m, c, l] * (1 + s(c) eps(m, c))
//              grad_log_alpha[c] = 0.5 s(c) sum_{m, l} grad_y * x * eps(m, c)   (one alpha per c)
//              grad_log_alpha    = 0.5 s   sum over every c as well            (one alpha)
//
// x is viewed as [M, C, L] (contiguous, row-major), exactly as concrete_dropout's mask:
//   per-element noise (channel_dim = -1): M = numel / C, C = x.size(-1), L = 1;
//   per-channel noise (channel_dim = 1, spatial on [N, C, *]): M = N, C, L = prod(*).
// eps(m, c) is the standard normal of element m * C + c of the logical Philox stream with tag
// kStreamGaussianDropout, by the Box-Muller rule of the `normal` op (random.h), so it equals
// element m * C + c of normal(rng_state, [M * C], kStreamGaussianDropout) on the same backend,
// and backward re-makes the forward's noise instead of storing it.
//
// The log_alpha gradient is reduced in a fixed order (fixed tiles whose partial sums are combined
// in tile order): the same bits on every run, whatever the thread count or launch shape.
// NaN / inf in x or log_alpha propagate to y and the gradients (no check, no host sync).
#pragma once

#include <stdint.h>

#include <bdlkern/common/backend.h>
#include <bdlkern/common/dtype.h>

namespace bdlkern {

struct GaussianDropoutParams {
  int64_t rows;              // M
  int64_t channels;          // C >= 1
  int64_t inner;             // L >= 1
  bool per_channel_alpha;    // log_alpha has C entries (else 1)
  const int64_t* rng_state;  // int64[2] (seed, offset) in the backend's memory, read in-kernel
  DType dtype;               // float32 or float64: x, log_alpha, y and the gradients
  void* stream;              // cudaStream_t (CudaTag only)
};

// gaussian_dropout_backward_workspace: bytes of scratch backward needs (device memory for the
// CUDA kernels, 0 for the CPU).
#define BDLKERN_DECLARE_GAUSSIAN_KERNELS(Tag)                                                     \
  /* y [M, C, L] */                                                                               \
  void gaussian_dropout_forward(Tag, const GaussianDropoutParams& p, const void* x,              \
                                const void* log_alpha, void* y);                                 \
  /* grad_x [M, C, L]; grad_log_alpha [C] or [1] */                                               \
  int64_t gaussian_dropout_backward_workspace(Tag, const GaussianDropoutParams& p);              \
  void gaussian_dropout_backward(Tag, const GaussianDropoutParams& p, const void* grad_y,        \
                                 const void* x, const void* log_alpha, void* grad_x,             \
                                 void* grad_log_alpha, void* workspace);

BDLKERN_DECLARE_GAUSSIAN_KERNELS(CpuTag)
BDLKERN_DECLARE_GAUSSIAN_KERNELS(CudaTag)
BDLKERN_DECLARE_GAUSSIAN_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_GAUSSIAN_KERNELS

}  // namespace bdlkern
