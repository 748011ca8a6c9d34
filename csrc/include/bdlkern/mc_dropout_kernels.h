// Raw-pointer entry points of the fused multi-sample MC-dropout linear kernels (torch-free).
//
//   forward:       Y[s, b, :] = (X[s, b, :] * M[s, b, :] * scale) W^T + bias
//   grad_input:    dX[s, b, :] = (dY[s, b, :] W) * M[s, b, :] * scale
//                  (summed over s when the input is shared by all samples)
//   grad_weight:   dW = sum_{s, b} dY[s, b, :]^T (X[s, b, :] * M[s, b, :] * scale)
// with M the keep mask of masks.h (never stored: every kernel re-makes it from rng_state) and
// scale = 1 / (1 - p). Shapes (all contiguous, row-major, in the backend's memory):
//   x       [S, B, K], or [B, K] when shared_input (the same input for every sample)
//   weight  [N, K];  bias [N] or nullptr;  y / grad_y [S, B, N];  grad_x like x;  grad_w [N, K]
// Accumulation is in float for float16/bfloat16/float32 and in double for float64.
#pragma once

#include <stdint.h>

#include "backend.h"

namespace bdlkern {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct MCDropoutLinearParams {
  int64_t num_samples;   // S >= 1
  int64_t rows;          // B >= 0: rows per sample (the flattened batch)
  int64_t in_features;   // K >= 1
  int64_t out_features;  // N >= 1
  bool shared_input;     // x is [B, K], used by every sample (else [S, B, K])
  bool shared_mask;      // mask per (sample, feature) instead of per (sample, row, feature)
  uint64_t threshold;    // keep iff the stream word < threshold (random.h keep_threshold)
  double scale;          // 1 / (1 - p), applied to kept inputs
  const int64_t* rng_state;  // int64[2] (seed, offset) in the backend's memory, read in-kernel
  DType dtype;           // of x, weight, bias, y and every gradient
  void* stream;          // cudaStream_t (CudaTag only)
};

#define BDLKERN_DECLARE_MC_DROPOUT_KERNELS(Tag)                                                   \
  void mc_dropout_linear_forward(Tag, const MCDropoutLinearParams& p, const void* x,            \
                                 const void* weight, const void* bias, void* y);                \
  void mc_dropout_linear_grad_input(Tag, const MCDropoutLinearParams& p, const void* grad_y,    \
                                    const void* weight, void* grad_x);                          \
  void mc_dropout_linear_grad_weight(Tag, const MCDropoutLinearParams& p, const void* grad_y,   \
                                     const void* x, void* grad_w);

BDLKERN_DECLARE_MC_DROPOUT_KERNELS(CudaTag)
BDLKERN_DECLARE_MC_DROPOUT_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_MC_DROPOUT_KERNELS

}  // namespace bdlkern
