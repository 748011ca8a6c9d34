// Counter arithmetic of the logical Philox stream near the 2^32, 2^63 and 2^64 boundaries, checked
// on the shared headers directly (no tensors, so indices of 2^62 cost nothing). Torch-free.
//
// The kernels address random numbers only through these helpers: PhiloxStream::block / word /
// words4 (the counter of element i is i/4 + offset mod 2^64, split into two 32-bit words),
// normal_at (Box-Muller on the element's lane pair) and MCDropoutMask::index / keep / keep4. The
// reference below recomputes every counter with 128-bit integers and an explicit split, so a lost
// carry between the counter words, a 32-bit truncation, or a wrong wrap at 2^64 shows up here.
//
// Run by ctest (CMakeLists.txt) and, with -fsanitize=address,undefined (signed overflow in the
// index products is undefined behaviour, so UBSan checks it), by tools/sanitize.sh:
//   g++ -std=c++20 -O1 -Icsrc/include tests/cpp/counter_test.cpp -o /tmp/counter_test
#include <bdlkern/rng/masks.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <vector>

namespace {

using u128 = unsigned __int128;
using bdlkern::PhiloxBlock;
using bdlkern::PhiloxStream;

int failures = 0;

void expect(bool ok, const char* what, unsigned long long a, unsigned long long b) {
  if (!ok) {
    if (++failures <= 20) std::fprintf(stderr, "FAIL %s (%llx, %llx)\n", what, a, b);
  }
}

constexpr uint64_t kTwo32 = uint64_t{1} << 32;
constexpr uint64_t kTwo63 = uint64_t{1} << 63;
constexpr uint64_t kMax64 = ~uint64_t{0};

// Word of logical element i, the counter computed in 128 bits and reduced mod 2^64 by hand.
uint32_t ref_word(uint64_t seed, uint64_t offset, uint32_t tag, uint64_t i) {
  const u128 sum = static_cast<u128>(i / 4) + static_cast<u128>(offset);
  const u128 b = sum % (static_cast<u128>(1) << 64);
  const uint32_t c0 = static_cast<uint32_t>(b & 0xffffffffu);
  const uint32_t c1 = static_cast<uint32_t>((b >> 32) & 0xffffffffu);
  const PhiloxBlock blk = bdlkern::philox4x32_10(c0, c1, tag, 0u, static_cast<uint32_t>(seed & 0xffffffffu),
                                                 static_cast<uint32_t>(seed >> 32));
  return blk.w[i % 4];
}

// The contract vector (docs/design.md section 2.5) whose offset 2^32 - 1 makes block 1 carry
// into counter word 1.
void test_contract_carry() {
  const uint32_t expected[8] = {0xc2cc56c6, 0x8c2981bf, 0xeb48860d, 0x57ce8e18,
                                0x37e0f5a2, 0x291c60e3, 0x3cfecf69, 0xb640ab01};
  const PhiloxStream stream{42, kTwo32 - 1, 2};
  for (uint64_t i = 0; i < 8; ++i) {
    expect(stream.word(i) == expected[i], "contract vector (42, 2^32-1, stream 2)", i, stream.word(i));
    expect(ref_word(42, kTwo32 - 1, 2, i) == expected[i], "reference contract vector", i, expected[i]);
  }
}

// Element indices around every boundary the block counter (i/4 + offset) can cross.
std::vector<uint64_t> boundary_indices() {
  std::vector<uint64_t> out;
  for (uint64_t base : {uint64_t{0}, 4 * kTwo32, kTwo63, kMax64 - 11}) {
    for (uint64_t d = 0; d < 12; ++d) out.push_back(base + d);
  }
  for (uint64_t d = 1; d <= 9; ++d) out.push_back(4 * kTwo32 - d);  // last elements below 2^34
  for (uint64_t d = 1; d <= 9; ++d) out.push_back(kTwo63 - d);
  return out;
}

const uint64_t kOffsets[] = {0,          1,          kTwo32 - 2, kTwo32 - 1, kTwo32,     kTwo32 + 1,
                             kTwo63 - 2, kTwo63 - 1, kTwo63,     kMax64 - 1, kMax64,     0x0123456789abcdefull};
const uint64_t kSeeds[] = {0, 42, 0xdeadbeefcafef00dull, kMax64};

void test_words() {
  for (uint64_t seed : kSeeds) {
    for (uint64_t offset : kOffsets) {
      for (uint32_t tag : {0u, 3u}) {
        const PhiloxStream stream{seed, offset, tag};
        for (uint64_t i : boundary_indices()) {
          const uint32_t want = ref_word(seed, offset, tag, i);
          expect(stream.word(i) == want, "word(i)", i, offset);
          // words4 from i for every count of valid words; elements past 2^64 - 1 do not exist.
          for (int valid = 1; valid <= 4; ++valid) {
            if (kMax64 - i < static_cast<uint64_t>(valid - 1)) break;
            uint32_t w[4];
            stream.words4(i, valid, w);
            for (int j = 0; j < valid; ++j) {
              expect(w[j] == ref_word(seed, offset, tag, i + j), "words4(i)", i + j, offset);
            }
          }
        }
      }
    }
  }
}

void test_normal_at() {
  const PhiloxStream stream{0xdeadbeefcafef00dull, kTwo32 - 1, 4};
  for (uint64_t i : boundary_indices()) {
    const uint64_t pair = i & ~uint64_t{1};  // the first element of i's lane pair
    const uint32_t a = ref_word(stream.seed, stream.offset, stream.tag, pair);
    const uint32_t b = ref_word(stream.seed, stream.offset, stream.tag, pair + 1);
    float f0, f1;
    double d0, d1;
    bdlkern::box_muller(a, b, &f0, &f1);
    bdlkern::box_muller(a, b, &d0, &d1);
    const float f = bdlkern::normal_at<float>(stream, i);
    const double d = bdlkern::normal_at<double>(stream, i);
    expect(std::memcmp(&f, (i & 1) ? &f1 : &f0, sizeof f) == 0, "normal_at<float>", i, 0);
    expect(std::memcmp(&d, (i & 1) ? &d1 : &d0, sizeof d) == 0, "normal_at<double>", i, 0);
  }
}

// MC-dropout mask addressing with element counts far beyond 2^32: the index products stay exact
// in 64 bits (and free of signed overflow) up to the largest logical index below 2^63.
void test_mask_index() {
  struct Dims {
    int64_t S, B, K;
  };
  const Dims dims[] = {{3, int64_t{1} << 20, int64_t{1} << 13},        // S*B*K > 2^32
                       {3, (int64_t{1} << 31) + 7, (int64_t{1} << 30) - 1},  // S*B*K = 0.75 * 2^63
                       {1, 1, (int64_t{1} << 62) + 3}};                // one huge row
  for (const Dims& d : dims) {
    for (bool shared : {false, true}) {
      bdlkern::MCDropoutMask mask{PhiloxStream{7, kTwo32 - 3, 1}, bdlkern::keep_threshold(0.5), d.B, d.K,
                                  shared};
      for (int64_t s : {int64_t{0}, d.S - 1}) {
        for (int64_t b : {int64_t{0}, d.B - 1}) {
          for (int64_t k0 : {int64_t{0}, d.K - 4, d.K - 3, d.K / 2 + 1}) {
            if (k0 < 0) continue;
            const u128 row = shared ? static_cast<u128>(s) : static_cast<u128>(s) * d.B + b;
            const u128 want = row * static_cast<u128>(d.K) + static_cast<u128>(k0);
            expect(want < (static_cast<u128>(1) << 63), "test dims within int64", s, b);
            const uint64_t got = mask.index(s, b, k0);
            expect(static_cast<u128>(got) == want, "MCDropoutMask::index", got, static_cast<uint64_t>(want));
            bool flags[4];
            mask.keep4(s, b, k0, flags);
            for (int l = 0; l < 4 && k0 + l < d.K; ++l) {
              const bool ref = ref_word(7, kTwo32 - 3, 1, static_cast<uint64_t>(want) + l) < mask.threshold;
              expect(flags[l] == ref, "MCDropoutMask::keep4", static_cast<uint64_t>(want) + l, l);
              expect(mask.keep(s, b, k0 + l) == ref, "MCDropoutMask::keep", static_cast<uint64_t>(want) + l, l);
            }
          }
        }
      }
    }
  }
}

}  // namespace

int main() {
  test_contract_carry();
  test_words();
  test_normal_at();
  test_mask_index();
  if (failures) {
    std::fprintf(stderr, "counter_test: %d failures\n", failures);
    return 1;
  }
  std::printf("counter_test: all counter checks passed\n");
  return 0;
}
