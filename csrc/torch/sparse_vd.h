// Bindings of the sparse variational dropout ops (LRT linear layer and the KL term): validate,
// make contiguous, run the GEMMs with ATen on the input's device, and call the fused passes of
// backend `Tag` (csrc/kernels/cpu/sparse_vd.cpp, csrc/kernels/cuda/sparse_vd.cu). Semantics:
// bdlkern/sparse_vd/kernels.h.
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <bdlkern/rng/random.h>
#include <bdlkern/sparse_vd/kernels.h>

#include <optional>
#include <tuple>
#include <type_traits>

#include "autocast.h"
#include "backend_traits.h"
#include "checks.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct SparseVDOps {
  using Traits = BackendTraits<Tag>;

  static DType dtype_of(const at::Tensor& t, const char* name, const char* op) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                " must be float32 or float64, got ", t.scalar_type());
    return t.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  }

  static void check_on_backend(const at::Tensor& t, const char* name, const char* op) {
    TORCH_CHECK(t.device().type() == Traits::device_type, op, ": ", name, " must be on ",
                c10::DeviceTypeName(Traits::device_type, true), ", got ", t.device());
  }

  // theta and log_sigma2: the same shape, dtype and device. `weight` names the first argument in
  // errors (the variance layers pass log_sigma2 as both).
  static DType check_weights(const at::Tensor& theta, const at::Tensor& log_sigma2,
                             const char* op, const char* weight = "theta") {
    check_on_backend(theta, weight, op);
    const DType dt = dtype_of(theta, weight, op);
    check_like(log_sigma2, "log_sigma2", theta, weight, op);
    TORCH_CHECK(log_sigma2.sizes() == theta.sizes(), op, ": log_sigma2 must have theta's shape ",
                theta.sizes(), ", got ", log_sigma2.sizes());
    return dt;
  }

  struct Layer {
    at::Tensor x;      // [R, K] shared by the samples, or [S * R, K]
    at::Tensor theta;  // [N, K]
    at::Tensor log_sigma2;
    LrtParams prm;
  };

  static Layer layer(const at::Tensor& x, const at::Tensor& theta, const at::Tensor& log_sigma2,
                     const at::Tensor& rng_state, int64_t num_samples, const char* op,
                     const char* weight = "theta") {
    const DType dt = check_weights(theta, log_sigma2, op, weight);
    TORCH_CHECK(theta.dim() == 2, op, ": ", weight, " must be [out_features, in_features], got shape ",
                theta.sizes());
    check_like(x, "x", theta, weight, op);
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op,
                ": x must be [B, in_features] (shared by all samples) or [S, B, in_features], got "
                "shape ",
                x.sizes());
    TORCH_CHECK(x.size(-1) == theta.size(1), op, ": x has ", x.size(-1), " features but ", weight,
                " expects in_features = ", theta.size(1));
    TORCH_CHECK(num_samples >= 1, op, ": num_samples must be >= 1, got ", num_samples);
    TORCH_CHECK(x.dim() == 2 || x.size(0) == num_samples, op, ": x has ", x.size(0),
                " samples in its leading dimension but num_samples = ", num_samples);
    check_rng_state(rng_state, Traits::device_type, x, "x", op);
    // A 2-d x is shared by the samples: mu and var are computed once for all of them.
    const bool shared = x.dim() == 2;
    // Explicit row count: reshape(-1, K) is ambiguous when K == 0.
    const at::Tensor xs =
        shared ? x.contiguous() : x.reshape({x.size(0) * x.size(1), x.size(-1)}).contiguous();
    Layer l{xs, theta.contiguous(), log_sigma2.contiguous(), LrtParams{}};
    l.prm.num_samples = num_samples;
    l.prm.rows = shared ? xs.size(0) : x.size(1);
    l.prm.out_features = theta.size(0);
    l.prm.shared_input = shared;
    l.prm.tag = kStreamLRT;
    l.prm.rng_state = nullptr;
    l.prm.dtype = dt;
    l.prm.stream = Traits::stream(x);
    return l;
  }

  static at::Tensor variance_weights(const Layer& l) {
    at::Tensor A = at::empty_like(l.theta, at::MemoryFormat::Contiguous);
    weight_variance(Tag{}, l.theta.numel(), l.theta.const_data_ptr(), l.log_sigma2.const_data_ptr(),
                    A.data_ptr(), l.prm.dtype, l.prm.stream);
    return A;
  }

  // bias [N] (or none), contiguous, like the weight `like`.
  static std::optional<at::Tensor> checked_bias(const std::optional<at::Tensor>& bias, int64_t N,
                                                const at::Tensor& like, const char* like_name,
                                                const char* op) {
    if (!bias.has_value()) return std::nullopt;
    check_like(*bias, "bias", like, like_name, op);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [out_features] = [", N,
                "], got shape ", bias->sizes());
    return bias->contiguous();
  }

  // (y [S, R, N], std [R, N] or [S * R, N])
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& x, const at::Tensor& theta,
                                                    const at::Tensor& log_sigma2,
                                                    const std::optional<at::Tensor>& bias,
                                                    const at::Tensor& rng_state,
                                                    int64_t num_samples) {
    const char* op = "lrt_linear";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    Layer l = layer(x, theta, log_sigma2, rng_state, num_samples, op);
    const int64_t N = l.prm.out_features;
    const std::optional<at::Tensor> b = checked_bias(bias, N, theta, "theta", op);
    const at::Tensor state = rng_state.contiguous();
    l.prm.rng_state = state.const_data_ptr<int64_t>();
    const at::Tensor A = variance_weights(l);
    const at::Tensor mu = at::mm(l.x, l.theta.t());
    const at::Tensor var = at::mm(l.x.square(), A.t());
    at::Tensor y = at::empty({num_samples, l.prm.rows, N}, x.options());
    at::Tensor std = at::empty_like(var);
    check_buffer(mu, l.theta.scalar_type(), "mu", op);
    check_buffer(var, l.theta.scalar_type(), "var", op);
    lrt_noise_forward(Tag{}, l.prm, mu.const_data_ptr(), var.const_data_ptr(),
                      b.has_value() ? b->const_data_ptr() : nullptr, y.data_ptr(), std.data_ptr());
    return {y, std};
  }

  // What lrt_noise_backward reads, checked against the layer and contiguous: grad_out [S, R, N],
  // std (saved by the forward `fwd`) and rng_state, whose pointer goes into l.prm.
  struct NoiseGrad {
    at::Tensor grad, std, state;
  };
  static NoiseGrad noise_grad_inputs(const at::Tensor& grad_y, const at::Tensor& std,
                                     const at::Tensor& rng_state, Layer& l, const at::Tensor& like,
                                     const char* like_name, const char* op, const char* fwd) {
    check_like(grad_y, "grad_out", like, like_name, op);
    check_like(std, "std", like, like_name, op);
    const int64_t S = l.prm.num_samples, R = l.prm.rows, N = l.prm.out_features;
    TORCH_CHECK(grad_y.size(1) == R && grad_y.size(2) == N, op, ": grad_out must be [", S, ", ",
                R, ", ", N, "], got ", grad_y.sizes());
    const int64_t src_rows = l.prm.shared_input ? R : S * R;
    TORCH_CHECK(std.dim() == 2 && std.size(0) == src_rows && std.size(1) == N, op,
                ": std must be [", src_rows, ", ", N, "] (saved by ", fwd, "), got ", std.sizes());
    NoiseGrad in{grad_y.contiguous(), std.contiguous(), rng_state.contiguous()};
    l.prm.rng_state = in.state.template const_data_ptr<int64_t>();
    return in;
  }

  // (grad_x like x, grad_theta, grad_log_sigma2, grad_bias [N])
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& theta,
      const at::Tensor& log_sigma2, const at::Tensor& std, const at::Tensor& rng_state) {
    const char* op = "lrt_linear_backward";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    TORCH_CHECK(grad_y.dim() == 3, op, ": grad_out must be [S, B, out_features], got shape ",
                grad_y.sizes());
    TORCH_CHECK(x.dim() != 3 || x.size(0) == grad_y.size(0), op, ": grad_out has ",
                grad_y.size(0), " samples but x has ", x.size(0));
    Layer l = layer(x, theta, log_sigma2, rng_state, grad_y.size(0), op);
    const NoiseGrad in = noise_grad_inputs(grad_y, std, rng_state, l, theta, "theta", op, "lrt_linear");
    const at::Tensor &g = in.grad, &sd = in.std;
    const int64_t S = l.prm.num_samples, R = l.prm.rows, N = l.prm.out_features;
    const int64_t src_rows = sd.size(0);
    at::Tensor grad_mu = at::empty({src_rows, N}, theta.options());
    at::Tensor grad_var = at::empty({src_rows, N}, theta.options());
    lrt_noise_backward(Tag{}, l.prm, g.const_data_ptr(), sd.const_data_ptr(), grad_mu.data_ptr(),
                       grad_var.data_ptr());
    // alpha theta^2 and x^2 are made again rather than saved by the forward: one pass over the
    // weights and one over x here, against keeping a weight-sized and an input-sized tensor alive
    // between forward and backward for every layer.
    at::Tensor A = variance_weights(l);
    const at::Tensor x2 = l.x.square();
    at::Tensor grad_x = at::mm(grad_mu, l.theta);
    grad_x.addcmul_(l.x, at::mm(grad_var, A), 2);
    at::Tensor grad_theta = at::mm(grad_mu.t(), l.x);
    // G_A, turned into grad_log_sigma2 in place; written over A, which is no longer needed (one
    // weight-sized allocation less: fresh large blocks cost page faults on every call)
    at::Tensor grad_ls2 = at::mm_out(A, grad_var.t(), x2);
    check_buffer(grad_theta, l.theta.scalar_type(), "grad_theta", op);
    check_buffer(grad_ls2, l.theta.scalar_type(), "grad_log_sigma2", op);
    weight_variance_backward(Tag{}, l.theta.numel(), l.theta.const_data_ptr(),
                             l.log_sigma2.const_data_ptr(), grad_theta.const_data_ptr(),
                             grad_ls2.const_data_ptr(), grad_theta.data_ptr(), grad_ls2.data_ptr(),
                             l.prm.dtype, l.prm.stream);
    at::Tensor grad_bias = grad_mu.sum(0);
    if (!l.prm.shared_input) grad_x = grad_x.view({S, R, x.size(-1)});
    return {grad_x, grad_theta, grad_ls2, grad_bias};
  }

  // ---- variance layers (Neklyudov et al. 2018): zero-mean weights, variance exp(log_sigma2) ----
  // forward: V = exp(log_sigma2), var = x^2 V^T (the only GEMM), y = bias + sqrt(var + 1e-8) eps
  // by lrt_noise_forward with the bias rows as the mean (the same `lrt` stream and layout as
  // lrt_linear). backward: grad_mean (-> grad_bias) and grad_var from lrt_noise_backward, then
  // grad_x = 2 x (grad_var V), grad_log_sigma2 = (grad_var^T x^2) * V.
  static at::Tensor mean_rows(const std::optional<at::Tensor>& b, int64_t rows, int64_t N,
                              const at::Tensor& like) {
    if (!b.has_value()) return at::zeros({rows, N}, like.options());
    return b->unsqueeze(0).expand({rows, N}).contiguous();
  }

  // (y [S, R, N], std [R, N] or [S * R, N])
  static std::tuple<at::Tensor, at::Tensor> variance_forward(
      const at::Tensor& x, const at::Tensor& log_sigma2, const std::optional<at::Tensor>& bias,
      const at::Tensor& rng_state, int64_t num_samples) {
    const char* op = "variance_linear";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    Layer l = layer(x, log_sigma2, log_sigma2, rng_state, num_samples, op, "log_sigma2");
    const int64_t N = l.prm.out_features;
    const std::optional<at::Tensor> b = checked_bias(bias, N, log_sigma2, "log_sigma2", op);
    const at::Tensor state = rng_state.contiguous();
    l.prm.rng_state = state.const_data_ptr<int64_t>();
    const at::Tensor var = at::mm(l.x.square(), l.log_sigma2.exp().t());
    check_buffer(var, l.log_sigma2.scalar_type(), "var", op);
    const at::Tensor mean = mean_rows(b, var.size(0), N, var);
    at::Tensor y = at::empty({num_samples, l.prm.rows, N}, x.options());
    at::Tensor std = at::empty_like(var);
    lrt_noise_forward(Tag{}, l.prm, mean.const_data_ptr(), var.const_data_ptr(), nullptr,
                      y.data_ptr(), std.data_ptr());
    return {y, std};
  }

  // (grad_x like x, grad_log_sigma2, grad_bias [N])
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> variance_backward(
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& log_sigma2,
      const at::Tensor& std, const at::Tensor& rng_state) {
    const char* op = "variance_linear_backward";
    const NoAutocast no_ac = no_autocast();
    at::OptionalDeviceGuard guard(x.device());
    TORCH_CHECK(grad_y.dim() == 3, op, ": grad_out must be [S, B, out_features], got shape ",
                grad_y.sizes());
    TORCH_CHECK(x.dim() != 3 || x.size(0) == grad_y.size(0), op, ": grad_out has ",
                grad_y.size(0), " samples but x has ", x.size(0));
    Layer l = layer(x, log_sigma2, log_sigma2, rng_state, grad_y.size(0), op, "log_sigma2");
    const NoiseGrad in =
        noise_grad_inputs(grad_y, std, rng_state, l, log_sigma2, "log_sigma2", op, "variance_linear");
    const at::Tensor &g = in.grad, &sd = in.std;
    const int64_t src_rows = sd.size(0), N = l.prm.out_features;
    at::Tensor grad_mu = at::empty({src_rows, N}, log_sigma2.options());
    at::Tensor grad_var = at::empty({src_rows, N}, log_sigma2.options());
    lrt_noise_backward(Tag{}, l.prm, g.const_data_ptr(), sd.const_data_ptr(), grad_mu.data_ptr(),
                       grad_var.data_ptr());
    const at::Tensor V = l.log_sigma2.exp();
    at::Tensor grad_x = at::mm(grad_var, V).mul_(l.x).mul_(2);
    at::Tensor grad_ls2 = at::mm(grad_var.t(), l.x.square()).mul_(V);
    at::Tensor grad_bias = grad_mu.sum(0);
    if (!l.prm.shared_input) grad_x = grad_x.view({l.prm.num_samples, l.prm.rows, x.size(-1)});
    return {grad_x, grad_ls2, grad_bias};
  }

  // ---- the KL term, one binding per op for both priors (sparse_vd_kl*: log-uniform, ard_kl*) --
  static constexpr const char* kl_name(KlPrior prior) {
    return prior == KlPrior::kArd ? "ard_kl" : "sparse_vd_kl";
  }
  static constexpr const char* kl_backward_name(KlPrior prior) {
    return prior == KlPrior::kArd ? "ard_kl_backward" : "sparse_vd_kl_backward";
  }
  static constexpr const char* kl_with_grad_name(KlPrior prior) {
    return prior == KlPrior::kArd ? "ard_kl_with_grad" : "sparse_vd_kl_with_grad";
  }

  template <KlPrior P>
  static at::Tensor kl(const at::Tensor& theta, const at::Tensor& log_sigma2) {
    const char* op = kl_name(P);
    const DType dt = check_weights(theta, log_sigma2, op);
    at::OptionalDeviceGuard guard(theta.device());
    const at::Tensor th = theta.contiguous();
    const at::Tensor ls = log_sigma2.contiguous();
    at::Tensor out = at::empty({}, theta.options());
    const int64_t ws = sparse_vd_kl_workspace(Tag{}, th.numel(), dt);
    at::Tensor workspace;
    if (ws > 0) workspace = at::empty({ws}, theta.options().dtype(at::kByte));
    sparse_vd_kl(Tag{}, P, th.numel(), th.const_data_ptr(), ls.const_data_ptr(), out.data_ptr(),
                 ws > 0 ? workspace.data_ptr() : nullptr, dt, Traits::stream(theta));
    return out;
  }

  template <KlPrior P>
  static std::tuple<at::Tensor, at::Tensor> kl_backward(const at::Tensor& grad,
                                                        const at::Tensor& theta,
                                                        const at::Tensor& log_sigma2) {
    const char* op = kl_backward_name(P);
    const DType dt = check_weights(theta, log_sigma2, op);
    check_like(grad, "grad", theta, "theta", op);
    TORCH_CHECK(grad.numel() == 1, op, ": grad must hold one value (the KL is a scalar), got shape ",
                grad.sizes());
    at::OptionalDeviceGuard guard(theta.device());
    const at::Tensor th = theta.contiguous();
    const at::Tensor ls = log_sigma2.contiguous();
    const at::Tensor g = grad.contiguous();
    at::Tensor grad_theta = at::empty_like(th);
    at::Tensor grad_ls2 = at::empty_like(ls);
    sparse_vd_kl_backward(Tag{}, P, th.numel(), g.const_data_ptr(), th.const_data_ptr(),
                          ls.const_data_ptr(), grad_theta.data_ptr(), grad_ls2.data_ptr(), dt,
                          Traits::stream(theta));
    return {grad_theta, grad_ls2};
  }

  // The KL and its gradient at grad 1 (what the autograd of the public sparse_vd_kl / ard_kl saves,
  // so its backward is a scaling): one fused pass on the CPU, the two kernels elsewhere.
  template <KlPrior P>
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_with_grad(const at::Tensor& theta,
                                                                     const at::Tensor& log_sigma2) {
    const char* op = kl_with_grad_name(P);
    const DType dt = check_weights(theta, log_sigma2, op);
    if constexpr (!std::is_same_v<Tag, CpuTag>) {
      at::Tensor out = kl<P>(theta, log_sigma2);
      auto [grad_theta, grad_ls2] =
          kl_backward<P>(at::ones({}, theta.options()), theta, log_sigma2);
      return {out, grad_theta, grad_ls2};
    } else {
      const at::Tensor th = theta.contiguous();
      const at::Tensor ls = log_sigma2.contiguous();
      at::Tensor out = at::empty({}, theta.options());
      at::Tensor grad_theta = at::empty_like(th);
      at::Tensor grad_ls2 = at::empty_like(ls);
      sparse_vd_kl_with_grad(CpuTag{}, P, th.numel(), th.const_data_ptr(), ls.const_data_ptr(),
                             out.data_ptr(), grad_theta.data_ptr(), grad_ls2.data_ptr(), dt);
      return {out, grad_theta, grad_ls2};
    }
  }

  static void register_impls(torch::Library& m) {
    m.impl("lrt_linear", &forward);
    m.impl("lrt_linear_backward", &backward);
    m.impl("variance_linear", &variance_forward);
    m.impl("variance_linear_backward", &variance_backward);
    m.impl("sparse_vd_kl", &kl<KlPrior::kLogUniform>);
    m.impl("sparse_vd_kl_backward", &kl_backward<KlPrior::kLogUniform>);
    m.impl("sparse_vd_kl_with_grad", &kl_with_grad<KlPrior::kLogUniform>);
    m.impl("ard_kl", &kl<KlPrior::kArd>);
    m.impl("ard_kl_backward", &kl_backward<KlPrior::kArd>);
    m.impl("ard_kl_with_grad", &kl_with_grad<KlPrior::kArd>);
  }
};

}  // namespace ops
}  // namespace bdlkern
