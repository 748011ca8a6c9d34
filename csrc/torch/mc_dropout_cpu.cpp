// The CPU GEMM orchestration of the MC-dropout linear ops (declared in mc_dropout_cpu.h).
//
// Rows are processed in cache-sized chunks (about 1 MiB): the CPU mask pass writes the chunk's
// masked copy into one reused buffer, then one multi-threaded ATen GEMM consumes it. With shared
// masks each sample's kept features are gathered first (and the kept rows of W^T with them), so
// the GEMMs run over about (1 - p) K columns; a trailing column of ones and a bias row let the
// GEMM add the bias. The passes are deterministic, and so is every sum here (a fixed chunk order).
#include "mc_dropout_cpu.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace bdlkern {
namespace ops {
namespace cpu_gemm {
namespace {

// Masked-input chunk sizes. Forward and grad_input: ~1 MiB, about one core's L2, so the masked
// copy is still cached when the GEMM packs it. grad_weight accumulates dW += dY_c^T Xm_c over the
// chunks, so each chunk re-reads and re-writes all of dW: bigger chunks (a longer reduction per
// GEMM call) halve that traffic and measured ~10% faster at K = N = 1024.
constexpr int64_t kChunkBytes = int64_t{1} << 20;
constexpr int64_t kReductionChunkBytes = int64_t{4} << 20;
constexpr int64_t kMinChunkRows = 16;

// Problems of at most this many multiply-adds (S B K N) run the one-pass CPU kernels
// (bdlkern/mc_dropout/kernels.h, CpuTag) instead of the GEMM path: below it the GEMM path's fixed
// costs (buffers, views, the BLAS call) outweigh its arithmetic. Measured on a 2-core AVX-512 Xeon
// (float32, 1 and 2 threads, each path forced in turn): at 20K MACs the one-pass kernels take
// 6-10 us against 10-12 us, at 78K they are even (forward) or ahead (backward), at 256K the GEMM
// path is ahead (17-23 us against 21-32 us).
constexpr int64_t kSmallMacs = int64_t{1} << 16;

bool small_problem(const MCDropoutLinearParams& p) {
  return p.num_samples * p.rows * p.in_features * p.out_features <= kSmallMacs;
}

int64_t chunk_rows(const MCDropoutLinearParams& p, int64_t element_size, int64_t total_rows,
                   int64_t chunk_bytes = kChunkBytes) {
  const int64_t rows = std::max(kMinChunkRows, chunk_bytes / (p.in_features * element_size));
  return std::max<int64_t>(1, std::min(rows, total_rows));
}

// p with the dtype of the tensors the passes will see (the binding computes bfloat16 in float).
MCDropoutLinearParams compute_params(MCDropoutLinearParams p, const at::Tensor& like) {
  p.dtype = like.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  return p;
}

// Shared masks: the kept features of sample s and the same indices as a tensor.
struct Kept {
  std::vector<int64_t> index;
  int64_t count = 0;
  at::Tensor tensor() const {
    at::Tensor idx = at::empty({count}, at::kLong);
    std::copy(index.begin(), index.begin() + count, idx.data_ptr<int64_t>());
    return idx;
  }
};

Kept kept_features(const MCDropoutLinearParams& p, int64_t s) {
  Kept kept;
  kept.index.resize(static_cast<size_t>(p.in_features));
  kept.count = mc_dropout_kept_features(CpuTag{}, p, s, kept.index.data());
  return kept;
}

}  // namespace

at::Tensor mc_dropout_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const MCDropoutLinearParams& params) {
  const MCDropoutLinearParams p = compute_params(params, x);
  const int64_t S = p.num_samples, B = p.rows, K = p.in_features, N = p.out_features;
  at::Tensor y = at::empty({S, B, N}, x.options());
  if (small_problem(p)) {
    mc_dropout_linear_forward(CpuTag{}, p, x.const_data_ptr(), weight.const_data_ptr(),
                              bias.has_value() ? bias->const_data_ptr() : nullptr, y.data_ptr());
    return y;
  }
  at::Tensor y_rows = y.view({S * B, N});

  if (!p.shared_mask) {
    const int64_t R = chunk_rows(p, x.element_size(), S * B);
    at::Tensor buffer = at::empty({R, K}, x.options());
    const at::Tensor weight_t = weight.t();
    for (int64_t r0 = 0; r0 < S * B; r0 += R) {
      const int64_t count = std::min(R, S * B - r0);
      mc_dropout_mask_rows(CpuTag{}, p, x.const_data_ptr(), r0, count, buffer.data_ptr());
      at::Tensor y_chunk = y_rows.narrow(0, r0, count);
      const at::Tensor xm = buffer.narrow(0, 0, count);
      if (bias.has_value()) {
        at::addmm_out(y_chunk, *bias, xm, weight_t);
      } else {
        at::mm_out(y_chunk, xm, weight_t);
      }
    }
    return y;
  }

  const int64_t R = chunk_rows(p, x.element_size(), B);
  at::Tensor buffer = at::empty({R * (K + 1)}, x.options());
  // W^T [K, N] once, so each sample's kept features are whole contiguous rows to gather.
  const at::Tensor weight_t = weight.t().contiguous();
  const bool with_bias = bias.has_value();
  at::Tensor weight_kept = at::empty({K + 1, N}, x.options());  // kept rows of W^T (+ bias row)
  for (int64_t s = 0; s < S; ++s) {
    const Kept kept = kept_features(p, s);
    const int64_t nk = kept.count;
    const int64_t width = nk + (with_bias ? 1 : 0);
    at::Tensor y_s = y[s];
    if (width == 0) {  // every feature dropped and no bias
      y_s.zero_();
      continue;
    }
    at::Tensor wk = weight_kept.narrow(0, 0, width);
    if (nk > 0) {
      at::Tensor rows = wk.narrow(0, 0, nk);
      at::index_select_out(rows, weight_t, 0, kept.tensor());
    }
    if (with_bias) wk[nk].copy_(*bias);
    for (int64_t b0 = 0; b0 < B; b0 += R) {
      const int64_t count = std::min(R, B - b0);
      mc_dropout_gather_kept(CpuTag{}, p, x.const_data_ptr(), s, b0, count, kept.index.data(), nk,
                             with_bias, buffer.data_ptr());
      at::Tensor y_chunk = y_s.narrow(0, b0, count);
      at::mm_out(y_chunk, buffer.narrow(0, 0, count * width).view({count, width}), wk);
    }
  }
  return y;
}

at::Tensor mc_dropout_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight,
                                        const MCDropoutLinearParams& params) {
  const MCDropoutLinearParams p = compute_params(params, weight);
  const int64_t S = p.num_samples, B = p.rows, K = p.in_features, N = p.out_features;
  const bool sum_samples = p.shared_input;
  if (small_problem(p)) {
    at::Tensor grad_x = sum_samples ? at::empty({B, K}, weight.options())
                                    : at::empty({S, B, K}, weight.options());
    mc_dropout_linear_grad_input(CpuTag{}, p, grad_y.const_data_ptr(), weight.const_data_ptr(),
                                 grad_x.data_ptr());
    return grad_x;
  }
  at::Tensor grad_x = sum_samples ? at::zeros({B, K}, weight.options())
                                  : at::empty({S, B, K}, weight.options());
  const at::Tensor g_rows = grad_y.view({S * B, N});

  if (!p.shared_mask) {
    const int64_t R = chunk_rows(p, weight.element_size(), S * B);
    at::Tensor buffer = at::empty({R, K}, weight.options());
    for (int64_t r0 = 0; r0 < S * B; r0 += R) {
      const int64_t count = std::min(R, S * B - r0);
      at::Tensor d = sum_samples ? buffer.narrow(0, 0, count)
                                 : grad_x.view({S * B, K}).narrow(0, r0, count);
      at::mm_out(d, g_rows.narrow(0, r0, count), weight);  // [count, K] = dY W
      if (sum_samples) {
        mc_dropout_mask_accumulate_rows(CpuTag{}, p, d.const_data_ptr(), r0, count,
                                        grad_x.data_ptr());
      } else {  // mask in place: d is rows [r0, r0 + count) of grad_x
        mc_dropout_mask_rows(CpuTag{}, p, grad_x.const_data_ptr(), r0, count, d.data_ptr());
      }
    }
    return grad_x;
  }

  if (!sum_samples) grad_x.zero_();  // dropped features get no gradient
  const int64_t R = chunk_rows(p, weight.element_size(), B);
  at::Tensor buffer = at::empty({R * K}, weight.options());
  const at::Tensor weight_t = weight.t().contiguous();  // [K, N]: kept rows gather contiguously
  for (int64_t s = 0; s < S; ++s) {
    const Kept kept = kept_features(p, s);
    const int64_t nk = kept.count;
    if (nk == 0) continue;
    const at::Tensor weight_kept = weight_t.index_select(0, kept.tensor()).t();  // [N, nk]
    for (int64_t b0 = 0; b0 < B; b0 += R) {
      const int64_t count = std::min(R, B - b0);
      at::Tensor d = buffer.narrow(0, 0, count * nk).view({count, nk});
      at::mm_out(d, g_rows.narrow(0, s * B + b0, count), weight_kept);
      mc_dropout_scatter_kept(CpuTag{}, p, d.const_data_ptr(), s, b0, count, kept.index.data(), nk,
                              grad_x.data_ptr());
    }
  }
  return grad_x;
}

