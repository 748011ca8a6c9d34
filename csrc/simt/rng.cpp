// The SIMT build of csrc/cuda/rng.cu (see bdlkern/simt.h).
#include <bdlkern/simt.h>
#include "../cuda/rng.cu"
