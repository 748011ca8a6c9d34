// CUDA kernels of the sparse (CSR) convolution (entry points and semantics:
// bdlkern/sparse_conv/kernels.h). Also compiled under the SIMT emulator (csrc/testing/simt/).
//
//   * forward: one block per output plane (image, output channel), grid-stride; each thread owns
//     output positions and sums its row's kept weights times the input they read, in entry order.
//     The row's column and value reads are uniform across the block (broadcast, cached).
//   * grad_input: one block per input plane (image, input channel); each thread owns input
//     positions and gathers, over the output channels of the channel's group, the entries of the
//     channel (a binary search in the row's ascending columns) whose output position reads it.
// Every output element is written once after a fixed-order sum: deterministic, no atomics.
#include <bdlkern/common/device.h>
#include <bdlkern/sparse_conv/kernels.h>

#include <stdint.h>

#include <stdexcept>

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 65535;

template <typename T, bool kSquare>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(SparseConvParams p, const T* __restrict__ x, T* __restrict__ y) {
  const T* values = static_cast<const T*>(p.values);
  const T* bias = static_cast<const T*>(p.bias);
  const int64_t in_plane = p.in_size[0] * p.in_size[1] * p.in_size[2];
  const int64_t out_plane = p.out_size[0] * p.out_size[1] * p.out_size[2];
  const int64_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const int64_t planes = p.batch * p.out_channels;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const int64_t n = plane / p.out_channels, o = plane % p.out_channels;
    const T* x_group = x + (n * p.in_channels + (o / cout_g) * cin_g) * in_plane;
    for (int64_t q = threadIdx.x; q < out_plane; q += kThreads) {
      const int64_t ow = q % p.out_size[2], oh = (q / p.out_size[2]) % p.out_size[1],
                    od = q / (p.out_size[2] * p.out_size[1]);
      T acc = bias != nullptr ? bias[o] : T(0);
      for (int64_t j = p.crow[o]; j < p.crow[o + 1]; ++j) {
        const SparseConvTap t = sparse_conv_tap(p, p.col[j]);
        const int64_t id = od * p.stride[0] - p.padding[0] + t.a * p.dilation[0];
        const int64_t ih = oh * p.stride[1] - p.padding[1] + t.b * p.dilation[1];
        const int64_t iw = ow * p.stride[2] - p.padding[2] + t.e * p.dilation[2];
        if (id < 0 || id >= p.in_size[0] || ih < 0 || ih >= p.in_size[1] || iw < 0 ||
            iw >= p.in_size[2]) {
          continue;
        }
        const T v = x_group[t.channel * in_plane + (id * p.in_size[1] + ih) * p.in_size[2] + iw];
        acc += values[j * p.value_stride + p.value_offset] * (kSquare ? v * v : v);
      }
      y[plane * out_plane + q] = acc;
    }
  }
}

