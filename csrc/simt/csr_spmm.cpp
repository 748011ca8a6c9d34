// The SIMT build of csrc/cuda/csr_spmm.cu (see bdlkern/simt.h).
#include <bdlkern/simt.h>
#include "../cuda/csr_spmm.cu"
