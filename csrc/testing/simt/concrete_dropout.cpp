// The SIMT build of csrc/kernels/cuda/concrete_dropout.cu (see bdlkern/common/simt.h).
#include <bdlkern/common/simt.h>
#include "../../kernels/cuda/concrete_dropout.cu"
