// CUDA kernels of sparse variational dropout's fused passes (entry points and semantics:
// bdlkern/sparse_vd/kernels.h, per-weight math: bdlkern/sparse_vd/math.h). Also compiled under the
// SIMT emulator (csrc/testing/simt/).
//
// Elementwise passes are grid-stride loops. The LRT noise is read by logical output index, so the
// launch shape never changes it. The KL sum is reduced without atomics: each block reduces a fixed
// chunk of weights in a fixed tree, and one block adds the chunk sums in order (the same bits every
// run). The KL kernels are templated on the prior (KlPrior: log-uniform or ARD), one body each.
#include <bdlkern/common/device.h>
#include <bdlkern/rng/philox.h>
#include <bdlkern/rng/random.h>
#include <bdlkern/sparse_vd/math.h>
#include <bdlkern/sparse_vd/kernels.h>

#include <stdint.h>

#include <stdexcept>
#include <string>

namespace bdlkern {
namespace BDLKERN_DEVICE_NS {
namespace {

constexpr int kThreads = 128;
constexpr int64_t kMaxGrid = 4096;
constexpr int64_t kKlChunk = 4096;  // weights per KL block (fixed: part of the summation order)

inline unsigned grid_for(int64_t work) {
  int64_t g = (work + kThreads - 1) / kThreads;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g < kMaxGrid ? g : kMaxGrid);
}

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    weight_variance_kernel(int64_t n, const T* __restrict__ theta, const T* __restrict__ ls2,
                           T* __restrict__ A) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    A[i] = weight_variance<T>(theta[i], ls2[i]).value;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    weight_variance_backward_kernel(int64_t n, const T* __restrict__ theta,
                                    const T* __restrict__ ls2, const T* g_theta, const T* g_A,
                                    T* grad_theta, T* grad_ls2) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const WeightVariance<T> w = weight_variance<T>(theta[i], ls2[i]);
    const T ga = g_A[i];
    grad_theta[i] = g_theta[i] + ga * w.d_theta;
    grad_ls2[i] = ga * w.d_log_s2;
  }
}

// One thread per output element; std is written once per element of mu (by sample 0 when shared).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lrt_noise_forward_kernel(LrtParams p, const T* __restrict__ mu, const T* __restrict__ var,
                             const T* __restrict__ bias, T* __restrict__ y, T* __restrict__ std) {
  const PhiloxStream stream = make_stream(p.rng_state, p.tag);
  const int64_t per_sample = p.rows * p.out_features;
  const int64_t total = p.num_samples * per_sample;
  for (int64_t i = global_thread(); i < total; i += grid_threads()) {
    const int64_t src = p.shared_input ? i % per_sample : i;
    const int64_t o = i % p.out_features;
    const T sd = sqrt(var[src] + static_cast<T>(kVarianceEps));
    if (!p.shared_input || i < per_sample) std[src] = sd;
    const T b = bias != nullptr ? bias[o] : T(0);
    y[i] = mu[src] + b + sd * normal_at<T>(stream, static_cast<uint64_t>(i));
  }
}

// One thread per element of std: grad_mu = sum_s g, grad_var = sum_s g eps / (2 std), s ascending.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lrt_noise_backward_kernel(LrtParams p, const T* __restrict__ g, const T* __restrict__ std,
                              T* __restrict__ grad_mu, T* __restrict__ grad_var) {
  const PhiloxStream stream = make_stream(p.rng_state, p.tag);
  const int64_t per_sample = p.rows * p.out_features;
  const int64_t elems = p.shared_input ? per_sample : p.num_samples * per_sample;
  const int64_t samples = p.shared_input ? p.num_samples : 1;
  for (int64_t j = global_thread(); j < elems; j += grid_threads()) {
    T gm = T(0), ge = T(0);
    for (int64_t s = 0; s < samples; ++s) {
      const int64_t i = s * per_sample + j;
      const T gi = g[i];
      gm += gi;
      ge += gi * normal_at<T>(stream, static_cast<uint64_t>(i));
    }
    grad_mu[j] = gm;
    grad_var[j] = ge / (T(2) * std[j]);
  }
}

