// Bindings of the fused MC-dropout linear ops: validate, make contiguous, allocate, and call the
// CPU GEMM orchestration (mc_dropout_cpu.cpp, over the CPU mask passes of
// csrc/kernels/cpu/mc_dropout_linear.cpp) or, on CUDA and its SIMT twin, one of two paths:
// the fused raw-pointer kernels (csrc/kernels/cuda/mc_dropout_linear.cu), which never hold an
// S x copy of the input, or the materialise path, a mask pass (csrc/kernels/cuda/mc_dropout_mask.cu)
// around at::mm, which runs at cuBLAS speed. memory_efficient=True / False picks one; None lets
// the cost model (bdlkern/mc_dropout/cost_model.h) pick per call from the device's properties.
// The CPU path works on cache-sized row chunks and never holds an S x copy: it ignores the flag.
// Semantics: bdlkern/mc_dropout/kernels.h.
#pragma once

#include <ATen/Context.h>
#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <bdlkern/mc_dropout/cost_model.h>
#include <bdlkern/mc_dropout/kernels.h>
#include <bdlkern/rng/random.h>

#include <limits>
#include <optional>
#include <type_traits>

#include "mc_dropout_cpu.h"
#include "autocast.h"
#include "backend_traits.h"
#include "checks.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct MCDropoutOps {
  using Traits = BackendTraits<Tag>;
  static constexpr bool kCpu = std::is_same_v<Tag, CpuTag>;

  static DType dtype_of(at::ScalarType t, const char* op) {
    switch (t) {
      case at::kFloat:
        return DType::kFloat32;
      case at::kDouble:
        return DType::kFloat64;
      case at::kBFloat16:
        return DType::kBFloat16;
      case at::kHalf:
        TORCH_CHECK(!kCpu, op, ": float16 is supported on CUDA only; use float32 or bfloat16 on the CPU");
        return DType::kFloat16;
      default:
        TORCH_CHECK(false, op, ": x must be float32, float64, bfloat16 or (CUDA) float16, got ", t);
    }
  }

  static void check_p(double p, const char* op) {
    TORCH_CHECK(std::isfinite(p) && p >= 0.0 && p < 1.0, op, ": p must be in [0, 1), got ", p);
  }

  // A 3-d x that is one row block broadcast over samples (x.expand(S, B, K)) is read once.
  static bool broadcast_over_samples(const at::Tensor& x) {
    return x.dim() == 3 && x.size(0) > 1 && x.stride(0) == 0;
  }

  static MCDropoutLinearParams params(int64_t S, int64_t B, int64_t K, int64_t N, bool shared_input,
                                      bool shared_mask, double p, const at::Tensor& state,
                                      at::ScalarType dtype, const at::Tensor& like, const char* op) {
    MCDropoutLinearParams prm;
    prm.num_samples = S;
    prm.rows = B;
    prm.in_features = K;
    prm.out_features = N;
    prm.shared_input = shared_input;
    prm.shared_mask = shared_mask;
    prm.threshold = keep_threshold(p);
    prm.scale = 1.0 / (1.0 - p);
    prm.rng_state = state.const_data_ptr<int64_t>();
    prm.dtype = dtype_of(dtype, op);
    prm.stream = Traits::stream(like);
    return prm;
  }

  // CUDA / SIMT: whether this call takes the fused kernel (true) or the materialise path.
  static bool fused_path(const MCDropoutLinearParams& prm, McDropoutPass pass,
                         const std::optional<bool>& memory_efficient, const at::Tensor& like) {
    if (memory_efficient.has_value()) return *memory_efficient;
    McDropoutProblem pr;
    pr.S = prm.num_samples;
    pr.B = prm.rows;
    pr.K = prm.in_features;
    pr.N = prm.out_features;
    pr.shared_input = prm.shared_input;
    pr.dtype = prm.dtype;
    pr.allow_tf32 = cuda_matmul_tf32();
    pr.pass = pass;
    pr.shared_mask = prm.shared_mask;
    pr.keep = 1.0 / prm.scale;
    return plan_mc_dropout_linear(Traits::gpu_spec(like), pr).memory_efficient;
  }

  // The CPU kernels compute bfloat16 in float (more accurate than PyTorch's own bf16 path).
  static at::Tensor cpu_compute(const at::Tensor& t) {
    return t.scalar_type() == at::kBFloat16 ? t.to(at::kFloat) : t;
  }

  static at::Tensor forward(const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& rng_state,
                            double p, int64_t num_samples, bool shared_mask,
                            std::optional<bool> memory_efficient) {
    const char* op = "mc_dropout_linear";
    const NoAutocast no_ac = no_autocast();
    TORCH_CHECK(x.device().type() == Traits::device_type, op, ": x must be on ",
                c10::DeviceTypeName(Traits::device_type, true), ", got ", x.device());
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op,
                ": x must be [B, in_features] (shared by all samples) or [S, B, in_features], got "
                "shape ",
                x.sizes());
    dtype_of(x.scalar_type(), op);
    TORCH_CHECK(weight.dim() == 2, op, ": weight must be [out_features, in_features], got shape ",
                weight.sizes());
    check_like(weight, "weight", x, "x", op);
    TORCH_CHECK(weight.size(1) == x.size(-1), op, ": x has ", x.size(-1),
                " features but weight expects in_features = ", weight.size(1));
    if (bias.has_value()) {
      check_like(*bias, "bias", x, "x", op);
      TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                  ": bias must be [out_features] = [", weight.size(0), "], got shape ",
                  bias->sizes());
    }
    check_p(p, op);
    TORCH_CHECK(num_samples >= 1, op, ": num_samples must be >= 1, got ", num_samples);
    TORCH_CHECK(x.dim() == 2 || x.size(0) == num_samples, op, ": x has ", x.size(0),
                " samples in its leading dimension but num_samples = ", num_samples);
    check_rng_state(rng_state, Traits::device_type, x, "x", op);

    const bool shared_input = x.dim() == 2 || broadcast_over_samples(x);
    const at::Tensor xs = (x.dim() == 3 && shared_input ? x.select(0, 0) : x).contiguous();
    const int64_t S = num_samples, B = xs.size(-2), K = xs.size(-1), N = weight.size(0);
    at::OptionalDeviceGuard guard(x.device());
    if (B == 0 || K == 0 || N == 0) {  // nothing to multiply: y = bias
      at::Tensor y = at::zeros({S, B, N}, x.options());
      if (bias.has_value()) y.add_(*bias);
      return y;
    }
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor w = weight.contiguous();
    const std::optional<at::Tensor> b =
        bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
    const MCDropoutLinearParams prm =
        params(S, B, K, N, shared_input, shared_mask, p, state, x.scalar_type(), x, op);
    if constexpr (kCpu) {
      const std::optional<at::Tensor> bc =
          b.has_value() ? std::optional<at::Tensor>(cpu_compute(*b)) : std::nullopt;
      return cpu_gemm::mc_dropout_linear_forward(cpu_compute(xs), cpu_compute(w), bc, prm)
          .to(x.scalar_type());
    } else if (fused_path(prm, McDropoutPass::kForward, memory_efficient, x)) {
      at::Tensor y = at::empty({S, B, N}, x.options());
      MCDropoutLinearParams fprm = prm;
      at::Tensor lists;  // shared masks: each sample's kept features, so the GEMM skips the rest
      if (shared_mask && p > 0.0 && K <= std::numeric_limits<int32_t>::max()) {
        lists = at::empty({S * (K + 1)}, x.options().dtype(at::kInt));
        fprm.workspace = lists.data_ptr<int32_t>();
      }
      mc_dropout_linear_forward(Tag{}, fprm, xs.const_data_ptr(), w.const_data_ptr(),
                                b.has_value() ? b->const_data_ptr() : nullptr, y.data_ptr());
      return y;
    } else {
      // y = scale * (x * keep) W^T + bias: the mask pass, then one GEMM whose alpha scales.
      at::Tensor xm = at::empty({S * B, K}, x.options());
      mc_dropout_mask_input(Tag{}, prm, xs.const_data_ptr(), xm.data_ptr());
      at::Tensor y = b.has_value() ? at::addmm(*b, xm, w.t(), 1.0, prm.scale)
                                   : at::empty({S * B, N}, x.options()).addmm_(xm, w.t(), 0.0, prm.scale);
      return y.view({S, B, N});
    }
  }

  static void check_grad_out(const at::Tensor& grad_out, const at::Tensor& like,
                             const char* like_name, const at::Tensor& rng_state, double p,
                             const char* op) {
    TORCH_CHECK(grad_out.device().type() == Traits::device_type, op, ": grad_out must be on ",
                c10::DeviceTypeName(Traits::device_type, true), ", got ", grad_out.device());
    TORCH_CHECK(grad_out.dim() == 3, op, ": grad_out must be [S, B, out_features], got shape ",
                grad_out.sizes());
    check_like(grad_out, "grad_out", like, like_name, op);
    dtype_of(grad_out.scalar_type(), op);
    check_p(p, op);
    check_rng_state(rng_state, Traits::device_type, like, like_name, op);
  }

  static at::Tensor grad_input(const at::Tensor& grad_out, const at::Tensor& weight,
                               const at::Tensor& rng_state, double p, bool shared_mask,
                               bool sum_samples, std::optional<bool> memory_efficient) {
    const char* op = "mc_dropout_linear_grad_input";
    const NoAutocast no_ac = no_autocast();
    check_grad_out(grad_out, weight, "weight", rng_state, p, op);
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) == grad_out.size(2), op,
                ": weight must be [out_features = ", grad_out.size(2), ", in_features], got shape ",
                weight.sizes());
    const int64_t S = grad_out.size(0), B = grad_out.size(1), N = grad_out.size(2),
                  K = weight.size(1);
    at::OptionalDeviceGuard guard(weight.device());
    if (B == 0 || K == 0 || N == 0) {
      return sum_samples ? at::zeros({B, K}, weight.options())
                         : at::zeros({S, B, K}, weight.options());
    }
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor g = grad_out.contiguous();
    const at::Tensor w = weight.contiguous();
    const MCDropoutLinearParams prm =
        params(S, B, K, N, sum_samples, shared_mask, p, state, weight.scalar_type(), weight, op);
    if constexpr (kCpu) {
      return cpu_gemm::mc_dropout_linear_grad_input(cpu_compute(g), cpu_compute(w), prm)
          .to(weight.scalar_type());
    } else if (fused_path(prm, McDropoutPass::kGradInput, memory_efficient, weight)) {
      at::Tensor grad_x = sum_samples ? at::empty({B, K}, weight.options())
                                      : at::empty({S, B, K}, weight.options());
      mc_dropout_linear_grad_input(Tag{}, prm, g.const_data_ptr(), w.const_data_ptr(),
                                   grad_x.data_ptr());
      return grad_x;
    } else {
      // dX = (dY W) * keep * scale: one GEMM, then the mask applied in place (or the samples
      // summed into [B, K] in a fixed order).
      at::Tensor d = at::mm(g.view({S * B, N}), w);
      at::Tensor grad_x = sum_samples ? at::empty({B, K}, weight.options()) : d;
      mc_dropout_mask_grad(Tag{}, prm, d.const_data_ptr(), grad_x.data_ptr());
      return sum_samples ? grad_x : grad_x.view({S, B, K});
    }
  }

  static at::Tensor grad_weight(const at::Tensor& grad_out, const at::Tensor& x,
                                const at::Tensor& rng_state, double p, bool shared_mask,
                                std::optional<bool> memory_efficient) {
    const char* op = "mc_dropout_linear_grad_weight";
    const NoAutocast no_ac = no_autocast();
    check_grad_out(grad_out, x, "x", rng_state, p, op);
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [B, in] or [S, B, in], got shape ",
                x.sizes());
    const int64_t S = grad_out.size(0), N = grad_out.size(2);
    const bool shared_input = x.dim() == 2 || broadcast_over_samples(x);
    const at::Tensor xs = (x.dim() == 3 && shared_input ? x.select(0, 0) : x).contiguous();
    TORCH_CHECK(xs.size(-2) == grad_out.size(1) && (x.dim() == 2 || x.size(0) == S), op,
                ": x of shape ", x.sizes(), " does not match grad_out of shape ", grad_out.sizes());
    const int64_t B = xs.size(-2), K = xs.size(-1);
    at::OptionalDeviceGuard guard(x.device());
    if (B == 0 || K == 0 || N == 0) return at::zeros({N, K}, x.options());
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor g = grad_out.contiguous();
    const MCDropoutLinearParams prm =
        params(S, B, K, N, shared_input, shared_mask, p, state, x.scalar_type(), x, op);
    if constexpr (kCpu) {
      return cpu_gemm::mc_dropout_linear_grad_weight(cpu_compute(g), cpu_compute(xs), prm)
          .to(x.scalar_type());
    } else if (fused_path(prm, McDropoutPass::kGradWeight, memory_efficient, x)) {
      at::Tensor grad_w = at::empty({N, K}, x.options());
      mc_dropout_linear_grad_weight(Tag{}, prm, g.const_data_ptr(), xs.const_data_ptr(),
                                    grad_w.data_ptr());
      return grad_w;
    } else {
      // dW = scale * dY^T (x * keep): the masked input made again (it was never stored).
      at::Tensor xm = at::empty({S * B, K}, x.options());
      mc_dropout_mask_input(Tag{}, prm, xs.const_data_ptr(), xm.data_ptr());
      return at::empty({N, K}, x.options()).addmm_(g.view({S * B, N}).t(), xm, 0.0, prm.scale);
    }
  }

  static void register_impls(torch::Library& m) {
    m.impl("mc_dropout_linear", &forward);
    m.impl("mc_dropout_linear_grad_input", &grad_input);
    m.impl("mc_dropout_linear_grad_weight", &grad_weight);
  }
};

}  // namespace ops
}  // namespace bdlkern
