// CPU kernels of the MC-dropout linear layer (semantics and shapes: bdlkern/mc_dropout_kernels.h).
// They take contiguous float32/float64 tensors already validated by the binding
// (csrc/ops/mc_dropout_ops.h, which also handles empty problems: B, K, N >= 1 here) and call ATen's GEMM on masked, cache-sized chunks.
#pragma once

#include <ATen/core/Tensor.h>

#include <bdlkern/masks.h>
#include <bdlkern/mc_dropout_kernels.h>

#include <optional>

namespace bdlkern {
namespace cpu {

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

}  // namespace cpu
}  // namespace bdlkern
