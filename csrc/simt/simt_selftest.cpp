// The SIMT build of csrc/cuda/simt_selftest.cu (see bdlkern/simt.h).
#include <bdlkern/simt.h>
#include "../cuda/simt_selftest.cu"
