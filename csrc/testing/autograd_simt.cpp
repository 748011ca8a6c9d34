// Autograd of the SIMT test namespace: the same C++ Functions as `bdlkern` (csrc/torch/autograd.h),
// calling the bdlkern_simt ops.
#include "../torch/autograd.h"

TORCH_LIBRARY_IMPL(bdlkern_simt, Autograd, m) {
  bdlkern::ops::AutogradOps<"bdlkern_simt">::register_impls(m);
}
