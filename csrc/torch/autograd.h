// Autograd of the bdlkern operators, in C++ (the Autograd dispatch key), so that an op call costs
// no Python beyond the module's forward: each differentiable op is a torch::autograd::Function
// whose forward calls the op below autograd and whose backward calls the backward ops, which
// re-make the random bits from the saved rng_state (nothing random is stored).
//
// Double backward: a backward that runs with grad mode on was asked for a graph of its own
// (create_graph=True: gradient penalties, Hessian-vector products, meta-learning). The fused
// backward kernels are not differentiable, so there the backward differentiates a composite form
// of its op instead: the same formula in ATen ops, with the op's random bits re-made by the stream
// ops (same stream tag, same logical index). That graph gives exact gradients of every order, at
// the memory of eager PyTorch, which only that path pays. sparse_linear_backward is linear in its
// gradient, so its own backward is the forward product and stays on the CSR kernels.
//
// Templated on the op namespace: `bdlkern` (csrc/torch/autograd.cpp) and the SIMT test namespace
// `bdlkern_simt` (csrc/testing/autograd_simt.cpp) share it.
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

#include "autocast.h"

namespace bdlkern {
namespace ops {

template <Name Ns>
struct AutogradOps {
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

  // ---- mc_dropout_linear -------------------------------------------------------------------
  struct MCDropoutLinear : torch::autograd::Function<MCDropoutLinear> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                          const Tensor& rng_state, double p, int64_t S, bool shared_mask) {
      Tensor y;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        y = op_handle<Ns, "mc_dropout_linear",
                      Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, double,
                             int64_t, bool)>()
                .call(x, weight, bias, rng_state, p, S, shared_mask);
      }
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
            shared_mask ? dropout_mask(state, sizes({S, features}), p, kStreamMCDropout)
                              .reshape({S, 1, features})
                        : dropout_mask(state, sizes({S, rows, features}), p, kStreamMCDropout);
        const auto forward = [&](const Tensor& x_, const Tensor& w_) {
          return at::matmul(x_ * mask.to(x_.scalar_type()) * (1.0 / (1.0 - p)), w_.t());
        };
        const Grads g = composite_grads(forward(x, weight), {x, weight}, needs(ctx, {0, 1}), grad);
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
    return MCDropoutLinear::apply(x, weight, bias, rng_state, p, S, shared_mask);
  }

  // ---- concrete_dropout --------------------------------------------------------------------
  struct ConcreteDropout : torch::autograd::Function<ConcreteDropout> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& p_logit, const Tensor& rng_state,
                          double temperature, int64_t channel_dim) {
      Tensor y;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        y = op_handle<Ns, "concrete_dropout",
                      Tensor(const Tensor&, const Tensor&, const Tensor&, double, int64_t)>()
                .call(x, p_logit, rng_state, temperature, channel_dim);
      }
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
        const Tensor u = uniform(state, sizes({n}), kStreamConcreteDropout, x.scalar_type())
                             .reshape(mask_shape);
        const Tensor noise = at::log(u + eps) - at::log(1 - u + eps);
        const auto forward = [&](const Tensor& x_, const Tensor& p_logit_) {
          const Tensor p = at::sigmoid(p_logit_.reshape(rate_shape));
          const Tensor drop = at::log(p + eps) - at::log(1 - p + eps) + noise;
          return x_ * (1 - at::sigmoid(drop / t)) / (1 - p);
        };
        const Grads g =
            composite_grads(forward(x, p_logit), {x, p_logit}, needs(ctx, {0, 1}), grad);
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
    return ConcreteDropout::apply(x, p_logit, rng_state, temperature, channel_dim);
  }

  // ---- lrt_linear --------------------------------------------------------------------------
  struct LrtLinear : torch::autograd::Function<LrtLinear> {
    static Grads forward(Ctx* ctx, const Tensor& x, const Tensor& theta, const Tensor& log_sigma2,
                         const OptTensor& bias, const Tensor& rng_state, int64_t S) {
      Tensor y, std;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        std::tie(y, std) =
            op_handle<Ns, "lrt_linear",
                      std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const OptTensor&, const Tensor&, int64_t)>()
                .call(x, theta, log_sigma2, bias, rng_state, S);
      }
      ctx->mark_non_differentiable({std});
      // std takes no gradient: without this, autograd would fill a tensor of zeros of its size
      // for it on every backward.
      ctx->set_materialize_grads(false);
      ctx->save_for_backward({x, theta, log_sigma2, std, rng_state});
      ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
      return {y, std};
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      Grads out(6);
      const Tensor& grad = grads[0];
      if (!grad.defined()) return out;
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &theta = saved[1], &log_sigma2 = saved[2], &std = saved[3],
                   &state = saved[4];
      const bool bias_grad = ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(3);
      if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
        const Tensor variance = at::exp(log_alpha(theta, log_sigma2)) * theta * theta;
        const Tensor y = lrt_composite(x, theta, variance, state, grad.size(0), kStreamLRT);
        const Grads g = composite_grads(y, {x, theta, log_sigma2}, needs(ctx, {0, 1, 2}), grad);
        std::copy(g.begin(), g.end(), out.begin());
        if (bias_grad) out[3] = grad.sum({0, 1});
        return out;
      }
      auto [gx, gt, gs, gb] =
          op_handle<Ns, "lrt_linear_backward",
                    std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&,
                                                               const Tensor&, const Tensor&,
                                                               const Tensor&, const Tensor&)>()
              .call(grad, x, theta, log_sigma2, std, state);
      if (ctx->needs_input_grad(0)) out[0] = gx;
      if (ctx->needs_input_grad(1)) out[1] = gt;
      if (ctx->needs_input_grad(2)) out[2] = gs;
      if (bias_grad) out[3] = gb;
      return out;
    }
  };

  static std::tuple<Tensor, Tensor> lrt_linear(const Tensor& x, const Tensor& theta,
                                               const Tensor& log_sigma2, const OptTensor& bias,
                                               const Tensor& rng_state, int64_t S) {
    const Grads out = LrtLinear::apply(x, theta, log_sigma2, bias, rng_state, S);
    return {out[0], out[1]};
  }

  // ---- the KL ------------------------------------------------------------------------------
  static Tensor kl_composite(const Tensor& theta, const Tensor& log_sigma2) {
    const Tensor la = log_alpha(theta, log_sigma2);
    constexpr double k1 = 0.63576, k2 = 1.87320, k3 = 1.48695;
    return -(k1 * at::sigmoid(k2 + k3 * la) - 0.5 * at::log1p(at::exp(-la)) - k1).sum();
  }

  static Grads kl_composite_grads(Ctx* ctx, const Tensor& theta, const Tensor& log_sigma2,
                                  const Tensor& grad) {
    return composite_grads(kl_composite(theta, log_sigma2), {theta, log_sigma2}, needs(ctx, {0, 1}),
                           grad);
  }

  struct SparseVDKL : torch::autograd::Function<SparseVDKL> {
    static Tensor forward(Ctx* ctx, const Tensor& theta, const Tensor& log_sigma2) {
      Tensor kl;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        kl = op_handle<Ns, "sparse_vd_kl", Tensor(const Tensor&, const Tensor&)>().call(theta,
                                                                                        log_sigma2);
      }
      ctx->save_for_backward({theta, log_sigma2});
      return kl;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const auto saved = ctx->get_saved_variables();
      if (at::GradMode::is_enabled()) return kl_composite_grads(ctx, saved[0], saved[1], grads[0]);
      auto [gt, gs] =
          op_handle<Ns, "sparse_vd_kl_backward",
                    std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>()
              .call(grads[0], saved[0], saved[1]);
      return {ctx->needs_input_grad(0) ? gt : Tensor(), ctx->needs_input_grad(1) ? gs : Tensor()};
    }
  };

  static Tensor sparse_vd_kl(const Tensor& theta, const Tensor& log_sigma2) {
    return SparseVDKL::apply(theta, log_sigma2);
  }

  // The KL and its gradient at grad 1 from one pass (what the public sparse_vd_kl calls when a
  // gradient will be needed): backward only scales the saved gradient.
  struct SparseVDKLWithGrad : torch::autograd::Function<SparseVDKLWithGrad> {
    static Grads forward(Ctx* ctx, const Tensor& theta, const Tensor& log_sigma2) {
      Tensor kl, gt, gs;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        std::tie(kl, gt, gs) =
            op_handle<Ns, "sparse_vd_kl_with_grad",
                      std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&)>()
                .call(theta, log_sigma2);
      }
      ctx->mark_non_differentiable({gt, gs});
      // No gradient ever flows into the two gradient outputs: no theta-sized zeros per backward.
      ctx->set_materialize_grads(false);
      // theta and log_sigma2 too, for a double backward only: saving an input copies nothing, and
      // its version counter catches in-place changes.
      ctx->save_for_backward({gt, gs, theta, log_sigma2});
      return {kl, gt, gs};
    }

    // The loss is the KL itself: grad 1, a plain CPU scalar with no graph (no tracing subclass,
    // no double backward, nothing to synchronise to read it).
    static bool is_plain_cpu_one(const Tensor& grad) {
      // Dense CPU below autograd: no Python subclass (fake tensors), no functionalization.
      const c10::DispatchKeySet keys = grad.key_set() -
                                       c10::autograd_dispatch_keyset_with_ADInplaceOrView -
                                       c10::autocast_dispatch_keyset;
      return keys.highestPriorityTypeId() == c10::DispatchKey::CPU && grad.numel() == 1 &&
             !grad.requires_grad() && grad.item<double>() == 1.0;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const Tensor& grad = grads[0];
      if (!grad.defined()) return {Tensor(), Tensor()};
      const auto saved = ctx->get_saved_variables();
      if (at::GradMode::is_enabled()) return kl_composite_grads(ctx, saved[2], saved[3], grad);
      const bool need_t = ctx->needs_input_grad(0), need_s = ctx->needs_input_grad(1);
      if (is_plain_cpu_one(grad)) {
        // The saved gradient as it is, with no pass over it. Saved tensors are version-checked:
        // modifying the returned gradient in place and backwarding again raises autograd's error.
        return {need_t ? saved[0] : Tensor(), need_s ? saved[1] : Tensor()};
      }
      return {need_t ? grad * saved[0] : Tensor(), need_s ? grad * saved[1] : Tensor()};
    }
  };

  static std::tuple<Tensor, Tensor, Tensor> sparse_vd_kl_with_grad(const Tensor& theta,
                                                                   const Tensor& log_sigma2) {
    const Grads out = SparseVDKLWithGrad::apply(theta, log_sigma2);
    return {out[0], out[1], out[2]};
  }

  // ---- sparse_linear -----------------------------------------------------------------------
  static Tensor sparse_linear_below(const Tensor& x, const Tensor& crow, const Tensor& col,
                                    const Tensor& values, const OptTensor& bias,
                                    const OptTensor& row_order) {
    return op_handle<Ns, "sparse_linear",
                     Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const OptTensor&, const OptTensor&)>()
        .call(x, crow, col, values, bias, row_order);
  }

  // sparse_linear_backward's own gradient: the forward product without bias (it is linear in
  // grad_out), so gradients of every order stay on the CSR kernels.
  struct SparseLinearBackward : torch::autograd::Function<SparseLinearBackward> {
    static Tensor forward(Ctx* ctx, const Tensor& grad_out, const Tensor& crow, const Tensor& col,
                          const Tensor& values, int64_t in_features) {
      Tensor grad_x;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        grad_x = op_handle<Ns, "sparse_linear_backward",
                           Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>()
                     .call(grad_out, crow, col, values, in_features);
      }
      ctx->save_for_backward({crow, col, values});
      return grad_x;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const auto saved = ctx->get_saved_variables();
      Grads out(5);
      if (ctx->needs_input_grad(0)) {
        out[0] = sparse_linear(grads[0], saved[0], saved[1], saved[2], std::nullopt, std::nullopt);
      }
      return out;
    }
  };

  static Tensor sparse_linear_backward(const Tensor& grad_out, const Tensor& crow, const Tensor& col,
                                       const Tensor& values, int64_t in_features) {
    return SparseLinearBackward::apply(grad_out, crow, col, values, in_features);
  }

  // Differentiable in x only (the values are the pruned model's constants).
  struct SparseLinear : torch::autograd::Function<SparseLinear> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& crow, const Tensor& col,
                          const Tensor& values, const OptTensor& bias, const OptTensor& row_order) {
      Tensor y;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        y = sparse_linear_below(x, crow, col, values, bias, row_order);
      }
      ctx->save_for_backward({crow, col, values});
      ctx->saved_data["in_features"] = x.size(-1);
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const auto saved = ctx->get_saved_variables();
      Grads out(6);
      if (ctx->needs_input_grad(0)) {
        // Through the dispatcher's autograd: under create_graph the result keeps a graph.
        out[0] = sparse_linear_backward(grads[0], saved[0], saved[1], saved[2],
                                        ctx->saved_data["in_features"].toInt());
      }
      return out;
    }
  };

  static Tensor sparse_linear(const Tensor& x, const Tensor& crow, const Tensor& col,
                              const Tensor& values, const OptTensor& bias,
                              const OptTensor& row_order) {
    return SparseLinear::apply(x, crow, col, values, bias, row_order);
  }

  // (W, V) of a CSR weight with values [nnz, 2] as dense [N, K] matrices, in ATen ops.
  static std::pair<Tensor, Tensor> csr_dense(const Tensor& crow, const Tensor& col,
                                             const Tensor& values, int64_t in_features) {
    const int64_t rows = crow.size(0) - 1;
    const Tensor row_of =
        at::repeat_interleave(at::arange(rows, crow.options()), crow.diff());
    Tensor dense = at::zeros({2, rows, in_features}, values.options());
    dense.index_put_({at::indexing::Slice(), row_of, col}, values.t());
    return {dense[0], dense[1]};
  }

  struct SparseLinearLrt : torch::autograd::Function<SparseLinearLrt> {
    static Grads forward(Ctx* ctx, const Tensor& x, const Tensor& crow, const Tensor& col,
                         const Tensor& values, const OptTensor& bias, const OptTensor& row_order,
                         const Tensor& rng_state, int64_t S) {
      Tensor y, std;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        std::tie(y, std) =
            op_handle<Ns, "sparse_linear_lrt",
                      std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                 const Tensor&, const OptTensor&, const OptTensor&,
                                                 const Tensor&, int64_t)>()
                .call(x, crow, col, values, bias, row_order, rng_state, S);
      }
      ctx->mark_non_differentiable({std});
      ctx->set_materialize_grads(false);  // std takes no gradient
      ctx->save_for_backward({x, crow, col, values, std, rng_state});
      return {y, std};
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      Grads out(8);
      const Tensor& grad = grads[0];
      if (!grad.defined() || !ctx->needs_input_grad(0)) return out;
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &crow = saved[1], &col = saved[2], &values = saved[3],
                   &std = saved[4], &state = saved[5];
      if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
        const auto [weight, variance] = csr_dense(crow, col, values, x.size(-1));
        const Tensor y = lrt_composite(x, weight, variance, state, grad.size(0), kStreamSparseLRT);
        out[0] = composite_grads(y, {x}, {true}, grad)[0];
        return out;
      }
      out[0] = op_handle<Ns, "sparse_linear_lrt_backward",
                         Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                const Tensor&, const Tensor&, const Tensor&)>()
                   .call(grad, x, crow, col, values, std, state);
      return out;
    }
  };

  static std::tuple<Tensor, Tensor> sparse_linear_lrt(const Tensor& x, const Tensor& crow,
                                                      const Tensor& col, const Tensor& values,
                                                      const OptTensor& bias,
                                                      const OptTensor& row_order,
                                                      const Tensor& rng_state, int64_t S) {
    const Grads out = SparseLinearLrt::apply(x, crow, col, values, bias, row_order, rng_state, S);
    return {out[0], out[1]};
  }

  static void register_impls(torch::Library& m) {
    m.impl("mc_dropout_linear", &mc_dropout_linear);
    m.impl("concrete_dropout", &concrete_dropout);
    m.impl("lrt_linear", &lrt_linear);
    m.impl("sparse_vd_kl", &sparse_vd_kl);
    m.impl("sparse_vd_kl_with_grad", &sparse_vd_kl_with_grad);
    m.impl("sparse_linear", &sparse_linear);
    m.impl("sparse_linear_backward", &sparse_linear_backward);
    m.impl("sparse_linear_lrt", &sparse_linear_lrt);
  }
};

}  // namespace ops
}  // namespace bdlkern
