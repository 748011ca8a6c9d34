// The Python module `bdlkern._C`. Importing it registers torch.ops.bdlkern.* (the registrations
// live in csrc/ops/*.cpp); the module itself only reports how it was built.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <ATen/Config.h>
#include <torch/headeronly/version.h>

#ifndef BDLKERN_VERSION
#error "BDLKERN_VERSION must be defined by the build"
#endif
#ifndef BDLKERN_CUDA_ARCHS
#define BDLKERN_CUDA_ARCHS ""
#endif

#if defined(BDLKERN_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

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
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "bdlkern operators (CPU and CUDA kernels); see torch.ops.bdlkern";
  m.def("build_info", &build_info, "How this extension was built: a dict.");
}
