// The SIMT build of csrc/cuda/mc_dropout_linear.cu (see bdlkern/simt.h).
#include <bdlkern/simt.h>
#include "../cuda/mc_dropout_linear.cu"
