// C++ autograd of the CSR layers: sparse_linear, its backward, and sparse_linear_lrt, and the same
// three for the sparse convolution (see csrc/torch/autograd.h for the scheme, double backward
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
                                    const OptTensor& row_order, bool validate) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "sparse_linear",
                     Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const OptTensor&, const OptTensor&, bool)>()
        .call(x, crow, col, values, bias, row_order, validate);
  }

  // sparse_linear_backward's own gradient: the forward product without bias (it is linear in
  // grad_out), so gradients of every order stay on the CSR kernels.
  struct SparseLinearBackward : torch::autograd::Function<SparseLinearBackward> {
    static Tensor forward(Ctx* ctx, const Tensor& grad_out, const Tensor& crow, const Tensor& col,
                          const Tensor& values, int64_t in_features, bool validate) {
      Tensor grad_x;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        grad_x = op_handle<Ns, "sparse_linear_backward",
                           Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t,
                                  bool)>()
                     .call(grad_out, crow, col, values, in_features, validate);
      }
      ctx->save_for_backward({crow, col, values});
      return grad_x;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const auto saved = ctx->get_saved_variables();
      Grads out(6);
      if (ctx->needs_input_grad(0)) {  // the structure was checked (or vouched for) on the way here
        out[0] = sparse_linear(grads[0], saved[0], saved[1], saved[2], std::nullopt, std::nullopt,
                               false);
      }
      return out;
    }
  };

  static Tensor sparse_linear_backward(const Tensor& grad_out, const Tensor& crow, const Tensor& col,
                                       const Tensor& values, int64_t in_features, bool validate) {
    return SparseLinearBackward::apply(grad_out, crow, col, values, in_features, validate);
  }

  // Differentiable in x only (the values are the pruned model's constants).
  struct SparseLinear : torch::autograd::Function<SparseLinear> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& crow, const Tensor& col,
                          const Tensor& values, const OptTensor& bias, const OptTensor& row_order,
                          bool validate) {
      const Tensor y = sparse_linear_below(x, crow, col, values, bias, row_order, validate);
      ctx->save_for_backward({crow, col, values});
      ctx->saved_data["in_features"] = x.size(-1);
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const auto saved = ctx->get_saved_variables();
      Grads out(7);
      if (ctx->needs_input_grad(0)) {
        // Through the dispatcher's autograd: under create_graph the result keeps a graph. The
        // forward checked the structure (or its caller vouched for it): no second host check.
        out[0] = sparse_linear_backward(grads[0], saved[0], saved[1], saved[2],
                                        ctx->saved_data["in_features"].toInt(), false);
      }
      return out;
    }
  };

  static Tensor sparse_linear(const Tensor& x, const Tensor& crow, const Tensor& col,
                              const Tensor& values, const OptTensor& bias,
                              const OptTensor& row_order, bool validate) {
    if (!C::needs_graph(x, values, bias)) {
      return sparse_linear_below(x, crow, col, values, bias, row_order, validate);
    }
    return SparseLinear::apply(x, crow, col, values, bias, row_order, validate);
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
                                              int64_t S, bool validate) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "sparse_linear_lrt",
                     std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const OptTensor&, const OptTensor&,
                                                const Tensor&, int64_t, bool)>()
        .call(x, crow, col, values, bias, row_order, rng_state, S, validate);
  }

  struct SparseLinearLrt : torch::autograd::Function<SparseLinearLrt> {
    static Grads forward(Ctx* ctx, const Tensor& x, const Tensor& crow, const Tensor& col,
                         const Tensor& values, const OptTensor& bias, const OptTensor& row_order,
                         const Tensor& rng_state, int64_t S, bool validate) {
      auto [y, std] = lrt_below(x, crow, col, values, bias, row_order, rng_state, S, validate);
      ctx->mark_non_differentiable({std});
      ctx->set_materialize_grads(false);  // std takes no gradient
      ctx->save_for_backward({x, crow, col, values, std, rng_state});
      return {y, std};
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      Grads out(9);
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
                                const Tensor&, const Tensor&, const Tensor&, bool)>()
                   .call(grad, x, crow, col, values, std, state, false);
      return out;
    }
  };

  static std::tuple<Tensor, Tensor> sparse_linear_lrt(const Tensor& x, const Tensor& crow,
                                                      const Tensor& col, const Tensor& values,
                                                      const OptTensor& bias,
                                                      const OptTensor& row_order,
                                                      const Tensor& rng_state, int64_t S,
                                                      bool validate) {
    if (!C::needs_graph(x, values, bias)) {
      return lrt_below(x, crow, col, values, bias, row_order, rng_state, S, validate);
    }
    const Grads out =
        SparseLinearLrt::apply(x, crow, col, values, bias, row_order, rng_state, S, validate);
    return {out[0], out[1]};
  }

  // ---- sparse_conv -------------------------------------------------------------------------
  using Ints = c10::IntArrayRef;
  using ConvSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                         const OptTensor&, Ints, Ints, Ints, Ints, int64_t, bool);
  using ConvBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, Ints,
                                 Ints, Ints, Ints, Ints, int64_t, bool);
  using ConvLrtSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                const Tensor&, const OptTensor&, const Tensor&,
                                                int64_t, bool, Ints, Ints, Ints, Ints, int64_t,
                                                bool);
  using ConvLrtBackwardSig = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                    const Tensor&, const Tensor&, const Tensor&, int64_t, bool,
                                    Ints, Ints, Ints, Ints, int64_t, bool);

  // The geometry of a conv op call, kept for its backward.
  static void save_geometry(Ctx* ctx, Ints kernel_size, Ints stride, Ints padding, Ints dilation,
                            int64_t groups) {
    auto& d = ctx->saved_data;
    d["kernel_size"] = kernel_size.vec();
    d["stride"] = stride.vec();
    d["padding"] = padding.vec();
    d["dilation"] = dilation.vec();
    d["groups"] = groups;
  }
  struct Geometry {
    std::vector<int64_t> kernel_size, stride, padding, dilation;
    int64_t groups;
  };
  static Geometry geometry(Ctx* ctx) {
    auto& d = ctx->saved_data;
    return Geometry{d["kernel_size"].toIntVector(), d["stride"].toIntVector(),
                    d["padding"].toIntVector(), d["dilation"].toIntVector(), d["groups"].toInt()};
  }

  static Tensor sparse_conv_below(const Tensor& x, const Tensor& crow, const Tensor& col,
                                  const Tensor& values, const OptTensor& bias, Ints kernel_size,
                                  Ints stride, Ints padding, Ints dilation, int64_t groups,
                                  bool validate) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "sparse_conv", ConvSig>().call(x, crow, col, values, bias, kernel_size,
                                                        stride, padding, dilation, groups,
                                                        validate);
  }

  // sparse_conv_backward's own gradient is the forward without bias (it is linear in grad_out).
  struct SparseConvBackward : torch::autograd::Function<SparseConvBackward> {
    static Tensor forward(Ctx* ctx, const Tensor& grad_out, const Tensor& crow, const Tensor& col,
                          const Tensor& values, Ints input_size, Ints kernel_size, Ints stride,
                          Ints padding, Ints dilation, int64_t groups, bool validate) {
      Tensor grad_x;
      {
        at::AutoDispatchBelowADInplaceOrView below;
        grad_x = op_handle<Ns, "sparse_conv_backward", ConvBackwardSig>().call(
            grad_out, crow, col, values, input_size, kernel_size, stride, padding, dilation,
            groups, validate);
      }
      ctx->save_for_backward({crow, col, values});
      save_geometry(ctx, kernel_size, stride, padding, dilation, groups);
      return grad_x;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const auto saved = ctx->get_saved_variables();
      const Geometry g = geometry(ctx);
      Grads out(11);
      if (ctx->needs_input_grad(0)) {
        out[0] = sparse_conv(grads[0], saved[0], saved[1], saved[2], std::nullopt, g.kernel_size,
                             g.stride, g.padding, g.dilation, g.groups, false);
      }
      return out;
    }
  };

  // Differentiable in x only (the values are the pruned model's constants).
  struct SparseConv : torch::autograd::Function<SparseConv> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& crow, const Tensor& col,
                          const Tensor& values, const OptTensor& bias, Ints kernel_size,
                          Ints stride, Ints padding, Ints dilation, int64_t groups, bool validate) {
      const Tensor y = sparse_conv_below(x, crow, col, values, bias, kernel_size, stride, padding,
                                         dilation, groups, validate);
      ctx->save_for_backward({crow, col, values});
      ctx->saved_data["input_size"] = x.sizes().vec();
      save_geometry(ctx, kernel_size, stride, padding, dilation, groups);
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const auto saved = ctx->get_saved_variables();
      const Geometry g = geometry(ctx);
      Grads out(11);
      if (ctx->needs_input_grad(0)) {
        out[0] = SparseConvBackward::apply(grads[0], saved[0], saved[1], saved[2],
                                           ctx->saved_data["input_size"].toIntVector(),
                                           g.kernel_size, g.stride, g.padding, g.dilation,
                                           g.groups, false);
      }
      return out;
    }
  };

  static Tensor sparse_conv_backward_entry(const Tensor& grad_out, const Tensor& crow,
                                           const Tensor& col, const Tensor& values,
                                           Ints input_size, Ints kernel_size, Ints stride,
                                           Ints padding, Ints dilation, int64_t groups,
                                           bool validate) {
    return SparseConvBackward::apply(grad_out, crow, col, values, input_size, kernel_size, stride,
                                     padding, dilation, groups, validate);
  }

  static Tensor sparse_conv(const Tensor& x, const Tensor& crow, const Tensor& col,
                            const Tensor& values, const OptTensor& bias, Ints kernel_size,
                            Ints stride, Ints padding, Ints dilation, int64_t groups,
                            bool validate) {
    if (!C::needs_graph(x, values, bias)) {
      return sparse_conv_below(x, crow, col, values, bias, kernel_size, stride, padding, dilation,
                               groups, validate);
    }
    return SparseConv::apply(x, crow, col, values, bias, kernel_size, stride, padding, dilation,
                             groups, validate);
  }

  static std::tuple<Tensor, Tensor> conv_lrt_below(const Tensor& x, const Tensor& crow,
                                                   const Tensor& col, const Tensor& values,
                                                   const OptTensor& bias, const Tensor& rng_state,
                                                   int64_t S, bool shared_input, Ints kernel_size,
                                                   Ints stride, Ints padding, Ints dilation,
                                                   int64_t groups, bool validate) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "sparse_conv_lrt", ConvLrtSig>().call(
        x, crow, col, values, bias, rng_state, S, shared_input, kernel_size, stride, padding,
        dilation, groups, validate);
  }

  struct SparseConvLrt : torch::autograd::Function<SparseConvLrt> {
    static Grads forward(Ctx* ctx, const Tensor& x, const Tensor& crow, const Tensor& col,
                         const Tensor& values, const OptTensor& bias, const Tensor& rng_state,
                         int64_t S, bool shared_input, Ints kernel_size, Ints stride, Ints padding,
                         Ints dilation, int64_t groups, bool validate) {
      auto [y, std] = conv_lrt_below(x, crow, col, values, bias, rng_state, S, shared_input,
                                     kernel_size, stride, padding, dilation, groups, validate);
      ctx->mark_non_differentiable({std});
      ctx->set_materialize_grads(false);  // std takes no gradient
      ctx->save_for_backward({x, crow, col, values, std, rng_state});
      ctx->saved_data["S"] = S;
      ctx->saved_data["shared_input"] = shared_input;
      save_geometry(ctx, kernel_size, stride, padding, dilation, groups);
      return {y, std};
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      Grads out(14);
      const Tensor& grad = grads[0];
      if (!grad.defined() || !ctx->needs_input_grad(0)) return out;
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &crow = saved[1], &col = saved[2], &values = saved[3],
                   &std = saved[4], &state = saved[5];
      const Geometry g = geometry(ctx);
      const int64_t S = ctx->saved_data["S"].toInt();
      const bool shared_input = ctx->saved_data["shared_input"].toBool();
      if (at::GradMode::is_enabled()) {  // create_graph: the composite on the dense weights
        int64_t taps = 1;
        for (const int64_t k : g.kernel_size) taps *= k;
        const int64_t cin_g = x.size(1) / g.groups;
        auto [weight, variance] = csr_dense(crow, col, values, cin_g * taps);
        std::vector<int64_t> wshape{weight.size(0), cin_g};
        wshape.insert(wshape.end(), g.kernel_size.begin(), g.kernel_size.end());
        const std::vector<int64_t> out_pad(g.stride.size(), 0);
        Tensor mean = at::convolution(x, weight.reshape(wshape), std::nullopt, g.stride,
                                      g.padding, g.dilation, false, out_pad, g.groups);
        Tensor var = at::convolution(x * x, variance.reshape(wshape), std::nullopt, g.stride,
                                     g.padding, g.dilation, false, out_pad, g.groups);
        if (shared_input) {
          std::vector<int64_t> repeat(static_cast<size_t>(mean.dim()), 1);
          repeat[0] = S;
          mean = mean.repeat(repeat);
          var = var.repeat(repeat);
        }
        const Tensor eps =
            C::normal(state, C::sizes(mean.sizes()), kStreamSparseLRT, x.scalar_type());
        const Tensor y = mean + at::sqrt(var + 1e-8) * eps;
        out[0] = C::composite_grads(y, {x}, {true}, grad)[0];
        return out;
      }
      out[0] = op_handle<Ns, "sparse_conv_lrt_backward", ConvLrtBackwardSig>().call(
          grad, x, crow, col, values, std, state, S, shared_input, g.kernel_size, g.stride,
          g.padding, g.dilation, g.groups, false);
      return out;
    }
  };

  static std::tuple<Tensor, Tensor> sparse_conv_lrt(const Tensor& x, const Tensor& crow,
                                                    const Tensor& col, const Tensor& values,
                                                    const OptTensor& bias, const Tensor& rng_state,
                                                    int64_t S, bool shared_input,
                                                    Ints kernel_size, Ints stride, Ints padding,
                                                    Ints dilation, int64_t groups, bool validate) {
    if (!C::needs_graph(x, values, bias)) {
      return conv_lrt_below(x, crow, col, values, bias, rng_state, S, shared_input, kernel_size,
                            stride, padding, dilation, groups, validate);
    }
    const Grads out = SparseConvLrt::apply(x, crow, col, values, bias, rng_state, S, shared_input,
                                           kernel_size, stride, padding, dilation, groups, validate);
    return {out[0], out[1]};
  }

  static void register_impls(torch::Library& m) {
    m.impl("sparse_conv", &sparse_conv);
    m.impl("sparse_conv_backward", &sparse_conv_backward_entry);
    m.impl("sparse_conv_lrt", &sparse_conv_lrt);
    m.impl("sparse_linear", &sparse_linear);
    m.impl("sparse_linear_backward", &sparse_linear_backward);
    m.impl("sparse_linear_lrt", &sparse_linear_lrt);
  }
};

}  // namespace ops
}  // namespace bdlkern
