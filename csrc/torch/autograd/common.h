// What the per-family autograd Functions (csrc/torch/autograd/*.h) share: the stream ops they call
// through the dispatcher to re-make random bits, the composite-gradient helper of the double
// backward, and the LRT / log-alpha composite forms used by more than one family.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <bdlkern/rng/random.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../autocast.h"

namespace bdlkern {
namespace ops {

template <Name Ns>
struct AutogradCommon {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using Ctx = torch::autograd::AutogradContext;
  using Grads = torch::autograd::variable_list;

  // ---- the ops this file calls, through the dispatcher ----------------------------------------
  static Tensor dropout_mask(const Tensor& state, c10::SymIntArrayRef size, double p, int64_t stream) {
    return op_handle<Ns, "dropout_mask", Tensor(const Tensor&, c10::SymIntArrayRef, double, int64_t)>()
        .call(state, size, p, stream);
  }
  static Tensor uniform(const Tensor& state, c10::SymIntArrayRef size, int64_t stream,
                        at::ScalarType dtype) {
    return op_handle<Ns, "uniform",
                     Tensor(const Tensor&, c10::SymIntArrayRef, int64_t, std::optional<at::ScalarType>)>()
        .call(state, size, stream, dtype);
  }
  static Tensor normal(const Tensor& state, c10::SymIntArrayRef size, int64_t stream,
                       at::ScalarType dtype) {
    return op_handle<Ns, "normal",
                     Tensor(const Tensor&, c10::SymIntArrayRef, int64_t, std::optional<at::ScalarType>)>()
        .call(state, size, stream, dtype);
  }

  // The gradients of `out` (a composite recomputation) for the inputs that need one, with a graph.
  static Grads composite_grads(const Tensor& out, const Grads& inputs,
                               const std::vector<bool>& needs, const Tensor& grad) {
    Grads wrt;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (needs[i]) wrt.push_back(inputs[i]);
    }
    Grads result(inputs.size());
    if (wrt.empty()) return result;
    const Grads got = torch::autograd::grad({out}, wrt, {grad}, /*retain_graph=*/true,
                                            /*create_graph=*/true, /*allow_unused=*/true);
    for (size_t i = 0, k = 0; i < inputs.size(); ++i) {
      if (needs[i]) result[i] = got[k++];
    }
    return result;
  }

  // Whether a call must go through its autograd Function: grad mode is on and an input requires
  // grad, or an input carries a forward-mode tangent (which the Function then rejects, as it has
  // no jvp, instead of dropping it). Otherwise (inference, torch.no_grad, frozen layers) the
  // Autograd kernel calls the op below autograd directly, as ATen's own kernels skip their nodes:
  // a Function costs microseconds, as much as a small layer's whole kernel.
  static bool wants_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
  static bool wants_grad(const OptTensor& t) { return t.has_value() && wants_grad(*t); }
  static bool has_tangent(const Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
  static bool has_tangent(const OptTensor& t) { return t.has_value() && has_tangent(*t); }
  template <class... Ts>
  static bool needs_graph(const Ts&... ts) {
    return (at::GradMode::is_enabled() && (wants_grad(ts) || ...)) || (has_tangent(ts) || ...);
  }

  static c10::SymIntArrayRef sizes(at::IntArrayRef concrete) {
    return c10::fromIntArrayRefSlow(concrete);
  }

  static std::vector<bool> needs(Ctx* ctx, std::initializer_list<size_t> indices) {
    std::vector<bool> out;
    for (size_t i : indices) out.push_back(ctx->needs_input_grad(i));
    return out;
  }

  static Tensor log_alpha(const Tensor& theta, const Tensor& log_sigma2) {
    return at::clamp(log_sigma2 - at::log(theta * theta + 1e-8), -8.0, 8.0);
  }

  // mu + sqrt(var + 1e-8) * eps without bias, [S, R, N]: mu = x W^T, var = x^2 V^T.
  static Tensor lrt_composite(const Tensor& x, const Tensor& weight, const Tensor& variance,
                              const Tensor& rng_state, int64_t S, int64_t stream) {
    const Tensor mu = at::matmul(x, weight.t());
    const Tensor std = at::sqrt(at::matmul(x * x, variance.t()) + 1e-8);
    const c10::SymInt size[] = {S, x.sym_size(-2), weight.sym_size(0)};
    return mu + std * normal(rng_state, size, stream, x.scalar_type());
  }
};

}  // namespace ops
}  // namespace bdlkern
