// Autograd of the `bdlkern` operators (csrc/torch/autograd.h), for every device.
#include "autograd.h"

TORCH_LIBRARY_IMPL(bdlkern, Autograd, m) { bdlkern::ops::AutogradOps<"bdlkern">::register_impls(m); }
