// Bindings of the random-stream ops: check arguments, allocate the output, call the raw-pointer
// kernel of backend `Tag` (CpuTag, CudaTag or SimtTag; see bdlkern/common/backend.h).
#pragma once

#include <ATen/DeviceGuard.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <bdlkern/rng/kernels.h>

#include <tuple>

#include "backend_traits.h"
#include "checks.h"

namespace bdlkern {
namespace ops {

template <class Tag>
struct RngOps {
  using Traits = BackendTraits<Tag>;

  static at::Tensor prepare(const at::Tensor& rng_state, c10::IntArrayRef size, int64_t stream,
                            const char* op, at::ScalarType dtype, uint32_t* tag,
                            at::Tensor* state) {
    check_rng_state(rng_state, Traits::device_type, op);
    *tag = check_stream(stream, op);
    check_size(size, op);
    *state = rng_state.contiguous();
    return at::empty(size, rng_state.options().dtype(dtype));
  }

  // Raw Philox4x32-10 on explicit (counter, key) pairs, for known-answer tests.
  static at::Tensor philox4x32(const at::Tensor& counter, const at::Tensor& key) {
    for (const auto& [t, name, words] :
         {std::tuple<const at::Tensor&, const char*, int64_t>{counter, "counter", 4},
          std::tuple<const at::Tensor&, const char*, int64_t>{key, "key", 2}}) {
      TORCH_CHECK(t.scalar_type() == at::kLong, "philox4x32: ", name, " must be int64, got ",
                  t.scalar_type());
      TORCH_CHECK(t.dim() >= 1 && t.size(-1) == words, "philox4x32: ", name,
                  " must have shape [..., ", words, "], got ", t.sizes());
      TORCH_CHECK(t.device().type() == Traits::device_type, "philox4x32: ", name,
                  " must be on ", c10::DeviceTypeName(Traits::device_type, true), ", got ",
                  t.device());
    }
    TORCH_CHECK(counter.sizes().slice(0, counter.dim() - 1) == key.sizes().slice(0, key.dim() - 1),
                "philox4x32: counter [..., 4] and key [..., 2] need the same leading shape, got ",
                counter.sizes(), " and ", key.sizes());
    at::OptionalDeviceGuard guard(counter.device());
    const at::Tensor c = counter.contiguous();
    const at::Tensor k = key.contiguous();
    at::Tensor out = at::empty_like(c);
    bdlkern::philox4x32(Tag{}, c.const_data_ptr<int64_t>(), k.const_data_ptr<int64_t>(),
                        out.data_ptr<int64_t>(), c.numel() / 4, Traits::stream(out));
    return out;
  }

  static at::Tensor philox_bits(const at::Tensor& rng_state, c10::IntArrayRef size,
                                int64_t stream) {
    uint32_t tag;
    at::Tensor state;
    at::OptionalDeviceGuard guard(rng_state.device());
    at::Tensor out = prepare(rng_state, size, stream, "philox_bits", at::kInt, &tag, &state);
    bdlkern::philox_bits(Tag{}, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), out.numel(),
                         state.const_data_ptr<int64_t>(), tag, Traits::stream(out));
    return out;
  }

  static at::Tensor dropout_mask(const at::Tensor& rng_state, c10::IntArrayRef size, double p,
                                 int64_t stream) {
    check_probability(p, "p", "dropout_mask");
    uint32_t tag;
    at::Tensor state;
    at::OptionalDeviceGuard guard(rng_state.device());
    at::Tensor out = prepare(rng_state, size, stream, "dropout_mask", at::kBool, &tag, &state);
    bdlkern::dropout_mask(Tag{}, out.data_ptr<bool>(), out.numel(),
                          state.const_data_ptr<int64_t>(), tag, keep_threshold(p),
                          Traits::stream(out));
    return out;
  }

  // uniform and normal share everything but the kernel.
  template <typename KernelF, typename KernelD>
  static at::Tensor real_stream(const at::Tensor& rng_state, c10::IntArrayRef size,
                                int64_t stream, std::optional<at::ScalarType> dtype,
                                const char* op, KernelF kernel_f, KernelD kernel_d) {
    const at::ScalarType st = dtype.value_or(at::kFloat);
    TORCH_CHECK(st == at::kFloat || st == at::kDouble, op,
                ": dtype must be torch.float32 or torch.float64, got ", st);
    uint32_t tag;
    at::Tensor state;
    at::OptionalDeviceGuard guard(rng_state.device());
    at::Tensor out = prepare(rng_state, size, stream, op, st, &tag, &state);
    const int64_t* s = state.const_data_ptr<int64_t>();
    if (st == at::kFloat) {
      kernel_f(out.data_ptr<float>(), out.numel(), s, tag, Traits::stream(out));
    } else {
      kernel_d(out.data_ptr<double>(), out.numel(), s, tag, Traits::stream(out));
    }
    return out;
  }

  static at::Tensor uniform(const at::Tensor& rng_state, c10::IntArrayRef size, int64_t stream,
                            std::optional<at::ScalarType> dtype) {
    return real_stream(
        rng_state, size, stream, dtype, "uniform",
        [](float* o, int64_t n, const int64_t* s, uint32_t t, void* cs) {
          bdlkern::uniform(Tag{}, o, n, s, t, cs);
        },
        [](double* o, int64_t n, const int64_t* s, uint32_t t, void* cs) {
          bdlkern::uniform(Tag{}, o, n, s, t, cs);
        });
  }

  static at::Tensor normal(const at::Tensor& rng_state, c10::IntArrayRef size, int64_t stream,
                           std::optional<at::ScalarType> dtype) {
    return real_stream(
        rng_state, size, stream, dtype, "normal",
        [](float* o, int64_t n, const int64_t* s, uint32_t t, void* cs) {
          bdlkern::normal(Tag{}, o, n, s, t, cs);
        },
        [](double* o, int64_t n, const int64_t* s, uint32_t t, void* cs) {
          bdlkern::normal(Tag{}, o, n, s, t, cs);
        });
  }

  static void register_impls(torch::Library& m) {
    m.impl("philox4x32", &philox4x32);
    m.impl("philox_bits", &philox_bits);
    m.impl("dropout_mask", &dropout_mask);
    m.impl("uniform", &uniform);
    m.impl("normal", &normal);
  }
};

}  // namespace ops
}  // namespace bdlkern
