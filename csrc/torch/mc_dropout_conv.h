// Bindings of the MC-dropout convolution ops: validate, make contiguous, run the mask pass of
// backend `Tag` (csrc/kernels/cpu/mc_dropout_conv.cpp, csrc/kernels/cuda/mc_dropout_conv.cu) and
// ATen's convolution (oneDNN on the CPU, cuDNN on CUDA) on the masked, folded [S N, C, *] input.
// Semantics and the mask layout: bdlkern/mc_dropout/conv.h.
//
// Nothing random is stored: backward re-makes the masked input from rng_state for the weight
// gradient, and applies the mask to the input gradient in the unmask pass (which also sums the
// samples of a shared input). With shared channel masks and groups == 1 each sample's convolution
// runs on its kept channels only (the kept weights are gathered and scaled by 1 / (1 - p)), so
// dropped channels cost no FLOPs; the kept channels are read from the Philox stream on the host,
// which on CUDA copies the 16-byte rng_state to the host once per call.
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <bdlkern/mc_dropout/conv.h>
#include <bdlkern/rng/random.h>

#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "autocast.h"
#include "backend_traits.h"
#include "checks.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct MCDropoutConvOps {
  using Traits = BackendTraits<Tag>;
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;

  struct Problem {
    MCDropoutConvParams prm;
    std::vector<int64_t> xm_sizes;  // [S N, C, *spatial]
    bool kept_channels;             // the shared-channel path (module comment)
  };

  static DType dtype_of(at::ScalarType t, const char* op) {
    switch (t) {
      case at::kFloat:
        return DType::kFloat32;
      case at::kDouble:
        return DType::kFloat64;
      case at::kBFloat16:
        return DType::kBFloat16;
      case at::kHalf:
        return DType::kFloat16;
      default:
        TORCH_CHECK(false, op, ": x must be float32, float64, bfloat16 or float16, got ", t);
    }
  }

  // Checks every argument and returns the kernel parameters (rng_state pointer left null).
  static Problem problem(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                         const Tensor& rng_state, double p, int64_t S, bool shared_input,
                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                         c10::IntArrayRef dilation, int64_t groups, bool channel_mask,
                         bool shared_mask, const char* op) {
    TORCH_CHECK(x.device().type() == Traits::device_type, op, ": x must be on ",
                c10::DeviceTypeName(Traits::device_type, true), ", got ", x.device());
    TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, op,
                ": x must be [batch, channels, *spatial] with 1 to 3 spatial dimensions, got shape ",
                x.sizes());
    const DType dtype = dtype_of(x.scalar_type(), op);
    TORCH_CHECK(weight.dim() == x.dim(), op, ": weight must be [out_channels, in_channels / groups, ",
                x.dim() - 2, " kernel sizes] for x of shape ", x.sizes(), ", got shape ",
                weight.sizes());
    check_like(weight, "weight", x, "x", op);
    TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
    const int64_t C = x.size(1), C_out = weight.size(0);
    TORCH_CHECK(C == weight.size(1) * groups, op, ": x has ", C,
                " channels but weight expects in_channels = ", weight.size(1), " * groups (",
                groups, ") = ", weight.size(1) * groups);
    TORCH_CHECK(C_out % groups == 0, op, ": out_channels (", C_out,
                ") must be divisible by groups (", groups, ")");
    if (bias.has_value()) {
      check_like(*bias, "bias", x, "x", op);
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == C_out, op,
                  ": bias must be [out_channels] = [", C_out, "], got shape ", bias->sizes());
    }
    const int64_t dims = x.dim() - 2;
    check_conv_list(stride, dims, "stride", 1, op);
    check_conv_list(padding, dims, "padding", 0, op);
    check_conv_list(dilation, dims, "dilation", 1, op);
    TORCH_CHECK(std::isfinite(p) && p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
    TORCH_CHECK(S >= 1, op, ": num_samples must be >= 1, got ", S);
    TORCH_CHECK(shared_input || x.size(0) % S == 0, op, ": x has ", x.size(0),
                " rows, not a multiple of num_samples = ", S,
                " (an input with samples is [S * N, C, *spatial], sample-major)");
    check_rng_state(rng_state, Traits::device_type, x, "x", op);

    Problem pr;
    MCDropoutConvParams& prm = pr.prm;
    prm.num_samples = S;
    prm.rows = shared_input ? x.size(0) : x.size(0) / S;
    prm.channels = C;
    prm.inner = 1;
    for (int64_t d = 2; d < x.dim(); ++d) prm.inner *= x.size(d);
    prm.shared_input = shared_input;
    prm.channel_mask = channel_mask;
    prm.shared_mask = shared_mask;
    prm.threshold = keep_threshold(p);
    prm.scale = 1.0 / (1.0 - p);
    prm.rng_state = nullptr;
    prm.dtype = dtype;
    prm.stream = Traits::stream(x);
    pr.xm_sizes = x.sizes().vec();
    pr.xm_sizes[0] = S * prm.rows;
    pr.kept_channels = channel_mask && shared_mask && groups == 1 && p > 0.0;
    return pr;
  }

  // The masked, folded input [S N, C, *] (uninitialised when !fill: its values are not read).
  static Tensor masked_input(const Problem& pr, const Tensor& xc, const Tensor& state, bool fill) {
    Tensor xm = at::empty(pr.xm_sizes, xc.options().memory_format(at::MemoryFormat::Contiguous));
    if (fill && xm.numel() > 0) {
      MCDropoutConvParams prm = pr.prm;
      prm.rng_state = state.const_data_ptr<int64_t>();
      mc_dropout_conv_mask(Tag{}, prm, xc.const_data_ptr(), xm.data_ptr());
    }
    return xm;
  }

  // The layout the convolution runs in: on the CPU, oneDNN convolves 2-d channels-last (NHWC)
  // inputs faster than NCHW ones (measured 1.3-2x on a 2-core AVX-512 Xeon at the benchmark's
  // shapes, more than the transpositions cost), so the folded input is handed over channels-last;
  // the output is returned contiguous (NCHW), like every other conv op's. CUDA and the SIMT build
  // convolve NCHW.
  static Tensor conv_layout(const Tensor& t) {
    if constexpr (std::is_same_v<Tag, CpuTag>) {
      if (t.dim() == 4) return t.contiguous(at::MemoryFormat::ChannelsLast);
    }
    return t;
  }

  // Shared channel masks: the kept channels of each sample, read on the host.
  static std::vector<Tensor> kept_channels(const Problem& pr, const Tensor& rng_state) {
    const Tensor host_state = rng_state.to(at::kCPU).contiguous();  // a no-op for CPU tensors
    MCDropoutConvParams prm = pr.prm;
    prm.rng_state = host_state.const_data_ptr<int64_t>();
    std::vector<Tensor> out;
    std::vector<int64_t> buf(static_cast<size_t>(prm.channels));
    for (int64_t s = 0; s < prm.num_samples; ++s) {
      const int64_t k = mc_dropout_conv_kept_channels(prm, s, buf.data());
      Tensor idx = at::empty({k}, at::kLong);
      std::copy(buf.begin(), buf.begin() + k, idx.data_ptr<int64_t>());
      out.push_back(idx.to(rng_state.device()));
    }
    return out;
  }

  // The input of sample s (the shared input, or its rows of a folded one).
  static Tensor sample_input(const Problem& pr, const Tensor& xc, int64_t s) {
    return pr.prm.shared_input ? xc : xc.narrow(0, s * pr.prm.rows, pr.prm.rows);
  }

  // [B, out_channels, *output spatial] of a convolution of x (as at::convolution computes it).
  static std::vector<int64_t> output_sizes(const Tensor& x, const Tensor& weight,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                           c10::IntArrayRef dilation) {
    std::vector<int64_t> sizes{x.size(0), weight.size(0)};
    for (int64_t d = 2; d < x.dim(); ++d) {
      const int64_t i = d - 2;
      sizes.push_back((x.size(d) + 2 * padding[i] - dilation[i] * (weight.size(d) - 1) - 1) /
                          stride[i] + 1);
    }
    return sizes;
  }

  // [1, C_out, 1, ...]: a bias broadcast over a batch of rank `dims`.
  static std::vector<int64_t> bias_view(int64_t dims) {
    std::vector<int64_t> v(static_cast<size_t>(dims), 1);
    v[1] = -1;
    return v;
  }

  static std::vector<int64_t> zeros_like_list(c10::IntArrayRef v) {
    return std::vector<int64_t>(v.size(), 0);
  }

  static Tensor forward(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                        const Tensor& rng_state, double p, int64_t num_samples, bool shared_input,
                        c10::IntArrayRef stride, c10::IntArrayRef padding,
                        c10::IntArrayRef dilation, int64_t groups, bool channel_mask,
                        bool shared_mask) {
    const char* op = "mc_dropout_conv";
    const NoAutocast no_ac = no_autocast();
    const Problem pr = problem(x, weight, bias, rng_state, p, num_samples, shared_input, stride,
                               padding, dilation, groups, channel_mask, shared_mask, op);
    at::OptionalDeviceGuard guard(x.device());
    const Tensor xc = x.contiguous();
    const auto out_pad = zeros_like_list(stride);
    if (!pr.kept_channels || pr.prm.rows == 0) {
      const Tensor xm = conv_layout(masked_input(pr, xc, rng_state.contiguous(), true));
      return at::convolution(xm, weight, bias, stride, padding, dilation, false, out_pad, groups)
          .contiguous();
    }
    const std::vector<Tensor> kept = kept_channels(pr, rng_state);
    std::vector<int64_t> sizes = output_sizes(x, weight, stride, padding, dilation);
    sizes[0] = pr.xm_sizes[0];
    Tensor y = at::empty(sizes, x.options());
    const int64_t N = pr.prm.rows;
    for (int64_t s = 0; s < pr.prm.num_samples; ++s) {
      Tensor part = y.narrow(0, s * N, N);
      if (kept[s].numel() == 0) {  // every channel dropped: the bias alone
        if (bias.has_value()) {
          part.copy_(bias->reshape(bias_view(x.dim())).expand_as(part));
        } else {
          part.zero_();
        }
        continue;
      }
      const Tensor xs = conv_layout(sample_input(pr, xc, s).index_select(1, kept[s]));
      const Tensor ws = weight.index_select(1, kept[s]) * pr.prm.scale;
      part.copy_(at::convolution(xs, ws, bias, stride, padding, dilation, false, out_pad, 1));
    }
    return y;
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(
      const Tensor& grad_out, const Tensor& x, const Tensor& weight, const Tensor& rng_state,
      double p, int64_t num_samples, bool shared_input, c10::IntArrayRef stride,
      c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, bool channel_mask,
      bool shared_mask, std::array<bool, 3> output_mask) {
    const char* op = "mc_dropout_conv_backward";
    const NoAutocast no_ac = no_autocast();
    const Problem pr = problem(x, weight, std::nullopt, rng_state, p, num_samples, shared_input,
                               stride, padding, dilation, groups, channel_mask, shared_mask, op);
    check_like(grad_out, "grad_out", x, "x", op);
    TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.size(0) == pr.xm_sizes[0] &&
                    grad_out.size(1) == weight.size(0),
                op, ": grad_out must be [S * N = ", pr.xm_sizes[0], ", out_channels = ",
                weight.size(0), ", *spatial], got shape ", grad_out.sizes());
    at::OptionalDeviceGuard guard(x.device());
    const Tensor xc = x.contiguous();
    const Tensor g = grad_out.contiguous();
    const auto out_pad = zeros_like_list(stride);
    const int64_t C_out = weight.size(0);
    const std::vector<int64_t> bias_sizes{C_out};
    Tensor grad_x, grad_w, grad_b;
    if (!pr.kept_channels || pr.prm.rows == 0) {
      const Tensor state = rng_state.contiguous();
      const Tensor xm = conv_layout(masked_input(pr, xc, state, output_mask[1]));
      auto [gxm, gw, gb] = at::convolution_backward(
          g, xm, weight, output_mask[2] ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt,
          stride, padding, dilation, false, out_pad, groups,
          {output_mask[0], output_mask[1], output_mask[2]});
      if (output_mask[0]) {
        grad_x = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
        if (grad_x.numel() > 0) {
          MCDropoutConvParams prm = pr.prm;
          prm.rng_state = state.const_data_ptr<int64_t>();
          const Tensor gxm_c = gxm.contiguous();
          mc_dropout_conv_unmask(Tag{}, prm, gxm_c.const_data_ptr(), grad_x.data_ptr());
        } else {
          grad_x.zero_();
        }
      }
      return {defined_or_empty(grad_x, x), defined_or_empty(gw.defined() ? gw.contiguous() : gw, x),
              defined_or_empty(gb, x)};
    }
    // Shared channel masks: per sample, the gradients of the convolution on its kept channels,
    // accumulated in ascending sample order.
    const int64_t N = pr.prm.rows;
    const std::vector<Tensor> kept = kept_channels(pr, rng_state);
    if (output_mask[0]) grad_x = at::zeros(x.sizes(), x.options());
    if (output_mask[1]) grad_w = at::zeros(weight.sizes(), weight.options());
    if (output_mask[2]) grad_b = at::zeros({C_out}, weight.options());
    for (int64_t s = 0; s < pr.prm.num_samples; ++s) {
      const Tensor gs = g.narrow(0, s * N, N);
      if (kept[s].numel() == 0) {  // every channel dropped: only the bias saw this sample
        if (output_mask[2]) grad_b.add_(gs.transpose(0, 1).reshape({C_out, -1}).sum(1));
        continue;
      }
      const Tensor xs = conv_layout(sample_input(pr, xc, s).index_select(1, kept[s]));
      const Tensor ws = weight.index_select(1, kept[s]) * pr.prm.scale;
      auto [gxs, gws, gbs] = at::convolution_backward(
          gs, xs, ws, output_mask[2] ? std::optional<at::IntArrayRef>(bias_sizes) : std::nullopt,
          stride, padding, dilation, false, out_pad, 1,
          {output_mask[0], output_mask[1], output_mask[2]});
      if (output_mask[0]) {
        Tensor dst = shared_input ? grad_x : grad_x.narrow(0, s * N, N);
        dst.index_add_(1, kept[s], gxs);
      }
      if (output_mask[1]) grad_w.index_add_(1, kept[s], gws, pr.prm.scale);
      if (output_mask[2]) grad_b.add_(gbs);
    }
    return {defined_or_empty(grad_x, x), defined_or_empty(grad_w, x), defined_or_empty(grad_b, x)};
  }

  // The schema returns three tensors: a gradient output_mask did not ask for is an empty one.
  static Tensor defined_or_empty(const Tensor& t, const Tensor& like) {
    return t.defined() ? t : at::empty({0}, like.options());
  }

  static void register_impls(torch::Library& m) {
    m.impl("mc_dropout_conv", &forward);
    m.impl("mc_dropout_conv_backward", &backward);
  }
};

}  // namespace ops
}  // namespace bdlkern
