// The SIMT build of csrc/kernels/cuda/rng.cu (see bdlkern/common/simt.h).
#include <bdlkern/common/simt.h>
#include "../../kernels/cuda/rng.cu"