at::Tensor mc_dropout_linear_grad_weight(const at::Tensor& grad_y, const at::Tensor& x,
                                         const MCDropoutLinearParams& params) {
  const MCDropoutLinearParams p = compute_params(params, x);
  const int64_t S = p.num_samples, B = p.rows, K = p.in_features, N = p.out_features;
  if (small_problem(p)) {
    at::Tensor grad_w = at::empty({N, K}, x.options());
    mc_dropout_linear_grad_weight(CpuTag{}, p, grad_y.const_data_ptr(), x.const_data_ptr(),
                                  grad_w.data_ptr());
    return grad_w;
  }
  const at::Tensor g_rows = grad_y.view({S * B, N});

  if (!p.shared_mask) {
    at::Tensor grad_w = at::zeros({N, K}, x.options());
    const int64_t R = chunk_rows(p, x.element_size(), S * B, kReductionChunkBytes);
    at::Tensor buffer = at::empty({R, K}, x.options());
    for (int64_t r0 = 0; r0 < S * B; r0 += R) {
      const int64_t count = std::min(R, S * B - r0);
      mc_dropout_mask_rows(CpuTag{}, p, x.const_data_ptr(), r0, count, buffer.data_ptr());
      grad_w.addmm_(g_rows.narrow(0, r0, count).t(), buffer.narrow(0, 0, count));
    }
    return grad_w;
  }

  // Accumulate dW^T [K, N]: each sample adds whole rows at its kept features.
  at::Tensor grad_w_t = at::zeros({K, N}, x.options());
  const int64_t R = chunk_rows(p, x.element_size(), B, kReductionChunkBytes);
  at::Tensor buffer = at::empty({R * K}, x.options());
  for (int64_t s = 0; s < S; ++s) {
    const Kept kept = kept_features(p, s);
    const int64_t nk = kept.count;
    if (nk == 0) continue;
    at::Tensor grad_kept = at::zeros({nk, N}, x.options());
    for (int64_t b0 = 0; b0 < B; b0 += R) {
      const int64_t count = std::min(R, B - b0);
      mc_dropout_gather_kept(CpuTag{}, p, x.const_data_ptr(), s, b0, count, kept.index.data(), nk,
                             /*ones_column=*/false, buffer.data_ptr());
      grad_kept.addmm_(buffer.narrow(0, 0, count * nk).view({count, nk}).t(),
                       g_rows.narrow(0, s * B + b0, count));
    }
    grad_w_t.index_add_(0, kept.tensor(), grad_kept);
  }
  return grad_w_t.t().contiguous();
}

}  // namespace cpu_gemm
}  // namespace ops
}  // namespace bdlkern
