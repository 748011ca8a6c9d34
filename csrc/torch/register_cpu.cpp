// CPU kernels of the `bdlkern` operators.
#include <torch/library.h>

#include "autocast.h"
#include "concrete.h"
#include "mc_dropout.h"
#include "mc_dropout_conv.h"
#include "rng.h"
#include "sparse_conv.h"
#include "sparse_linear.h"
#include "lrt_conv.h"
#include "sparse_vd.h"
#include "gaussian.h"

TORCH_LIBRARY_IMPL(bdlkern, CPU, m) {
  bdlkern::ops::RngOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::MCDropoutOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::MCDropoutConvOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::ConcreteOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::SparseVDOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::LrtConvOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::SparseLinearOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::SparseConvOps<bdlkern::CpuTag>::register_impls(m);
  bdlkern::ops::GaussianOps<bdlkern::CpuTag>::register_impls(m);
}

// Autocast kernels (csrc/torch/autocast.h). The CUDA ones are registered in every build: they only
// cast and redispatch, and a CPU-only build has no CUDA tensors to reach them.
namespace {
template <c10::DeviceType Dev, bool HalfOnCpu>
void register_autocast(torch::Library& m) {
  using namespace bdlkern::ops;
  using Tag = bdlkern::CpuTag;
  AutocastRegistrar<"bdlkern", Dev, HalfOnCpu>{m}
      .template register_all<RngOps<Tag>, MCDropoutOps<Tag>, MCDropoutConvOps<Tag>, ConcreteOps<Tag>,
                             SparseVDOps<Tag>, LrtConvOps<Tag>, SparseLinearOps<Tag>, SparseConvOps<Tag>,
                             GaussianOps<Tag>>();
}
}  // namespace

TORCH_LIBRARY_IMPL(bdlkern, AutocastCPU, m) { register_autocast<c10::DeviceType::CPU, false>(m); }
TORCH_LIBRARY_IMPL(bdlkern, AutocastCUDA, m) { register_autocast<c10::DeviceType::CUDA, true>(m); }
