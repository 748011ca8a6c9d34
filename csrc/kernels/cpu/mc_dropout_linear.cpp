// CPU mask passes of the fused multi-sample MC-dropout linear layer (entry points and semantics:
// bdlkern/mc_dropout/kernels.h).
//
// The masked input never exists as an [S, B, K] tensor: the binding (csrc/torch/mc_dropout_cpu.cpp)
// walks the rows in cache-sized chunks and calls these passes to build each chunk's masked copy in
// one reused buffer, straight from the Philox stream (parallel over rows, SIMD Philox, a vectorised
// select), before one multi-threaded GEMM per chunk. Backward re-makes the same chunks from
// rng_state. With shared masks the kept features of a sample are gathered first, so the GEMMs run
// over about (1 - p) K columns.
//
// The per-element mask words of flattened row r are stream elements [r K, r K + K): a chunk of
// consecutive rows is a contiguous piece of the stream (masks.h).
#include <ATen/Parallel.h>

#include <bdlkern/mc_dropout/kernels.h>
#include <bdlkern/rng/masks.h>

#include <bit>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "philox_simd.h"

namespace bdlkern {
namespace {

using cpu::stream_words;

constexpr int64_t kRowGrain = 4;       // rows per parallel task
constexpr int64_t kColumnGrain = 256;  // columns per task when reducing over samples

MCDropoutMask make_mask(const MCDropoutLinearParams& p) {
  return MCDropoutMask{make_stream(p.rng_state, kStreamMCDropout), p.threshold, p.rows,
                       p.in_features, p.shared_mask};
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

template <typename T>
void mask_rows(const MCDropoutLinearParams& p, const T* x, int64_t r0, int64_t count, T* out) {
  const MCDropoutMask mask = make_mask(p);
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

// Split the columns, walk the rows in ascending order: a fixed accumulation order for every
// element, whatever the thread count.
template <typename T>
void mask_accumulate_rows(const MCDropoutLinearParams& p, const T* d, int64_t r0, int64_t count,
                          T* grad_x) {
  const MCDropoutMask mask = make_mask(p);
  const int64_t K = p.in_features, B = p.rows;
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, K, kColumnGrain, [&](int64_t k0, int64_t k1) {
    std::vector<uint32_t> words(static_cast<size_t>(k1 - k0));
    std::vector<T> masked(static_cast<size_t>(k1 - k0));
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = r0 + i;
      stream_words(mask.stream, mask.index(r / B, r % B, k0), k1 - k0, words.data());
      apply_mask(d + i * K + k0, words.data(), mask.threshold, scale, masked.data(), k1 - k0);
      T* dst = grad_x + (r % B) * K + k0;
      for (int64_t k = 0; k < k1 - k0; ++k) dst[k] += masked[static_cast<size_t>(k)];
    }
  });
}

template <typename T>
void gather_kept(const MCDropoutLinearParams& p, const T* x, int64_t s, int64_t b0, int64_t count,
                 const int64_t* kept, int64_t nk, bool ones_column, T* out) {
  const int64_t width = nk + (ones_column ? 1 : 0);
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = input_row(x, p, s * p.rows + b0 + i);
      T* dst = out + i * width;
      for (int64_t j = 0; j < nk; ++j) dst[j] = row[kept[j]] * scale;
      if (ones_column) dst[nk] = T(1);
    }
  });
}

template <typename T>
void scatter_kept(const MCDropoutLinearParams& p, const T* d, int64_t s, int64_t b0, int64_t count,
                  const int64_t* kept, int64_t nk, T* grad_x) {
  const T scale = static_cast<T>(p.scale);
  at::parallel_for(0, count, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = b0 + i;
      T* dst = grad_x + (p.shared_input ? b : s * p.rows + b) * p.in_features;
      for (int64_t j = 0; j < nk; ++j) dst[kept[j]] += d[i * nk + j] * scale;
    }
  });
}

// Calls fn with a typed null pointer of p.dtype's element type (float or double).
template <class Fn>
void dispatch(const MCDropoutLinearParams& p, const char* pass, Fn&& fn) {
  switch (p.dtype) {
    case DType::kFloat32:
      return fn(static_cast<float*>(nullptr));
    case DType::kFloat64:
      return fn(static_cast<double*>(nullptr));
    default:
      throw std::invalid_argument(std::string(pass) + ": the CPU passes run in float32 or float64");
  }
}

}  // namespace

void mc_dropout_mask_rows(CpuTag, const MCDropoutLinearParams& p, const void* x, int64_t r0,
                          int64_t count, void* out) {
  dispatch(p, "mc_dropout_mask_rows", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mask_rows<T>(p, static_cast<const T*>(x), r0, count, static_cast<T*>(out));
  });
}

void mc_dropout_mask_accumulate_rows(CpuTag, const MCDropoutLinearParams& p, const void* d,
                                     int64_t r0, int64_t count, void* grad_x) {
  dispatch(p, "mc_dropout_mask_accumulate_rows", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mask_accumulate_rows<T>(p, static_cast<const T*>(d), r0, count, static_cast<T*>(grad_x));
  });
}

int64_t mc_dropout_kept_features(CpuTag, const MCDropoutLinearParams& p, int64_t s, int64_t* kept) {
  const MCDropoutMask mask = make_mask(p);
  const int64_t K = p.in_features;
  std::vector<uint32_t> words(static_cast<size_t>(K));
  stream_words(mask.stream, mask.index(s, 0, 0), K, words.data());
  int64_t nk = 0;
  for (int64_t k = 0; k < K; ++k) {
    if (keep_element(words[static_cast<size_t>(k)], mask.threshold)) kept[nk++] = k;
  }
  return nk;
}

void mc_dropout_gather_kept(CpuTag, const MCDropoutLinearParams& p, const void* x, int64_t s,
                            int64_t b0, int64_t count, const int64_t* kept, int64_t nk,
                            bool ones_column, void* out) {
  dispatch(p, "mc_dropout_gather_kept", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    gather_kept<T>(p, static_cast<const T*>(x), s, b0, count, kept, nk, ones_column,
                   static_cast<T*>(out));
  });
}

void mc_dropout_scatter_kept(CpuTag, const MCDropoutLinearParams& p, const void* d, int64_t s,
                             int64_t b0, int64_t count, const int64_t* kept, int64_t nk,
                             void* grad_x) {
  dispatch(p, "mc_dropout_scatter_kept", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    scatter_kept<T>(p, static_cast<const T*>(d), s, b0, count, kept, nk, static_cast<T*>(grad_x));
  });
}

}  // namespace bdlkern