// Block b reduces the KL (prior P) of weights [b kKlChunk, (b + 1) kKlChunk) into partial[b]
// (double).
template <KlPrior P, typename T>
__global__ void __launch_bounds__(kThreads)
    kl_partial_kernel(int64_t n, const T* __restrict__ theta, const T* __restrict__ ls2,
                      double* __restrict__ partial) {
  BDL_SHARED(double, tree, [kThreads]);
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kKlChunk;
  const int64_t end = begin + kKlChunk < n ? begin + kKlChunk : n;
  double sum = 0.0;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    sum += static_cast<double>(kl_term<P, T>(log_alpha_of<T>(theta[i], ls2[i]).value));
  }
  tree[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) tree[threadIdx.x] += tree[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) partial[blockIdx.x] = tree[0];
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kl_total_kernel(int64_t chunks, const double* __restrict__ partial, T* __restrict__ out) {
  BDL_SHARED(double, tree, [kThreads]);
  double sum = 0.0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) sum += partial[c];
  tree[threadIdx.x] = sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half >>= 1) {
    if (static_cast<int>(threadIdx.x) < half) tree[threadIdx.x] += tree[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<T>(tree[0]);
}

template <KlPrior P, typename T>
__global__ void __launch_bounds__(kThreads)
    kl_backward_kernel(int64_t n, const T* __restrict__ grad, const T* __restrict__ theta,
                       const T* __restrict__ ls2, T* __restrict__ grad_theta,
                       T* __restrict__ grad_ls2) {
  const T g = grad[0];
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    kl_grads<P, T>(theta[i], ls2[i], g, &grad_theta[i], &grad_ls2[i]);
  }
}

// Calls f.template operator()<T>() with T the element type of `dtype`.
template <typename F>
void dispatch(DType dtype, const char* op, F f) {
  if (dtype == DType::kFloat64) return f.template operator()<double>();
  if (dtype == DType::kFloat32) return f.template operator()<float>();
  throw std::invalid_argument(std::string(op) + ": float32 or float64 only");
}

// Calls f.template operator()<P>() with P the compile-time prior.
template <typename F>
void dispatch_prior(KlPrior prior, F f) {
  if (prior == KlPrior::kArd) return f.template operator()<KlPrior::kArd>();
  return f.template operator()<KlPrior::kLogUniform>();
}

// The op names for error messages.
inline const char* kl_op_name(KlPrior prior) {
  return prior == KlPrior::kArd ? "ard_kl" : "sparse_vd_kl";
}
inline const char* kl_backward_op_name(KlPrior prior) {
  return prior == KlPrior::kArd ? "ard_kl_backward" : "sparse_vd_kl_backward";
}

}  // namespace
}  // namespace BDLKERN_DEVICE_NS

using DeviceTag = BDLKERN_DEVICE_TAG;

void weight_variance(DeviceTag, int64_t n, const void* theta, const void* log_sigma2, void* A,
                     DType dtype, void* stream) {
  using namespace BDLKERN_DEVICE_NS;
  if (n == 0) return;
  dispatch(dtype, "weight_variance", [&]<typename T>() {
    launch(weight_variance_kernel<T>, dim3(grid_for(n)), dim3(kThreads), 0, stream, n,
           static_cast<const T*>(theta), static_cast<const T*>(log_sigma2), static_cast<T*>(A));
  });
}

void weight_variance_backward(DeviceTag, int64_t n, const void* theta, const void* log_sigma2,
                              const void* g_theta, const void* g_A, void* grad_theta,
                              void* grad_log_sigma2, DType dtype, void* stream) {
  using namespace BDLKERN_DEVICE_NS;
  if (n == 0) return;
  dispatch(dtype, "weight_variance_backward", [&]<typename T>() {
    launch(weight_variance_backward_kernel<T>, dim3(grid_for(n)), dim3(kThreads), 0, stream, n,
           static_cast<const T*>(theta), static_cast<const T*>(log_sigma2),
           static_cast<const T*>(g_theta), static_cast<const T*>(g_A), static_cast<T*>(grad_theta),
           static_cast<T*>(grad_log_sigma2));
  });
}

