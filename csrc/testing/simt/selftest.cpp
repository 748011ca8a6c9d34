// The SIMT build of csrc/testing/selftest.cu (see bdlkern/common/simt.h).
#include <bdlkern/common/simt.h>
#include "../selftest.cu"
