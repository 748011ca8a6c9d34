// CUDA kernels of the `bdlkern` operators (compiled only in CUDA builds).
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "concrete_ops.h"
#include "mc_dropout_ops.h"
#include "rng_ops.h"
#include "sparse_linear_ops.h"
#include "sparse_vd_ops.h"
#include "selftest_ops.h"

namespace bdlkern {
namespace ops {

void* BackendTraits<CudaTag>::stream(const at::Tensor& like) {
  return c10::cuda::getCurrentCUDAStream(like.device().index()).stream();
}

}  // namespace ops
}  // namespace bdlkern

TORCH_LIBRARY_IMPL(bdlkern, CUDA, m) {
  bdlkern::ops::RngOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::MCDropoutOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::ConcreteOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::SparseVDOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::SparseLinearOps<bdlkern::CudaTag>::register_impls(m);
}

// The SIMT self-test kernels on real hardware (schemas live in the _C_simt test extension).
TORCH_LIBRARY_IMPL(bdlkern_simt, CUDA, m) {
  bdlkern::ops::SelftestOps<bdlkern::CudaTag>::register_impls(m);
}
