// The SIMT build of csrc/kernels/cuda/mc_dropout_mask.cu (see bdlkern/common/simt.h).
#include <bdlkern/common/simt.h>
#include "../../kernels/cuda/mc_dropout_mask.cu"
