// The SIMT build of csrc/kernels/cuda/sparse_conv.cu (see bdlkern/common/simt.h).
#include <bdlkern/common/simt.h>
#include "../../kernels/cuda/sparse_conv.cu"
