// MC-dropout GEMM (csrc/kernels/cuda/mc_dropout_linear.cu), part 1 of 3: element traits, vector
// types and the block tilings of the two compute cores. Included by that file only.
#pragma once

#include <bdlkern/common/device.h>

#include <stdint.h>

#include <type_traits>

#if defined(__CUDACC__)
#define BDL_UNROLL _Pragma("unroll")
#define BDL_NO_UNROLL _Pragma("unroll 1")
#else
#define BDL_UNROLL
#define BDL_NO_UNROLL
#endif
// Kernel-side helpers (WMMA and warp barriers are device-only under nvcc).
#define BDL_DI __device__ __forceinline__

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

// ---- element types ------------------------------------------------------------------------------
// Explicit conversions only: torch compiles CUDA with the implicit __half / __nv_bfloat16
// conversions and operators disabled.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Acc = float;
  static constexpr bool kTensorCore = false;
  BDL_DI static float to_acc(float v) { return v; }
  BDL_DI static float from_acc(float v) { return v; }
  BDL_DI static float zero() { return 0.0f; }
};
template <>
struct Elem<double> {
  using Acc = double;
  static constexpr bool kTensorCore = false;
  BDL_DI static double to_acc(double v) { return v; }
  BDL_DI static double from_acc(double v) { return v; }
  BDL_DI static double zero() { return 0.0; }
};
template <>
struct Elem<__half> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  BDL_DI static float to_acc(__half v) { return __half2float(v); }
  BDL_DI static __half from_acc(float v) { return __float2half_rn(v); }
  BDL_DI static __half zero() { return __ushort_as_half(static_cast<unsigned short>(0)); }
};
template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static constexpr bool kTensorCore = true;
  BDL_DI static float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  BDL_DI static __nv_bfloat16 from_acc(float v) { return __float2bfloat16_rn(v); }
  BDL_DI static __nv_bfloat16 zero() {
    return __ushort_as_bfloat16(static_cast<unsigned short>(0));
  }
};

// Elements per global load: 16 bytes for 4-byte and 2-byte types; 4 doubles (two 16-byte loads)
// for float64, so that one thread's run of features still covers a whole Philox block.
template <typename T>
constexpr int kVec = sizeof(T) >= 4 ? 4 : 16 / static_cast<int>(sizeof(T));

template <typename T, int V>
struct alignas(16) Vec {
  T v[V];
};

// Four consecutive outputs of one row (the epilogue's unit): 8 bytes for half, 16 for float,
// 32 (two 16-byte stores) for double.
template <typename T>
struct alignas(4 * sizeof(T) < 16 ? 4 * sizeof(T) : 16) Quad {
  T v[4];
};

BDL_DI bool is_aligned(const void* p, uintptr_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) == 0;
}

// ---- tiling ------------------------------------------------------------------------------------
template <typename T, bool kTensorCore = Elem<T>::kTensorCore>
struct Tiling;

template <typename T>
struct Tiling<T, false> {  // FMA path
  static constexpr int kBM = 64, kBN = 64, kBK = 16;
  static constexpr int kThreads = 256;
  static constexpr int kPad = 0;  // transposed stores hit consecutive banks; reads broadcast
};

template <typename T>
struct Tiling<T, true> {  // WMMA path
  static constexpr int kBM = 64, kBN = 64, kBK = 32;
  static constexpr int kThreads = 128;
  // 16 bytes of padding per shared row: keeps WMMA pointers 32-byte aligned (ldm 72 is a multiple
  // of 8) and staggers the rows a fragment load reads across banks.
  static constexpr int kPad = 8;
};

}  // namespace
}  // namespace BDLKERN_DEVICE_NS
}  // namespace bdlkern
