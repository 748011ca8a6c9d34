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

#include <bdlkern/common/backend.h>
#include <bdlkern/common/dtype.h>

namespace bdlkern {

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
  // CUDA / SIMT forward with shared_mask: S * (K + 1) int32 of device memory (K < 2^31) for the
  // per-sample lists of kept features, so the GEMM runs over those only; nullptr: the tiles mask.
  int32_t* workspace = nullptr;
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
// CPU (float32 / float64): the whole op in one single-threaded pass, for small problems, where the
// GEMM path below would spend more on its fixed costs than on arithmetic. p.shared_input with
// grad_input sums the samples in ascending order.
BDLKERN_DECLARE_MC_DROPOUT_KERNELS(CpuTag)

#undef BDLKERN_DECLARE_MC_DROPOUT_KERNELS

// ---- CUDA: the materialise path -----------------------------------------------------------------
// On CUDA the binding picks, per call, between the fused kernels above and a cuBLAS path
// (bdlkern/mc_dropout/cost_model.h): these two memory-bound passes around at::mm
// (csrc/kernels/cuda/mc_dropout_mask.cu). Same params and mask as the fused kernels.
//   mask_input:  xm[r, k] = keep(r, k) ? x_row(r)[k] : 0 for the R = S * B rows r = s * B + b,
//                xm [R, K]; x_row(r) = x[b] when p.shared_input, else x[r]. Unscaled: the GEMM's
//                alpha applies 1 / (1 - p), as the fused kernel scales its accumulator.
//   mask_grad:   grad_x[r, k] = keep(r, k) * d[r, k] * scale for d [R, K] (d may be grad_x);
//                when p.shared_input, grad_x [B, K] = the sum over s ascending of those rows.
#define BDLKERN_DECLARE_MC_DROPOUT_MASK_KERNELS(Tag)                                              \
  void mc_dropout_mask_input(Tag, const MCDropoutLinearParams& p, const void* x, void* xm);     \
  void mc_dropout_mask_grad(Tag, const MCDropoutLinearParams& p, const void* d, void* grad_x);

BDLKERN_DECLARE_MC_DROPOUT_MASK_KERNELS(CudaTag)
BDLKERN_DECLARE_MC_DROPOUT_MASK_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_MC_DROPOUT_MASK_KERNELS

// ---- CPU: the mask passes around the GEMMs ------------------------------------------------------
// On the CPU (above the small-problem size) the three products are ATen GEMMs on cache-sized chunks of rows, run by the binding
// (csrc/torch/mc_dropout_cpu.cpp); the CPU kernels (csrc/kernels/cpu/mc_dropout_linear.cpp) are the
// passes that make the mask from Philox and apply it, on float or double (p.dtype) row-major
// buffers. Row r of the flattened [S * B] rows belongs to sample r / B and batch row r % B; the
// input row of r is x[r % B] when p.shared_input, else x[r].

// out[i, :] = keep(r0 + i, :) * x_row(r0 + i) * scale, i < count (per-element masks). In place
// when out is x + r0 * K and x is not shared.
void mc_dropout_mask_rows(CpuTag, const MCDropoutLinearParams& p, const void* x, int64_t r0,
                          int64_t count, void* out);
// grad_x[(r0 + i) % B, :] += keep(r0 + i, :) * d[i, :] * scale, i ascending (per-element masks,
// input shared by the samples: grad_x [B, K] sums them in a fixed order).
void mc_dropout_mask_accumulate_rows(CpuTag, const MCDropoutLinearParams& p, const void* d,
                                     int64_t r0, int64_t count, void* grad_x);
// Shared masks: the kept features of sample s, ascending, into kept [K]; returns how many.
int64_t mc_dropout_kept_features(CpuTag, const MCDropoutLinearParams& p, int64_t s, int64_t* kept);
// Shared masks: out[i, j] = x_row(s * B + b0 + i)[kept[j]] * scale for j < nk, rows of width
// nk + ones_column (a trailing 1 that multiplies a bias row appended to the kept weights).
void mc_dropout_gather_kept(CpuTag, const MCDropoutLinearParams& p, const void* x, int64_t s,
                            int64_t b0, int64_t count, const int64_t* kept, int64_t nk,
                            bool ones_column, void* out);
// Shared masks: grad_x row of (s, b0 + i) at kept[j] += d[i, j] * scale (the row is b0 + i when
// p.shared_input, else s * B + b0 + i).
void mc_dropout_scatter_kept(CpuTag, const MCDropoutLinearParams& p, const void* d, int64_t s,
                             int64_t b0, int64_t count, const int64_t* kept, int64_t nk,
                             void* grad_x);

}  // namespace bdlkern
