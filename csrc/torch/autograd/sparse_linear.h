// C++ autograd of the CSR layer: sparse_linear, its backward, and sparse_linear_lrt (see csrc/torch/autograd.h for the scheme, double backward
// included). Templated on the op namespace.
#pragma once

#include "common.h"

namespace bdlkern {
namespace ops {

template <Name Ns>
struct SparseLinearAutograd {
  using C = AutogradCommon<Ns>;
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using Ctx = torch::autograd::AutogradContext;
  using Grads = torch::autograd::variable_list;

  // ---- sparse_linear -----------------------------------------------------------------------
  static Tensor sparse_linear_below(const Tensor& x, const Tensor& crow, const Tensor& col,
                                    const Tensor& values, const OptTensor& bias,
                                    const OptTensor& row_order) {
    at::AutoDispatchBelowADInplaceOrView below;
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
      const Tensor y = sparse_linear_below(x, crow, col, values, bias, row_order);
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
    if (!C::needs_graph(x, values, bias)) return sparse_linear_below(x, crow, col, values, bias, row_order);
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

  static std::tuple<Tensor, Tensor> lrt_below(const Tensor& x, const Tensor& crow, const Tensor& col,
                                              const Tensor& values, const OptTensor& bias,
                                              const OptTensor& row_order, const Tensor& rng_state,
                                              int64_t S) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "sparse_linear_lrt",
                     std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const OptTensor&, const OptTensor&,
                                                const Tensor&, int64_t)>()
        .call(x, crow, col, values, bias, row_order, rng_state, S);
  }

  struct SparseLinearLrt : torch::autograd::Function<SparseLinearLrt> {
    static Grads forward(Ctx* ctx, const Tensor& x, const Tensor& crow, const Tensor& col,
                         const Tensor& values, const OptTensor& bias, const OptTensor& row_order,
                         const Tensor& rng_state, int64_t S) {
      auto [y, std] = lrt_below(x, crow, col, values, bias, row_order, rng_state, S);
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
        const Tensor y = C::lrt_composite(x, weight, variance, state, grad.size(0), kStreamSparseLRT);
        out[0] = C::composite_grads(y, {x}, {true}, grad)[0];
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
    if (!C::needs_graph(x, values, bias)) return lrt_below(x, crow, col, values, bias, row_order, rng_state, S);
    const Grads out = SparseLinearLrt::apply(x, crow, col, values, bias, row_order, rng_state, S);
    return {out[0], out[1]};
  }

  static void register_impls(torch::Library& m) {
    m.impl("sparse_linear", &sparse_linear);
    m.impl("sparse_linear_backward", &sparse_linear_backward);
    m.impl("sparse_linear_lrt", &sparse_linear_lrt);
  }
};

}  // namespace ops
}  // namespace bdlkern
