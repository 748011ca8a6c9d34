// The `bdlkern_simt` operator library: the same schemas as `bdlkern`, implemented on CPU tensors
// by the CUDA kernel sources compiled against the SIMT emulator, plus the emulator's self-tests.
#include <torch/library.h>

#include "../torch/autocast.h"
#include "../torch/concrete.h"
#include "../torch/mc_dropout.h"
#include "../torch/mc_dropout_conv.h"
#include "../torch/rng.h"
#include "../torch/schemas.h"
#include "selftest_ops.h"
#include "../torch/sparse_conv.h"
#include "../torch/sparse_linear.h"
#include "../torch/lrt_conv.h"
#include "../torch/sparse_vd.h"
#include "../torch/gaussian.h"

TORCH_LIBRARY(bdlkern_simt, m) {
  bdlkern::ops::define_rng_schemas(m);
  bdlkern::ops::define_mc_dropout_schemas(m);
  bdlkern::ops::define_concrete_schemas(m);
  bdlkern::ops::define_sparse_vd_schemas(m);
  bdlkern::ops::define_selftest_schemas(m);
  bdlkern::ops::define_gaussian_schemas(m);
}

TORCH_LIBRARY_IMPL(bdlkern_simt, CPU, m) {
  bdlkern::ops::RngOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::MCDropoutOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::MCDropoutConvOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::ConcreteOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::SparseVDOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::LrtConvOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::SparseLinearOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::SparseConvOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::SelftestOps<bdlkern::SimtTag>::register_impls(m);
  bdlkern::ops::GaussianOps<bdlkern::SimtTag>::register_impls(m);
}

// Autocast on CPU tensors, with the policies of the `bdlkern` namespace (csrc/torch/autocast.h); the
// emulated CUDA kernels have float16 paths, so float16 autocast runs them natively.
TORCH_LIBRARY_IMPL(bdlkern_simt, AutocastCPU, m) {
  using namespace bdlkern::ops;
  using Tag = bdlkern::SimtTag;
  AutocastRegistrar<"bdlkern_simt", c10::DeviceType::CPU, true>{m}
      .register_all<RngOps<Tag>, MCDropoutOps<Tag>, MCDropoutConvOps<Tag>, ConcreteOps<Tag>,
                    SparseVDOps<Tag>, LrtConvOps<Tag>, SparseLinearOps<Tag>, SparseConvOps<Tag>,
                    GaussianOps<Tag>>();
}
