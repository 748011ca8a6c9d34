// CSR structure validation on the host (declared in bdlkern/sparse_linear/kernels.h). Its own file
// because the SIMT test extension links it too: the bindings of every backend validate before a kernel runs.
#include <stdint.h>

#include <bdlkern/sparse_linear/kernels.h>

#include "vec_math.h"

namespace bdlkern {
namespace {

// Counts crow descents, then in one pass over col (the bulk of the bytes) the columns out of range
// and the col descents (col[j] <= col[j - 1]); then the col descents that sit at a row start. The
// structure is valid iff the out-of-order counts are 0 and every col descent is a row start.
inline __attribute__((always_inline)) bool structure_ok_body(const int64_t* crow, const int64_t* col,
                                                             int64_t n_rows, int64_t n_cols) {
  const int64_t nnz = crow[n_rows];
  int64_t bad = 0;
  for (int64_t n = 0; n < n_rows; ++n) bad += crow[n] > crow[n + 1];
  if (bad != 0 || nnz < 0) return false;
  int64_t descents = 0;
  if (nnz > 0) bad += static_cast<uint64_t>(col[0]) >= static_cast<uint64_t>(n_cols);
  for (int64_t j = 1; j < nnz; ++j) {
    bad += static_cast<uint64_t>(col[j]) >= static_cast<uint64_t>(n_cols);
    descents += col[j] <= col[j - 1];
  }
  if (bad != 0) return false;
  int64_t at_starts = 0;
  for (int64_t n = 0; n < n_rows; ++n) {
    const int64_t j = crow[n];
    at_starts += (j > 0 && j < crow[n + 1]) && col[j] <= col[j - 1];
  }
  return descents == at_starts;
}

BDLKERN_SIMD_FUNCTION(bool, structure_ok,
                      (const int64_t* crow, const int64_t* col, int64_t n_rows, int64_t n_cols),
                      structure_ok_body, (crow, col, n_rows, n_cols))

}  // namespace

bool csr_structure_ok(const int64_t* crow, const int64_t* col, int64_t n_rows, int64_t n_cols) {
  if (crow[0] != 0) return false;
  return structure_ok(crow, col, n_rows, n_cols);
}

}  // namespace bdlkern
