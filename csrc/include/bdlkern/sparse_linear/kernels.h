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

#include <bdlkern/common/backend.h>
#include <bdlkern/common/dtype.h>

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

BDLKERN_DECLARE_CSR_KERNELS(CudaTag)
BDLKERN_DECLARE_CSR_KERNELS(SimtTag)

#undef BDLKERN_DECLARE_CSR_KERNELS

// The CPU kernel (csrc/kernels/cpu/sparse_linear.cpp): the same products on row-major operands,
// in_a / in_b [B, k_in] and out_a / out_b [B, p.rows]; it makes its own batch-contiguous copies
// where it needs them.
void csr_spmm_rows(CpuTag, const CsrParams& p, int64_t k_in, const void* in_a, const void* in_b,
                   void* out_a, void* out_b);

// Host-side validation that every backend's binding runs before a kernel
// (csrc/kernels/cpu/sparse_linear_check.cpp): true when host arrays crow [n_rows + 1] and
// col [crow[n_rows]] form a valid CSR structure with columns in [0, n_cols): crow non-decreasing
// from 0, col strictly increasing within each row. Vectorised and branch-free (the binding walks
// the arrays again only to name what is wrong).
bool csr_structure_ok(const int64_t* crow, const int64_t* col, int64_t n_rows, int64_t n_cols);

}  // namespace bdlkern
