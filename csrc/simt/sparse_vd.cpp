// The SIMT build of csrc/cuda/sparse_vd.cu (see bdlkern/simt.h).
#include <bdlkern/simt.h>
#include "../cuda/sparse_vd.cu"
