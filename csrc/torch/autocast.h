// Autocast behaviour of the bdlkern operators (torch.autocast on CPU and CUDA).
//
// Under autocast every op call first reaches the kernel registered here for the AutocastCPU /
// AutocastCUDA dispatch key. It turns autocast off for everything below it (the ATen calls that an
// op makes inside, e.g. the GEMMs of the LRT layer, must see the dtypes the op chose, not the
// autocast dtype), casts the floating inputs by the op's policy, and calls the op again through the
// dispatcher (autograd records the casts, so gradients flow back to float32 parameters):
//
// * kLowerPrecision: the autocast dtype where the kernel has a native path for it (MC dropout: bf16
//   on the CPU; fp16 and bf16 on CUDA and under the SIMT emulator), else float32. Like F.linear.
// * kFloat32: float16/bfloat16 inputs become float32 (the Concrete, LRT, KL and CSR kernels
//   compute in float32 or float64 only); float64 stays float64, as autocast leaves it everywhere.
// * kAsGiven: no cast. Used for the backward ops, whose operands autograd hands over in the dtypes
//   the forward chose, and for ops without floating inputs (the random-stream ops).
//
// The casts go through at::autocast::cached_cast, so a float32 weight is cast once per autocast
// region, as torch's own autocast ops do.
#pragma once

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <bdlkern/sparse_vd/math.h>  // KlPrior

#include <algorithm>
#include <cstddef>
#include <optional>
#include <string>
#include <type_traits>

namespace bdlkern {
namespace ops {

// Turns autocast off for the ATen calls of an op's binding (a no-op when autocast is off). Every
// binding that calls ATen compute ops (GEMMs, casts, reductions) holds one.
using NoAutocast = c10::impl::ExcludeDispatchKeyGuard;
inline NoAutocast no_autocast() { return NoAutocast(c10::autocast_dispatch_keyset); }

enum class CastPolicy { kAsGiven, kFloat32, kLowerPrecision };

// A string literal usable as a template argument (C++20).
template <std::size_t N>
struct Name {
  char text[N];
  constexpr Name(const char (&s)[N]) { std::copy_n(s, N, text); }
};

// The typed dispatcher handle of op Ns::Op, looked up once.
template <Name Ns, Name Op, class Sig>
const c10::TypedOperatorHandle<Sig>& op_handle() {
  static const auto handle =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow((std::string(Ns.text) + "::" + Op.text).c_str(), "")
          .template typed<Sig>();
  return handle;
}

template <c10::DeviceType Dev, bool HalfOnCpu>
inline at::ScalarType lower_precision_dtype() {
  const at::ScalarType t = at::autocast::get_autocast_dtype(Dev);
  if (Dev == c10::DeviceType::CPU && t == at::kHalf && !HalfOnCpu) return at::kFloat;
  return t;
}

template <class T>
inline decltype(auto) autocast_arg(at::ScalarType to, c10::DeviceType dev, const T& arg) {
  if constexpr (std::is_same_v<T, at::Tensor> || std::is_same_v<T, std::optional<at::Tensor>>) {
    return at::autocast::cached_cast(to, arg, dev);
  } else {
    return (arg);
  }
}

template <Name Ns, Name Op, c10::DeviceType Dev, CastPolicy P, bool HalfOnCpu, class Fn>
struct AutocastKernel;

template <Name Ns, Name Op, c10::DeviceType Dev, CastPolicy P, bool HalfOnCpu, class Ret,
          class... Args>
struct AutocastKernel<Ns, Op, Dev, P, HalfOnCpu, Ret (*)(Args...)> {
  static Ret call(Args... args) {
    const NoAutocast guard = no_autocast();
    if constexpr (P == CastPolicy::kAsGiven) {
      return op_handle<Ns, Op, Ret(Args...)>().call(args...);
    } else {
      const at::ScalarType to =
          P == CastPolicy::kFloat32 ? at::kFloat : lower_precision_dtype<Dev, HalfOnCpu>();
      return op_handle<Ns, Op, Ret(Args...)>().call(
          autocast_arg<std::remove_cvref_t<Args>>(to, Dev, args)...);
    }
  }
};

// Registers autocast kernels of namespace Ns for device Dev: impl<"op", policy>(&binding).
template <Name Ns, c10::DeviceType Dev, bool HalfOnCpu>
struct AutocastRegistrar {
  torch::Library& m;

