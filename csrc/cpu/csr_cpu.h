// The CPU CSR linear kernel (csrc/cpu/csr_spmm.cpp). Same products as csr_spmm of
// bdlkern/csr_kernels.h, but on row-major operands: in_a / in_b [B, k_in] and out_a / out_b
// [B, p.rows]; the kernel makes its own batch-contiguous copies where it needs them.
#pragma once

#include <stdint.h>

#include <bdlkern/csr_kernels.h>

namespace bdlkern {
namespace cpu {

void csr_linear(const CsrParams& p, int64_t k_in, const void* in_a, const void* in_b, void* out_a,
                void* out_b);

// True when host arrays crow [n_rows + 1] and col [crow[n_rows]] form a valid CSR structure with
// columns in [0, n_cols): crow non-decreasing from 0, col strictly increasing within each row.
// Vectorised and branch-free (the binding walks the arrays again only to name what is wrong).
bool csr_structure_ok(const int64_t* crow, const int64_t* col, int64_t n_rows, int64_t n_cols);

}  // namespace cpu
}  // namespace bdlkern
