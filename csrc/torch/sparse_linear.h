// Bindings of the CSR linear ops (pruned sparse VD inference): validate the CSR structure before
// any kernel runs, lay the dense operands out batch-contiguous, and call csr_spmm of backend `Tag`
// (csrc/kernels/cpu/sparse_linear.cpp, csrc/kernels/cuda/sparse_linear.cu) and, for stochastic samples, the LRT noise pass of
// the sparse VD kernels. Semantics: bdlkern/sparse_linear/kernels.h.
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/argsort.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <bdlkern/sparse_linear/kernels.h>
#include <bdlkern/rng/random.h>
#include <bdlkern/sparse_vd/kernels.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "autocast.h"
#include "backend_traits.h"
#include "checks.h"

namespace bdlkern {
namespace ops {

// A validated CSR weight: contiguous crow [rows + 1], col [nnz], values [nnz * stride].
struct Csr {
  at::Tensor crow, col, values;
  int64_t rows;
  int64_t stride;
  at::Tensor order;  // validated contiguous row_order, or undefined (set by params)
};

template <class Tag>
struct SparseLinearOps {
  using Traits = BackendTraits<Tag>;
  static constexpr bool kCpu = std::is_same_v<Tag, CpuTag>;

  // out_a [B, N] (and out_b) = the CSR products of in_a [B, K_in] (and in_b), all row-major. The
  // CPU kernel handles the layout itself; the device kernels take batch-contiguous operands.
  static void spmm(const CsrParams& p, int64_t k_in, const at::Tensor& in_a,
                   const std::optional<at::Tensor>& in_b, at::Tensor& out_a,
                   std::optional<at::Tensor> out_b) {
    if constexpr (kCpu) {
      csr_spmm_rows(CpuTag{}, p, k_in, in_a.const_data_ptr(),
                    in_b.has_value() ? in_b->const_data_ptr() : nullptr, out_a.data_ptr(),
                    out_b.has_value() ? out_b->data_ptr() : nullptr);
    } else {
      const at::Tensor a_t = in_a.t().contiguous();
      const at::Tensor b_t = in_b.has_value() ? in_b->t().contiguous() : at::Tensor();
      at::Tensor oa_t = at::empty({p.rows, p.batch}, in_a.options());
      at::Tensor ob_t = out_b.has_value() ? at::empty({p.rows, p.batch}, in_a.options()) : at::Tensor();
      csr_spmm(Tag{}, p, a_t.const_data_ptr(), in_b.has_value() ? b_t.const_data_ptr() : nullptr,
               oa_t.data_ptr(), out_b.has_value() ? ob_t.data_ptr() : nullptr);
      out_a.copy_(oa_t.t());
      if (out_b.has_value()) out_b->copy_(ob_t.t());
    }
  }