  template <Name Op, CastPolicy P, class Fn>
  void impl(Fn) const {
    m.impl(Op.text, &AutocastKernel<Ns, Op, Dev, P, HalfOnCpu, Fn>::call);
  }

  // The same kernels for both namespaces and every backend: the bindings of one backend give the
  // signatures (they are the same for every backend).
  template <class Rng, class MC, class MCConv, class Concrete, class VD, class LrtConv, class Csr,
            class CsrConv, class Gaussian>
  void register_all() const {
    using enum CastPolicy;
    // No floating inputs: nothing to cast; the guard keeps their ATen calls out of autocast.
    impl<"philox4x32", kAsGiven>(&Rng::philox4x32);
    impl<"philox_bits", kAsGiven>(&Rng::philox_bits);
    impl<"dropout_mask", kAsGiven>(&Rng::dropout_mask);
    impl<"uniform", kAsGiven>(&Rng::uniform);
    impl<"normal", kAsGiven>(&Rng::normal);
    impl<"mc_dropout_linear", kLowerPrecision>(&MC::forward);
    impl<"mc_dropout_linear_grad_input", kAsGiven>(&MC::grad_input);
    impl<"mc_dropout_linear_grad_weight", kAsGiven>(&MC::grad_weight);
    impl<"mc_dropout_conv", kLowerPrecision>(&MCConv::forward);
    impl<"mc_dropout_conv_backward", kAsGiven>(&MCConv::backward);
    impl<"concrete_dropout", kFloat32>(&Concrete::forward);
    impl<"concrete_dropout_backward", kAsGiven>(&Concrete::backward);
    impl<"lrt_linear", kFloat32>(&VD::forward);
    impl<"lrt_linear_backward", kAsGiven>(&VD::backward);
    impl<"lrt_conv", kFloat32>(&LrtConv::forward);
    impl<"lrt_conv_backward", kAsGiven>(&LrtConv::backward);
    impl<"variance_linear", kFloat32>(&VD::variance_forward);
    impl<"variance_linear_backward", kAsGiven>(&VD::variance_backward);
    impl<"variance_conv", kFloat32>(&LrtConv::variance_forward);
    impl<"variance_conv_backward", kAsGiven>(&LrtConv::variance_backward);
    impl<"sparse_vd_kl", kFloat32>(&VD::template kl<KlPrior::kLogUniform>);
    impl<"sparse_vd_kl_backward", kAsGiven>(&VD::template kl_backward<KlPrior::kLogUniform>);
    impl<"sparse_vd_kl_with_grad", kFloat32>(&VD::template kl_with_grad<KlPrior::kLogUniform>);
    impl<"ard_kl", kFloat32>(&VD::template kl<KlPrior::kArd>);
    impl<"ard_kl_backward", kAsGiven>(&VD::template kl_backward<KlPrior::kArd>);
    impl<"ard_kl_with_grad", kFloat32>(&VD::template kl_with_grad<KlPrior::kArd>);
    impl<"sparse_linear", kFloat32>(&Csr::forward);
    impl<"sparse_linear_backward", kAsGiven>(&Csr::backward);
    impl<"sparse_linear_lrt", kFloat32>(&Csr::lrt_forward);
    impl<"sparse_linear_lrt_backward", kAsGiven>(&Csr::lrt_backward);
    impl<"sparse_conv", kFloat32>(&CsrConv::forward);
    impl<"sparse_conv_backward", kAsGiven>(&CsrConv::backward);
    impl<"sparse_conv_lrt", kFloat32>(&CsrConv::lrt_forward);
    impl<"sparse_conv_lrt_backward", kAsGiven>(&CsrConv::lrt_backward);
    impl<"gaussian_dropout", kFloat32>(&Gaussian::forward);
    impl<"gaussian_dropout_backward", kAsGiven>(&Gaussian::backward);
  }
};

}  // namespace ops
}  // namespace bdlkern
