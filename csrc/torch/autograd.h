// Autograd of the bdlkern operators, in C++ (the Autograd dispatch key), so that an op call costs
// no Python beyond the module's forward: each differentiable op is a torch::autograd::Function
// whose forward calls the op below autograd and whose backward calls the backward ops, which
// re-make the random bits from the saved rng_state (nothing random is stored).
//
// Double backward: a backward that runs with grad mode on was asked for a graph of its own
// (create_graph=True: gradient penalties, Hessian-vector products, meta-learning). The fused
// backward kernels are not differentiable, so there the backward differentiates a composite form
// of its op instead: the same formula in ATen ops, with the op's random bits re-made by the stream
// ops (same stream tag, same logical index). That graph gives exact gradients of every order, at
// the memory of eager PyTorch, which only that path pays. sparse_linear_backward is linear in its
// gradient, so its own backward is the forward product and stays on the CSR kernels.
//
// Templated on the op namespace: `bdlkern` (csrc/torch/autograd.cpp) and the SIMT test namespace
// `bdlkern_simt` (csrc/testing/autograd_simt.cpp) share it.
//
// Layout: autograd/common.h (shared helpers) and one file per family (autograd/mc_dropout.h,
// concrete.h, sparse_vd.h, sparse_linear.h), each with its Functions and its registrations.
#pragma once

#include <torch/library.h>

#include "autograd/concrete.h"
#include "autograd/mc_dropout.h"
#include "autograd/sparse_linear.h"
#include "autograd/sparse_vd.h"
#include "autograd/gaussian.h"

namespace bdlkern {
namespace ops {

template <Name Ns>
struct AutogradOps {
  static void register_impls(torch::Library& m) {
    MCDropoutAutograd<Ns>::register_impls(m);
    ConcreteAutograd<Ns>::register_impls(m);
    SparseVDAutograd<Ns>::register_impls(m);
    SparseLinearAutograd<Ns>::register_impls(m);
    GaussianAutograd<Ns>::register_impls(m);
  }
};

}  // namespace ops
}  // namespace bdlkern
