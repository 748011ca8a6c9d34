// Raw-pointer entry points of the fused Concrete-dropout kernels (torch-free).
//
// x is viewed as [M, C, L] (contiguous, row-major): one relaxed mask value per (m, c), shared by
// the L elements of that pair:
//   per-element masks (channel_dim = -1): M = numel / C, C = x.size(-1), L = 1;
//   per-channel masks (channel_dim = 1, spatial dropout on [N, C, *]): M = N, C, L = prod(*).
// The mask value of (m, c) is made from element m * C + c of the logical Philox stream with tag
// kStreamConcreteDropout (uniform_float / uniform_double of random.h), so the CPU kernel, the CUDA
// kernel and the SIMT build draw the same u, and backward re-makes the forward's u.
//
//   forward:   y[m, c, l] = x[m, c, l] * keep(m, c) / q(c)                (concrete.h)
//   backward:  grad_x[m, c, l] = grad_y[m, c, l] * keep(m, c) / q(c)
//              grad_p_logit[c] = sum_{m, l} grad_y * x * dfactor(m, c)     (per-channel p)
//              grad_p_logit    = sum over every c as well                 (one p for the layer)
// The p_logit gradient is reduced in a fixed order (fixed tiles, partial sums combined in tile
// order): the same bits every run, whatever the thread count or launch shape.
#pragma once

#include <stdint.h>

#include <bdlkern/common/backend.h>
#include <bdlkern/common/dtype.h>

namespace bdlkern {

struct ConcreteDropoutParams {
  int64_t rows;        // M
  int64_t channels;    // C >= 1
  int64_t inner;       // L >= 1
  bool per_channel_p;  // p_logit has C entries (else 1)
  double inv_temperature;    // 1 / t, t > 0
  const int64_t* rng_state;  // int64[2] (seed, offset) in the backend's memory, read in-kernel
  DType dtype;               // float32 or float64: x, p_logit, y and the gradients
  void* stream;              // cudaStream_t (CudaTag only)
};

// Workspace of concrete_dropout_backward, in bytes (device memory for CudaTag; 0 for the CPU).
#define BDLKERN_DECLARE_CONCRETE_KERNELS(Tag)                                                     \
  /* y [M, C, L] */                                                                               \
  void concrete_dropout_forward(Tag, const ConcreteDropoutParams& p, const void* x,              \
                                const void* p_logit, void* y);                                   \
  /* grad_x [M, C, L]; grad_p_logit [C] or [1] */                                                 \
  int64_t concrete_dropout_backward_workspace(Tag, const ConcreteDropoutParams& p);              \
  void concrete_dropout_backward(Tag, const ConcreteDropoutParams& p, const void* grad_y,        \
                                 const void* x, const void* p_logit, void* grad_x,               \
                                 void* grad_p_logit, void* workspace);

BDLKERN_DECLARE_CONCRETE_KERNELS(CpuTag)
BDLKERN_DECLARE_CONCRETE_KERNELS(CudaTag)
BDLKERN_DECLARE_CONCRETE_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_CONCRETE_KERNELS

}  // namespace bdlkern
