// CPU kernels of the fused Gaussian dropout (semantics and shapes: bdlkern/gaussian/kernels.h).
//
// Work is split into fixed row tiles (a pure function of the shape, never of the thread count).
// A tile walks its rows in groups whose noise indices form one contiguous stream range
// [m0 * C, m1 * C): it makes that range's standard normals in one call (SIMD Philox, then the
// vectorised float32 Box-Muller the `normal` op uses, or random.h's libm one in float64, so eps is
// bit-identical to the `normal` op's on this backend) and applies them row by row.
// Backward writes one partial log_alpha gradient per tile and channel, in double; the partials
// are added in tile order at the end, so the gradient has the same bits for any thread count.
#include <ATen/Parallel.h>

#include <bdlkern/gaussian/kernels.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "philox_simd.h"

namespace bdlkern {
namespace {

// A tile holds at least kTileElements elements (amortises a task) and there are at most kMaxTiles
// tiles (bounds the [tiles, C] buffer of partial gradients). A group of rows draws at most
// kGroupNoise normals at once (unless one row alone has more), so its scratch stays in cache.
constexpr int64_t kTileElements = int64_t{1} << 14;
constexpr int64_t kMaxTiles = 64;
constexpr int64_t kGroupNoise = 4096;

struct Tiles {
  int64_t rows_per_tile;
  int64_t count;
};

Tiles make_tiles(const GaussianDropoutParams& p) {
  const int64_t row_elems = std::max<int64_t>(1, p.channels * p.inner);
  int64_t rows = std::max<int64_t>(1, (kTileElements + row_elems - 1) / row_elems);
  rows = std::max(rows, (p.rows + kMaxTiles - 1) / kMaxTiles);
  return Tiles{rows, p.rows == 0 ? 0 : (p.rows + rows - 1) / rows};
}

// eps[j] = the standard normal of stream element begin + j, j < count, with the bits of the
// `normal` op of this backend (csrc/kernels/cpu/rng.cpp): whole Philox blocks are converted, the
// float32 ones by the vectorised Box-Muller (normals_f32), the float64 ones by random.h's normal4.
template <typename T>
void stream_normals(const PhiloxStream& stream, uint64_t begin, int64_t count,
                    std::vector<uint32_t>& words, std::vector<T>& block_eps, T* eps) {
  const uint64_t first = begin & ~uint64_t{3};
  const int64_t skip = static_cast<int64_t>(begin - first);
  const int64_t n_words = (skip + count + 3) & ~int64_t{3};
  words.resize(static_cast<size_t>(n_words));
  block_eps.resize(static_cast<size_t>(n_words));
  cpu::stream_words(stream, first, n_words, words.data());
  if constexpr (std::is_same_v<T, float>) {
    cpu::normals_f32(n_words / 2, words.data(), block_eps.data());
  } else {
    for (int64_t b = 0; b < n_words; b += 4) {
      normal4(PhiloxBlock{{words[b], words[b + 1], words[b + 2], words[b + 3]}},
              block_eps.data() + b);
    }
  }
  std::copy(block_eps.begin() + skip, block_eps.begin() + skip + count, eps);
}

// s[c] = sqrt(alpha_c) = exp(0.5 log_alpha_c) for every channel (a scalar log_alpha broadcast).
template <typename T>
std::vector<T> noise_scales(const T* log_alpha, const GaussianDropoutParams& p) {
  std::vector<T> s(static_cast<size_t>(p.channels));
  if (p.per_channel_alpha) {
    for (int64_t c = 0; c < p.channels; ++c) s[c] = std::exp(T(0.5) * log_alpha[c]);
  } else {
    std::fill(s.begin(), s.end(), std::exp(T(0.5) * log_alpha[0]));
  }
  return s;
}

// Runs body(row, eps_of_row, acc) over the rows of the fixed tiles in parallel, eps_of_row the C
// normals of the row; acc[C] (double, zeroed per tile) is handed to tile_end(tile, acc) after the
// tile's last row.
template <typename T, typename Body, typename TileEnd>
void for_each_row(const GaussianDropoutParams& p, const Tiles& tiles, Body body, TileEnd tile_end) {
  const PhiloxStream stream = make_stream(p.rng_state, kStreamGaussianDropout);
  const int64_t C = p.channels;
  const int64_t group_rows = std::max<int64_t>(1, kGroupNoise / std::max<int64_t>(1, C));
  at::parallel_for(0, tiles.count, 1, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> words;
    std::vector<T> block_eps;
    std::vector<T> eps(static_cast<size_t>(std::min(group_rows, tiles.rows_per_tile) * C));
    std::vector<double> acc(static_cast<size_t>(C));
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const int64_t m_end = std::min(p.rows, (t + 1) * tiles.rows_per_tile);
      for (int64_t m0 = t * tiles.rows_per_tile; m0 < m_end; m0 += group_rows) {
        const int64_t m1 = std::min(m_end, m0 + group_rows);
        stream_normals<T>(stream, static_cast<uint64_t>(m0 * C), (m1 - m0) * C, words, block_eps,
                          eps.data());
        for (int64_t m = m0; m < m1; ++m) body(m, eps.data() + (m - m0) * C, acc.data());
      }
      tile_end(t, acc.data());
    }
  });
}

