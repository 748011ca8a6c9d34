// CPU kernels of the fused multi-sample MC-dropout linear layer.
//
// The masked input never exists as an [S, B, K] tensor: rows are processed in cache-sized chunks
// (about 1 MiB), each chunk's masked copy is built in one reused buffer straight from the Philox
// stream (parallel over rows, SIMD Philox, a vectorised select), and fed to one multi-threaded
// GEMM. Backward re-makes the same chunks from rng_state. With shared masks the kept features of
// a sample are compacted first, so the GEMMs run over about (1 - p) K columns.
//
// Row r of the flattened [S * B] output belongs to sample s = r / B and batch row b = r % B, and
// its per-element mask words are stream elements [r K, r K + K): a chunk of consecutive rows is
// a contiguous piece of the stream (masks.h).
#include "mc_dropout_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <bit>
#include <type_traits>
#include <vector>

#include "philox_simd.h"

namespace bdlkern {
namespace cpu {
namespace {

// Masked-input chunk sizes. Forward and grad_input: ~1 MiB, about one core's L2, so the masked
// copy is still cached when the GEMM packs it. grad_weight accumulates dW += dY_c^T Xm_c over the
// chunks, so each chunk re-reads and re-writes all of dW: bigger chunks (a longer reduction per
// GEMM call) halve that traffic and measured ~10% faster at K = N = 1024.
constexpr int64_t kChunkBytes = int64_t{1} << 20;
constexpr int64_t kReductionChunkBytes = int64_t{4} << 20;
constexpr int64_t kMinChunkRows = 16;
constexpr int64_t kRowGrain = 4;      // rows per parallel task when masking a chunk
constexpr int64_t kColumnGrain = 256;  // columns per task when reducing over samples

MCDropoutMask make_mask(const MCDropoutLinearParams& p) {
  return MCDropoutMask{make_stream(p.rng_state, kStreamMCDropout), p.threshold, p.rows,
                       p.in_features, p.shared_mask};
}

int64_t chunk_rows(const MCDropoutLinearParams& p, int64_t element_size, int64_t total_rows,
                   int64_t chunk_bytes = kChunkBytes) {
  const int64_t rows = std::max(kMinChunkRows, chunk_bytes / (p.in_features * element_size));
  return std::max<int64_t>(1, std::min(rows, total_rows));
}

// out[k] = keep(word[k]) ? x[k] * scale : 0. The threshold is < 2^32 unless p == 0, where
// every element is kept. The select is done on the bits (an all-ones or all-zeros mask ANDed
// with the scaled value): random keep flags would mispredict a branch half the time (measured
// 6x slower), and a multiply by 0 would turn a dropped NaN into NaN instead of 0.
template <typename T>
void apply_mask(const T* x, const uint32_t* words, uint64_t threshold, T scale, T* out,
                int64_t n) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  if (threshold > 0xffffffffull) {
    for (int64_t k = 0; k < n; ++k) out[k] = x[k] * scale;
    return;
  }
  const uint32_t t = static_cast<uint32_t>(threshold);
  for (int64_t k = 0; k < n; ++k) {
    const Bits keep = Bits{0} - static_cast<Bits>(words[k] < t);
    out[k] = std::bit_cast<T>(std::bit_cast<Bits>(x[k] * scale) & keep);
  }
}

// Input row of flattened row r.
template <typename T>
const T* input_row(const T* x, const MCDropoutLinearParams& p, int64_t r) {
  const int64_t row = p.shared_input ? r % p.rows : r;
  return x + row * p.in_features;
}

// Per-element masks: out[i, :] = mask(row r0 + i) * x_row(r0 + i) * scale for i < count.
template <typename T>
void build_masked_rows(const T* x, const MCDropoutLinearParams& p, const MCDropoutMask& mask,
                       int64_t r0, int64_t count, T* out) {
  const int64_t K = p.in_features;
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(static_cast<size_t>(K));
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = r0 + i;
      stream_words(mask.stream, mask.index(r / p.rows, r % p.rows, 0), K, words.data());
      apply_mask(input_row(x, p, r), words.data(), mask.threshold, scale, out + i * K, K);
    }
  });
}

