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
#include "channel_noise.h"
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
    const ChannelLayout l = channel_layout(x, log_alpha, "log_alpha", rng_state, channel_dim,
                                           Traits::device_type, {"noise", "alphas", "alpha"}, op);
    GaussianDropoutParams prm;
    prm.rows = l.rows;
    prm.channels = l.channels;
    prm.inner = l.inner;
    prm.per_channel_alpha = l.per_channel;
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
    check_grad_like_x(grad_out, x, op);
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
