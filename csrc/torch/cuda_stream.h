// BackendTraits<CudaTag>::stream: the current CUDA stream of a tensor's device. Included by exactly
// one file of each extension that launches CUDA kernels (csrc/torch/register_cuda.cpp for _C,
// csrc/testing/register_selftest_cuda.cpp for the test extension), the only binding files that
// include the CUDA runtime headers.
#pragma once

#include <c10/cuda/CUDAStream.h>

#include "backend_traits.h"

namespace bdlkern {
namespace ops {

void* BackendTraits<CudaTag>::stream(const at::Tensor& like) {
  return c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
}

}  // namespace ops
}  // namespace bdlkern
