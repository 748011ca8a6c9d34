// C++ autograd of concrete_dropout (see csrc/torch/autograd.h for the scheme, double backward
// included). Templated on the op namespace.
#pragma once

#include "common.h"

namespace bdlkern {
namespace ops {

template <Name Ns>
struct ConcreteAutograd {
  using C = AutogradCommon<Ns>;
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using Ctx = torch::autograd::AutogradContext;
  using Grads = torch::autograd::variable_list;

  // ---- concrete_dropout --------------------------------------------------------------------
  static Tensor below(const Tensor& x, const Tensor& p_logit, const Tensor& rng_state,
                      double temperature, int64_t channel_dim) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "concrete_dropout",
                     Tensor(const Tensor&, const Tensor&, const Tensor&, double, int64_t)>()
        .call(x, p_logit, rng_state, temperature, channel_dim);
  }

  struct ConcreteDropout : torch::autograd::Function<ConcreteDropout> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& p_logit, const Tensor& rng_state,
                          double temperature, int64_t channel_dim) {
      const Tensor y = below(x, p_logit, rng_state, temperature, channel_dim);
      ctx->save_for_backward({x, p_logit, rng_state});
      ctx->saved_data["temperature"] = temperature;
      ctx->saved_data["channel_dim"] = channel_dim;
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const Tensor& grad = grads[0];
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &p_logit = saved[1], &state = saved[2];
      const double t = ctx->saved_data["temperature"].toDouble();
      const int64_t channel_dim = ctx->saved_data["channel_dim"].toInt();
      Grads out(5);
      if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
        constexpr double eps = 1e-7;
        // One mask value per element, or per (n, c) with channel_dim = 1 (rates [C] along dim 1).
        std::vector<int64_t> mask_shape = x.sizes().vec();
        std::vector<int64_t> rate_shape = p_logit.sizes().vec();
        if (channel_dim == 1) {
          for (int64_t d = 2; d < x.dim(); ++d) mask_shape[d] = 1;
          if (p_logit.dim() == 1) rate_shape.resize(x.dim() - 1, 1);
        }
        const int64_t n = c10::multiply_integers(mask_shape);
        const Tensor u = C::uniform(state, C::sizes({n}), kStreamConcreteDropout, x.scalar_type())
                             .reshape(mask_shape);
        const Tensor noise = at::log(u + eps) - at::log(1 - u + eps);
        const auto forward = [&](const Tensor& x_, const Tensor& p_logit_) {
          const Tensor p = at::sigmoid(p_logit_.reshape(rate_shape));
          const Tensor drop = at::log(p + eps) - at::log(1 - p + eps) + noise;
          return x_ * (1 - at::sigmoid(drop / t)) / (1 - p);
        };
        const Grads g =
            C::composite_grads(forward(x, p_logit), {x, p_logit}, C::needs(ctx, {0, 1}), grad);
        out[0] = g[0];
        out[1] = g[1];
        return out;
      }
      auto [grad_x, grad_p] =
          op_handle<Ns, "concrete_dropout_backward",
                    std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, double, int64_t)>()
              .call(grad, x, p_logit, state, t, channel_dim);
      if (ctx->needs_input_grad(0)) out[0] = grad_x;
      if (ctx->needs_input_grad(1)) out[1] = grad_p;
      return out;
    }
  };

  static Tensor concrete_dropout(const Tensor& x, const Tensor& p_logit, const Tensor& rng_state,
                                 double temperature, int64_t channel_dim) {
    if (!C::needs_graph(x, p_logit)) return below(x, p_logit, rng_state, temperature, channel_dim);
    return ConcreteDropout::apply(x, p_logit, rng_state, temperature, channel_dim);
  }

  static void register_impls(torch::Library& m) {
    m.impl("concrete_dropout", &concrete_dropout);
  }
};

}  // namespace ops
}  // namespace bdlkern
