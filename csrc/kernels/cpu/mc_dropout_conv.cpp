// CPU mask passes of the MC-dropout convolution (entry points and semantics:
// bdlkern/mc_dropout/conv.h).
//
// Work is split into items of (row, piece of the row) so that a few large images keep both cores
// busy as well as many small ones. Element masks draw the words of a piece with the SIMD Philox
// (philox_simd.h) and select branch-free (mask_select.h); channel masks draw one word per channel
// and write whole planes. float16 / bfloat16 are computed in float. The unmask pass of a shared
// input sums the samples of each element in ascending order: the same bits for any thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <bdlkern/mc_dropout/conv.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include <algorithm>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "mask_select.h"
#include "philox_simd.h"

namespace bdlkern {
namespace {

using cpu::apply_mask;
using cpu::stream_words;

constexpr int64_t kPiece = 4096;  // elements of a row per work item (16 KiB of float32)

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

struct Layout {
  int64_t S, N, C, L, CL, rows, pieces;  // pieces per row (element masks), or 1 (channel masks)
};

Layout layout(const MCDropoutConvParams& p) {
  Layout l{p.num_samples, p.rows, p.channels, p.inner, p.channels * p.inner, 0, 1};
  l.rows = l.S * l.N;
  // Channel masks: a piece is a run of channels whose planes hold about kPiece elements.
  l.pieces = p.channel_mask ? std::max<int64_t>(1, std::min(l.C, l.CL / kPiece))
                            : (l.CL + kPiece - 1) / kPiece;
  return l;
}

// The mask group of row r: its sample with shared masks, else the row itself.
inline int64_t group_of(const MCDropoutConvParams& p, const Layout& l, int64_t r) {
  return p.shared_mask ? r / l.N : r;
}

// [lo, hi) of piece j of a row: elements, or channels for channel masks.
inline void piece_range(const MCDropoutConvParams& p, const Layout& l, int64_t j, int64_t* lo,
                        int64_t* hi) {
  if (p.channel_mask) {
    *lo = l.C * j / l.pieces;
    *hi = l.C * (j + 1) / l.pieces;
  } else {
    *lo = j * kPiece;
    *hi = std::min(l.CL, *lo + kPiece);
  }
}

template <typename T>
inline T from_acc(Acc<T> v) {
  return static_cast<T>(v);
}

// dst[k] = keep ? src[k] * scale : 0 over one piece, T any of the four dtypes. buf: Acc scratch.
template <typename T>
void select_piece(const MCDropoutConvParams& p, const uint32_t* words, const T* src, T* dst,
                  int64_t n, std::vector<Acc<T>>& buf) {
  using A = Acc<T>;
  const A scale = static_cast<A>(p.scale);
  if constexpr (std::is_same_v<T, A>) {
    apply_mask(src, words, p.threshold, scale, dst, n);
  } else {
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<A>(src[k]);
    apply_mask(buf.data(), words, p.threshold, scale, buf.data(), n);
    for (int64_t k = 0; k < n; ++k) dst[k] = from_acc<T>(buf[k]);
  }
}

template <typename T>
void mask_typed(const MCDropoutConvParams& p, const T* x, T* xm) {
  const Layout l = layout(p);
  const PhiloxStream stream = make_stream(p.rng_state, kStreamMCDropout);
  using A = Acc<T>;
  const A scale = static_cast<A>(p.scale);
  at::parallel_for(0, l.rows * l.pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(static_cast<size_t>(p.channel_mask ? l.C : kPiece));
    std::vector<A> buf(static_cast<size_t>(kPiece));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / l.pieces;
      int64_t lo, hi;
      piece_range(p, l, item % l.pieces, &lo, &hi);
      const T* src = x + (p.shared_input ? r % l.N : r) * l.CL;
      T* dst = xm + r * l.CL;
      const uint64_t g = static_cast<uint64_t>(group_of(p, l, r));
      if (p.channel_mask) {
        stream_words(stream, g * l.C + lo, hi - lo, words.data());
        for (int64_t c = lo; c < hi; ++c) {
          T* out = dst + c * l.L;
          if (keep_element(words[c - lo], p.threshold)) {
            const T* in = src + c * l.L;
            for (int64_t k = 0; k < l.L; ++k) out[k] = from_acc<T>(static_cast<A>(in[k]) * scale);
          } else {
            std::fill(out, out + l.L, T(0));
          }
        }
      } else {
        stream_words(stream, g * l.CL + lo, hi - lo, words.data());
        select_piece(p, words.data(), src + lo, dst + lo, hi - lo, buf);
      }
    }
  });
}

