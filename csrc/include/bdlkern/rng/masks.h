// Dropout masks over logical coordinates, shared by the CPU and CUDA kernels.
//
// An MC-dropout mask element is addressed by (sample s, row b, input feature k) and maps to one
// element of the logical Philox stream (docs/design.md section 2.4, tag kStreamMCDropout):
//   per-element masks: index = (s * B + b) * K + k
//   shared masks:      index =  s * K + k          (one mask per sample and feature; every row of
//                                                   a sample sees it: a posterior weight sample)
// Because the index depends only on these coordinates, any tiling and any thread count produce
// the same mask, and the backward pass re-makes exactly the forward mask.
#pragma once

#include <stdint.h>

#include <bdlkern/common/macros.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

namespace bdlkern {

struct MCDropoutMask {
  PhiloxStream stream;
  uint64_t threshold;   // keep iff word < threshold (keep_threshold(p))
  int64_t rows;         // B: rows per sample
  int64_t in_features;  // K
  bool shared_mask;

  BDL_HDI uint64_t index(int64_t s, int64_t b, int64_t k) const {
    const int64_t row = shared_mask ? s : s * rows + b;
    return static_cast<uint64_t>(row * in_features + k);
  }

  // Keep flag of one element (costs one Philox block).
  BDL_HDI bool keep(int64_t s, int64_t b, int64_t k) const {
    return keep_element(stream.word(index(s, b, k)), threshold);
  }

  // Keep flags of features k0 .. k0+3 of (s, b). Costs one Philox block when index(s, b, k0) is a
  // multiple of 4 (K % 4 == 0 and k0 % 4 == 0), else two. Flags past the row end (k >= K) belong
  // to the next row's stream elements and must be ignored by the caller.
  BDL_HDI void keep4(int64_t s, int64_t b, int64_t k0, bool keep[4]) const {
    uint32_t w[4];
    stream.words4(index(s, b, k0), 4, w);
    for (int l = 0; l < 4; ++l) keep[l] = keep_element(w[l], threshold);
  }
};

}  // namespace bdlkern
