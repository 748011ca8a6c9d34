// C++ smoke test of libbdlkern_ops: the operators are reached through the torch dispatcher only
// (no bdlkern symbol is referenced), as a C++ user of the installed library would call them.
//
// Checks the contract words of the logical Philox stream (docs/design.md section 2.5), the
// dropout_mask edge cases p = 0 / p = 1, and that bad input raises c10::Error. Exits non-zero on
// any failure.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymIntArrayRef.h>
#include <c10/util/Exception.h>

#if defined(BDLKERN_WITH_CUDA)
#include <ATen/Context.h>
#endif

#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace {

int g_failed = 0;
int g_passed = 0;

void check(bool ok, const std::string& what) {
  if (ok) {
    ++g_passed;
  } else {
    ++g_failed;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

// Runs one check body; an unexpected exception is a failure, not a crash.
void run(const char* name, const std::function<void()>& body) {
  try {
    body();
  } catch (const std::exception& e) {
    ++g_failed;
    std::fprintf(stderr, "FAIL: %s threw: %s\n", name, e.what());
  }
}

// The schemas take `SymInt[] size`; through the dispatcher that is c10::SymIntArrayRef (the
// IntArrayRef kernels registered by the library are adapted by the dispatcher).
using PhiloxBitsFn = at::Tensor(const at::Tensor&, c10::SymIntArrayRef, int64_t);
using DropoutMaskFn = at::Tensor(const at::Tensor&, c10::SymIntArrayRef, double, int64_t);

c10::TypedOperatorHandle<PhiloxBitsFn> philox_bits_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bdlkern::philox_bits", "")
                             .typed<PhiloxBitsFn>();
  return op;
}

c10::TypedOperatorHandle<DropoutMaskFn> dropout_mask_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bdlkern::dropout_mask", "")
                             .typed<DropoutMaskFn>();
  return op;
}

at::Tensor rng_state(uint64_t seed, uint64_t offset) {
  at::Tensor s = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  s.data_ptr<int64_t>()[0] = static_cast<int64_t>(seed);
  s.data_ptr<int64_t>()[1] = static_cast<int64_t>(offset);
  return s;
}

at::Tensor philox_bits(const at::Tensor& state, std::vector<int64_t> size, int64_t stream) {
  return philox_bits_op().call(state, c10::fromIntArrayRefSlow(size), stream);
}

at::Tensor dropout_mask(const at::Tensor& state, std::vector<int64_t> size, double p,
                        int64_t stream) {
  return dropout_mask_op().call(state, c10::fromIntArrayRefSlow(size), p, stream);
}

std::string hex_words(const at::Tensor& words, int64_t count) {
  std::string out;
  const at::Tensor w = words.contiguous();
  for (int64_t i = 0; i < count && i < w.numel(); ++i) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "%s%08" PRIx32, i ? " " : "",
                  static_cast<uint32_t>(w.const_data_ptr<int32_t>()[i]));
    out += buf;
  }
  return out;
}

struct Contract {
  uint64_t seed, offset;
  int64_t stream;
  const char* words;  // first 8 words of the stream, as uint32
};

// docs/design.md section 2.5: (seed, offset, stream) -> first 8 words of the logical stream.
constexpr Contract kContract[] = {
    {0, 0, 0, "6627e8d5 e169c58d bc57ac4c 9b00dbd8 f8e4cca4 5cb200db b1a574eb 097eff67"},
    {0x0123456789abcdefULL, 5, 1,
     "22252b2a dcea3022 86f0ceb0 d1cdb8d1 36a9b705 57a35841 77c50247 a49265f3"},
    {42, 0xffffffffULL, 2,
     "c2cc56c6 8c2981bf eb48860d 57ce8e18 37e0f5a2 291c60e3 3cfecf69 b640ab01"},
};

bool all_equal(const at::Tensor& mask, bool value) {
  const at::Tensor m = mask.contiguous();
  const bool* p = m.const_data_ptr<bool>();
  for (int64_t i = 0; i < m.numel(); ++i) {
    if (p[i] != value) return false;
  }
  return true;
}

}  // namespace

