// Qualifier macros shared by every torch-free kernel header.
//
// The same header is read by three compilers:
//   * nvcc (device and host passes)           -> real CUDA qualifiers;
//   * g++, for the CPU kernels and for the SIMT emulation build -> the qualifiers vanish (under
//     the emulator every function is a host function).
#pragma once

#if defined(__CUDACC__)
#define BDL_HD __host__ __device__
#define BDL_HDI __host__ __device__ __forceinline__
#else
#define BDL_HD
#define BDL_HDI inline __attribute__((always_inline))
#endif
