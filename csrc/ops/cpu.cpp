// CPU kernels of the `bdlkern` operators.
#include <torch/library.h>

#include "concrete_ops.h"
#include "mc_dropout_ops.h"
#include "rng_ops.h"
#include "sparse_linear_ops.h"
#include "sparse_vd_ops.h"

TORCH_LIBRARY_IMPL(bdlkern, CPU, m) {
  bdlkern::ops::RngOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::MCDropoutOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::ConcreteOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::SparseVDOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::SparseLinearOps<bdlkern::CpuTag>::register_impls(m);
}
