// CUDA kernels of the materialise path of mc_dropout_linear (entry points and semantics:
// bdlkern/mc_dropout/kernels.h): the two memory-bound passes that sit around a cuBLAS GEMM when
// the cost model (bdlkern/mc_dropout/cost_model.h) or the caller picks that path over the fused
// kernel of mc_dropout_linear.cu. Also compiled under the SIMT emulator.
//
// One thread owns a quad: 4 consecutive features of one output row. It makes the keep flags of the
// quad from Philox (one block when the quad's stream index is a multiple of 4, two otherwise) and
// moves the quad with one vector load and store when the row width and the pointers allow. A
// grid-stride loop covers any size; the quad index, never the thread index, picks the stream
// elements, so the launch shape cannot change the bits.
//
//   mask_input  xm[r, :] = keep(r, :) ? x_row(r) : 0        (a select: exact in every dtype)
//   mask_grad   grad_x[r, :] = keep(r, :) * d[r, :] * scale (in place when d == grad_x), or for
//               a shared input grad_x[b, :] = sum_s keep(s, b, :) * d[s B + b, :] * scale, the
//               samples in ascending order in the accumulation type: no atomics, deterministic.
#include <bdlkern/common/device.h>
#include <bdlkern/mc_dropout/kernels.h>

#include <stdint.h>

#include <stdexcept>

#include "mc_dropout/loaders.cuh"
#include "mc_dropout/traits.cuh"

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kMaskThreads = 256;
constexpr int64_t kMaxMaskGrid = 1 << 16;

template <typename T>
struct MaskArgs {
  int64_t S, B, K;
  bool shared_input;
  MCDropoutMask mask;
  bool all_kept;
  double scale;
  const T* src;  // x ([B, K] or [S B, K]) / d ([S B, K])
  T* dst;        // xm [S B, K] / grad_x ([B, K] or [S B, K])
  bool vec_ok;   // K % 4 == 0 and both pointers aligned to a quad
};

// Keep flags of the quad at (s, b, k0): bit j for feature k0 + j < k0 + valid.
BDL_DI uint32_t quad_keep(const MCDropoutMask& m, bool all_kept, int64_t s, int64_t b, int64_t k0,
                          int valid) {
  return all_kept ? 0xfu : keep_bits<4>(m, m.index(s, b, k0), valid);
}

template <typename T>
BDL_DI void load_quad(const T* src, int valid, bool vec_ok, T v[4]) {
  if (valid == 4 && vec_ok) {
    const Quad<T> q = *reinterpret_cast<const Quad<T>*>(src);
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) v[j] = q.v[j];
  } else {
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) v[j] = j < valid ? src[j] : Elem<T>::zero();
  }
}

template <typename T>
BDL_DI void store_elems(T* dst, const T v[4], int valid, bool vec_ok) {
  if (valid == 4 && vec_ok) {
    Quad<T> q;
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) q.v[j] = v[j];
    *reinterpret_cast<Quad<T>*>(dst) = q;
  } else {
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (j < valid) dst[j] = v[j];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaskThreads) mask_input_kernel(MaskArgs<T> a) {
  const int64_t quads_per_row = (a.K + 3) / 4;
  const int64_t total = a.S * a.B * quads_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t r = i / quads_per_row;
    const int64_t k0 = (i - r * quads_per_row) * 4;
    const int valid = a.K - k0 >= 4 ? 4 : static_cast<int>(a.K - k0);
    const int64_t s = r / a.B, b = r - s * a.B;
    T v[4];
    load_quad<T>(a.src + (a.shared_input ? b : r) * a.K + k0, valid, a.vec_ok, v);
    const uint32_t keep = quad_keep(a.mask, a.all_kept, s, b, k0, valid);
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) {
      if (!((keep >> j) & 1u)) v[j] = Elem<T>::zero();
    }
    store_elems<T>(a.dst + r * a.K + k0, v, valid, a.vec_ok);
  }
}

