// Raw-pointer entry points of the MC-dropout convolution's mask passes (torch-free).
//
// The MC-dropout convolution is `y = conv(X * M / (1 - p), W, b)` over S samples of N images,
// folded sample-major into one batch of S N images (row r = s N + n). The convolution itself is
// ATen's (oneDNN / cuDNN); these passes are the two memory-bound steps around it:
//
//   mask:    xm[r, c, l] = x_row(r)[c, l] * keep(s, n, c, l) * scale        xm is [S N, C, L]
//   unmask:  grad_x[row(r), c, l] (+)= grad_xm[r, c, l] * keep(s, n, c, l) * scale
//            summed over s in ascending order when the input is shared by the samples
//
// with x_row(r) = x[n] when shared_input (x [N, C, L], the first MC layer of a network) and
// x[r] otherwise (x [S N, C, L]), L the product of the spatial sizes, scale = 1 / (1 - p).
//
// The keep flags are elements of the logical Philox stream with tag kStreamMCDropout (masks.h):
//   element masks:  index ((g * C) + c) * L + l        g = s N + n, or s with shared masks
//   channel masks:  index  (g * C) + c                 (one flag per channel, broadcast over l)
// so an element mask is the mc_dropout_linear mask of the input flattened to [.., C L], a channel
// mask that of the input's [.., C] channel vector, and a flag depends only on its logical
// coordinates: the same for a shared input and for its S copies, on every device and tiling.
#pragma once

#include <stdint.h>

#include <bdlkern/common/backend.h>
#include <bdlkern/common/dtype.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

namespace bdlkern {

struct MCDropoutConvParams {
  int64_t num_samples;   // S >= 1
  int64_t rows;          // N >= 0: images per sample
  int64_t channels;      // C >= 1
  int64_t inner;         // L >= 1: elements per channel plane (product of the spatial sizes)
  bool shared_input;     // x is [N, C, L] for every sample (else [S N, C, L], sample-major)
  bool channel_mask;     // one flag per (sample, image, channel) instead of per element
  bool shared_mask;      // the flags of a sample are shared by its N images
  uint64_t threshold;    // keep iff the stream word < threshold (random.h keep_threshold)
  double scale;          // 1 / (1 - p)
  const int64_t* rng_state;  // int64[2] (seed, offset) in the backend's memory, read in-kernel
  DType dtype;           // of x, xm and the gradients
  void* stream;          // cudaStream_t (CudaTag only)
};

#define BDLKERN_DECLARE_MC_DROPOUT_CONV_KERNELS(Tag)                                              \
  /* xm [S N, C, L] from x ([N, C, L] when shared_input, else [S N, C, L]) */                     \
  void mc_dropout_conv_mask(Tag, const MCDropoutConvParams& p, const void* x, void* xm);         \
  /* grad_x like x from grad_xm [S N, C, L]; may be in place when !shared_input */                \
  void mc_dropout_conv_unmask(Tag, const MCDropoutConvParams& p, const void* grad_xm,           \
                              void* grad_x);

BDLKERN_DECLARE_MC_DROPOUT_CONV_KERNELS(CpuTag)
BDLKERN_DECLARE_MC_DROPOUT_CONV_KERNELS(CudaTag)
BDLKERN_DECLARE_MC_DROPOUT_CONV_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_MC_DROPOUT_CONV_KERNELS

// Shared channel masks: the kept channels of sample s, ascending, into kept [C]; returns how
// many. Host code (rng_state in host memory): the binding runs the convolution of sample s on
// those channels only.
inline int64_t mc_dropout_conv_kept_channels(const MCDropoutConvParams& p, int64_t s,
                                             int64_t* kept) {
  const PhiloxStream stream = make_stream(p.rng_state, kStreamMCDropout);
  int64_t count = 0;
  for (int64_t c = 0; c < p.channels; ++c) {
    if (keep_element(stream.word(static_cast<uint64_t>(s * p.channels + c)), p.threshold)) {
      kept[count++] = c;
    }
  }
  return count;
}

}  // namespace bdlkern
