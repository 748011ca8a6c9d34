// Bindings of the SIMT emulator self-test kernels (namespace bdlkern_simt, test-only): CPU
// tensors run them under the emulator, CUDA tensors on the GPU.
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "selftest_kernels.h"

#include <tuple>

#include "../torch/backend_traits.h"

namespace bdlkern {
namespace ops {

inline void define_selftest_schemas(torch::Library& m) {
  // legacy_stream: launch on the legacy default stream (nullptr) instead of the current one, which
  // the emulator must refuse.
  m.def("selftest_indices(Tensor like, int[] grid, int[] block, bool legacy_stream=False) -> Tensor");
  m.def("selftest_block_sum(Tensor x) -> (Tensor, Tensor)");
  m.def("selftest_bad_barrier(Tensor like, int mode, int threads) -> Tensor");
  m.def("selftest_shared_poison(Tensor like, int blocks) -> Tensor");
  m.def("selftest_big_shared(Tensor like) -> Tensor");
  m.def("selftest_shuffle(Tensor x, int threads) -> Tensor");
  m.def("selftest_atomic_add(Tensor x, Tensor xd, int blocks, int threads) -> Tensor");
  m.def(
      "selftest_wmma(Tensor a, bool a_col, Tensor b, bool b_col, Tensor? c, bool c_col, "
      "float fill, ScalarType acc_dtype, bool d_col) -> Tensor");
}

template <class Tag>
struct SelftestOps {
  static void check_device(const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().type() == BackendTraits<Tag>::device_type, "selftest: ", name,
                " is on the wrong device: ", t.device());
    TORCH_CHECK(t.is_contiguous(), "selftest: ", name, " must be contiguous");
  }

  static at::Tensor indices(const at::Tensor& like, c10::IntArrayRef grid, c10::IntArrayRef block,
                            bool legacy_stream) {
    check_device(like, "like");
    TORCH_CHECK(grid.size() == 3 && block.size() == 3, "selftest_indices: grid and block are 3-d");
    uint32_t g[3], b[3];
    int64_t total = 1;
    for (int k = 0; k < 3; ++k) {
      TORCH_CHECK(grid[k] >= 1 && block[k] >= 1, "selftest_indices: dimensions must be >= 1");
      g[k] = static_cast<uint32_t>(grid[k]);
      b[k] = static_cast<uint32_t>(block[k]);
      total *= grid[k] * block[k];
    }
    at::OptionalDeviceGuard guard(like.device());
    at::Tensor out = at::empty({total, kSelftestIndexFields}, like.options().dtype(at::kInt));
    selftest_indices(Tag{}, legacy_stream ? nullptr : BackendTraits<Tag>::stream(like), out.data_ptr<int32_t>(), g, b);
    return out;
  }

  static at::Tensor bad_barrier(const at::Tensor& like, int64_t mode, int64_t threads) {
    check_device(like, "like");
    TORCH_CHECK((mode == 0 || mode == 1) && threads >= 2 && threads <= 1024,
                "selftest_bad_barrier: mode 0 or 1 and 2 to 1024 threads");
    at::Tensor out = at::zeros({threads}, like.options().dtype(at::kInt));
    selftest_bad_barrier(Tag{}, BackendTraits<Tag>::stream(like), static_cast<int>(mode),
                         static_cast<int>(threads), out.data_ptr<int32_t>());
    return out;
  }

  // [blocks, kSelftestPoisonThreads] int32: what each thread read of shared memory before writing.
  static at::Tensor shared_poison(const at::Tensor& like, int64_t blocks) {
    check_device(like, "like");
    TORCH_CHECK(blocks >= 1 && blocks <= 1024, "selftest_shared_poison: 1 to 1024 blocks");
    at::Tensor out = at::empty({blocks, kSelftestPoisonThreads}, like.options().dtype(at::kInt));
    selftest_shared_poison(Tag{}, BackendTraits<Tag>::stream(like), static_cast<int>(blocks),
                           reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()));
    return out;
  }

  static at::Tensor big_shared(const at::Tensor& like) {
    check_device(like, "like");
    at::Tensor out = at::zeros({2}, like.options().dtype(at::kFloat));
    selftest_big_shared(Tag{}, BackendTraits<Tag>::stream(like), out.data_ptr<float>());
    return out;
  }

