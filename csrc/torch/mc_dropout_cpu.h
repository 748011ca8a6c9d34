// The CPU GEMM orchestration of the MC-dropout linear ops (csrc/torch/mc_dropout_cpu.cpp): chunks
// of rows, each masked by the CPU passes of bdlkern/mc_dropout/kernels.h and multiplied by one
// ATen GEMM. Inputs are contiguous float32/float64 tensors already validated by the binding
// (csrc/torch/mc_dropout.h, which also handles empty problems: B, K, N >= 1 here).
#pragma once

#include <ATen/core/Tensor.h>

#include <bdlkern/mc_dropout/kernels.h>

#include <optional>

namespace bdlkern {
namespace ops {
namespace cpu_gemm {

// y [S, B, N]
at::Tensor mc_dropout_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const MCDropoutLinearParams& p);
// grad_x [B, K] (p.shared_input: summed over samples) or [S, B, K]
at::Tensor mc_dropout_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight,
                                        const MCDropoutLinearParams& p);
// grad_w [N, K]
at::Tensor mc_dropout_linear_grad_weight(const at::Tensor& grad_y, const at::Tensor& x,
                                         const MCDropoutLinearParams& p);

}  // namespace cpu_gemm
}  // namespace ops
}  // namespace bdlkern