template <typename T>
void forward_impl(const GaussianDropoutParams& p, const T* x, const T* log_alpha, T* y) {
  const Tiles tiles = make_tiles(p);
  const std::vector<T> scale = noise_scales(log_alpha, p);
  const T* s = scale.data();
  const int64_t C = p.channels, L = p.inner;
  for_each_row<T>(
      p, tiles,
      [&](int64_t m, const T* eps, double*) {
        const T* xr = x + m * C * L;
        T* yr = y + m * C * L;
        if (L == 1) {
          for (int64_t c = 0; c < C; ++c) yr[c] = xr[c] * (T(1) + s[c] * eps[c]);
          return;
        }
        for (int64_t c = 0; c < C; ++c) {
          const T f = T(1) + s[c] * eps[c];
          for (int64_t l = 0; l < L; ++l) yr[c * L + l] = xr[c * L + l] * f;
        }
      },
      [](int64_t, double*) {});
}

template <typename T>
void backward_impl(const GaussianDropoutParams& p, const T* g, const T* x, const T* log_alpha,
                   T* grad_x, T* grad_log_alpha) {
  const Tiles tiles = make_tiles(p);
  const std::vector<T> scale = noise_scales(log_alpha, p);
  const T* s = scale.data();
  const int64_t C = p.channels, L = p.inner;
  // partial[t, c] (one alpha per channel) or partial[t] (one alpha, channels added in order):
  // tile t's share of sum(grad_y * x * eps), in double.
  const int64_t width = p.per_channel_alpha ? C : 1;
  std::vector<double> partial(static_cast<size_t>(tiles.count * width), 0.0);
  for_each_row<T>(
      p, tiles,
      [&](int64_t m, const T* eps, double* acc) {
        const T* gr = g + m * C * L;
        const T* xr = x + m * C * L;
        T* gxr = grad_x + m * C * L;
        if (L == 1) {
          for (int64_t c = 0; c < C; ++c) {
            gxr[c] = gr[c] * (T(1) + s[c] * eps[c]);
            acc[c] += static_cast<double>(gr[c] * xr[c] * eps[c]);
          }
          return;
        }
        for (int64_t c = 0; c < C; ++c) {
          const T f = T(1) + s[c] * eps[c];
          double dot = 0.0;
          for (int64_t l = 0; l < L; ++l) {
            gxr[c * L + l] = gr[c * L + l] * f;
            dot += static_cast<double>(gr[c * L + l] * xr[c * L + l]);
          }
          acc[c] += dot * static_cast<double>(eps[c]);
        }
      },
      [&](int64_t t, double* acc) {
        double* dst = partial.data() + t * width;
        for (int64_t c = 0; c < C; ++c) dst[p.per_channel_alpha ? c : 0] += acc[c];
      });
  // Tile order: fixed whatever ran where.
  for (int64_t c = 0; c < width; ++c) {
    double sum = 0.0;
    for (int64_t t = 0; t < tiles.count; ++t) sum += partial[static_cast<size_t>(t * width + c)];
    grad_log_alpha[c] = static_cast<T>(0.5 * static_cast<double>(s[c]) * sum);
  }
}

}  // namespace

void gaussian_dropout_forward(CpuTag, const GaussianDropoutParams& p, const void* x,
                              const void* log_alpha, void* y) {
  if (p.dtype == DType::kFloat64) {
    forward_impl(p, static_cast<const double*>(x), static_cast<const double*>(log_alpha),
                 static_cast<double*>(y));
  } else {
    forward_impl(p, static_cast<const float*>(x), static_cast<const float*>(log_alpha),
                 static_cast<float*>(y));
  }
}

int64_t gaussian_dropout_backward_workspace(CpuTag, const GaussianDropoutParams&) { return 0; }

void gaussian_dropout_backward(CpuTag, const GaussianDropoutParams& p, const void* grad_y,
                               const void* x, const void* log_alpha, void* grad_x,
                               void* grad_log_alpha, void*) {
  if (p.dtype == DType::kFloat64) {
    backward_impl(p, static_cast<const double*>(grad_y), static_cast<const double*>(x),
                  static_cast<const double*>(log_alpha), static_cast<double*>(grad_x),
                  static_cast<double*>(grad_log_alpha));
  } else {
    backward_impl(p, static_cast<const float*>(grad_y), static_cast<const float*>(x),
                  static_cast<const float*>(log_alpha), static_cast<float*>(grad_x),
                  static_cast<float*>(grad_log_alpha));
  }
}

}  // namespace bdlkern