  static std::tuple<at::Tensor, at::Tensor> block_sum(const at::Tensor& x) {
    check_device(x, "x");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "selftest_block_sum: x must be float32");
    at::OptionalDeviceGuard guard(x.device());
    const int64_t n = x.numel();
    const int64_t blocks = (n + kSelftestReduceThreads - 1) / kSelftestReduceThreads;
    at::Tensor sums = at::empty({blocks}, x.options());
    at::Tensor reversed = at::empty({n}, x.options());
    selftest_block_sum(Tag{}, BackendTraits<Tag>::stream(x), x.const_data_ptr<float>(), n, sums.data_ptr<float>(),
                       reversed.data_ptr<float>());
    return {sums, reversed};
  }

  static at::Tensor shuffle(const at::Tensor& x, int64_t threads) {
    check_device(x, "x");
    TORCH_CHECK(x.scalar_type() == at::kFloat, "selftest_shuffle: x must be float32");
    TORCH_CHECK(threads >= 32 && threads <= 1024 && threads % 32 == 0,
                "selftest_shuffle: threads must be a multiple of 32 in [32, 1024]");
    at::OptionalDeviceGuard guard(x.device());
    at::Tensor out = at::empty({x.numel(), kSelftestShuffleFields}, x.options());
    selftest_shuffle(Tag{}, BackendTraits<Tag>::stream(x), x.const_data_ptr<float>(), x.numel(), static_cast<int>(threads),
                     out.data_ptr<float>());
    return out;
  }

  // Returns float64 [5]: float total, double total, int count, unsigned count, index sum.
  static at::Tensor atomic_add(const at::Tensor& x, const at::Tensor& xd, int64_t blocks,
                               int64_t threads) {
    check_device(x, "x");
    check_device(xd, "xd");
    TORCH_CHECK(x.scalar_type() == at::kFloat && xd.scalar_type() == at::kDouble &&
                    x.numel() == xd.numel(),
                "selftest_atomic_add: x float32 and xd float64 of one size");
    TORCH_CHECK(blocks >= 1 && threads >= 1 && threads <= 1024, "selftest_atomic_add: bad launch");
    at::OptionalDeviceGuard guard(x.device());
    // One zeroed int64 buffer carved into the five accumulators (each 8-byte aligned).
    at::Tensor acc = at::zeros({5}, x.options().dtype(at::kLong));
    auto* base = reinterpret_cast<char*>(acc.data_ptr<int64_t>());
    selftest_atomic_add(Tag{}, BackendTraits<Tag>::stream(x), x.const_data_ptr<float>(), xd.const_data_ptr<double>(), x.numel(),
                        static_cast<int>(blocks), static_cast<int>(threads),
                        reinterpret_cast<float*>(base), reinterpret_cast<double*>(base + 8),
                        reinterpret_cast<int*>(base + 16), reinterpret_cast<unsigned*>(base + 24),
                        reinterpret_cast<unsigned long long*>(base + 32));
    at::Tensor host = acc.cpu();
    const char* h = reinterpret_cast<const char*>(host.const_data_ptr<int64_t>());
    float f;
    double d;
    int ci;
    unsigned cu;
    unsigned long long is;
    memcpy(&f, h, sizeof f);
    memcpy(&d, h + 8, sizeof d);
    memcpy(&ci, h + 16, sizeof ci);
    memcpy(&cu, h + 24, sizeof cu);
    memcpy(&is, h + 32, sizeof is);
    at::Tensor out = at::empty({5}, at::TensorOptions().dtype(at::kDouble));
    double* o = out.data_ptr<double>();
    o[0] = f;
    o[1] = d;
    o[2] = ci;
    o[3] = cu;
    o[4] = static_cast<double>(is);
    return out;
  }

  static at::Tensor wmma(const at::Tensor& a, bool a_col, const at::Tensor& b, bool b_col,
                         const std::optional<at::Tensor>& c, bool c_col, double fill,
                         at::ScalarType acc_dtype, bool d_col) {
    check_device(a, "a");
    check_device(b, "b");
    TORCH_CHECK(a.scalar_type() == b.scalar_type(), "selftest_wmma: a and b need one dtype");
    TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == 16 && b.size(0) == 16 &&
                    a.size(1) >= 16 && b.size(1) >= 16,
                "selftest_wmma: a and b are [16, ld >= 16] (ld = leading dimension)");
    int type;
    if (a.scalar_type() == at::kHalf && acc_dtype == at::kFloat) {
      type = kWmmaHalfFloat;
    } else if (a.scalar_type() == at::kHalf && acc_dtype == at::kHalf) {
      type = kWmmaHalfHalf;
    } else if (a.scalar_type() == at::kBFloat16 && acc_dtype == at::kFloat) {
      type = kWmmaBf16Float;
    } else {
      TORCH_CHECK(false, "selftest_wmma: unsupported types ", a.scalar_type(), " -> ", acc_dtype);
    }
    const void* c_ptr = nullptr;
    int ldc = 16;
    if (c.has_value()) {
      check_device(*c, "c");
      TORCH_CHECK(c->scalar_type() == acc_dtype && c->dim() == 2 && c->size(0) == 16 &&
                      c->size(1) >= 16,
                  "selftest_wmma: c is [16, ld >= 16] of acc_dtype");
      c_ptr = c->const_data_ptr();
      ldc = static_cast<int>(c->size(1));
    }
    at::OptionalDeviceGuard guard(a.device());
    at::Tensor d = at::zeros({16, 16}, a.options().dtype(acc_dtype));
    selftest_wmma(Tag{}, BackendTraits<Tag>::stream(a), type, a.const_data_ptr(), static_cast<int>(a.size(1)), a_col,
                  b.const_data_ptr(), static_cast<int>(b.size(1)), b_col, c_ptr, ldc, c_col,
                  !c.has_value(), static_cast<float>(fill), d.data_ptr(), 16, d_col);
    return d;
  }

  static void register_impls(torch::Library& m) {
    m.impl("selftest_indices", &indices);
    m.impl("selftest_block_sum", &block_sum);
    m.impl("selftest_bad_barrier", &bad_barrier);
    m.impl("selftest_shared_poison", &shared_poison);
    m.impl("selftest_big_shared", &big_shared);
    m.impl("selftest_shuffle", &shuffle);
    m.impl("selftest_atomic_add", &atomic_add);
    m.impl("selftest_wmma", &wmma);
  }
};

}  // namespace ops
}  // namespace bdlkern
