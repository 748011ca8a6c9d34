// C++ autograd of gaussian_dropout (see csrc/torch/autograd.h for the scheme, double backward
// included). Templated on the op namespace.
#pragma once

#include "common.h"

namespace bdlkern {
namespace ops {

template <Name Ns>
struct GaussianAutograd {
  using C = AutogradCommon<Ns>;
  using Tensor = at::Tensor;
  using Ctx = torch::autograd::AutogradContext;
  using Grads = torch::autograd::variable_list;

  // ---- gaussian_dropout --------------------------------------------------------------------
  static Tensor below(const Tensor& x, const Tensor& log_alpha, const Tensor& rng_state,
                      int64_t channel_dim) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "gaussian_dropout",
                     Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t)>()
        .call(x, log_alpha, rng_state, channel_dim);
  }

  struct GaussianDropout : torch::autograd::Function<GaussianDropout> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& log_alpha,
                          const Tensor& rng_state, int64_t channel_dim) {
      const Tensor y = below(x, log_alpha, rng_state, channel_dim);
      ctx->save_for_backward({x, log_alpha, rng_state});  // never the noise
      ctx->saved_data["channel_dim"] = channel_dim;
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const Tensor& grad = grads[0];
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &log_alpha = saved[1], &state = saved[2];
      const int64_t channel_dim = ctx->saved_data["channel_dim"].toInt();
      Grads out(4);
      if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
        // One noise value per element, or per (n, c) with channel_dim = 1 (alphas [C] along dim 1),
        // re-made by the normal op from the same stream and logical index.
        std::vector<int64_t> noise_shape = x.sizes().vec();
        std::vector<int64_t> alpha_shape = log_alpha.sizes().vec();
        if (channel_dim == 1) {
          for (int64_t d = 2; d < x.dim(); ++d) noise_shape[d] = 1;
          if (log_alpha.dim() == 1) alpha_shape.resize(x.dim() - 1, 1);
        }
        const int64_t n = c10::multiply_integers(noise_shape);
        const Tensor eps =
            C::normal(state, C::sizes({n}), kStreamGaussianDropout, x.scalar_type())
                .reshape(noise_shape);
        const auto forward = [&](const Tensor& x_, const Tensor& log_alpha_) {
          return x_ * (1 + at::exp(0.5 * log_alpha_.reshape(alpha_shape)) * eps);
        };
        const Grads g =
            C::composite_grads(forward(x, log_alpha), {x, log_alpha}, C::needs(ctx, {0, 1}), grad);
        out[0] = g[0];
        out[1] = g[1];
        return out;
      }
      auto [grad_x, grad_la] =
          op_handle<Ns, "gaussian_dropout_backward",
                    std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                               const Tensor&, int64_t)>()
              .call(grad, x, log_alpha, state, channel_dim);
      if (ctx->needs_input_grad(0)) out[0] = grad_x;
      if (ctx->needs_input_grad(1)) out[1] = grad_la;
      return out;
    }
  };

  static Tensor gaussian_dropout(const Tensor& x, const Tensor& log_alpha, const Tensor& rng_state,
                                 int64_t channel_dim) {
    if (!C::needs_graph(x, log_alpha)) return below(x, log_alpha, rng_state, channel_dim);
    return GaussianDropout::apply(x, log_alpha, rng_state, channel_dim);
  }

  static void register_impls(torch::Library& m) {
    m.impl("gaussian_dropout", &gaussian_dropout);
  }
};

}  // namespace ops
}  // namespace bdlkern
