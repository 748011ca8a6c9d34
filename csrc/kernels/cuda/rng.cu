// CUDA kernels of the random-stream ops (philox_bits, dropout_mask, uniform, normal).
//
// One thread computes one Philox block and writes the four elements of its lanes with a single
// vector store; a grid-stride loop covers any n. The block index, not the thread index, feeds the
// counter, so the launch shape never changes the bits. Also compiled under the SIMT emulator.
#include <bdlkern/common/device.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>
#include <bdlkern/rng/kernels.h>

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGrid = 4096;

template <typename T>
struct alignas(4 * sizeof(T) <= 16 ? 4 * sizeof(T) : 16) Vec4 {
  T v[4];
};

template <typename Op, typename T>
__global__ void __launch_bounds__(kThreads)
    fill_stream_kernel(T* __restrict__ out, int64_t n, const int64_t* __restrict__ rng_state,
                       uint32_t tag, Op op) {
  const PhiloxStream stream = make_stream(rng_state, tag);
  const int64_t num_blocks = (n + 3) / 4;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < num_blocks;
       b += step) {
    Vec4<T> v;
    op(stream.block(static_cast<uint64_t>(b)), v.v);
    const int64_t first = 4 * b;
    if (first + 4 <= n) {
      *reinterpret_cast<Vec4<T>*>(out + first) = v;
    } else {
      for (int l = 0; first + l < n; ++l) out[first + l] = v.v[l];
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    philox4x32_kernel(const int64_t* __restrict__ counter, const int64_t* __restrict__ key,
                      int64_t* __restrict__ out, int64_t n) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
    philox4x32_int64(counter + 4 * i, key + 2 * i, out + 4 * i);
  }
}

// Blocks for `work` grid-stride items: one item per thread up to kMaxGrid blocks.
inline int64_t grid_for(int64_t work) {
  const int64_t grid = (work + kThreads - 1) / kThreads;
  return grid < kMaxGrid ? grid : kMaxGrid;
}

template <typename Op, typename T>
void fill_stream(T* out, int64_t n, const int64_t* rng_state, uint32_t tag, Op op, void* stream) {
  if (n == 0) return;
  launch(fill_stream_kernel<Op, T>, dim3(static_cast<unsigned>(grid_for((n + 3) / 4))),
         dim3(kThreads), 0, stream, out, n, rng_state, tag, op);
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using DeviceTag = BDLKERN_DEVICE_TAG;

void philox4x32(DeviceTag, const int64_t* counter, const int64_t* key, int64_t* out, int64_t n,
                void* stream) {
  if (n == 0) return;
  using namespace BDLKERN_DEVICE_NS;
  launch(philox4x32_kernel, dim3(static_cast<unsigned>(grid_for(n))), dim3(kThreads), 0, stream,
         counter, key, out, n);
}

void philox_bits(DeviceTag, uint32_t* out, int64_t n, const int64_t* rng_state, uint32_t tag,
                 void* stream) {
  BDLKERN_DEVICE_NS::fill_stream(out, n, rng_state, tag, BitsOp{}, stream);
}

void dropout_mask(DeviceTag, bool* out, int64_t n, const int64_t* rng_state, uint32_t tag,
                  uint64_t threshold, void* stream) {
  BDLKERN_DEVICE_NS::fill_stream(out, n, rng_state, tag, MaskOp{threshold}, stream);
}

void uniform(DeviceTag, float* out, int64_t n, const int64_t* rng_state, uint32_t tag,
             void* stream) {
  BDLKERN_DEVICE_NS::fill_stream(out, n, rng_state, tag, UniformOp<float>{}, stream);
}

void uniform(DeviceTag, double* out, int64_t n, const int64_t* rng_state, uint32_t tag,
             void* stream) {
  BDLKERN_DEVICE_NS::fill_stream(out, n, rng_state, tag, UniformOp<double>{}, stream);
}

void normal(DeviceTag, float* out, int64_t n, const int64_t* rng_state, uint32_t tag,
            void* stream) {
  BDLKERN_DEVICE_NS::fill_stream(out, n, rng_state, tag, NormalOp<float>{}, stream);
}

void normal(DeviceTag, double* out, int64_t n, const int64_t* rng_state, uint32_t tag,
            void* stream) {
  BDLKERN_DEVICE_NS::fill_stream(out, n, rng_state, tag, NormalOp<double>{}, stream);
}

}  // namespace bdlkern
