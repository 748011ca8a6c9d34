// C++ autograd of mc_dropout_linear and mc_dropout_conv (see csrc/torch/autograd.h for the scheme,
// double backward included). Templated on the op namespace.
#pragma once

#include "common.h"

#include <array>

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
  using OptBool = std::optional<bool>;

  static Tensor below(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                      const Tensor& rng_state, double p, int64_t S, bool shared_mask,
                      OptBool memory_efficient) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "mc_dropout_linear",
                     Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, double,
                            int64_t, bool, OptBool)>()
        .call(x, weight, bias, rng_state, p, S, shared_mask, memory_efficient);
  }

  struct MCDropoutLinear : torch::autograd::Function<MCDropoutLinear> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                          const Tensor& rng_state, double p, int64_t S, bool shared_mask,
                          OptBool memory_efficient) {
      const Tensor y = below(x, weight, bias, rng_state, p, S, shared_mask, memory_efficient);
      ctx->save_for_backward({x, weight, rng_state});
      ctx->saved_data["p"] = p;
      ctx->saved_data["shared_mask"] = shared_mask;
      ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
      // The backward ops take the caller's choice too (None: their own cost-model pick).
      ctx->saved_data["memory_efficient"] =
          memory_efficient.has_value() ? c10::IValue(*memory_efficient) : c10::IValue();
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const Tensor& grad = grads[0];
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &weight = saved[1], &state = saved[2];
      const double p = ctx->saved_data["p"].toDouble();
      const bool shared_mask = ctx->saved_data["shared_mask"].toBool();
      const c10::IValue& me = ctx->saved_data["memory_efficient"];
      const OptBool memory_efficient = me.isNone() ? OptBool() : OptBool(me.toBool());
      Grads out(8);
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
                           Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool, bool,
                                  OptBool)>()
                     .call(grad, weight, state, p, shared_mask, x.dim() == 2, memory_efficient);
      }
      if (ctx->needs_input_grad(1)) {
        out[1] = op_handle<Ns, "mc_dropout_linear_grad_weight",
                           Tensor(const Tensor&, const Tensor&, const Tensor&, double, bool,
                                  OptBool)>()
                     .call(grad, x, state, p, shared_mask, memory_efficient);
      }
      return out;
    }
  };

  static Tensor mc_dropout_linear(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                  const Tensor& rng_state, double p, int64_t S, bool shared_mask,
                                  OptBool memory_efficient) {
    if (!C::needs_graph(x, weight, bias)) {
      return below(x, weight, bias, rng_state, p, S, shared_mask, memory_efficient);
    }
    return MCDropoutLinear::apply(x, weight, bias, rng_state, p, S, shared_mask, memory_efficient);
  }

  // ---- mc_dropout_conv ---------------------------------------------------------------------
  using Ints = c10::IntArrayRef;
  using ConvSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, double,
                         int64_t, bool, Ints, Ints, Ints, int64_t, bool, bool);
  using ConvBackwardSig = std::tuple<Tensor, Tensor, Tensor>(
      const Tensor&, const Tensor&, const Tensor&, const Tensor&, double, int64_t, bool, Ints,
      Ints, Ints, int64_t, bool, bool, std::array<bool, 3>);

  static Tensor conv_below(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                           const Tensor& rng_state, double p, int64_t S, bool shared_input,
                           Ints stride, Ints padding, Ints dilation, int64_t groups,
                           bool channel_mask, bool shared_mask) {
    at::AutoDispatchBelowADInplaceOrView below;
    return op_handle<Ns, "mc_dropout_conv", ConvSig>().call(
        x, weight, bias, rng_state, p, S, shared_input, stride, padding, dilation, groups,
        channel_mask, shared_mask);
  }

  // The op as ATen ops (the double-backward graph): the mask re-made by dropout_mask on the same
  // stream and logical index, the input repeated sample-major, ATen's convolution without bias.
  static Tensor conv_composite(const Tensor& x, const Tensor& weight, const Tensor& state,
                               double p, int64_t S, bool shared_input,
                               const std::vector<int64_t>& stride,
                               const std::vector<int64_t>& padding,
                               const std::vector<int64_t>& dilation, int64_t groups,
                               bool channel_mask, bool shared_mask) {
    const int64_t N = shared_input ? x.size(0) : x.size(0) / S, Cin = x.size(1);
    std::vector<int64_t> repeat(static_cast<size_t>(x.dim()), 1);
    repeat[0] = S;
    const Tensor xs = shared_input ? x.repeat(repeat) : x;
    // The mask as [groups, C, *sp or 1s], then [S, N or 1, C, ...] against xs viewed per sample.
    std::vector<int64_t> mask_shape{shared_mask ? S : S * N, Cin};
    for (int64_t d = 2; d < x.dim(); ++d) mask_shape.push_back(channel_mask ? 1 : x.size(d));
    const int64_t n = c10::multiply_integers(mask_shape);
    const Tensor mask = C::dropout_mask(state, C::sizes({n}), p, kStreamMCDropout)
                            .to(x.scalar_type())
                            .reshape(mask_shape);
    std::vector<int64_t> per_sample = xs.sizes().vec();
    per_sample[0] = N;
    per_sample.insert(per_sample.begin(), S);
    std::vector<int64_t> mask_view = mask_shape;
    mask_view[0] = shared_mask ? 1 : N;
    mask_view.insert(mask_view.begin(), S);
    const Tensor xm = (xs.reshape(per_sample) * mask.reshape(mask_view) * (1.0 / (1.0 - p)))
                          .reshape(xs.sizes());
    const std::vector<int64_t> out_pad(stride.size(), 0);
    return at::convolution(xm, weight, std::nullopt, stride, padding, dilation, false, out_pad,
                           groups);
  }

  struct MCDropoutConv : torch::autograd::Function<MCDropoutConv> {
    static Tensor forward(Ctx* ctx, const Tensor& x, const Tensor& weight, const OptTensor& bias,
                          const Tensor& rng_state, double p, int64_t S, bool shared_input,
                          Ints stride, Ints padding, Ints dilation, int64_t groups,
                          bool channel_mask, bool shared_mask) {
      const Tensor y = conv_below(x, weight, bias, rng_state, p, S, shared_input, stride, padding,
                                  dilation, groups, channel_mask, shared_mask);
      ctx->save_for_backward({x, weight, rng_state});
      ctx->saved_data["p"] = p;
      ctx->saved_data["S"] = S;
      ctx->saved_data["shared_input"] = shared_input;
      ctx->saved_data["stride"] = stride.vec();
      ctx->saved_data["padding"] = padding.vec();
      ctx->saved_data["dilation"] = dilation.vec();
      ctx->saved_data["groups"] = groups;
      ctx->saved_data["channel_mask"] = channel_mask;
      ctx->saved_data["shared_mask"] = shared_mask;
      ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
      return y;
    }

    static Grads backward(Ctx* ctx, Grads grads) {
      const Tensor& grad = grads[0];
      const auto saved = ctx->get_saved_variables();
      const Tensor &x = saved[0], &weight = saved[1], &state = saved[2];
      auto& d = ctx->saved_data;
      const double p = d["p"].toDouble();
      const int64_t S = d["S"].toInt(), groups = d["groups"].toInt();
      const bool shared_input = d["shared_input"].toBool();
      const bool channel_mask = d["channel_mask"].toBool(), shared_mask = d["shared_mask"].toBool();
      const std::vector<int64_t> stride = d["stride"].toIntVector();
      const std::vector<int64_t> padding = d["padding"].toIntVector();
      const std::vector<int64_t> dilation = d["dilation"].toIntVector();
      const bool need_bias = d["has_bias"].toBool() && ctx->needs_input_grad(2);
      Grads out(13);
      if (at::GradMode::is_enabled()) {  // create_graph: differentiable gradients
        if (need_bias) {
          std::vector<int64_t> dims{0};
          for (int64_t k = 2; k < grad.dim(); ++k) dims.push_back(k);
          out[2] = grad.sum(dims);
        }
        const Tensor y = conv_composite(x, weight, state, p, S, shared_input, stride, padding,
                                        dilation, groups, channel_mask, shared_mask);
        const Grads g = C::composite_grads(y, {x, weight}, C::needs(ctx, {0, 1}), grad);
        out[0] = g[0];
        out[1] = g[1];
        return out;
      }
      const std::array<bool, 3> mask{ctx->needs_input_grad(0), ctx->needs_input_grad(1),
                                     need_bias};
      auto [gx, gw, gb] = op_handle<Ns, "mc_dropout_conv_backward", ConvBackwardSig>().call(
          grad, x, weight, state, p, S, shared_input, stride, padding, dilation, groups,
          channel_mask, shared_mask, mask);
      if (mask[0]) out[0] = gx;
      if (mask[1]) out[1] = gw;
      if (mask[2]) out[2] = gb;
      return out;
    }
  };

  static Tensor mc_dropout_conv(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                const Tensor& rng_state, double p, int64_t S, bool shared_input,
                                Ints stride, Ints padding, Ints dilation, int64_t groups,
                                bool channel_mask, bool shared_mask) {
    if (!C::needs_graph(x, weight, bias)) {
      return conv_below(x, weight, bias, rng_state, p, S, shared_input, stride, padding, dilation,
                        groups, channel_mask, shared_mask);
    }
    return MCDropoutConv::apply(x, weight, bias, rng_state, p, S, shared_input, stride, padding,
                                dilation, groups, channel_mask, shared_mask);
  }

  static void register_impls(torch::Library& m) {
    m.impl("mc_dropout_linear", &mc_dropout_linear);
    m.impl("mc_dropout_conv", &mc_dropout_conv);
  }
};

}  // namespace ops
}  // namespace bdlkern