void lrt_noise_forward(DeviceTag, const LrtParams& p, const void* mu, const void* var,
                       const void* bias, void* y, void* std) {
  using namespace BDLKERN_DEVICE_NS;
  const int64_t total = p.num_samples * p.rows * p.out_features;
  if (total == 0) return;
  dispatch(p.dtype, "lrt_linear", [&]<typename T>() {
    launch(lrt_noise_forward_kernel<T>, dim3(grid_for(total)), dim3(kThreads), 0, p.stream, p,
           static_cast<const T*>(mu), static_cast<const T*>(var), static_cast<const T*>(bias),
           static_cast<T*>(y), static_cast<T*>(std));
  });
}

void lrt_noise_backward(DeviceTag, const LrtParams& p, const void* grad_y, const void* std,
                        void* grad_mu, void* grad_var) {
  using namespace BDLKERN_DEVICE_NS;
  const int64_t per_sample = p.rows * p.out_features;
  const int64_t elems = p.shared_input ? per_sample : p.num_samples * per_sample;
  if (elems == 0) return;
  dispatch(p.dtype, "lrt_linear_backward", [&]<typename T>() {
    launch(lrt_noise_backward_kernel<T>, dim3(grid_for(elems)), dim3(kThreads), 0, p.stream, p,
           static_cast<const T*>(grad_y), static_cast<const T*>(std), static_cast<T*>(grad_mu),
           static_cast<T*>(grad_var));
  });
}

int64_t sparse_vd_kl_workspace(DeviceTag, int64_t n, DType) {
  const int64_t chunks = (n + BDLKERN_DEVICE_NS::kKlChunk - 1) / BDLKERN_DEVICE_NS::kKlChunk;
  return (chunks > 0 ? chunks : 1) * static_cast<int64_t>(sizeof(double));
}

void sparse_vd_kl(DeviceTag, KlPrior prior, int64_t n, const void* theta, const void* log_sigma2,
                  void* out, void* workspace, DType dtype, void* stream) {
  using namespace BDLKERN_DEVICE_NS;
  const int64_t chunks = (n + kKlChunk - 1) / kKlChunk;
  const char* op = kl_op_name(prior);
  if (chunks > 0x7fffffffLL) throw std::invalid_argument(std::string(op) + ": too many weights");
  double* partial = static_cast<double*>(workspace);
  dispatch(dtype, op, [&]<typename T>() {
    dispatch_prior(prior, [&]<KlPrior P>() {
      if (chunks > 0) {
        launch(kl_partial_kernel<P, T>, dim3(static_cast<unsigned>(chunks)), dim3(kThreads), 0,
               stream, n, static_cast<const T*>(theta), static_cast<const T*>(log_sigma2),
               partial);
      }
    });
    launch(kl_total_kernel<T>, dim3(1), dim3(kThreads), 0, stream, chunks,
           static_cast<const double*>(partial), static_cast<T*>(out));
  });
}

void sparse_vd_kl_backward(DeviceTag, KlPrior prior, int64_t n, const void* grad,
                           const void* theta, const void* log_sigma2, void* grad_theta,
                           void* grad_log_sigma2, DType dtype, void* stream) {
  using namespace BDLKERN_DEVICE_NS;
  if (n == 0) return;
  dispatch(dtype, kl_backward_op_name(prior), [&]<typename T>() {
    dispatch_prior(prior, [&]<KlPrior P>() {
      launch(kl_backward_kernel<P, T>, dim3(grid_for(n)), dim3(kThreads), 0, stream, n,
             static_cast<const T*>(grad), static_cast<const T*>(theta),
             static_cast<const T*>(log_sigma2), static_cast<T*>(grad_theta),
             static_cast<T*>(grad_log_sigma2));
    });
  });
}

}  // namespace bdlkern
