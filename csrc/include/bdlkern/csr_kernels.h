// Raw-pointer entry points of the sparse (CSR) linear kernels (torch-free).
//
// W [N, K] is held in CSR: row n (an output feature) has entries j in [crow[n], crow[n + 1]) at
// input features col[j] (ascending), with values[j * value_stride] (theta) and, for the stochastic
// layer, values[j * value_stride + 1] (the weight variance alpha theta^2, the same pattern).
// The batch is the contiguous dimension of every dense operand, so each weight is broadcast over a
// run of the batch that the CPU vectorises and a warp reads in one coalesced load:
//
//   out_a_t[n, b] = sum_j theta_j in_a_t[col_j, b]  (+ bias[n])
//   out_b_t[n, b] = sum_j var_j   (in_b_t ? in_b_t[col_j, b] : in_a_t[col_j, b]^2)   (if out_b_t)
//
// Forward: in_a_t = x^T [K, B] gives mu^T and (squared) var^T. The gradient of x runs the same
// kernel on the CSR of W^T (rows = input features) with in_a_t = grad_mu^T and in_b_t = grad_var^T.
// Every output element is written by one thread after a reduction in entry order: deterministic.
#pragma once

#include <stdint.h>

#include "backend.h"
#include "mc_dropout_kernels.h"  // DType

namespace bdlkern {

struct CsrParams {
  int64_t rows;           // N: rows of the CSR matrix (outputs)
  int64_t batch;          // B: columns of the dense operands
  const int64_t* crow;    // [N + 1]
  const int64_t* col;     // [nnz]
  const void* values;     // [nnz * value_stride]
  int64_t value_stride;   // 1 (theta) or 2 (theta, var interleaved)
  const int64_t* row_order;  // [N]: the order rows are handed to warps (CUDA), or nullptr
  const void* bias;       // [N] added to out_a, or nullptr
  DType dtype;            // float32 or float64
  void* stream;
};

#define BDLKERN_DECLARE_CSR_KERNELS(Tag)                                                          \
  void csr_spmm(Tag, const CsrParams& p, const void* in_a_t, const void* in_b_t, void* out_a_t,  \
                void* out_b_t);

// The CPU kernel takes row-major operands instead: cpu::csr_linear (csrc/cpu/csr_cpu.h).
BDLKERN_DECLARE_CSR_KERNELS(CudaTag)
BDLKERN_DECLARE_CSR_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_CSR_KERNELS

}  // namespace bdlkern
