// Bindings of the fused Gaussian-dropout ops: validate, make contiguous, allocate, and call the raw
// pointer kernels of backend `Tag` (csrc/kernels/cpu/gaussian_dropout.cpp,
// csrc/kernels/cuda/gaussian_dropout.cu). Semantics: bdlkern/gaussian/kernels.h.
//
// No check reads tensor values (no host sync on CUDA): a NaN / inf log_alpha or x propagates to
// the outputs, as in the eager formula x * (1 + exp(0.5 log_alpha) eps).
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <bdlkern/gaussian/kernels.h>

#include <tuple>

#include "autocast.h"
#include "backend_traits.h"
#include "checks.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct GaussianOps {
  using Traits = BackendTraits<Tag>;

  // Checks every argument and returns the kernel parameters (x viewed as [M, C, L]).
  static GaussianDropoutParams params(const at::Tensor& x, const at::Tensor& log_alpha,
                                      const at::Tensor& rng_state, int64_t channel_dim,
                                      const char* op) {
    TORCH_CHECK(x.device().type() == Traits::device_type, op, ": x must be on ",
                c10::DeviceTypeName(Traits::device_type, true), ", got ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
                ": x must be float32 or float64, got ", x.scalar_type());
    TORCH_CHECK(channel_dim == -1 || channel_dim == 1, op,
                ": channel_dim must be -1 (noise per element, alphas along the last dim) or "
                "1 (noise per (sample, channel) of [N, C, *]), got ",
                channel_dim);
    TORCH_CHECK(x.dim() >= (channel_dim == 1 ? 2 : 1), op, ": x must have ",
                channel_dim == 1 ? "shape [N, C, *] for channel_dim=1" : "at least one dimension",
                ", got shape ", x.sizes());
    TORCH_CHECK(log_alpha.scalar_type() == x.scalar_type(), op,
                ": log_alpha must have the dtype of x (", x.scalar_type(), "), got ",
                log_alpha.scalar_type());
    TORCH_CHECK(log_alpha.device() == x.device(), op, ": log_alpha must be on x's device (",
                x.device(), "), got ", log_alpha.device());
    const int64_t C = x.size(channel_dim);
    TORCH_CHECK(log_alpha.dim() == 0 || (log_alpha.dim() == 1 && log_alpha.size(0) == C), op,
                ": log_alpha must be a scalar (one alpha for the layer) or have shape [", C,
                "] (one alpha per ", channel_dim == 1 ? "channel" : "feature", "), got shape ",
                log_alpha.sizes());
    check_rng_state(rng_state, Traits::device_type, op);
    TORCH_CHECK(rng_state.device() == x.device(), op, ": rng_state must be on x's device (",
                x.device(), "), got ", rng_state.device());

    GaussianDropoutParams prm;
    prm.channels = C;
    if (channel_dim == 1) {
      prm.rows = x.size(0);
      prm.inner = C == 0 || x.size(0) == 0 ? 1 : x.numel() / (x.size(0) * C);
    } else {
      prm.rows = C == 0 ? 0 : x.numel() / C;
      prm.inner = 1;
    }
    prm.per_channel_alpha = log_alpha.dim() == 1;
    prm.rng_state = nullptr;
    prm.dtype = x.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
    prm.stream = Traits::stream(x);
    return prm;
  }

  static at::Tensor forward(const at::Tensor& x, const at::Tensor& log_alpha,
                            const at::Tensor& rng_state, int64_t channel_dim) {
    const char* op = "gaussian_dropout";
    const NoAutocast no_ac = no_autocast();
    GaussianDropoutParams prm = params(x, log_alpha, rng_state, channel_dim, op);
    at::OptionalDeviceGuard guard(x.device());
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (x.numel() == 0) return y;
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor la = log_alpha.contiguous();
    prm.rng_state = state.const_data_ptr<int64_t>();
    prm.stream = Traits::stream(x);
    gaussian_dropout_forward(Tag{}, prm, xc.const_data_ptr(), la.const_data_ptr(), y.data_ptr());
    return y;
  }

  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out,
                                                     const at::Tensor& x,
                                                     const at::Tensor& log_alpha,
                                                     const at::Tensor& rng_state,
                                                     int64_t channel_dim) {
    const char* op = "gaussian_dropout_backward";
    const NoAutocast no_ac = no_autocast();
    GaussianDropoutParams prm = params(x, log_alpha, rng_state, channel_dim, op);
    TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(),
                ", got ", grad_out.sizes());
    TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(), op,
                ": grad_out must have x's dtype and device (", x.scalar_type(), ", ", x.device(),
                "), got ", grad_out.scalar_type(), ", ", grad_out.device());
    at::OptionalDeviceGuard guard(x.device());
    at::Tensor grad_x =
        at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (x.numel() == 0) return {grad_x, at::zeros_like(log_alpha)};
    at::Tensor grad_la = at::empty(log_alpha.sizes(), log_alpha.options());
    const at::Tensor xc = x.contiguous();
    const at::Tensor gc = grad_out.contiguous();
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor la = log_alpha.contiguous();
    prm.rng_state = state.const_data_ptr<int64_t>();
    const int64_t ws_bytes = gaussian_dropout_backward_workspace(Tag{}, prm);
    at::Tensor workspace;
    if (ws_bytes > 0) workspace = at::empty({ws_bytes}, x.options().dtype(at::kByte));
    gaussian_dropout_backward(Tag{}, prm, gc.const_data_ptr(), xc.const_data_ptr(),
                              la.const_data_ptr(), grad_x.data_ptr(), grad_la.data_ptr(),
                              ws_bytes > 0 ? workspace.data_ptr() : nullptr);
    return {grad_x, grad_la};
  }

  static void register_impls(torch::Library& m) {
    m.impl("gaussian_dropout", &forward);
    m.impl("gaussian_dropout_backward", &backward);
  }
};

}  // namespace ops
}  // namespace bdlkern