// Shared masks: the kept features of sample s, ascending.
std::vector<int64_t> kept_features(const MCDropoutMask& mask, int64_t s, int64_t K) {
  std::vector<uint32_t> words(static_cast<size_t>(K));
  stream_words(mask.stream, mask.index(s, 0, 0), K, words.data());
  std::vector<int64_t> kept;
  kept.reserve(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) {
    if (keep_element(words[static_cast<size_t>(k)], mask.threshold)) kept.push_back(k);
  }
  return kept;
}

at::Tensor index_tensor(const std::vector<int64_t>& kept) {
  at::Tensor idx = at::empty({static_cast<int64_t>(kept.size())}, at::kLong);
  std::copy(kept.begin(), kept.end(), idx.data_ptr<int64_t>());
  return idx;
}

// Shared masks: out[i, j] = x_row(s, b0 + i)[kept[j]] * scale for j < nk, rows of width
// nk + ones_column; the optional trailing column of ones multiplies a bias row appended to the
// kept weights, so the GEMM adds the bias without a separate pass over the output.
template <typename T>
void gather_kept(const T* x, const MCDropoutLinearParams& p, int64_t s, int64_t b0,
                 int64_t count, const std::vector<int64_t>& kept, bool ones_column, T* out) {
  const int64_t nk = static_cast<int64_t>(kept.size());
  const int64_t width = nk + (ones_column ? 1 : 0);
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = input_row(x, p, s * p.rows + b0 + i);
      T* dst = out + i * width;
      for (int64_t j = 0; j < nk; ++j) dst[j] = row[kept[static_cast<size_t>(j)]] * scale;
      if (ones_column) dst[nk] = T(1);
    }
  });
}

// y_chunk = xm W^T (+ bias).
void linear_out(at::Tensor& y_chunk, const at::Tensor& xm, const at::Tensor& weight_t,
                const std::optional<at::Tensor>& bias) {
  if (bias.has_value()) {
    at::addmm_out(y_chunk, *bias, xm, weight_t);
  } else {
    at::mm_out(y_chunk, xm, weight_t);
  }
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias, const MCDropoutLinearParams& p) {
  const int64_t S = p.num_samples, B = p.rows, K = p.in_features, N = p.out_features;
  at::Tensor y = at::empty({S, B, N}, x.options());
  const MCDropoutMask mask = make_mask(p);
  const T* xp = x.const_data_ptr<T>();
  at::Tensor y_rows = y.view({S * B, N});

  if (!p.shared_mask) {
    const int64_t R = chunk_rows(p, sizeof(T), S * B);
    at::Tensor buffer = at::empty({R, K}, x.options());
    const at::Tensor weight_t = weight.t();
    for (int64_t r0 = 0; r0 < S * B; r0 += R) {
      const int64_t count = std::min(R, S * B - r0);
      build_masked_rows(xp, p, mask, r0, count, buffer.data_ptr<T>());
      at::Tensor y_chunk = y_rows.narrow(0, r0, count);
      linear_out(y_chunk, buffer.narrow(0, 0, count), weight_t, bias);
    }
    return y;
  }

  const int64_t R = chunk_rows(p, sizeof(T), B);
  at::Tensor buffer = at::empty({R * (K + 1)}, x.options());
  // W^T [K, N] once, so each sample's kept features are whole contiguous rows to gather.
  const at::Tensor weight_t = weight.t().contiguous();
  const bool with_bias = bias.has_value();
  at::Tensor weight_kept = at::empty({K + 1, N}, x.options());  // kept rows of W^T (+ bias row)
  for (int64_t s = 0; s < S; ++s) {
    const std::vector<int64_t> kept = kept_features(mask, s, K);
    const int64_t nk = static_cast<int64_t>(kept.size());
    const int64_t width = nk + (with_bias ? 1 : 0);
    at::Tensor y_s = y[s];
    if (width == 0) {  // every feature dropped and no bias
      y_s.zero_();
      continue;
    }
    at::Tensor wk = weight_kept.narrow(0, 0, width);
    if (nk > 0) {
      at::Tensor rows = wk.narrow(0, 0, nk);
      at::index_select_out(rows, weight_t, 0, index_tensor(kept));
    }
    if (with_bias) wk[nk].copy_(*bias);
    for (int64_t b0 = 0; b0 < B; b0 += R) {
      const int64_t count = std::min(R, B - b0);
      gather_kept(xp, p, s, b0, count, kept, with_bias, buffer.data_ptr<T>());
      at::Tensor y_chunk = y_s.narrow(0, b0, count);
      at::mm_out(y_chunk, buffer.narrow(0, 0, count * width).view({count, width}), wk);
    }
  }
  return y;
}

