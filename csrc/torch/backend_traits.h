// What a binding needs to know about a backend: the device type its tensors live on and the
// stream its kernels launch on.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>

#include <bdlkern/common/backend.h>
#include <bdlkern/common/simt_stream.h>
#include <bdlkern/mc_dropout/cost_model.h>

namespace bdlkern {
namespace ops {

// Whether float32 matmuls on CUDA may use TF32, as torch's own cuBLAS calls decide it
// (torch.backends.cuda.matmul.fp32_precision, which the legacy allow_tf32 flag and
// torch.set_float32_matmul_precision also set). The legacy getter would throw once the new API
// has been used, so this reads the new one.
inline bool cuda_matmul_tf32() {
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
}

template <class Tag>
struct BackendTraits;

template <>
struct BackendTraits<CpuTag> {
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
  static void* stream(const at::Tensor&) { return nullptr; }
};

// The SIMT emulator runs CUDA sources on CPU tensors; its current stream is an identity that every
// emulated launch is checked against (bdlkern/common/simt_stream.h).
template <>
struct BackendTraits<SimtTag> {
  static constexpr c10::DeviceType device_type = c10::DeviceType::CPU;
  static void* stream(const at::Tensor&) { return simt::current_stream(); }
  // The emulator stands in for an H100 when a cost model asks what the device is.
  static GpuSpec gpu_spec(const at::Tensor&) { return h100_sxm5_80gb(); }
};

template <>
struct BackendTraits<CudaTag> {
  static constexpr c10::DeviceType device_type = c10::DeviceType::CUDA;
  // The current CUDA stream of the tensor's device; defined in csrc/torch/cuda_stream.h, which
  // one binding file per CUDA extension includes.
  static void* stream(const at::Tensor& like);
  // The tensor's device as the cost models see it (cudaDeviceGetAttribute, cached per device).
  static GpuSpec gpu_spec(const at::Tensor& like);
};

}  // namespace ops
}  // namespace bdlkern
