// CUDA kernel of the CSR linear layer (semantics: bdlkern/sparse_linear/kernels.h). Also compiled under the
// SIMT emulator (csrc/testing/simt/).
//
// One warp per CSR row, rows taken in `row_order` (the binding passes rows sorted by length, so
// the long rows start first and the short ones fill in: balanced warps). The lanes split the
// batch, V consecutive elements each (a 16-byte vector load for float32 when B % 4 == 0), so the
// warp reads each weight once (a broadcast) and its input row in coalesced runs. No atomics: a
// lane owns its outputs and adds the row's entries in order.
#include <bdlkern/sparse_linear/kernels.h>
#include <bdlkern/common/device.h>

#include <stdint.h>

#include <stdexcept>

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxGrid = 8192;

template <typename T, int V>
struct alignas(sizeof(T) * V) VecT {
  T v[V];
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    csr_spmm_kernel(CsrParams p, const T* __restrict__ in_a, const T* __restrict__ in_b,
                    T* __restrict__ out_a, T* __restrict__ out_b) {
  const T* values = static_cast<const T*>(p.values);
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * kWarps;
  const int64_t B = p.batch, vs = p.value_stride;
  const bool second = out_b != nullptr;
  for (int64_t slot = warp; slot < p.rows; slot += num_warps) {
    const int64_t n = p.row_order != nullptr ? p.row_order[slot] : slot;
    const int64_t j0 = p.crow[n], j1 = p.crow[n + 1];
    for (int64_t b0 = static_cast<int64_t>(lane) * V; b0 < B; b0 += 32 * V) {
      T acc_a[V], acc_b[V];
      for (int e = 0; e < V; ++e) acc_a[e] = acc_b[e] = T(0);
      for (int64_t j = j0; j < j1; ++j) {
        const T w = values[j * vs];
        const VecT<T, V> xa = *reinterpret_cast<const VecT<T, V>*>(in_a + p.col[j] * B + b0);
        for (int e = 0; e < V; ++e) acc_a[e] += w * xa.v[e];
        if (second) {
          const T var = values[j * vs + 1];
          if (in_b != nullptr) {
            const VecT<T, V> xb = *reinterpret_cast<const VecT<T, V>*>(in_b + p.col[j] * B + b0);
            for (int e = 0; e < V; ++e) acc_b[e] += var * xb.v[e];
          } else {
            for (int e = 0; e < V; ++e) acc_b[e] += var * (xa.v[e] * xa.v[e]);
          }
        }
      }
      const T b = p.bias != nullptr ? static_cast<const T*>(p.bias)[n] : T(0);
      VecT<T, V> oa, ob;
      for (int e = 0; e < V; ++e) {
        oa.v[e] = acc_a[e] + b;
        ob.v[e] = acc_b[e];
      }
      *reinterpret_cast<VecT<T, V>*>(out_a + n * B + b0) = oa;
      if (second) *reinterpret_cast<VecT<T, V>*>(out_b + n * B + b0) = ob;
    }
  }
}

template <typename T, int V>
void run(const CsrParams& p, const void* in_a, const void* in_b, void* out_a, void* out_b) {
  int64_t blocks = (p.rows + kWarps - 1) / kWarps;
  if (blocks > kMaxGrid) blocks = kMaxGrid;
  launch(csr_spmm_kernel<T, V>, dim3(static_cast<unsigned>(blocks)), dim3(kThreads), 0, p.stream,
         p, static_cast<const T*>(in_a), static_cast<const T*>(in_b), static_cast<T*>(out_a),
         static_cast<T*>(out_b));
}

inline bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

void csr_spmm(BDLKERN_DEVICE_TAG, const CsrParams& p, const void* in_a_t, const void* in_b_t,
              void* out_a_t, void* out_b_t) {
  using namespace BDLKERN_DEVICE_NS;
  if (p.rows == 0 || p.batch == 0) return;
  if (p.dtype == DType::kFloat32) {
    // 16-byte vectors along the batch when every run starts aligned.
    const bool vec = p.batch % 4 == 0 && aligned16(in_a_t) && aligned16(out_a_t) &&
                     (in_b_t == nullptr || aligned16(in_b_t)) &&
                     (out_b_t == nullptr || aligned16(out_b_t));
    return vec ? run<float, 4>(p, in_a_t, in_b_t, out_a_t, out_b_t)
               : run<float, 1>(p, in_a_t, in_b_t, out_a_t, out_b_t);
  }
  if (p.dtype == DType::kFloat64) return run<double, 1>(p, in_a_t, in_b_t, out_a_t, out_b_t);
  throw std::invalid_argument("sparse_linear: float32 or float64 only");
}

}  // namespace bdlkern
