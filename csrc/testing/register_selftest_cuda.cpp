// The test extension `bdlkern._C_simt_cuda`: the SIMT emulator's self-test kernels
// (csrc/testing/selftest.cu) compiled by nvcc and registered as the CUDA kernels of the
// `bdlkern_simt` self-test ops, so that tests/test_simt.py checks the emulator against real hardware
// where a GPU is present. Built only in development builds (BDLKERN_SIMT=1) that also build CUDA;
// the operator library `bdlkern._C` carries no test code.
#include <Python.h>
#include <torch/library.h>

#include "../torch/cuda_stream.h"
#include "selftest_ops.h"

TORCH_LIBRARY_IMPL(bdlkern_simt, CUDA, m) {
  bdlkern::ops::SelftestOps<bdlkern::CudaTag>::register_impls(m);
}

static PyModuleDef simt_cuda_module = {PyModuleDef_HEAD_INIT, "_C_simt_cuda",
                                       "the SIMT self-test kernels on a real GPU (tests only)", -1,
                                       nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C_simt_cuda(void) { return PyModule_Create(&simt_cuda_module); }
