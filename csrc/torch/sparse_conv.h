// Bindings of the sparse (CSR) convolution ops: validate the CSR structure and the geometry, then
// call the kernels of backend `Tag` (csrc/kernels/cpu/sparse_conv.cpp, csrc/kernels/cuda/sparse_conv.cu;
// semantics: bdlkern/sparse_conv/kernels.h). The stochastic op draws LRT samples on the kept
// weights: the mean and the variance convolutions are the sparse kernel on theta and on
// alpha theta^2 (of x^2, never materialised), and the LRT noise passes of the sparse VD kernels
// (bdlkern/sparse_vd/kernels.h, stream `sparse_lrt`) add the noise, with the samples folded into
// the batch sample-major as in lrt_conv.
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <bdlkern/rng/random.h>
#include <bdlkern/sparse_conv/kernels.h>
#include <bdlkern/sparse_vd/kernels.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "autocast.h"
#include "backend_traits.h"
#include "checks.h"
#include "sparse_linear.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct SparseConvOps {
  using Traits = BackendTraits<Tag>;
  using Csr_ = SparseLinearOps<Tag>;
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;
  using Ints = c10::IntArrayRef;

  struct Problem {
    SparseConvParams prm;
    Csr csr;
    std::vector<int64_t> out_sizes;  // [batch, C_out, *spatial_out] of x's rows
  };

  // `like` is the dense operand (x, or grad_out for the backward of the deterministic op) whose
  // dtype and device the structure must have; in_sizes the input's spatial sizes.
  static Problem problem(const Tensor& like, const char* like_name, int64_t batch,
                         int64_t in_channels, Ints in_sizes, const Tensor& crow,
                         const Tensor& col, const Tensor& values, Ints kernel_size, Ints stride,
                         Ints padding, Ints dilation, int64_t groups, bool need_variance,
                         bool validate, const char* op) {
    TORCH_CHECK(like.device().type() == Traits::device_type, op, ": ", like_name, " must be on ",
                c10::DeviceTypeName(Traits::device_type, true), ", got ", like.device());
    TORCH_CHECK(like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble, op, ": ",
                like_name, " must be float32 or float64, got ", like.scalar_type());
    const int64_t dims = static_cast<int64_t>(in_sizes.size());
    TORCH_CHECK(dims >= 1 && dims <= 3, op, ": ", like_name,
                " must have 1 to 3 spatial dimensions, got ", dims);
    check_conv_list(kernel_size, dims, "kernel_size", 1, op);
    check_conv_list(stride, dims, "stride", 1, op);
    check_conv_list(padding, dims, "padding", 0, op);
    check_conv_list(dilation, dims, "dilation", 1, op);
    TORCH_CHECK(groups >= 1 && in_channels % groups == 0, op, ": groups (", groups,
                ") must be >= 1 and divide the input channels (", in_channels, ")");
    const int64_t out_channels = crow.numel() - 1;
    TORCH_CHECK(out_channels >= 0 && out_channels % groups == 0, op, ": the CSR rows (",
                out_channels, " output channels, crow.numel() - 1) must be divisible by groups (",
                groups, ")");
    int64_t taps = 1;
    for (const int64_t k : kernel_size) taps *= k;
    const int64_t K = in_channels / groups * taps;
    Problem pr;
    pr.csr = Csr_::check_csr(crow, col, values, K, like, need_variance, validate, op, like_name);
    SparseConvParams& p = pr.prm;
    p.batch = batch;
    p.in_channels = in_channels;
    p.out_channels = out_channels;
    p.groups = groups;
    pr.out_sizes = {batch, out_channels};
    for (int64_t d = 0; d < 3; ++d) {
      const int64_t i = d - (3 - dims);  // the missing leading dimensions are of size 1
      const bool real = i >= 0;
      p.in_size[d] = real ? in_sizes[i] : 1;
      p.kernel[d] = real ? kernel_size[i] : 1;
      p.stride[d] = real ? stride[i] : 1;
      p.padding[d] = real ? padding[i] : 0;
      p.dilation[d] = real ? dilation[i] : 1;
      const int64_t span = p.dilation[d] * (p.kernel[d] - 1) + 1;
      TORCH_CHECK(p.in_size[d] + 2 * p.padding[d] >= span, op, ": the input (spatial size ",
                  p.in_size[d], " plus padding ", p.padding[d],
                  " on each side) is smaller than the dilated kernel (", span, ")");
      p.out_size[d] = (p.in_size[d] + 2 * p.padding[d] - span) / p.stride[d] + 1;
      if (real) pr.out_sizes.push_back(p.out_size[d]);
    }
    p.crow = pr.csr.crow.template const_data_ptr<int64_t>();
    p.col = pr.csr.col.template const_data_ptr<int64_t>();
    p.values = pr.csr.values.const_data_ptr();
    p.value_stride = pr.csr.stride;
    p.value_offset = 0;
    p.square_input = false;
    p.bias = nullptr;
    p.dtype = like.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
    p.stream = Traits::stream(like);
    return pr;
  }

  static void check_x(const Tensor& x, const char* op) {
    TORCH_CHECK(x.dim() >= 3 && x.dim() <= 5, op,
                ": x must be [batch, channels, *spatial] with 1 to 3 spatial dimensions, got shape ",
                x.sizes());
  }

  static OptTensor check_bias(const OptTensor& bias, const Tensor& x, int64_t out_channels,
                              const char* op) {
    if (!bias.has_value()) return std::nullopt;
    check_like(*bias, "bias", x, "x", op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out_channels, op,
                ": bias must be [out_channels] = [", out_channels, "], got shape ", bias->sizes());
    return bias->contiguous();
  }

  static Tensor forward(const Tensor& x, const Tensor& crow, const Tensor& col,
                        const Tensor& values, const OptTensor& bias, Ints kernel_size, Ints stride,
                        Ints padding, Ints dilation, int64_t groups, bool validate) {
    const char* op = "sparse_conv";
    const NoAutocast no_ac = no_autocast();
    check_x(x, op);
    at::OptionalDeviceGuard guard(x.device());
    Problem pr = problem(x, "x", x.size(0), x.size(1), x.sizes().slice(2), crow, col, values,
                         kernel_size, stride, padding, dilation, groups, false, validate, op);
    const OptTensor b = check_bias(bias, x, pr.prm.out_channels, op);
    const Tensor xc = x.contiguous();
    Tensor y = at::empty(pr.out_sizes, x.options().memory_format(at::MemoryFormat::Contiguous));
    pr.prm.bias = b.has_value() ? b->const_data_ptr() : nullptr;
    if (y.numel() > 0) sparse_conv_forward(Tag{}, pr.prm, xc.const_data_ptr(), y.data_ptr());
    return y;
  }

  // grad_x [batch, C_in, *input_size]
  static Tensor backward(const Tensor& grad_out, const Tensor& crow, const Tensor& col,
                         const Tensor& values, Ints input_size, Ints kernel_size, Ints stride,
                         Ints padding, Ints dilation, int64_t groups, bool validate) {
    const char* op = "sparse_conv_backward";
    const NoAutocast no_ac = no_autocast();
    TORCH_CHECK(input_size.size() >= 3 && input_size.size() <= 5, op,
                ": input_size must be [batch, channels, *spatial], got ", input_size);
    at::OptionalDeviceGuard guard(grad_out.device());
    Problem pr = problem(grad_out, "grad_out", input_size[0], input_size[1], input_size.slice(2),
                         crow, col, values, kernel_size, stride, padding, dilation, groups, false,
                         validate, op);
    TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(pr.out_sizes), op,
                ": grad_out must have the output's shape ", c10::IntArrayRef(pr.out_sizes),
                ", got ", grad_out.sizes());
    const Tensor g = grad_out.contiguous();
    Tensor gx = at::empty(input_size, grad_out.options().memory_format(at::MemoryFormat::Contiguous));
    if (gx.numel() > 0) sparse_conv_grad_input(Tag{}, pr.prm, g.const_data_ptr(), gx.data_ptr());
    return gx;
  }

  // The LRT parameters of the noise passes over rows of C_out L' values.
  static LrtParams lrt_params(const Problem& pr, int64_t S, bool shared_input, int64_t rows,
                              const Tensor& state) {
    LrtParams l{};
    l.num_samples = S;
    l.rows = rows;
    int64_t inner = 1;
    for (int64_t d = 0; d < 3; ++d) inner *= pr.prm.out_size[d];
    l.out_features = pr.prm.out_channels * inner;
    l.shared_input = shared_input;
    l.tag = kStreamSparseLRT;
    l.rng_state = state.const_data_ptr<int64_t>();
    l.dtype = pr.prm.dtype;
    l.stream = pr.prm.stream;
    return l;
  }

  // (y [S N, C_out, *sp'], std [x rows, C_out, *sp'])
  static std::tuple<Tensor, Tensor> lrt_forward(const Tensor& x, const Tensor& crow,
                                                const Tensor& col, const Tensor& values,
                                                const OptTensor& bias, const Tensor& rng_state,
                                                int64_t num_samples, bool shared_input,
                                                Ints kernel_size, Ints stride, Ints padding,
                                                Ints dilation, int64_t groups, bool validate) {
    const char* op = "sparse_conv_lrt";
    const NoAutocast no_ac = no_autocast();
    check_x(x, op);
    at::OptionalDeviceGuard guard(x.device());
    Problem pr = problem(x, "x", x.size(0), x.size(1), x.sizes().slice(2), crow, col, values,
                         kernel_size, stride, padding, dilation, groups, true, validate, op);
    if (validate) Csr_::check_variances(pr.csr.values, op);
    TORCH_CHECK(num_samples >= 1, op, ": num_samples must be >= 1, got ", num_samples);
    TORCH_CHECK(shared_input || x.size(0) % num_samples == 0, op, ": x has ", x.size(0),
                " rows, not a multiple of num_samples = ", num_samples,
                " (an input with samples is [S * N, C, *spatial], sample-major)");
    check_rng_state(rng_state, Traits::device_type, x, "x", op);
    const OptTensor b = check_bias(bias, x, pr.prm.out_channels, op);
    const Tensor xc = x.contiguous();
    const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
    Tensor mean = at::empty(pr.out_sizes, opts);
    Tensor var = at::empty(pr.out_sizes, opts);
    const int64_t N = shared_input ? x.size(0) : x.size(0) / num_samples;
    std::vector<int64_t> y_sizes = pr.out_sizes;
    y_sizes[0] = num_samples * N;
    Tensor y = at::empty(y_sizes, opts);
    Tensor std = at::empty(pr.out_sizes, opts);
    if (y.numel() == 0) return {y, std};
    sparse_conv_forward(Tag{}, pr.prm, xc.const_data_ptr(), mean.data_ptr());
    SparseConvParams pv = pr.prm;
    pv.value_offset = 1;
    pv.square_input = true;
    sparse_conv_forward(Tag{}, pv, xc.const_data_ptr(), var.data_ptr());
    const Tensor state = rng_state.contiguous();
    const LrtParams l = lrt_params(pr, num_samples, shared_input, N, state);
    Tensor bias_rows;
    if (b.has_value()) {
      bias_rows = b->unsqueeze(1).expand({pr.prm.out_channels, l.out_features / std::max<int64_t>(1, pr.prm.out_channels)}).contiguous();
    }
    lrt_noise_forward(Tag{}, l, mean.const_data_ptr(), var.const_data_ptr(),
                      b.has_value() ? bias_rows.const_data_ptr() : nullptr, y.data_ptr(),
                      std.data_ptr());
    return {y, std};
  }

  static Tensor lrt_backward(const Tensor& grad_out, const Tensor& x, const Tensor& crow,
                             const Tensor& col, const Tensor& values, const Tensor& std,
                             const Tensor& rng_state, int64_t num_samples, bool shared_input,
                             Ints kernel_size, Ints stride, Ints padding, Ints dilation,
                             int64_t groups, bool validate) {
    const char* op = "sparse_conv_lrt_backward";
    const NoAutocast no_ac = no_autocast();
    check_x(x, op);
    at::OptionalDeviceGuard guard(x.device());
    Problem pr = problem(x, "x", x.size(0), x.size(1), x.sizes().slice(2), crow, col, values,
                         kernel_size, stride, padding, dilation, groups, true, validate, op);
    TORCH_CHECK(num_samples >= 1, op, ": num_samples must be >= 1, got ", num_samples);
    check_rng_state(rng_state, Traits::device_type, x, "x", op);
    check_like(grad_out, "grad_out", x, "x", op);
    check_like(std, "std", x, "x", op);
    const int64_t N = shared_input ? x.size(0) : x.size(0) / num_samples;
    std::vector<int64_t> y_sizes = pr.out_sizes;
    y_sizes[0] = num_samples * N;
    TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(y_sizes), op, ": grad_out must be ",
                c10::IntArrayRef(y_sizes), ", got ", grad_out.sizes());
    TORCH_CHECK(std.sizes() == c10::IntArrayRef(pr.out_sizes), op, ": std must be ",
                c10::IntArrayRef(pr.out_sizes), " (saved by sparse_conv_lrt), got ", std.sizes());
    const Tensor state = rng_state.contiguous();
    const LrtParams l = lrt_params(pr, num_samples, shared_input, N, state);
    const Tensor g = grad_out.contiguous();
    const Tensor sd = std.contiguous();
    const auto opts = x.options().memory_format(at::MemoryFormat::Contiguous);
    Tensor grad_mean = at::empty(pr.out_sizes, opts);
    Tensor grad_var = at::empty(pr.out_sizes, opts);
    Tensor gx = at::empty(x.sizes(), opts);
    if (gx.numel() == 0 || sd.numel() == 0) return gx.zero_();
    lrt_noise_backward(Tag{}, l, g.const_data_ptr(), sd.const_data_ptr(), grad_mean.data_ptr(),
                       grad_var.data_ptr());
    sparse_conv_grad_input(Tag{}, pr.prm, grad_mean.const_data_ptr(), gx.data_ptr());
    SparseConvParams pv = pr.prm;
    pv.value_offset = 1;
    Tensor gx_var = at::empty(x.sizes(), opts);
    sparse_conv_grad_input(Tag{}, pv, grad_var.const_data_ptr(), gx_var.data_ptr());
    return gx.addcmul_(x.contiguous(), gx_var, 2);  // d var / d x = 2 x (...)
  }

  static void register_impls(torch::Library& m) {
    m.impl("sparse_conv", &forward);
    m.impl("sparse_conv_backward", &backward);
    m.impl("sparse_conv_lrt", &lrt_forward);
    m.impl("sparse_conv_lrt_backward", &lrt_backward);
  }
};

}  // namespace ops
}  // namespace bdlkern
