// CUDA kernels of the `bdlkern` operators (compiled only in CUDA builds).
#include <torch/library.h>

#include "concrete.h"
#include "mc_dropout.h"
#include "mc_dropout_conv.h"
#include "rng.h"
#include "sparse_conv.h"
#include "sparse_linear.h"
#include "lrt_conv.h"
#include "sparse_vd.h"
#include "gaussian.h"

#include "cuda_stream.h"

TORCH_LIBRARY_IMPL(bdlkern, CUDA, m) {
  bdlkern::ops::RngOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::MCDropoutOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::MCDropoutConvOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::ConcreteOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::SparseVDOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::LrtConvOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::SparseLinearOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::SparseConvOps<bdlkern::CudaTag>::register_impls(m);
  bdlkern::ops::GaussianOps<bdlkern::CudaTag>::register_impls(m);
}

