// The one include of every `.cu` file: real CUDA under nvcc, the SIMT emulation under g++.
//
// Kernel sources live in namespace bdlkern::BDLKERN_DEVICE_NS (`cuda` or `simt`) so the two builds
// of one source never share a symbol, and launch kernels with
//   launch(kernel, grid, block, shared_bytes, stream, args...)
// which is `kernel<<<grid, block, shared_bytes, stream>>>(args...)` on a GPU and
// bdlkern::simt::launch on the CPU, and declare static shared memory with
//   BDL_SHARED(type, name, dims);     e.g. BDL_SHARED(float, tile, [64][65]);
// which is `__shared__ type name dims` on a GPU and a registered static under the emulator.
#pragma once

#if defined(BDLKERN_SIMT)

#include <bdlkern/common/simt.h>
#define BDLKERN_DEVICE_NS simt
#define BDLKERN_DEVICE_TAG ::bdlkern::SimtTag

#else

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <string>
#include <utility>

#define BDLKERN_DEVICE_NS cuda
#define BDLKERN_DEVICE_TAG ::bdlkern::CudaTag
// A static shared array: `BDL_SHARED(float, tile, [64][64]);`. The SIMT build also registers it,
// so the emulator can poison it before every block (bdlkern/common/simt.h).
#define BDL_SHARED(type, name, dims) __shared__ type name dims

namespace bdlkern {
namespace cuda {

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, void* stream,
            Args&&... args) {
  kernel<<<grid, block, smem, static_cast<cudaStream_t>(stream)>>>(std::forward<Args>(args)...);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("bdlkern: CUDA kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}

}  // namespace cuda
}  // namespace bdlkern

#endif

#include <bdlkern/common/backend.h>
#include <bdlkern/common/macros.h>
