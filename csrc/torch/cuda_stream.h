// BackendTraits<CudaTag>::stream: the current CUDA stream of a tensor's device. Included by exactly
// one file of each extension that launches CUDA kernels (csrc/torch/register_cuda.cpp for _C,
// csrc/testing/register_selftest_cuda.cpp for the test extension), the only binding files that
// include the CUDA runtime headers.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <mutex>
#include <unordered_map>

#include "backend_traits.h"

namespace bdlkern {
namespace ops {

void* BackendTraits<CudaTag>::stream(const at::Tensor& like) {
  return c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
}

// Attribute queries, not cudaDeviceProp: CUDA 13 dropped the clock fields from the struct. None
// of these calls synchronises; the result is cached, so each device is asked once per process.
GpuSpec BackendTraits<CudaTag>::gpu_spec(const at::Tensor& like) {
  static std::mutex mutex;
  static std::unordered_map<int, GpuSpec> cache;
  const int index = like.device().index();
  std::lock_guard<std::mutex> lock(mutex);
  const auto hit = cache.find(index);
  if (hit != cache.end()) return hit->second;
  const auto attr = [index](cudaDeviceAttr a) {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, a, index));
    return v;
  };
  GpuSpec g;
  g.major = attr(cudaDevAttrComputeCapabilityMajor);
  g.minor = attr(cudaDevAttrComputeCapabilityMinor);
  g.sm_count = attr(cudaDevAttrMultiProcessorCount);
  g.sm_clock_khz = attr(cudaDevAttrClockRate);
  g.mem_clock_khz = attr(cudaDevAttrMemoryClockRate);
  g.mem_bus_bits = attr(cudaDevAttrGlobalMemoryBusWidth);
  cudaDeviceProp prop;
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, index));
  g.total_memory = static_cast<double>(prop.totalGlobalMem);
  cache.emplace(index, g);
  return g;
}

}  // namespace ops
}  // namespace bdlkern
