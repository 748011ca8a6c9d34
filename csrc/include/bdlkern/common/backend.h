// Backend tags: every raw-pointer kernel entry point takes one of these as its first argument, so
// one binding template (csrc/torch/*.h) calls the CPU kernel, the CUDA kernel or the CUDA source run
// under the SIMT emulator by overload resolution, with no per-backend copy of the argument checks.
#pragma once

namespace bdlkern {

struct CpuTag {};   // csrc/kernels/cpu/*.cpp: C++ kernels
struct CudaTag {};  // csrc/kernels/cuda/*.cu compiled by nvcc
struct SimtTag {};  // csrc/kernels/cuda/*.cu compiled by g++ against simt.h (test extension _C_simt)

}  // namespace bdlkern
