// The Python module `bdlkern._C`. Importing it registers torch.ops.bdlkern.* (the registrations
// live in csrc/torch/*.cpp); the module itself only reports how it was built.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/Generator.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <mutex>

#include "autocast.h"
#include "backend_traits.h"
#include <ATen/Config.h>
#include <bdlkern/mc_dropout/cost_model.h>
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
                         const at::Tensor&, double, int64_t, bool, std::optional<bool>);
  return bdlkern::ops::op_handle<"bdlkern", "mc_dropout_linear", Sig>().call(
      x, weight, bias, draw_cpu_rng_state(), p, num_samples, shared_mask, std::nullopt);
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

// ---- the CUDA path cost model (bdlkern/mc_dropout/cost_model.h), for bdlkern.ops.cost_model ----
static py::dict spec_dict(const bdlkern::GpuSpec& g) {
  py::dict d;
  d["major"] = g.major;
  d["minor"] = g.minor;
  d["sm_count"] = g.sm_count;
  d["sm_clock_khz"] = g.sm_clock_khz;
  d["mem_clock_khz"] = g.mem_clock_khz;
  d["mem_bus_bits"] = g.mem_bus_bits;
  d["total_memory"] = g.total_memory;
  return d;
}

static py::dict recorded_gpu_specs() {
  py::dict d;
  d["A100-SXM4-80GB"] = spec_dict(bdlkern::a100_sxm4_80gb());
  d["H100-SXM5-80GB"] = spec_dict(bdlkern::h100_sxm5_80gb());
  return d;
}

#if defined(BDLKERN_WITH_CUDA)
// What the op itself reads of a CUDA device (cached attribute queries).
static py::dict cuda_gpu_spec(int index) {
  const at::Tensor like =
      at::empty({0}, at::TensorOptions().device(at::Device(at::kCUDA, static_cast<int8_t>(index))));
  return spec_dict(bdlkern::ops::BackendTraits<bdlkern::CudaTag>::gpu_spec(like));
}
#endif

// plan(spec, S, B, K, N, shared_input, dtype, allow_tf32, pass, shared_mask, p) -> (memory_efficient,
// {path: (seconds, flops, bytes, workspace)}); dtype and pass are the C++ enums' values.
static py::tuple mc_dropout_plan(int major, int minor, int sm_count, double sm_clock_khz,
                                 double mem_clock_khz, int mem_bus_bits, double total_memory,
                                 int64_t S, int64_t B, int64_t K, int64_t N, bool shared_input,
                                 int dtype, bool allow_tf32, int pass, bool shared_mask,
                                 double p) {
  TORCH_CHECK(sm_count > 0 && sm_clock_khz > 0 && mem_clock_khz > 0 && mem_bus_bits > 0,
              "mc_dropout_linear_plan: the GPU spec needs positive sm_count, clocks and bus width");
  TORCH_CHECK(S >= 1 && B >= 0 && K >= 0 && N >= 0,
              "mc_dropout_linear_plan: sizes must be S >= 1 and B, K, N >= 0");
  TORCH_CHECK(dtype >= 0 && dtype <= 3 && pass >= 0 && pass <= 2,
              "mc_dropout_linear_plan: bad dtype or pass code");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "mc_dropout_linear_plan: p must be in [0, 1), got ", p);
  bdlkern::GpuSpec g;
  g.major = major, g.minor = minor, g.sm_count = sm_count;
  g.sm_clock_khz = sm_clock_khz, g.mem_clock_khz = mem_clock_khz, g.mem_bus_bits = mem_bus_bits;
  g.total_memory = total_memory;
  bdlkern::McDropoutProblem pr;
  pr.S = S, pr.B = B, pr.K = K, pr.N = N, pr.shared_input = shared_input;
  pr.dtype = static_cast<bdlkern::DType>(dtype);
  pr.allow_tf32 = allow_tf32;
  pr.pass = static_cast<bdlkern::McDropoutPass>(pass);
  pr.shared_mask = shared_mask;
  pr.keep = 1.0 - p;
  const bdlkern::McDropoutPlan plan = bdlkern::plan_mc_dropout_linear(g, pr);
  const auto cost = [](const bdlkern::PathCost& c) {
    return py::make_tuple(c.seconds, c.flops, c.bytes, c.workspace);
  };
  py::dict paths;
  paths["fused"] = cost(plan.fused);
  paths["materialise"] = cost(plan.materialise);
  paths["eager"] = cost(plan.eager);
  return py::make_tuple(plan.memory_efficient, paths);
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "bdlkern operators (CPU and CUDA kernels); see torch.ops.bdlkern";
  m.def("build_info", &build_info, "How this extension was built: a dict.");
  m.def("_draw_cpu_rng_state", &draw_cpu_rng_state,
        "[seed, 0] from torch's default CPU generator, as torch.randint(0, 2**63 - 1) draws it.");
  m.def("_mc_dropout_linear_eager", &mc_dropout_linear_eager,
        "torch.ops.bdlkern.mc_dropout_linear with a fresh CPU rng_state, called unboxed.");
  m.def("_recorded_gpu_specs", &recorded_gpu_specs,
        "The cost model's recorded device properties (A100, H100), by name.");
  m.def("_cuda_matmul_tf32", &bdlkern::ops::cuda_matmul_tf32,
        "Whether float32 CUDA matmuls may use TF32, as mc_dropout_linear's cost model reads it.");
  m.def("_mc_dropout_plan", &mc_dropout_plan,
        "The CUDA path cost model of mc_dropout_linear (see bdlkern.ops.cost_model).");
#if defined(BDLKERN_WITH_CUDA)
  m.def("_cuda_gpu_spec", &cuda_gpu_spec, "The cost model's view of CUDA device `index`.");
#endif
}
