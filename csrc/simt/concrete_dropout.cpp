// The SIMT build of csrc/cuda/concrete_dropout.cu (see bdlkern/simt.h).
#include <bdlkern/simt.h>
#include "../cuda/concrete_dropout.cu"