template <typename T>
at::Tensor grad_input_impl(const at::Tensor& grad_y, const at::Tensor& weight,
                           const MCDropoutLinearParams& p) {
  const int64_t S = p.num_samples, B = p.rows, K = p.in_features, N = p.out_features;
  const bool sum_samples = p.shared_input;
  at::Tensor grad_x = sum_samples ? at::zeros({B, K}, weight.options())
                                  : at::empty({S, B, K}, weight.options());
  const MCDropoutMask mask = make_mask(p);
  const T scale = static_cast<T>(p.scale);
  const at::Tensor g_rows = grad_y.view({S * B, N});
  T* gx = grad_x.data_ptr<T>();

  if (!p.shared_mask) {
    const int64_t R = chunk_rows(p, sizeof(T), S * B);
    at::Tensor buffer = at::empty({R, K}, weight.options());
    for (int64_t r0 = 0; r0 < S * B; r0 += R) {
      const int64_t count = std::min(R, S * B - r0);
      at::Tensor d = sum_samples ? buffer.narrow(0, 0, count)
                                 : grad_x.view({S * B, K}).narrow(0, r0, count);
      at::mm_out(d, g_rows.narrow(0, r0, count), weight);  // [count, K] = dY W
      const T* dp = d.const_data_ptr<T>();
      if (!sum_samples) {  // mask in place, rows independent
        at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
          std::vector<uint32_t> words(static_cast<size_t>(K));
          for (int64_t i = begin; i < end; ++i) {
            const int64_t r = r0 + i;
            T* row = gx + r * K;
            stream_words(mask.stream, mask.index(r / B, r % B, 0), K, words.data());
            apply_mask(row, words.data(), mask.threshold, scale, row, K);
          }
        });
        continue;
      }
      // Sum over samples: split the columns, walk the rows in ascending order (fixed
      // accumulation order for every element, whatever the thread count).
      at::parallel_for(0, K, kColumnGrain, [&](int64_t k0, int64_t k1) {
        std::vector<uint32_t> words(static_cast<size_t>(k1 - k0));
        std::vector<T> masked(static_cast<size_t>(k1 - k0));
        for (int64_t i = 0; i < count; ++i) {
          const int64_t r = r0 + i;
          stream_words(mask.stream, mask.index(r / B, r % B, k0), k1 - k0, words.data());
          apply_mask(dp + i * K + k0, words.data(), mask.threshold, scale, masked.data(), k1 - k0);
          T* dst = gx + (r % B) * K + k0;
          for (int64_t k = 0; k < k1 - k0; ++k) dst[k] += masked[static_cast<size_t>(k)];
        }
      });
    }
    return grad_x;
  }

  if (!sum_samples) grad_x.zero_();  // dropped features get no gradient
  const int64_t R = chunk_rows(p, sizeof(T), B);
  at::Tensor buffer = at::empty({R * K}, weight.options());
  const at::Tensor weight_t = weight.t().contiguous();  // [K, N]: kept rows gather contiguously
  for (int64_t s = 0; s < S; ++s) {
    const std::vector<int64_t> kept = kept_features(mask, s, K);
    const int64_t nk = static_cast<int64_t>(kept.size());
    if (nk == 0) continue;
    const at::Tensor weight_kept = weight_t.index_select(0, index_tensor(kept)).t();  // [N, nk]
    for (int64_t b0 = 0; b0 < B; b0 += R) {
      const int64_t count = std::min(R, B - b0);
      at::Tensor d = buffer.narrow(0, 0, count * nk).view({count, nk});
      at::mm_out(d, g_rows.narrow(0, s * B + b0, count), weight_kept);
      const T* dp = d.const_data_ptr<T>();
      at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          const int64_t b = b0 + i;
          T* dst = gx + (sum_samples ? b : s * B + b) * K;
          for (int64_t j = 0; j < nk; ++j) dst[kept[static_cast<size_t>(j)]] += dp[i * nk + j] * scale;
        }
      });
    }
  }
  return grad_x;
}

