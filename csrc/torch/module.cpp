// The Python module `bdlkern._C`. Importing it registers torch.ops.bdlkern.* (the registrations
// live in csrc/torch/*.cpp); the module itself only reports how it was built.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <mutex>

#include "autocast.h"
#include <ATen/Config.h>
#include <torch/headeronly/version.h>

#ifndef BDLKERN_VERSION
#error "BDLKERN_VERSION must be defined by the build"
#endif
#ifndef BDLKERN_DEBUG_INFO
#error "BDLKERN_DEBUG_INFO must be defined by the build (1: compiled with -g)"
#endif
#ifndef BDLKERN_CUDA_ARCHS
#define BDLKERN_CUDA_ARCHS ""
#endif

#if defined(BDLKERN_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

// A fresh rng_state [seed, 0] from torch's default CPU generator: the eager fast path of
// bdlkern.ops.new_rng_state. It consumes the generator exactly as
// torch.randint(0, 2**63 - 1, (1,)) does (one random64, reduced modulo the range), so eager calls
// and traced ones (which keep randint) draw the same seeds; it costs one call instead of three ops.
static at::Tensor draw_cpu_rng_state() {
  at::Generator gen = at::detail::getDefaultCPUGenerator();
  uint64_t word;
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    word = at::check_generator<at::CPUGeneratorImpl>(gen)->random64();
  }
  at::Tensor state = at::empty({2}, at::TensorOptions().dtype(at::kLong));
  int64_t* out = state.data_ptr<int64_t>();
  out[0] = static_cast<int64_t>(word % ((uint64_t{1} << 63) - 1));
  out[1] = 0;
  return state;
}

// The eager entry of bdlkern.ops.mc_dropout_linear for CPU inputs with a fresh state: the same
// op through the dispatcher (autograd, autocast, dispatch modes and the profiler all see it),
// called unboxed. A call through torch.ops from Python boxes every argument into a stack and back,
// which on a small layer costs more than the kernel. The Python side uses it only when neither
// torch.compile/export (which must see torch.ops) nor a __torch_function__ override is involved.
static at::Tensor mc_dropout_linear_eager(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias, double p,
                                          int64_t num_samples, bool shared_mask) {
  using Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         const at::Tensor&, double, int64_t, bool);
  return bdlkern::ops::op_handle<"bdlkern", "mc_dropout_linear", Sig>().call(
      x, weight, bias, draw_cpu_rng_state(), p, num_samples, shared_mask);
}

static py::dict build_info() {
  py::dict info;
  info["version"] = BDLKERN_VERSION;
  info["torch_version"] = TORCH_VERSION;
#if defined(BDLKERN_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                         std::to_string((CUDART_VERSION % 1000) / 10);
  info["cuda_archs"] = BDLKERN_CUDA_ARCHS;
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = "";
#endif
  info["threads"] = at::get_num_threads();
#if AT_PARALLEL_OPENMP
  info["parallel_backend"] = "openmp";
#elif AT_PARALLEL_NATIVE
  info["parallel_backend"] = "native";
#else
  info["parallel_backend"] = "unknown";
#endif
  info["compiler"] = __VERSION__;
  info["debug_info"] = BDLKERN_DEBUG_INFO != 0;
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "bdlkern operators (CPU and CUDA kernels); see torch.ops.bdlkern";
  m.def("build_info", &build_info, "How this extension was built: a dict.");
  m.def("_draw_cpu_rng_state", &draw_cpu_rng_state,
        "[seed, 0] from torch's default CPU generator, as torch.randint(0, 2**63 - 1) draws it.");
  m.def("_mc_dropout_linear_eager", &mc_dropout_linear_eager,
        "torch.ops.bdlkern.mc_dropout_linear with a fresh CPU rng_state, called unboxed.");
}
