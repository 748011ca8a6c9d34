// Argument validation shared by every binding (CPU, CUDA, SIMT). Each check names the op and the
// argument and says what was expected, so a user sees a Python exception they can act on.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <bdlkern/rng/random.h>

#include <cmath>

namespace bdlkern {
namespace ops {

// rng_state: int64[2] = (seed, offset) on the device the kernel runs on.
inline void check_rng_state(const at::Tensor& rng_state, c10::DeviceType device, const char* op) {
  TORCH_CHECK(rng_state.defined(), op, ": rng_state is undefined");
  TORCH_CHECK(rng_state.scalar_type() == at::kLong, op,
              ": rng_state must be an int64 tensor holding (seed, offset), got dtype ",
              rng_state.scalar_type());
  TORCH_CHECK(rng_state.dim() == 1 && rng_state.size(0) == 2, op,
              ": rng_state must have shape [2] (seed, offset), got shape ", rng_state.sizes());
  TORCH_CHECK(rng_state.device().type() == device, op, ": rng_state must be on ",
              c10::DeviceTypeName(device, /*lower_case=*/true), ", got ", rng_state.device());
}

// rng_state as above, and on the very device of `like` (an index too, not only the type: a state
// on another GPU would be read through a pointer of the wrong device).
inline void check_rng_state(const at::Tensor& rng_state, c10::DeviceType device,
                            const at::Tensor& like, const char* like_name, const char* op) {
  check_rng_state(rng_state, device, op);
  TORCH_CHECK(rng_state.device() == like.device(), op, ": rng_state must be on ", like_name,
              "'s device (", like.device(), "), got ", rng_state.device());
}

// `name` has the dtype and the device of `ref_name` (the tensor it is combined with).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name, const char* op) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ",
              ref_name, " (", ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device (",
              ref.device(), "), got ", t.device());
}

// A buffer an op made with ATen (a GEMM result, a cast) before a raw-pointer kernel reads it: the
// kernel reads `dtype`, contiguous. A mismatch is a bdlkern bug (e.g. an ATen call that autocast
// reached), caught here instead of read as the wrong type.
inline void check_buffer(const at::Tensor& t, at::ScalarType dtype, const char* name,
                         const char* op) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous(), op, ": internal error: buffer ", name,
              " is ", t.scalar_type(), t.is_contiguous() ? "" : " (strided)",
              " but the kernel reads contiguous ", dtype,
              "; please report this at bdlkern's issue tracker");
}

inline uint32_t check_stream(int64_t stream, const char* op) {
  TORCH_CHECK(stream >= 0 && stream < kNumStreams, op, ": stream must be a registered stream tag in [0, ",
              static_cast<int>(kNumStreams), "), got ", stream);
  return static_cast<uint32_t>(stream);
}

inline void check_size(c10::IntArrayRef size, const char* op) {
  for (const int64_t s : size) {
    TORCH_CHECK(s >= 0, op, ": size must be non-negative, got ", size);
  }
}

// A convolution argument (stride, padding, dilation, kernel_size): one value >= min per spatial
// dimension.
inline void check_conv_list(c10::IntArrayRef v, int64_t dims, const char* name, int64_t min,
                            const char* op) {
  TORCH_CHECK(static_cast<int64_t>(v.size()) == dims, op, ": ", name, " must have ", dims,
              " values (one per spatial dimension), got ", v);
  for (const int64_t e : v) {
    TORCH_CHECK(e >= min, op, ": ", name, " must be >= ", min, ", got ", v);
  }
}

// Drop probability p in [0, 1] (dropout_mask allows p = 1: every element dropped).
inline void check_probability(double p, const char* name, const char* op) {
  TORCH_CHECK(std::isfinite(p) && p >= 0.0 && p <= 1.0, op, ": ", name, " must be in [0, 1], got ",
              p);
}

}  // namespace ops
}  // namespace bdlkern
