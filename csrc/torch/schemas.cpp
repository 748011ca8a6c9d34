// The `bdlkern` operator library: schemas here, kernels in cpu.cpp and cuda.cpp.
#include "schemas.h"

TORCH_LIBRARY(bdlkern, m) {
  bdlkern::ops::define_rng_schemas(m);
  bdlkern::ops::define_mc_dropout_schemas(m);
  bdlkern::ops::define_concrete_schemas(m);
  bdlkern::ops::define_sparse_vd_schemas(m);
  bdlkern::ops::define_gaussian_schemas(m);
}