template <typename T>
at::Tensor grad_weight_impl(const at::Tensor& grad_y, const at::Tensor& x,
                            const MCDropoutLinearParams& p) {
  const int64_t S = p.num_samples, B = p.rows, K = p.in_features, N = p.out_features;
  const MCDropoutMask mask = make_mask(p);
  const T* xp = x.const_data_ptr<T>();
  const at::Tensor g_rows = grad_y.view({S * B, N});

  if (!p.shared_mask) {
    at::Tensor grad_w = at::zeros({N, K}, x.options());
    const int64_t R = chunk_rows(p, sizeof(T), S * B, kReductionChunkBytes);
    at::Tensor buffer = at::empty({R, K}, x.options());
    for (int64_t r0 = 0; r0 < S * B; r0 += R) {
      const int64_t count = std::min(R, S * B - r0);
      build_masked_rows(xp, p, mask, r0, count, buffer.data_ptr<T>());
      grad_w.addmm_(g_rows.narrow(0, r0, count).t(), buffer.narrow(0, 0, count));
    }
    return grad_w;
  }

  // Accumulate dW^T [K, N]: each sample adds whole rows at its kept features.
  at::Tensor grad_w_t = at::zeros({K, N}, x.options());
  const int64_t R = chunk_rows(p, sizeof(T), B, kReductionChunkBytes);
  at::Tensor buffer = at::empty({R * K}, x.options());
  for (int64_t s = 0; s < S; ++s) {
    const std::vector<int64_t> kept = kept_features(mask, s, K);
    const int64_t nk = static_cast<int64_t>(kept.size());
    if (nk == 0) continue;
    at::Tensor grad_kept = at::zeros({nk, N}, x.options());
    for (int64_t b0 = 0; b0 < B; b0 += R) {
      const int64_t count = std::min(R, B - b0);
      gather_kept(xp, p, s, b0, count, kept, /*ones_column=*/false, buffer.data_ptr<T>());
      grad_kept.addmm_(buffer.narrow(0, 0, count * nk).view({count, nk}).t(),
                       g_rows.narrow(0, s * B + b0, count));
    }
    grad_w_t.index_add_(0, index_tensor(kept), grad_kept);
  }
  return grad_w_t.t().contiguous();
}

}  // namespace

at::Tensor mc_dropout_linear_forward(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias,
                                     const MCDropoutLinearParams& p) {
  return x.scalar_type() == at::kDouble ? forward_impl<double>(x, weight, bias, p)
                                        : forward_impl<float>(x, weight, bias, p);
}

at::Tensor mc_dropout_linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight,
                                        const MCDropoutLinearParams& p) {
  return weight.scalar_type() == at::kDouble ? grad_input_impl<double>(grad_y, weight, p)
                                             : grad_input_impl<float>(grad_y, weight, p);
}

at::Tensor mc_dropout_linear_grad_weight(const at::Tensor& grad_y, const at::Tensor& x,
                                         const MCDropoutLinearParams& p) {
  return x.scalar_type() == at::kDouble ? grad_weight_impl<double>(grad_y, x, p)
                                        : grad_weight_impl<float>(grad_y, x, p);
}

}  // namespace cpu
}  // namespace bdlkern