// The output index along one dimension that reads input index i through kernel offset k, or -1.
__device__ __forceinline__ int64_t reader(int64_t i, int64_t k, int64_t stride, int64_t pad,
                                          int64_t dil, int64_t out) {
  const int64_t t = i + pad - k * dil;
  if (t < 0 || t % stride != 0) return -1;
  const int64_t o = t / stride;
  return o < out ? o : -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_input_kernel(SparseConvParams p, const T* __restrict__ gy, T* __restrict__ gx) {
  const T* values = static_cast<const T*>(p.values);
  const int64_t in_plane = p.in_size[0] * p.in_size[1] * p.in_size[2];
  const int64_t out_plane = p.out_size[0] * p.out_size[1] * p.out_size[2];
  const int64_t cin_g = p.in_channels / p.groups, cout_g = p.out_channels / p.groups;
  const int64_t taps = p.kernel[0] * p.kernel[1] * p.kernel[2];
  const int64_t planes = p.batch * p.in_channels;
  for (int64_t plane = blockIdx.x; plane < planes; plane += gridDim.x) {
    const int64_t n = plane / p.in_channels, c = plane % p.in_channels;
    const int64_t group = c / cin_g, c_local = c % cin_g;
    for (int64_t q = threadIdx.x; q < in_plane; q += kThreads) {
      const int64_t iw = q % p.in_size[2], ih = (q / p.in_size[2]) % p.in_size[1],
                    id = q / (p.in_size[2] * p.in_size[1]);
      T acc = T(0);
      for (int64_t o = group * cout_g; o < (group + 1) * cout_g; ++o) {
        // The row's entries of channel c_local: columns [c_local taps, (c_local + 1) taps).
        int64_t lo = p.crow[o], hi = p.crow[o + 1];
        while (lo < hi) {  // first entry with col >= c_local * taps
          const int64_t mid = (lo + hi) / 2;
          if (p.col[mid] < c_local * taps) lo = mid + 1; else hi = mid;
        }
        const T* g_plane = gy + (n * p.out_channels + o) * out_plane;
        for (int64_t j = lo; j < p.crow[o + 1] && p.col[j] < (c_local + 1) * taps; ++j) {
          const SparseConvTap t = sparse_conv_tap(p, p.col[j]);
          const int64_t od = reader(id, t.a, p.stride[0], p.padding[0], p.dilation[0], p.out_size[0]);
          const int64_t oh = reader(ih, t.b, p.stride[1], p.padding[1], p.dilation[1], p.out_size[1]);
          const int64_t ow = reader(iw, t.e, p.stride[2], p.padding[2], p.dilation[2], p.out_size[2]);
          if (od < 0 || oh < 0 || ow < 0) continue;
          acc += values[j * p.value_stride + p.value_offset] *
                 g_plane[(od * p.out_size[1] + oh) * p.out_size[2] + ow];
        }
      }
      gx[plane * in_plane + q] = acc;
    }
  }
}

inline dim3 grid_for(int64_t planes) {
  return dim3(static_cast<unsigned>(planes < kMaxBlocks ? planes : kMaxBlocks));
}

template <typename T>
void forward_typed(const SparseConvParams& p, const void* x, void* y) {
  const dim3 grid = grid_for(p.batch * p.out_channels);
  if (p.square_input) {
    launch(forward_kernel<T, true>, grid, dim3(kThreads), 0, p.stream, p,
           static_cast<const T*>(x), static_cast<T*>(y));
  } else {
    launch(forward_kernel<T, false>, grid, dim3(kThreads), 0, p.stream, p,
           static_cast<const T*>(x), static_cast<T*>(y));
  }
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using DeviceTag = BDLKERN_DEVICE_TAG;

void sparse_conv_forward(DeviceTag, const SparseConvParams& p, const void* x, void* y) {
  using namespace BDLKERN_DEVICE_NS;
  if (p.batch == 0 || p.out_channels == 0) return;
  if (p.dtype == DType::kFloat64) return forward_typed<double>(p, x, y);
  if (p.dtype == DType::kFloat32) return forward_typed<float>(p, x, y);
  throw std::invalid_argument("sparse_conv: float32 or float64 only");
}

void sparse_conv_grad_input(DeviceTag, const SparseConvParams& p, const void* grad_y,
                            void* grad_x) {
  using namespace BDLKERN_DEVICE_NS;
  if (p.batch == 0 || p.in_channels == 0) return;
  const dim3 grid = grid_for(p.batch * p.in_channels);
  if (p.dtype == DType::kFloat64) {
    return launch(grad_input_kernel<double>, grid, dim3(kThreads), 0, p.stream, p,
                  static_cast<const double*>(grad_y), static_cast<double*>(grad_x));
  }
  if (p.dtype == DType::kFloat32) {
    return launch(grad_input_kernel<float>, grid, dim3(kThreads), 0, p.stream, p,
                  static_cast<const float*>(grad_y), static_cast<float*>(grad_x));
  }
  throw std::invalid_argument("sparse_conv: float32 or float64 only");
}

}  // namespace bdlkern
