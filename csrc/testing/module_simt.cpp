// Python module of the SIMT test extension: importing it registers torch.ops.bdlkern_simt.*.
#include <Python.h>

static PyModuleDef simt_module = {PyModuleDef_HEAD_INIT, "_C_simt",
                                  "bdlkern CUDA kernels run by the SIMT emulator (tests only)", -1,
                                  nullptr, nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C_simt(void) { return PyModule_Create(&simt_module); }