// Shared input: grad_x[n] = sum over s ascending of keep * scale * grad_xm[s N + n].
template <typename T>
void unmask_shared_typed(const MCDropoutConvParams& p, const T* g, T* gx) {
  const Layout l = layout(p);
  const PhiloxStream stream = make_stream(p.rng_state, kStreamMCDropout);
  using A = Acc<T>;
  const A scale = static_cast<A>(p.scale);
  at::parallel_for(0, l.N * l.pieces, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> words(static_cast<size_t>(p.channel_mask ? l.C : kPiece));
    std::vector<A> acc(static_cast<size_t>(p.channel_mask ? 0 : kPiece));
    std::vector<A> buf(static_cast<size_t>(kPiece));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / l.pieces;
      int64_t lo, hi;
      piece_range(p, l, item % l.pieces, &lo, &hi);
      T* dst = gx + n * l.CL;
      if (p.channel_mask) {
        // Plane by plane: zero, then add the samples that keep the channel, in order.
        for (int64_t c = lo; c < hi; ++c) std::fill(dst + c * l.L, dst + (c + 1) * l.L, T(0));
        std::vector<A> plane(static_cast<size_t>(l.L));
        for (int64_t c = lo; c < hi; ++c) {
          std::fill(plane.begin(), plane.end(), A(0));
          bool any = false;
          for (int64_t s = 0; s < l.S; ++s) {
            const int64_t r = s * l.N + n;
            const uint64_t grp = static_cast<uint64_t>(group_of(p, l, r));
            if (!keep_element(stream.word(grp * l.C + c), p.threshold)) continue;
            const T* src = g + r * l.CL + c * l.L;
            for (int64_t k = 0; k < l.L; ++k) plane[k] += static_cast<A>(src[k]) * scale;
            any = true;
          }
          if (any) {
            for (int64_t k = 0; k < l.L; ++k) dst[c * l.L + k] = from_acc<T>(plane[k]);
          }
        }
        continue;
      }
      const int64_t len = hi - lo;
      std::fill(acc.begin(), acc.begin() + len, A(0));
      for (int64_t s = 0; s < l.S; ++s) {
        const int64_t r = s * l.N + n;
        const uint64_t grp = static_cast<uint64_t>(group_of(p, l, r));
        stream_words(stream, grp * l.CL + lo, len, words.data());
        const T* src = g + r * l.CL + lo;
        for (int64_t k = 0; k < len; ++k) buf[k] = static_cast<A>(src[k]);
        apply_mask(buf.data(), words.data(), p.threshold, scale, buf.data(), len);
        for (int64_t k = 0; k < len; ++k) acc[k] += buf[k];
      }
      for (int64_t k = 0; k < len; ++k) dst[lo + k] = from_acc<T>(acc[k]);
    }
  });
}

template <class Fn>
void dispatch(DType dtype, const char* pass, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      return fn(static_cast<float*>(nullptr));
    case DType::kFloat64:
      return fn(static_cast<double*>(nullptr));
    case DType::kFloat16:
      return fn(static_cast<c10::Half*>(nullptr));
    case DType::kBFloat16:
      return fn(static_cast<c10::BFloat16*>(nullptr));
  }
  throw std::invalid_argument(std::string(pass) + ": unknown dtype");
}

}  // namespace

void mc_dropout_conv_mask(CpuTag, const MCDropoutConvParams& p, const void* x, void* xm) {
  if (p.num_samples * p.rows == 0) return;
  dispatch(p.dtype, "mc_dropout_conv_mask", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    mask_typed<T>(p, static_cast<const T*>(x), static_cast<T*>(xm));
  });
}

void mc_dropout_conv_unmask(CpuTag, const MCDropoutConvParams& p, const void* grad_xm,
                            void* grad_x) {
  if (p.num_samples * p.rows == 0) return;
  dispatch(p.dtype, "mc_dropout_conv_unmask", [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    if (p.shared_input) {
      unmask_shared_typed<T>(p, static_cast<const T*>(grad_xm), static_cast<T*>(grad_x));
    } else {
      // Per row, the gradient is the forward pass applied to grad_xm (the same flags and scale).
      mask_typed<T>(p, static_cast<const T*>(grad_xm), static_cast<T*>(grad_x));
    }
  });
}

}  // namespace bdlkern
