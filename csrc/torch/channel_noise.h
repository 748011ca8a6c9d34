// What the bindings of the two noise-on-activations ops share (concrete_dropout, gaussian_dropout):
// x viewed as [M, C, L] with one random value per element (channel_dim = -1, L = 1) or per (n, c)
// of [N, C, *] (channel_dim = 1), a parameter that is 0-d (one for the layer) or [C], and the
// checks of x, the parameter, rng_state and the backward's grad_out, with the messages naming the
// op's own words for the random value and the parameter.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace bdlkern {
namespace ops {

// How the op names things in its errors: "a mask value" / "rates" / "rate" (Concrete dropout),
// "noise" / "alphas" / "alpha" (Gaussian dropout).
struct ChannelNoiseWords {
  const char* value;   // one random value of the op
  const char* params;  // the parameter, plural
  const char* param;   // the parameter, singular
};

struct ChannelLayout {
  int64_t rows, channels, inner;  // M, C, L
  bool per_channel;               // the parameter is [C] (else 0-d)
};

// Checks x, the parameter `param` (named `param_name`), channel_dim and rng_state for backend
// `device`, and returns x's [M, C, L] view.
inline ChannelLayout channel_layout(const at::Tensor& x, const at::Tensor& param,
                                    const char* param_name, const at::Tensor& rng_state,
                                    int64_t channel_dim, c10::DeviceType device,
                                    const ChannelNoiseWords& w, const char* op) {
  TORCH_CHECK(x.device().type() == device, op, ": x must be on ",
              c10::DeviceTypeName(device, true), ", got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(channel_dim == -1 || channel_dim == 1, op, ": channel_dim must be -1 (", w.value,
              " per element, ", w.params, " along the last dim) or 1 (", w.value,
              " per (sample, channel) of [N, C, *]), got ", channel_dim);
  TORCH_CHECK(x.dim() >= (channel_dim == 1 ? 2 : 1), op, ": x must have ",
              channel_dim == 1 ? "shape [N, C, *] for channel_dim=1" : "at least one dimension",
              ", got shape ", x.sizes());
  TORCH_CHECK(param.scalar_type() == x.scalar_type(), op, ": ", param_name,
              " must have the dtype of x (", x.scalar_type(), "), got ", param.scalar_type());
  TORCH_CHECK(param.device() == x.device(), op, ": ", param_name, " must be on x's device (",
              x.device(), "), got ", param.device());
  const int64_t C = x.size(channel_dim);
  TORCH_CHECK(param.dim() == 0 || (param.dim() == 1 && param.size(0) == C), op, ": ", param_name,
              " must be a scalar (one ", w.param, " for the layer) or have shape [", C, "] (one ",
              w.param, " per ", channel_dim == 1 ? "channel" : "feature", "), got shape ",
              param.sizes());
  check_rng_state(rng_state, device, x, "x", op);
  ChannelLayout l{0, C, 1, param.dim() == 1};
  if (channel_dim == 1) {
    l.rows = x.size(0);
    l.inner = C == 0 || x.size(0) == 0 ? 1 : x.numel() / (x.size(0) * C);
  } else {
    l.rows = C == 0 ? 0 : x.numel() / C;
  }
  return l;
}

// The backward's grad_out: x's shape, dtype and device.
inline void check_grad_like_x(const at::Tensor& grad_out, const at::Tensor& x, const char* op) {
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(),
              ", got ", grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(), op,
              ": grad_out must have x's dtype and device (", x.scalar_type(), ", ", x.device(),
              "), got ", grad_out.scalar_type(), ", ", grad_out.device());
}

}  // namespace ops
}  // namespace bdlkern
