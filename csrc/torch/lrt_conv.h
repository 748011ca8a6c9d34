// Bindings of the LRT convolution ops: the local reparameterisation trick of lrt_linear for a
// convolution, `y = conv(x, theta) + b + sqrt(conv(x^2, alpha theta^2) + 1e-8) * eps`, with the
// samples folded into the batch sample-major (row s N + n; bdlkern/mc_dropout/conv.h has the
// layout). The two convolutions are ATen's; around them run the fused passes of lrt_linear
// (bdlkern/sparse_vd/kernels.h) with the convolution's output viewed as rows of C_out L' values:
// weight_variance makes alpha theta^2 in one pass, lrt_noise_forward draws eps from the `lrt`
// stream at the flattened index of y and writes y and std in one pass, and in backward
// lrt_noise_backward turns grad_y into grad_mean and grad_var (summing the samples of a shared
// input) before ATen's convolution backward and weight_variance_backward. With a shared input
// the mean and the variance are convolved once for the N images, not S N.
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <bdlkern/rng/random.h>
#include <bdlkern/sparse_vd/kernels.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "autocast.h"
#include "backend_traits.h"
#include "checks.h"
#include "sparse_vd.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct LrtConvOps {
  using VD = SparseVDOps<Tag>;
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using Ints = c10::IntArrayRef;

  struct Layer {
    Tensor x, theta, log_sigma2;  // contiguous
    LrtParams prm;                // rows: images per sample; out_features: C_out L'
  };

  static Layer layer(const Tensor& x, const Tensor& theta, const Tensor& log_sigma2,
                     const Tensor& rng_state, int64_t S, bool shared_input, Ints stride,
                     Ints padding, Ints dilation, int64_t groups, const char* op,
                     const char* weight = "theta") {
    const DType dt = VD::check_weights(theta, log_sigma2, op, weight);
    TORCH_CHECK(theta.dim() >= 3 && theta.dim() <= 5, op, ": ", weight,
                " must be [out_channels, in_channels / groups, *kernel] with 1 to 3 kernel "
                "dimensions, got shape ",
                theta.sizes());
    check_like(x, "x", theta, weight, op);
    TORCH_CHECK(x.dim() == theta.dim(), op, ": x must be [batch, channels, *spatial] with ",
                theta.dim() - 2, " spatial dimension(s) for ", weight, " of shape ", theta.sizes(),
                ", got shape ", x.sizes());
    TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
    TORCH_CHECK(x.size(1) == theta.size(1) * groups, op, ": x has ", x.size(1), " channels but ",
                weight, " expects in_channels = ", theta.size(1), " * groups (", groups, ") = ",
                theta.size(1) * groups);
    TORCH_CHECK(theta.size(0) % groups == 0, op, ": out_channels (", theta.size(0),
                ") must be divisible by groups (", groups, ")");
    const int64_t dims = x.dim() - 2;
    check_conv_list(stride, dims, "stride", 1, op);
    check_conv_list(padding, dims, "padding", 0, op);
    check_conv_list(dilation, dims, "dilation", 1, op);
    TORCH_CHECK(S >= 1, op, ": num_samples must be >= 1, got ", S);
    TORCH_CHECK(shared_input || x.size(0) % S == 0, op, ": x has ", x.size(0),
                " rows, not a multiple of num_samples = ", S,
                " (an input with samples is [S * N, C, *spatial], sample-major)");
    check_rng_state(rng_state, VD::Traits::device_type, x, "x", op);
    Layer l{x.contiguous(), theta.contiguous(), log_sigma2.contiguous(), LrtParams{}};
    l.prm.num_samples = S;
    l.prm.rows = shared_input ? x.size(0) : x.size(0) / S;
    l.prm.out_features = 0;  // set from the convolution's output
    l.prm.shared_input = shared_input;
    l.prm.tag = kStreamLRT;
    l.prm.rng_state = nullptr;
    l.prm.dtype = dt;
    l.prm.stream = VD::Traits::stream(x);
    return l;
  }

  static Tensor variance_weights(const Layer& l) {
    Tensor A = at::empty_like(l.theta, at::MemoryFormat::Contiguous);
    weight_variance(Tag{}, l.theta.numel(), l.theta.const_data_ptr(), l.log_sigma2.const_data_ptr(),
                    A.data_ptr(), l.prm.dtype, l.prm.stream);
    return A;
  }

  static std::vector<int64_t> zeros(Ints v) { return std::vector<int64_t>(v.size(), 0); }


  // bias [C_out] (or none), contiguous, like the weight w.
  static OptTensor checked_bias(const OptTensor& bias, const Tensor& w, const char* w_name,
                                const char* op) {
    if (!bias.has_value()) return std::nullopt;
    check_like(*bias, "bias", w, w_name, op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op,
                ": bias must be [out_channels] = [", w.size(0), "], got shape ", bias->sizes());
    return bias->contiguous();
  }

  // y [S N, C_out, *sp'] and std like var from the convolved mean and variance (contiguous,
  // [N or S N, C_out, *sp']), the bias b [C_out] added per channel: lrt_noise_forward on rows of
  // C_out L' values.
  static std::tuple<Tensor, Tensor> noise_forward(Layer& l, const Tensor& mean, const Tensor& var,
                                                  const OptTensor& b, const Tensor& rng_state,
                                                  const char* op) {
    check_buffer(mean, l.x.scalar_type(), "mean", op);
    check_buffer(var, l.x.scalar_type(), "var", op);
    const int64_t C_out = var.size(1), inner = var.numel() / std::max<int64_t>(1, var.size(0) * C_out);
    l.prm.out_features = C_out * inner;
    std::vector<int64_t> y_sizes = var.sizes().vec();
    y_sizes[0] = l.prm.num_samples * l.prm.rows;
    Tensor y = at::empty(y_sizes, l.x.options().memory_format(at::MemoryFormat::Contiguous));
    Tensor std = at::empty_like(var, at::MemoryFormat::Contiguous);
    if (y.numel() == 0) return {y, std};
    const Tensor state = rng_state.contiguous();
    l.prm.rng_state = state.const_data_ptr<int64_t>();
    Tensor bias_rows;  // [C_out L']: the bias of every element of a row
    if (b.has_value()) bias_rows = b->unsqueeze(1).expand({C_out, inner}).contiguous();
    lrt_noise_forward(Tag{}, l.prm, mean.const_data_ptr(), var.const_data_ptr(),
                      b.has_value() ? bias_rows.const_data_ptr() : nullptr, y.data_ptr(),
                      std.data_ptr());
    return {y, std};
  }

  // (y [S N, C_out, *sp'], std [N or S N, C_out, *sp'])
  static std::tuple<Tensor, Tensor> forward(const Tensor& x, const Tensor& theta,
                                            const Tensor& log_sigma2, const OptTensor& bias,
                                            const Tensor& rng_state, int64_t num_samples,
                                            bool shared_input, Ints stride, Ints padding,
                                            Ints dilation, int64_t groups) {
    const char* op = "lrt_conv";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    Layer l = layer(x, theta, log_sigma2, rng_state, num_samples, shared_input, stride, padding,
                    dilation, groups, op);
    const OptTensor b = checked_bias(bias, theta, "theta", op);
    const Tensor A = variance_weights(l);
    const auto out_pad = zeros(stride);
    const Tensor mean = at::convolution(l.x, l.theta, std::nullopt, stride, padding, dilation,
                                        false, out_pad, groups)
                            .contiguous();
    const Tensor var = at::convolution(l.x.square(), A, std::nullopt, stride, padding, dilation,
                                       false, out_pad, groups)
                           .contiguous();
    return noise_forward(l, mean, var, b, rng_state, op);
  }

  // The variance convolution (Neklyudov et al. 2018): zero-mean weights with variance
  // V = exp(log_sigma2), y = bias + sqrt(conv(x^2, V) + 1e-8) eps; one convolution, no mean.
  static std::tuple<Tensor, Tensor> variance_forward(const Tensor& x, const Tensor& log_sigma2,
                                                     const OptTensor& bias,
                                                     const Tensor& rng_state, int64_t num_samples,
                                                     bool shared_input, Ints stride, Ints padding,
                                                     Ints dilation, int64_t groups) {
    const char* op = "variance_conv";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    Layer l = layer(x, log_sigma2, log_sigma2, rng_state, num_samples, shared_input, stride,
                    padding, dilation, groups, op, "log_sigma2");
    const OptTensor b = checked_bias(bias, log_sigma2, "log_sigma2", op);
    const Tensor var = at::convolution(l.x.square(), l.log_sigma2.exp(), std::nullopt, stride,
                                       padding, dilation, false, zeros(stride), groups)
                           .contiguous();
    return noise_forward(l, at::zeros_like(var), var, b, rng_state, op);
  }

  // (grad_mean, grad_var) like std from grad_y [S N, C_out, *sp'] by lrt_noise_backward (the
  // samples of a shared input summed), after checking grad_y and std (saved by `fwd`).
  static std::tuple<Tensor, Tensor> noise_backward(const Tensor& grad_y, const Tensor& std,
                                                   const Tensor& rng_state, Layer& l,
                                                   const Tensor& w, const char* w_name,
                                                   const char* op, const char* fwd) {
    check_like(grad_y, "grad_out", w, w_name, op);
    check_like(std, "std", w, w_name, op);
    const int64_t S = l.prm.num_samples, N = l.prm.rows, C_out = w.size(0);
    const int64_t src_rows = l.prm.shared_input ? N : S * N;
    TORCH_CHECK(grad_y.dim() == l.x.dim() && grad_y.size(0) == S * N && grad_y.size(1) == C_out,
                op, ": grad_out must be [S * N = ", S * N, ", out_channels = ", C_out,
                ", *spatial], got shape ", grad_y.sizes());
    TORCH_CHECK(std.dim() == l.x.dim() && std.size(0) == src_rows &&
                    std.sizes().slice(1) == grad_y.sizes().slice(1),
                op, ": std must be [", src_rows, ", ", grad_y.sizes().slice(1), "] (saved by ", fwd,
                "), got ", std.sizes());
    const int64_t inner = grad_y.numel() / std::max<int64_t>(1, grad_y.size(0) * C_out);
    l.prm.out_features = C_out * inner;
    const Tensor state = rng_state.contiguous();
    l.prm.rng_state = state.const_data_ptr<int64_t>();
    const Tensor g = grad_y.contiguous();
    const Tensor sd = std.contiguous();
    Tensor grad_mean = at::empty(sd.sizes(), w.options());
    Tensor grad_var = at::empty(sd.sizes(), w.options());
    if (sd.numel() > 0) {
      lrt_noise_backward(Tag{}, l.prm, g.const_data_ptr(), sd.const_data_ptr(),
                         grad_mean.data_ptr(), grad_var.data_ptr());
    } else {
      grad_mean.zero_();
      grad_var.zero_();
    }
    return {grad_mean, grad_var};
  }

  static Tensor channel_sum(const Tensor& t) {  // [*, C, *sp] -> [C]
    std::vector<int64_t> reduce{0};
    for (int64_t d = 2; d < t.dim(); ++d) reduce.push_back(d);
    return t.sum(reduce);
  }

  // (grad_x like x, grad_theta, grad_log_sigma2, grad_bias [C_out])
  static std::tuple<Tensor, Tensor, Tensor, Tensor> backward(
      const Tensor& grad_y, const Tensor& x, const Tensor& theta, const Tensor& log_sigma2,
      const Tensor& std, const Tensor& rng_state, int64_t num_samples, bool shared_input,
      Ints stride, Ints padding, Ints dilation, int64_t groups) {
    const char* op = "lrt_conv_backward";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    Layer l = layer(x, theta, log_sigma2, rng_state, num_samples, shared_input, stride, padding,
                    dilation, groups, op);
    auto [grad_mean, grad_var] = noise_backward(grad_y, std, rng_state, l, theta, "theta", op, "lrt_conv");
    const Tensor A = variance_weights(l);
    const Tensor x2 = l.x.square();
    const auto out_pad = zeros(stride);
    auto [gx_mean, g_theta, unused_b] = at::convolution_backward(
        grad_mean, l.x, l.theta, std::nullopt, stride, padding, dilation, false, out_pad, groups,
        {true, true, false});
    auto [gx_var, g_A, unused_b2] = at::convolution_backward(
        grad_var, x2, A, std::nullopt, stride, padding, dilation, false, out_pad, groups,
        {true, true, false});
    // d var / d x = 2 x (the input-gradient of the variance convolution)
    Tensor grad_x = gx_mean.contiguous().addcmul_(l.x, gx_var, 2);
    Tensor grad_theta = g_theta.contiguous();
    Tensor grad_ls2 = g_A.contiguous();
    check_buffer(grad_theta, l.theta.scalar_type(), "grad_theta", op);
    check_buffer(grad_ls2, l.theta.scalar_type(), "grad_log_sigma2", op);
    weight_variance_backward(Tag{}, l.theta.numel(), l.theta.const_data_ptr(),
                             l.log_sigma2.const_data_ptr(), grad_theta.const_data_ptr(),
                             grad_ls2.const_data_ptr(), grad_theta.data_ptr(), grad_ls2.data_ptr(),
                             l.prm.dtype, l.prm.stream);
    return {grad_x, grad_theta, grad_ls2, channel_sum(grad_mean)};
  }

  // (grad_x like x, grad_log_sigma2, grad_bias [C_out])
  static std::tuple<Tensor, Tensor, Tensor> variance_backward(
      const Tensor& grad_y, const Tensor& x, const Tensor& log_sigma2, const Tensor& std,
      const Tensor& rng_state, int64_t num_samples, bool shared_input, Ints stride, Ints padding,
      Ints dilation, int64_t groups) {
    const char* op = "variance_conv_backward";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    Layer l = layer(x, log_sigma2, log_sigma2, rng_state, num_samples, shared_input, stride,
                    padding, dilation, groups, op, "log_sigma2");
    auto [grad_mean, grad_var] =
        noise_backward(grad_y, std, rng_state, l, log_sigma2, "log_sigma2", op, "variance_conv");
    const Tensor V = l.log_sigma2.exp();
    auto [gx_var, g_V, unused_b] = at::convolution_backward(
        grad_var, l.x.square(), V, std::nullopt, stride, padding, dilation, false, zeros(stride),
        groups, {true, true, false});
    // d var / d x = 2 x; d V / d log_sigma2 = V
    Tensor grad_x = gx_var.contiguous().mul_(l.x).mul_(2);
    Tensor grad_ls2 = g_V.contiguous().mul_(V);
    return {grad_x, grad_ls2, channel_sum(grad_mean)};
  }

  static void register_impls(torch::Library& m) {
    m.impl("lrt_conv", &forward);
    m.impl("lrt_conv_backward", &backward);
    m.impl("variance_conv", &variance_forward);
    m.impl("variance_conv_backward", &variance_backward);
  }
};

}  // namespace ops
}  // namespace bdlkern
