// The SIMT build of csrc/kernels/cuda/gaussian_dropout.cu (see bdlkern/common/simt.h).
#include <bdlkern/common/simt.h>
#include "../../kernels/cuda/gaussian_dropout.cu"
