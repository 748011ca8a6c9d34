// Backend tags: every raw-pointer kernel entry point takes one of these as its first argument, so
// one binding template (csrc/ops/*.h) calls the CPU kernel, the CUDA kernel or the CUDA source run
// under the SIMT emulator by overload resolution, with no per-backend copy of the argument checks.
#pragma once

namespace bdlkern {

struct CpuTag {};   // csrc/cpu/*.cpp: C++ kernels
struct CudaTag {};  // csrc/cuda/*.cu compiled by nvcc
struct SimtTag {};  // csrc/cuda/*.cu compiled by g++ against simt.h (test extension _C_simt)

}  // namespace bdlkern
