// The element types a kernel entry point can be asked to run in. Bindings map at::ScalarType to
// this enum (csrc/torch/checks.h) so the torch-free kernel headers never see ATen.
#pragma once

namespace bdlkern {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

}  // namespace bdlkern
