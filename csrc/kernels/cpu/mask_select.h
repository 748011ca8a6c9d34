// The branch-free keep/drop select of the CPU mask passes (MC-dropout linear and convolution).
#pragma once

#include <stdint.h>

#include <bit>
#include <type_traits>

namespace bdlkern {
namespace cpu {

// out[k] = keep(word[k]) ? x[k] * scale : 0. The threshold is < 2^32 unless p == 0, where
// every element is kept. The select is done on the bits (an all-ones or all-zeros mask ANDed
// with the scaled value): random keep flags would mispredict a branch half the time (measured
// 6x slower), and a multiply by 0 would turn a dropped NaN into NaN instead of 0. In place is
// fine (out == x).
template <typename T>
void apply_mask(const T* x, const uint32_t* words, uint64_t threshold, T scale, T* out,
                int64_t n) {
  static_assert(std::is_floating_point_v<T>, "apply_mask: float or double");
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

}  // namespace cpu
}  // namespace bdlkern