int main() {
  // The library registers its operators from static initialisers; if it was dropped at link time
  // (--as-needed) or not loaded, there is nothing to test.
  if (!c10::Dispatcher::singleton().findSchema({"bdlkern::philox_bits", ""}).has_value()) {
    std::fprintf(stderr,
                 "FAIL: operator bdlkern::philox_bits is not registered: libbdlkern_ops was not "
                 "loaded (link it with -Wl,--no-as-needed, or dlopen it)\n");
    return 1;
  }

  for (const Contract& c : kContract) {
    char name[96];
    std::snprintf(name, sizeof name, "philox_bits(seed=%#" PRIx64 ", offset=%" PRIu64
                  ", stream=%" PRId64 ")", c.seed, c.offset, c.stream);
    run(name, [&] {
      const at::Tensor bits = philox_bits(rng_state(c.seed, c.offset), {8}, c.stream);
      check(bits.scalar_type() == at::kInt && bits.dim() == 1 && bits.size(0) == 8,
            std::string(name) + ": expected int32[8]");
      const std::string got = hex_words(bits, 8);
      check(got == c.words, std::string(name) + ":\n  got      " + got + "\n  expected " + c.words);
      // Element i depends only on i: a large, multi-dimensional request (split over threads by
      // at::parallel_for) starts with the same words.
      const at::Tensor big = philox_bits(rng_state(c.seed, c.offset), {1000, 259}, c.stream);
      check(big.size(0) == 1000 && big.size(1) == 259, std::string(name) + ": shape [1000, 259]");
      check(hex_words(big.reshape({-1}), 8) == c.words,
            std::string(name) + ": a [1000, 259] request must start with the same 8 words");
    });
  }

  // The IntArrayRef form of the typed handle works for the SymInt[] schema as well.
  run("philox_bits via IntArrayRef", [] {
    const auto op = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("bdlkern::philox_bits", "")
                        .typed<at::Tensor(const at::Tensor&, c10::IntArrayRef, int64_t)>();
    const at::Tensor bits = op.call(rng_state(0, 0), {8}, 0);
    check(hex_words(bits, 8) == kContract[0].words, "philox_bits via IntArrayRef: words");
  });

  run("dropout_mask", [] {
    const at::Tensor keep_all = dropout_mask(rng_state(7, 0), {33, 65}, 0.0, 0);
    check(keep_all.scalar_type() == at::kBool, "dropout_mask: dtype must be bool");
    check(keep_all.size(0) == 33 && keep_all.size(1) == 65, "dropout_mask: shape [33, 65]");
    check(all_equal(keep_all, true), "dropout_mask(p=0) must keep every element");
    const at::Tensor drop_all = dropout_mask(rng_state(7, 0), {33, 65}, 1.0, 0);
    check(all_equal(drop_all, false), "dropout_mask(p=1) must drop every element");
    const at::Tensor half = dropout_mask(rng_state(7, 0), {1 << 16}, 0.5, 0);
    const int64_t kept = half.sum().item<int64_t>();
    check(kept > 31000 && kept < 34500,
          "dropout_mask(p=0.5): kept " + std::to_string(kept) + " of 65536");
  });

  run("invalid arguments", [] {
    bool threw = false;
    try {
      philox_bits(rng_state(0, 0), {8}, 99);
    } catch (const c10::Error& e) {
      threw = std::string(e.what_without_backtrace()).find("stream") != std::string::npos;
    }
    check(threw, "philox_bits(stream=99) must raise c10::Error naming the stream");
    threw = false;
    try {
      dropout_mask(rng_state(0, 0), {8}, 0.5, 99);
    } catch (const c10::Error&) {
      threw = true;
    }
    check(threw, "dropout_mask(stream=99) must raise c10::Error");
    threw = false;
    try {
      dropout_mask(rng_state(0, 0), {8}, 1.5, 0);
    } catch (const c10::Error&) {
      threw = true;
    }
    check(threw, "dropout_mask(p=1.5) must raise c10::Error");
  });

#if defined(BDLKERN_WITH_CUDA)
  // With a GPU, the CUDA kernels must give the same words as the CPU ones.
  if (at::globalContext().hasCUDA()) {
    run("philox_bits on CUDA", [] {
      for (const Contract& c : kContract) {
        const at::Tensor state = rng_state(c.seed, c.offset).to(at::Device(at::kCUDA));
        const at::Tensor bits = philox_bits(state, {1000, 259}, c.stream).cpu();
        const at::Tensor ref = philox_bits(rng_state(c.seed, c.offset), {1000, 259}, c.stream);
        check(hex_words(bits, 8) == c.words, "philox_bits on CUDA: contract words");
        check(bits.equal(ref), "philox_bits on CUDA must equal the CPU result");
        const at::Tensor mask = dropout_mask(state, {4096}, 0.3, c.stream).cpu();
        check(mask.equal(dropout_mask(rng_state(c.seed, c.offset), {4096}, 0.3, c.stream)),
              "dropout_mask on CUDA must equal the CPU result");
      }
    });
  } else {
    std::printf("bdlkern_smoke: built with CUDA, no GPU visible: CUDA checks skipped\n");
  }
#endif

  std::printf("bdlkern_smoke: %d checks passed, %d failed\n", g_passed, g_failed);
  return g_failed == 0 ? 0 : 1;
}
