// The `bdlkern_simt` operator library: the same schemas as `bdlkern`, implemented on CPU tensors
// by the CUDA kernel sources compiled against the SIMT emulator, plus the emulator's self-tests.
#include <torch/library.h>

#include "../ops/autocast.h"
#include "../ops/concrete_ops.h"
#include "../ops/mc_dropout_ops.h"
#include "../ops/rng_ops.h"
#include "../ops/schemas.h"
#include "../ops/selftest_ops.h"
#include "../ops/sparse_linear_ops.h"
#include "../ops/sparse_vd_ops.h"

TORCH_LIBRARY(bdlkern_simt, m) {
  bdlkern::ops::define_rng_schemas(m);
  bdlkern::ops::define_mc_dropout_schemas(m);
  bdlkern::ops::define_concrete_schemas(m);
  bdlkern::ops::define_sparse_vd_schemas(m);
  bdlkern::ops::define_selftest_schemas(m);
}

TORCH_LIBRARY_IMPL(bdlkern_simt, CPU, m) {
  bdlkern::ops::RngOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::MCDropoutOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::ConcreteOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::SparseVDOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::SparseLinearOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::SelftestOps<bdlkern::SimtTag>::register_impls(m);
}

// Autocast on CPU tensors, with the policies of the `bdlkern` namespace (csrc/ops/autocast.h); the
// emulated CUDA kernels have float16 paths, so float16 autocast runs them natively.
TORCH_LIBRARY_IMPL(bdlkern_simt, AutocastCPU, m) {
  using namespace bdlkern::ops;
  using Tag = bdlkern::SimtTag;
  AutocastRegistrar<"bdlkern_simt", c10::DeviceType::CPU, true>{m}
      .register_all<RngOps<Tag>, MCDropoutOps<Tag>, ConcreteOps<Tag>, SparseVDOps<Tag>,
                    SparseLinearOps<Tag>>();
}