  // Checks the CSR structure of W [N, K] on the host (a copy for device tensors): every malformed
  // input is an exception that names the argument, before a kernel could read out of bounds.
  // `like` (named like_name in messages) fixes the device and dtype: x, or grad_out in the
  // backward of the deterministic op. validate = false keeps the metadata checks (dtypes, shapes,
  // devices) and skips the data ones, the only part that reads the structure on the host.
  static Csr check_csr(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& values,
                       int64_t K, const at::Tensor& like, bool need_variance, bool validate,
                       const char* op, const char* like_name = "x") {
    for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{crow, "crow"},
                                  std::pair<const at::Tensor&, const char*>{col, "col"}}) {
      TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name,
                  " must be an int64 (torch.long) index tensor, got ", t.scalar_type());
      TORCH_CHECK(t.dim() == 1, op, ": ", name, " must be 1-d, got shape ", t.sizes());
      TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like_name,
                  "'s device (", like.device(), "), got ", t.device());
    }
    TORCH_CHECK(crow.numel() >= 1, op, ": crow must have N + 1 >= 1 entries, got none");
    TORCH_CHECK(values.scalar_type() == like.scalar_type() && values.device() == like.device(), op,
                ": values must have ", like_name, "'s dtype and device (", like.scalar_type(), ", ",
                like.device(), "), got ", values.scalar_type(), ", ", values.device());
    TORCH_CHECK(values.dim() == 1 || (values.dim() == 2 && values.size(1) == 2), op,
                ": values must be [nnz] (theta) or [nnz, 2] (theta, alpha theta^2 interleaved), got "
                "shape ",
                values.sizes());
    TORCH_CHECK(!need_variance || values.dim() == 2, op,
                ": stochastic samples need values [nnz, 2] holding (theta, alpha theta^2), got shape ",
                values.sizes());
    const int64_t N = crow.numel() - 1, nnz = col.numel();
    TORCH_CHECK(values.size(0) == nnz, op, ": values has ", values.size(0),
                " entries but col has nnz = ", nnz);
    if (!validate) {
      return Csr{crow.contiguous(), col.contiguous(), values.contiguous(), N,
                 values.dim() == 2 ? 2 : 1};
    }
    const at::Tensor crow_h = crow.cpu().contiguous();
    const at::Tensor col_h = col.cpu().contiguous();
    const int64_t* cr = crow_h.const_data_ptr<int64_t>();
    const int64_t* cl = col_h.const_data_ptr<int64_t>();
    TORCH_CHECK(cr[0] == 0, op, ": crow[0] must be 0, got ", cr[0]);
    TORCH_CHECK(cr[N] == nnz, op, ": crow[-1] must equal nnz = ", nnz, ", got ", cr[N]);
    // One vectorised pass decides; only a malformed structure is walked again for the message.
    const bool bad = !csr_structure_ok(cr, cl, N, K);
    if (bad) {
      for (int64_t n = 0; n < N; ++n) {
        TORCH_CHECK(cr[n] <= cr[n + 1], op, ": crow must be non-decreasing, but crow[", n,
                    "] = ", cr[n], " > crow[", n + 1, "] = ", cr[n + 1]);
      }
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = cr[n]; j < cr[n + 1]; ++j) {
          TORCH_CHECK(cl[j] >= 0 && cl[j] < K, op, ": col[", j, "] = ", cl[j],
                      " is out of range for in_features = ", K);
          TORCH_CHECK(j == cr[n] || cl[j - 1] < cl[j], op,
                      ": col must be strictly increasing within each row, but row ", n,
                      " has col[", j - 1, "] = ", cl[j - 1], " then col[", j, "] = ", cl[j]);
        }
      }
    }
    return Csr{crow.contiguous(), col.contiguous(), values.contiguous(), N,
               values.dim() == 2 ? 2 : 1};
  }

  // The variance column of [nnz, 2] values (alpha theta^2) must not be negative: its square root
  // would be a NaN standard deviation, silently. (A NaN variance, like a NaN weight, gives NaN
  // outputs.) One pass over nnz values; on CUDA a sync, like the host check of the structure.
  static void check_variances(const at::Tensor& values, const char* op) {
    if (values.size(0) == 0) return;
    const at::Tensor negative = values.select(1, 1).lt(0);
    if (!negative.any().item<bool>()) return;
    const int64_t j = negative.nonzero()[0][0].item<int64_t>();
    TORCH_CHECK(false, op, ": the weight variances values[:, 1] (alpha theta^2) must be >= 0, but values[",
                j, ", 1] = ", values[j][1].item<double>());
  }

  // row_order must be a permutation of [0, rows): a repeated or out-of-range row would leave
  // output rows unwritten or read outside crow. Checked on the host like the CSR structure (the
  // metadata only without validate).
  static at::Tensor check_row_order(const at::Tensor& order, int64_t rows, const at::Tensor& like,
                                    bool validate, const char* op) {
    TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.numel() == rows &&
                    order.device() == like.device(),
                op, ": row_order must be an int64 [", rows, "] permutation on x's device (",
                like.device(), "), got ", order.scalar_type(), " ", order.sizes(), " on ",
                order.device());
    const at::Tensor order_c = order.contiguous();
    if (!validate) return order_c;
    const at::Tensor host = order_c.cpu();
    const int64_t* o = host.const_data_ptr<int64_t>();
    std::vector<char> seen(static_cast<size_t>(rows), 0);
    for (int64_t i = 0; i < rows; ++i) {
      TORCH_CHECK(o[i] >= 0 && o[i] < rows, op, ": row_order[", i, "] = ", o[i],
                  " is out of range for ", rows, " rows");
      TORCH_CHECK(!seen[static_cast<size_t>(o[i])], op, ": row_order must be a permutation, but row ",
                  o[i], " appears twice");
      seen[static_cast<size_t>(o[i])] = 1;
    }
    return order_c;
  }

  static CsrParams params(Csr& w, int64_t batch, const std::optional<at::Tensor>& order,
                          const at::Tensor& like, bool validate, const char* op) {
    CsrParams p;
    p.rows = w.rows;
    p.batch = batch;
    p.crow = w.crow.const_data_ptr<int64_t>();
    p.col = w.col.const_data_ptr<int64_t>();
    p.values = w.values.const_data_ptr();
    p.value_stride = w.stride;
    p.row_order = nullptr;
    p.bias = nullptr;
    if (order.has_value()) {
      w.order = check_row_order(*order, w.rows, like, validate, op);
      p.row_order = w.order.const_data_ptr<int64_t>();
    }
    p.dtype = like.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
    p.stream = Traits::stream(like);
    return p;
  }

  // The dense operand (x, or grad_out in the deterministic backward), named in the messages.
  static void check_x(const at::Tensor& x, const char* op, const char* name = "x") {
    TORCH_CHECK(x.device().type() == Traits::device_type, op, ": ", name, " must be on ",
                c10::DeviceTypeName(Traits::device_type, true), ", got ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op, ": ", name,
                " must be float32 or float64, got ", x.scalar_type());
  }

  static std::optional<at::Tensor> check_bias(const std::optional<at::Tensor>& bias, int64_t N,
                                              const at::Tensor& like, const char* op) {
    if (!bias.has_value()) return std::nullopt;
    TORCH_CHECK(bias->scalar_type() == like.scalar_type() && bias->device() == like.device(), op,
                ": bias must have x's dtype and device");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must be [out_features] = [", N,
                "], got shape ", bias->sizes());
    return bias->contiguous();
  }

  // The CSR of W^T [K, N] (rows = input features), values permuted alike: the gradient of x is
  // then the same row-parallel kernel, with no scattered (racing) updates. Made per backward call
  // (a sort of nnz indices): the op is functional and the gradient of x is the rare path. Every
  // size here comes from metadata (nnz, K), none from the data, so nothing waits for the device:
  // the row of entry j is the number of row ends at or before it (searchsorted on crow[1:]), and
  // the column counts are a scatter-add (repeat_interleave and bincount would size their outputs
  // from the data, a sync on CUDA).
  static Csr transpose(const Csr& w, int64_t K) {
    const int64_t nnz = w.col.numel();
    const at::Tensor rows = at::searchsorted(w.crow.slice(0, 1), at::arange(nnz, w.crow.options()),
                                             /*out_int32=*/false, /*right=*/true);
    const at::Tensor perm = at::argsort(w.col.mul(w.rows).add(rows), /*stable=*/true);
    const at::Tensor counts =
        at::zeros({K}, w.col.options()).index_add_(0, w.col, at::ones({nnz}, w.col.options()));
    const at::Tensor crow_t = at::cat({at::zeros({1}, w.crow.options()), counts.cumsum(0)});
    return Csr{crow_t, rows.index_select(0, perm).contiguous(),
               w.values.index_select(0, perm).contiguous(), K, w.stride};
  }

  // y [R, N] = x [R, K] W^T + bias
  static at::Tensor forward(const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
                            const at::Tensor& values, const std::optional<at::Tensor>& bias,
                            const std::optional<at::Tensor>& row_order, bool validate) {
    const char* op = "sparse_linear";
    const NoAutocast no_ac = no_autocast();
    check_x(x, op);
    TORCH_CHECK(x.dim() == 2, op, ": x must be [B, in_features], got shape ", x.sizes());
    at::OptionalDeviceGuard guard(x.device());
    Csr w = check_csr(crow, col, values, x.size(1), x, false, validate, op);
    const std::optional<at::Tensor> b = check_bias(bias, w.rows, x, op);
    at::Tensor y = at::empty({x.size(0), w.rows}, x.options());
    CsrParams prm = params(w, x.size(0), row_order, x, validate, op);
    prm.bias = b.has_value() ? b->const_data_ptr() : nullptr;  // added as the outputs are written
    spmm(prm, x.size(1), x.contiguous(), std::nullopt, y, std::nullopt);
    return y;
  }

  // grad_x [R, K] = grad_y [R, N] W
  static at::Tensor backward(const at::Tensor& grad_y, const at::Tensor& crow,
                             const at::Tensor& col, const at::Tensor& values,
                             int64_t in_features, bool validate) {
    const char* op = "sparse_linear_backward";
    const NoAutocast no_ac = no_autocast();
    TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
    check_x(grad_y, op, "grad_out");
    TORCH_CHECK(grad_y.dim() == 2, op, ": grad_out must be [B, out_features], got shape ",
                grad_y.sizes());
    at::OptionalDeviceGuard guard(grad_y.device());
    const Csr w = check_csr(crow, col, values, in_features, grad_y, false, validate, op, "grad_out");
    TORCH_CHECK(grad_y.size(1) == w.rows, op, ": grad_out has ", grad_y.size(1),
                " features but W has ", w.rows, " rows");
    Csr wt = transpose(w, in_features);
    at::Tensor grad_x = at::empty({grad_y.size(0), in_features}, grad_y.options());
    spmm(params(wt, grad_y.size(0), std::nullopt, grad_y, false, op), w.rows, grad_y.contiguous(),
         std::nullopt, grad_x, std::nullopt);
    return grad_x;
  }

  static LrtParams lrt_params(int64_t S, int64_t R, int64_t N, bool shared, const at::Tensor& state,
                              const at::Tensor& like) {
    LrtParams p;
    p.num_samples = S;
    p.rows = R;
    p.out_features = N;
    p.shared_input = shared;
    p.tag = kStreamSparseLRT;
    p.rng_state = state.const_data_ptr<int64_t>();
    p.dtype = like.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
    p.stream = Traits::stream(like);
    return p;
  }

  static void check_lrt(const at::Tensor& x, const at::Tensor& rng_state, int64_t S,
                        const char* op) {
    check_x(x, op);
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op,
                ": x must be [B, in_features] (shared by all samples) or [S, B, in_features], got "
                "shape ",
                x.sizes());
    TORCH_CHECK(S >= 1, op, ": num_samples must be >= 1, got ", S);
    TORCH_CHECK(x.dim() == 2 || x.size(0) == S, op, ": x has ", x.size(0),
                " samples in its leading dimension but num_samples = ", S);
    check_rng_state(rng_state, Traits::device_type, x, "x", op);
  }

  // (y [S, R, N], std [R or S R, N]): mu and var from one pass over the CSR, then S noise draws.
  static std::tuple<at::Tensor, at::Tensor> lrt_forward(
      const at::Tensor& x, const at::Tensor& crow, const at::Tensor& col,
      const at::Tensor& values, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& row_order, const at::Tensor& rng_state,
      int64_t num_samples, bool validate) {
    const char* op = "sparse_linear_lrt";
    const NoAutocast no_ac = no_autocast();
    check_lrt(x, rng_state, num_samples, op);
    at::OptionalDeviceGuard guard(x.device());
    Csr w = check_csr(crow, col, values, x.size(-1), x, true, validate, op);
    if (validate) check_variances(w.values, op);
    const std::optional<at::Tensor> b = check_bias(bias, w.rows, x, op);
    const bool shared = x.dim() == 2;
    // Explicit row count: reshape(-1, K) is ambiguous when K == 0.
    const int64_t rows = shared ? x.size(0) : x.size(0) * x.size(1), R = x.size(-2);
    const at::Tensor x2 = x.reshape({rows, x.size(-1)});
    at::Tensor mu = at::empty({rows, w.rows}, x.options());
    std::optional<at::Tensor> var = at::empty({rows, w.rows}, x.options());
    spmm(params(w, rows, row_order, x, validate, op), x.size(-1), x2.contiguous(), std::nullopt, mu,
         var);
    at::Tensor y = at::empty({num_samples, R, w.rows}, x.options());
    at::Tensor std = at::empty_like(mu);
    const at::Tensor state = rng_state.contiguous();
    lrt_noise_forward(Tag{}, lrt_params(num_samples, R, w.rows, shared, state, x),
                      mu.const_data_ptr(), var->const_data_ptr(),
                      b.has_value() ? b->const_data_ptr() : nullptr, y.data_ptr(), std.data_ptr());
    return {y, std};
  }

  // grad_x = grad_mu W + 2 x (grad_var V), grad_mu / grad_var from the re-made noise.
  static at::Tensor lrt_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                 const at::Tensor& crow, const at::Tensor& col,
                                 const at::Tensor& values, const at::Tensor& std,
                                 const at::Tensor& rng_state, bool validate) {
    const char* op = "sparse_linear_lrt_backward";
    const NoAutocast no_ac = no_autocast();
    TORCH_CHECK(grad_y.dim() == 3, op, ": grad_out must be [S, B, out_features], got shape ",
                grad_y.sizes());
    const int64_t S = grad_y.size(0);
    TORCH_CHECK(x.dim() != 3 || x.size(0) == S, op, ": grad_out has ", S,
                " samples but x has ", x.size(0));
    check_lrt(x, rng_state, S, op);
    at::OptionalDeviceGuard guard(x.device());
    const int64_t K = x.size(-1);
    const Csr w = check_csr(crow, col, values, K, x, true, validate, op);
    const bool shared = x.dim() == 2;
    const int64_t rows = shared ? x.size(0) : x.size(0) * x.size(1), R = x.size(-2);
    const at::Tensor x2 = x.reshape({rows, K}).contiguous();
    TORCH_CHECK(grad_y.size(1) == R && grad_y.size(2) == w.rows, op, ": grad_out must be [", S,
                ", ", R, ", ", w.rows, "], got ", grad_y.sizes());
    TORCH_CHECK(std.dim() == 2 && std.size(0) == rows && std.size(1) == w.rows &&
                    std.scalar_type() == x.scalar_type() && std.device() == x.device(),
                op, ": std must be [", rows, ", ", w.rows, "] (saved by sparse_linear)");
    const at::Tensor state = rng_state.contiguous();
    const at::Tensor g = grad_y.contiguous();
    const at::Tensor sd = std.contiguous();
    at::Tensor grad_mu = at::empty({rows, w.rows}, x.options());
    at::Tensor grad_var = at::empty({rows, w.rows}, x.options());
    lrt_noise_backward(Tag{}, lrt_params(S, R, w.rows, shared, state, x), g.const_data_ptr(),
                       sd.const_data_ptr(), grad_mu.data_ptr(), grad_var.data_ptr());
    Csr wt = transpose(w, K);
    at::Tensor grad_x = at::empty({rows, K}, x.options());
    std::optional<at::Tensor> out_b = at::empty({rows, K}, x.options());
    spmm(params(wt, rows, std::nullopt, x, false, op), w.rows, grad_mu, grad_var, grad_x, out_b);
    grad_x.addcmul_(x2, *out_b, 2);
    return shared ? grad_x : grad_x.view(x.sizes());
  }

  static void register_impls(torch::Library& m) {
    m.impl("sparse_linear", &forward);
    m.impl("sparse_linear_backward", &backward);
    m.impl("sparse_linear_lrt", &lrt_forward);
    m.impl("sparse_linear_lrt_backward", &lrt_backward);
  }
};

}  // namespace ops
}  // namespace bdlkern
