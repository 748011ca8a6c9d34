// CUDA mask passes of the MC-dropout convolution (entry points and semantics:
// bdlkern/mc_dropout/conv.h). Also compiled under the SIMT emulator (csrc/testing/simt/).
//
// Two launch shapes:
//   * element masks: one thread per quad of consecutive elements of a row (one Philox block when
//     C L % 4 == 0), grid-stride over rows x quads; the unmask of a shared input walks the samples
//     in ascending order in registers.
//   * channel masks: one warp per channel plane (row, c), lanes striding along the L contiguous
//     elements; every lane makes the plane's flag itself (one Philox block per lane and plane).
//     The unmask of a shared input adds the samples that keep the plane in ascending order, each
//     lane owning the same elements in every sample, so the sum has the same bits on every run.
#include <bdlkern/common/device.h>
#include <bdlkern/mc_dropout/conv.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>

#include <stdint.h>

#include <stdexcept>

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = 8192;  // grid-stride cap

// Explicit conversions (torch builds CUDA with the implicit half / bfloat16 ones disabled).
template <typename T>
struct Conv;
template <>
struct Conv<float> {
  using Acc = float;
  __device__ __forceinline__ static float load(float v) { return v; }
  __device__ __forceinline__ static float store(float v) { return v; }
};
template <>
struct Conv<double> {
  using Acc = double;
  __device__ __forceinline__ static double load(double v) { return v; }
  __device__ __forceinline__ static double store(double v) { return v; }
};
template <>
struct Conv<__half> {
  using Acc = float;
  __device__ __forceinline__ static float load(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Conv<__nv_bfloat16> {
  using Acc = float;
  __device__ __forceinline__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

struct Shape {
  int64_t S, N, C, L, CL, rows;
};

inline Shape make_shape(const MCDropoutConvParams& p) {
  return Shape{p.num_samples, p.rows, p.channels, p.inner, p.channels * p.inner,
               p.num_samples * p.rows};
}

__device__ __forceinline__ int64_t group_of(const MCDropoutConvParams& p, const Shape& sh,
                                            int64_t r) {
  return p.shared_mask ? r / sh.N : r;
}

// Element masks. kShared: the unmask of a shared input (items over [N, quads], summing samples);
// else items over [S N, quads]: out[r] = in_row(r) * keep * scale (the mask pass, and the unmask
// of an unshared input, which is the same map applied to the gradient).
template <typename T, bool kShared>
__global__ void __launch_bounds__(kThreads)
    element_kernel(MCDropoutConvParams p, Shape sh, const T* in, T* out) {
  using A = typename Conv<T>::Acc;
  const PhiloxStream stream = make_stream(p.rng_state, kStreamMCDropout);
  const A scale = static_cast<A>(p.scale);
  const int64_t quads = (sh.CL + 3) / 4;
  const int64_t items = (kShared ? sh.N : sh.rows) * quads;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t item = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; item < items;
       item += step) {
    const int64_t e0 = (item % quads) * 4;
    const int valid = sh.CL - e0 >= 4 ? 4 : static_cast<int>(sh.CL - e0);
    if (kShared) {
      const int64_t n = item / quads;
      A acc[4] = {A(0), A(0), A(0), A(0)};
      for (int64_t s = 0; s < sh.S; ++s) {
        const int64_t r = s * sh.N + n;
        uint32_t w[4];
        stream.words4(static_cast<uint64_t>(group_of(p, sh, r) * sh.CL + e0), valid, w);
        for (int j = 0; j < valid; ++j) {
          if (keep_element(w[j], p.threshold)) acc[j] += Conv<T>::load(in[r * sh.CL + e0 + j]) * scale;
        }
      }
      for (int j = 0; j < valid; ++j) out[n * sh.CL + e0 + j] = Conv<T>::store(acc[j]);
    } else {
      const int64_t r = item / quads;
      const T* src = in + (p.shared_input ? r % sh.N : r) * sh.CL + e0;
      uint32_t w[4];
      stream.words4(static_cast<uint64_t>(group_of(p, sh, r) * sh.CL + e0), valid, w);
      for (int j = 0; j < valid; ++j) {
        const A v = keep_element(w[j], p.threshold) ? Conv<T>::load(src[j]) * scale : A(0);
        out[r * sh.CL + e0 + j] = Conv<T>::store(v);
      }
    }
  }
}

// Channel masks: one warp per plane. kShared as in element_kernel (planes of [N, C] then).
template <typename T, bool kShared>
__global__ void __launch_bounds__(kThreads)
    channel_kernel(MCDropoutConvParams p, Shape sh, const T* in, T* out) {
  using A = typename Conv<T>::Acc;
  const PhiloxStream stream = make_stream(p.rng_state, kStreamMCDropout);
  const A scale = static_cast<A>(p.scale);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const int64_t planes = (kShared ? sh.N : sh.rows) * sh.C;
  for (int64_t plane = warp; plane < planes; plane += num_warps) {
    const int64_t c = plane % sh.C;
    if (kShared) {
      const int64_t n = plane / sh.C;
      T* dst = out + plane * sh.L;
      bool first = true;
      for (int64_t s = 0; s < sh.S; ++s) {
        const int64_t r = s * sh.N + n;
        if (!keep_element(stream.word(static_cast<uint64_t>(group_of(p, sh, r) * sh.C + c)),
                          p.threshold)) {
          continue;
        }
        const T* src = in + (r * sh.C + c) * sh.L;
        for (int64_t l = lane; l < sh.L; l += 32) {
          const A v = Conv<T>::load(src[l]) * scale;
          dst[l] = Conv<T>::store(first ? v : Conv<T>::load(dst[l]) + v);
        }
        first = false;
      }
      if (first) {
        for (int64_t l = lane; l < sh.L; l += 32) dst[l] = Conv<T>::store(A(0));
      }
    } else {
      const int64_t r = plane / sh.C;
      const bool keep = keep_element(
          stream.word(static_cast<uint64_t>(group_of(p, sh, r) * sh.C + c)), p.threshold);
      const T* src = in + ((p.shared_input ? r % sh.N : r) * sh.C + c) * sh.L;
      T* dst = out + plane * sh.L;
      for (int64_t l = lane; l < sh.L; l += 32) {
        dst[l] = Conv<T>::store(keep ? Conv<T>::load(src[l]) * scale : A(0));
      }
    }
  }
}

template <typename T, bool kShared>
void run_typed(const MCDropoutConvParams& p, const void* in, void* out) {
  const Shape sh = make_shape(p);
  const int64_t outer = kShared ? sh.N : sh.rows;
  if (outer == 0 || sh.CL == 0) return;
  int64_t blocks;
  if (p.channel_mask) {
    blocks = (outer * sh.C + kWarpsPerBlock - 1) / kWarpsPerBlock;
  } else {
    blocks = (outer * ((sh.CL + 3) / 4) + kThreads - 1) / kThreads;
  }
  if (blocks > kMaxBlocks) blocks = kMaxBlocks;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (p.channel_mask) {
    launch(channel_kernel<T, kShared>, grid, dim3(kThreads), 0, p.stream, p, sh,
           static_cast<const T*>(in), static_cast<T*>(out));
  } else {
    launch(element_kernel<T, kShared>, grid, dim3(kThreads), 0, p.stream, p, sh,
           static_cast<const T*>(in), static_cast<T*>(out));
  }
}

template <bool kShared>
void run(const MCDropoutConvParams& p, const void* in, void* out) {
  switch (p.dtype) {
    case DType::kFloat32:
      return run_typed<float, kShared>(p, in, out);
    case DType::kFloat64:
      return run_typed<double, kShared>(p, in, out);
    case DType::kFloat16:
      return run_typed<__half, kShared>(p, in, out);
    case DType::kBFloat16:
      return run_typed<__nv_bfloat16, kShared>(p, in, out);
  }
  throw std::invalid_argument("mc_dropout_conv: unknown dtype");
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using DeviceTag = BDLKERN_DEVICE_TAG;

void mc_dropout_conv_mask(DeviceTag, const MCDropoutConvParams& p, const void* x, void* xm) {
  BDLKERN_DEVICE_NS::run<false>(p, x, xm);
}

void mc_dropout_conv_unmask(DeviceTag, const MCDropoutConvParams& p, const void* grad_xm,
                            void* grad_x) {
  if (p.shared_input) return BDLKERN_DEVICE_NS::run<true>(p, grad_xm, grad_x);
  // Per row, the gradient is the mask pass applied to grad_xm (the same flags and scale).
  MCDropoutConvParams q = p;
  q.shared_input = false;
  BDLKERN_DEVICE_NS::run<false>(q, grad_xm, grad_x);
}

}  // namespace bdlkern