template <typename T>
__global__ void __launch_bounds__(kMaskThreads) mask_grad_kernel(MaskArgs<T> a) {
  using Acc = typename Elem<T>::Acc;
  const int64_t quads_per_row = (a.K + 3) / 4;
  const int64_t out_rows = a.shared_input ? a.B : a.S * a.B;
  const int64_t total = out_rows * quads_per_row;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const Acc scale = static_cast<Acc>(a.scale);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += step) {
    const int64_t row = i / quads_per_row;
    const int64_t k0 = (i - row * quads_per_row) * 4;
    const int valid = a.K - k0 >= 4 ? 4 : static_cast<int>(a.K - k0);
    // A shared input sums its samples (rows s B + b); otherwise the one row r = s B + b.
    const int64_t s_begin = a.shared_input ? 0 : row / a.B;
    const int64_t s_end = a.shared_input ? a.S : s_begin + 1;
    const int64_t b = a.shared_input ? row : row - s_begin * a.B;
    Acc sum[4] = {Acc(0), Acc(0), Acc(0), Acc(0)};
    for (int64_t s = s_begin; s < s_end; ++s) {
      T v[4];
      load_quad<T>(a.src + (s * a.B + b) * a.K + k0, valid, a.vec_ok, v);
      const uint32_t keep = quad_keep(a.mask, a.all_kept, s, b, k0, valid);
      BDL_UNROLL
      for (int j = 0; j < 4; ++j) {
        if ((keep >> j) & 1u) sum[j] += Elem<T>::to_acc(v[j]) * scale;
      }
    }
    T out[4];
    BDL_UNROLL
    for (int j = 0; j < 4; ++j) out[j] = Elem<T>::from_acc(sum[j]);
    store_elems<T>(a.dst + row * a.K + k0, out, valid, a.vec_ok);
  }
}

template <typename T>
MaskArgs<T> mask_args(const MCDropoutLinearParams& p, const void* src, void* dst) {
  MaskArgs<T> a;
  a.S = p.num_samples;
  a.B = p.rows;
  a.K = p.in_features;
  a.shared_input = p.shared_input;
  a.mask = MCDropoutMask{make_stream(p.rng_state, kStreamMCDropout), p.threshold, p.rows,
                         p.in_features, p.shared_mask};
  a.all_kept = p.threshold > 0xffffffffull;
  a.scale = p.scale;
  a.src = static_cast<const T*>(src);
  a.dst = static_cast<T*>(dst);
  a.vec_ok = p.in_features % 4 == 0 && is_aligned(src, alignof(Quad<T>)) &&
             is_aligned(dst, alignof(Quad<T>));
  return a;
}

// rng_state is a device pointer: make_stream reads it in the kernel (graph replays see the current
// state), so mask_args only stores the pointer.
template <typename T, bool kGrad>
void run_mask_typed(const MCDropoutLinearParams& p, const void* src, void* dst) {
  const int64_t rows = (kGrad && p.shared_input) ? p.rows : p.num_samples * p.rows;
  const int64_t total = rows * ((p.in_features + 3) / 4);
  if (total == 0) return;
  int64_t grid = (total + kMaskThreads - 1) / kMaskThreads;
  if (grid > kMaxMaskGrid) grid = kMaxMaskGrid;
  const MaskArgs<T> a = mask_args<T>(p, src, dst);
  if (kGrad) {
    launch(mask_grad_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(kMaskThreads), 0,
           p.stream, a);
  } else {
    launch(mask_input_kernel<T>, dim3(static_cast<unsigned>(grid)), dim3(kMaskThreads), 0,
           p.stream, a);
  }
}

template <bool kGrad>
void run_mask(const MCDropoutLinearParams& p, const void* src, void* dst) {
  switch (p.dtype) {
    case DType::kFloat32:
      return run_mask_typed<float, kGrad>(p, src, dst);
    case DType::kFloat64:
      return run_mask_typed<double, kGrad>(p, src, dst);
    case DType::kFloat16:
      return run_mask_typed<__half, kGrad>(p, src, dst);
    case DType::kBFloat16:
      return run_mask_typed<__nv_bfloat16, kGrad>(p, src, dst);
  }
  throw std::invalid_argument("mc_dropout_linear: unknown dtype");
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using MaskDeviceTag = BDLKERN_DEVICE_TAG;

void mc_dropout_mask_input(MaskDeviceTag, const MCDropoutLinearParams& p, const void* x,
                           void* xm) {
  BDLKERN_DEVICE_NS::run_mask<false>(p, x, xm);
}

void mc_dropout_mask_grad(MaskDeviceTag, const MCDropoutLinearParams& p, const void* d,
                          void* grad_x) {
  BDLKERN_DEVICE_NS::run_mask<true>(p, d, grad_x);
}

}  // namespace bdlkern

#undef BDL_UNROLL
#undef BDL_NO_UNROLL
#undef BDL_DI
