// C++ autograd of mc_dropout_linear (see csrc/torch/autograd.h for the scheme, double backward
// included). Templated on the op namespace.
#pragma once

#include "common.h"

namespace bdlkern {
namespace ops {

template <Name Ns>
struct MCDropoutAutograd {
  using C = AutogradCommon<Ns>;
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using Ctx = torch::autograd::AutogradContext;
  using Grads = torch::autograd::variable_list;

  // ---- mc_dropout_linear -------------------------------------------------------------------
  static Tensor below(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                      const Tensor& rng_state, double p, int64_t S, bool shared_mask) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "mc_dropout_linear",
                     Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, double,
                            int64_t, bool)>()
        .call(x, weight, bias, rng_state, p, S, shared_mask);
  }

  struct MCDropoutLinear : torch::autograd::Function<MCDropoutLinear> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                          const Tensor& rng_state, double p, int64_t S, bool shared_mask) {
      const Tensor y = below(x, weight, bias, rng_state, p, S, shared_mask);
      ctx->save_for_backward({x, weight, rng_state});
      ctx->saved_data["p"] = p;
      ctx->saved_data["shared_mask"] = shared_mask;
      ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const Tensor& grad = grads[0];
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &weight = saved[1], &state = saved[2];
      const double p = ctx->saved_data["p"].toDouble();
      const bool shared_mask = ctx->saved_data["shared_mask"].toBool();
      Grads out(7);
      if (ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)) {
        out[2] = grad.sum({0, 1});
      }
      if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
        const int64_t S = grad.size(0), rows = x.size(-2), features = x.size(-1);
        const Tensor mask =
            shared_mask ? C::dropout_mask(state, C::sizes({S, features}), p, kStreamMCDropout)
                              .reshape({S, 1, features})
                        : C::dropout_mask(state, C::sizes({S, rows, features}), p, kStreamMCDropout);
        const auto forward = [&](const Tensor& x_, const Tensor& w_) {
          return at::matmul(x_ * mask.to(x_.scalar_type()) * (1.0 / (1.0 - p)), w_.t());
        };
        const Grads g = C::composite_grads(forward(x, weight), {x, weight}, C::needs(ctx, {0, 1}), grad);
        out[0] = g[0];
        out[1] = g[1];
        return out;
      }
      if (ctx->needs_input_grad(0)) {
        // A 2-d x was shared by all samples: its gradient sums over them.
        out[0] = op_handle<Ns, "mc_dropout_linear_grad_input",
                           Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool, bool)>()
                     .call(grad, weight, state, p, shared_mask, x.dim() == 2);
      }
      if (ctx->needs_input_grad(1)) {
        out[1] = op_handle<Ns, "mc_dropout_linear_grad_weight",
                           Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool)>()
                     .call(grad, x, state, p, shared_mask);
      }
      return out;
    }
  };

  static Tensor mc_dropout_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                  const Tensor& rng_state, double p, int64_t S, bool shared_mask) {
    if (!C::needs_graph(x, weight, bias)) return below(x, weight, bias, rng_state, p, S, shared_mask);
    return MCDropoutLinear::apply(x, weight, bias, rng_state, p, S, shared_mask);
  }

  static void register_impls(torch::Library& m) {
    m.impl("mc_dropout_linear", &mc_dropout_linear);
  }
};

}  // namespace ops
}  // namespace bdlkern
