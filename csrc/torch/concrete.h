// Bindings of the fused Concrete-dropout ops: validate, make contiguous, allocate, and call the raw
// pointer kernels of backend `Tag` (csrc/kernels/cpu/concrete_dropout.cpp, csrc/kernels/cuda/concrete_dropout.cu).
// Semantics: bdlkern/concrete/kernels.h.
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/all.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/isfinite.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <bdlkern/concrete/kernels.h>

#include <cmath>
#include <tuple>
#include <type_traits>

#include "autocast.h"
#include "backend_traits.h"
#include "channel_noise.h"
#include "checks.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct ConcreteOps {
  using Traits = BackendTraits<Tag>;

  // Checks every argument and returns the kernel parameters (x viewed as [M, C, L]).
  static ConcreteDropoutParams params(const at::Tensor& x, const at::Tensor& p_logit,
                                      const at::Tensor& rng_state, double temperature,
                                      int64_t channel_dim, const char* op) {
    const ChannelLayout l = channel_layout(x, p_logit, "p_logit", rng_state, channel_dim,
                                           Traits::device_type, {"a mask value", "rates", "rate"}, op);
    TORCH_CHECK(std::isfinite(temperature) && temperature > 0.0, op,
                ": temperature must be a finite number > 0, got ", temperature);
    // On the CPU a NaN / inf rate is an error, not a NaN network (one reduction over the rates). On
    // a device (CUDA, and the SIMT emulator that stands for it) reading that answer would stall
    // the stream on every call and break CUDA-graph capture: there a non-finite rate propagates
    // into NaN outputs and gradients instead.
    if constexpr (std::is_same_v<Tag, CpuTag>) {
      TORCH_CHECK(p_logit.numel() == 0 || at::isfinite(p_logit).all().item<bool>(), op,
                  ": p_logit must be finite (no NaN or inf)");
    }

    ConcreteDropoutParams prm;
    prm.rows = l.rows;
    prm.channels = l.channels;
    prm.inner = l.inner;
    prm.per_channel_p = l.per_channel;
    prm.inv_temperature = 1.0 / temperature;
    prm.rng_state = nullptr;
    prm.dtype = x.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
    prm.stream = Traits::stream(x);
    return prm;
  }

  static at::Tensor forward(const at::Tensor& x, const at::Tensor& p_logit,
                            const at::Tensor& rng_state, double temperature,
                            int64_t channel_dim) {
    const char* op = "concrete_dropout";
    const NoAutocast no_ac = no_autocast();
    ConcreteDropoutParams prm = params(x, p_logit, rng_state, temperature, channel_dim, op);
    at::OptionalDeviceGuard guard(x.device());
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (x.numel() == 0) return y;
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor pl = p_logit.contiguous();
    prm.rng_state = state.const_data_ptr<int64_t>();
    prm.stream = Traits::stream(x);
    concrete_dropout_forward(Tag{}, prm, xc.const_data_ptr(), pl.const_data_ptr(), y.data_ptr());
    return y;
  }

  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out,
                                                     const at::Tensor& x,
                                                     const at::Tensor& p_logit,
                                                     const at::Tensor& rng_state,
                                                     double temperature, int64_t channel_dim) {
    const char* op = "concrete_dropout_backward";
    const NoAutocast no_ac = no_autocast();
    ConcreteDropoutParams prm = params(x, p_logit, rng_state, temperature, channel_dim, op);
    check_grad_like_x(grad_out, x, op);
    at::OptionalDeviceGuard guard(x.device());
    at::Tensor grad_x =
        at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (x.numel() == 0) return {grad_x, at::zeros_like(p_logit)};
    at::Tensor grad_p = at::empty(p_logit.sizes(), p_logit.options());
    const at::Tensor xc = x.contiguous();
    const at::Tensor gc = grad_out.contiguous();
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor pl = p_logit.contiguous();
    prm.rng_state = state.const_data_ptr<int64_t>();
    const int64_t ws_bytes = concrete_dropout_backward_workspace(Tag{}, prm);
    at::Tensor workspace;
    if (ws_bytes > 0) workspace = at::empty({ws_bytes}, x.options().dtype(at::kByte));
    concrete_dropout_backward(Tag{}, prm, gc.const_data_ptr(), xc.const_data_ptr(),
                              pl.const_data_ptr(), grad_x.data_ptr(), grad_p.data_ptr(),
                              ws_bytes > 0 ? workspace.data_ptr() : nullptr);
    return {grad_x, grad_p};
  }

  static void register_impls(torch::Library& m) {
    m.impl("concrete_dropout", &forward);
    m.impl("concrete_dropout_backward", &backward);
  }
};

}  // namespace ops
}  // namespace bdlkern
