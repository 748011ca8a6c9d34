"""Functional API of bdlkern's operators.

Every random op is driven by an ``rng_state``: an int64 tensor ``[seed, offset]`` on the device the
op runs on. Given the same ``rng_state`` an op draws the same random bits (masks, uniforms, noise)
on the CPU, on CUDA and under the SIMT emulator, for any thread count (docs/design.md section 2),
and bdlkern's own kernels and reductions return the same bits for any thread count. Matrix products
that an op hands to torch's BLAS (the CPU MC-dropout and LRT paths) carry the BLAS's rounding,
which for MKL's float32 GEMM changes in the last bits with the thread count. When ``rng_state`` is
omitted it is
drawn from torch's generator (:func:`new_rng_state`), so ``torch.manual_seed`` makes every bdlkern
op reproducible.

Layout: one module per op family, each holding its user-facing wrappers next to the fake (meta)
kernels that torch.compile / FakeTensor use for its ops (the autograd formulas are registered in
C++): :mod:`~bdlkern.ops.rng` (the raw streams), :mod:`~bdlkern.ops.mc_dropout`,
:mod:`~bdlkern.ops.concrete`, :mod:`~bdlkern.ops.sparse_vd` (LRT and KL),
:mod:`~bdlkern.ops.variance` (zero-mean LRT layers), the ``sparse_linear`` module (the CSR layer) and
:mod:`~bdlkern.ops.gaussian` (Gaussian dropout); what they share is in ``_common``. Importing this
package imports every family, which registers the fake kernels.
"""

from __future__ import annotations

from ._common import (  # noqa: F401  (the private helpers stay reachable as bdlkern.ops._name)
    _NAMESPACES,
    STREAMS,
    ShapeLike,
    _check_devices,
    _is_compiling,
    _is_cpu,
    _is_exporting,
    _is_int,
    _number,
    _resolve_state,
    _sample_dim_input,
    _shape,
    _stream,
    _tracing,
    new_rng_state,
)
from .rng import dropout_mask, normal, philox_bits, uniform
from .mc_dropout import mc_dropout_conv, mc_dropout_linear
from .concrete import _channel_dim, concrete_dropout, concrete_dropout_regularizer  # noqa: F401
from .sparse_vd import ard_kl, lrt_conv, lrt_linear, sparse_vd_kl
from .variance import variance_conv, variance_linear
# Importing the submodule binds bdlkern.ops.sparse_linear to it; this import then rebinds the name to
# the function, which is what the public name has always been.
from .sparse_linear import sparse_conv, sparse_linear
from .gaussian import gaussian_dropout
from . import cost_model  # noqa: F401  (bdlkern.ops.cost_model: the CUDA path choice of mc_dropout_linear)


def _register_namespace(ns: str) -> None:
    """Register every family's fake kernels for ``ns``, an op namespace with bdlkern's schemas (the
    SIMT test namespace ``bdlkern_simt``, which :func:`bdlkern.testing.simt.load` registers). A
    namespace already registered is left alone."""
    if ns in _NAMESPACES:
        return
    import importlib

    for family in ("rng", "mc_dropout", "concrete", "sparse_vd", "sparse_linear", "variance", "gaussian"):
        importlib.import_module(f"{__name__}.{family}")._register_fakes(ns)
    _NAMESPACES.append(ns)

__all__ = [
    "STREAMS",
    "new_rng_state",
    "philox_bits",
    "dropout_mask",
    "uniform",
    "normal",
    "mc_dropout_linear",
    "mc_dropout_conv",
    "concrete_dropout",
    "concrete_dropout_regularizer",
    "lrt_linear",
    "lrt_conv",
    "sparse_vd_kl",
    "ard_kl",
    "sparse_linear",
    "sparse_conv",
    "variance_linear",
    "variance_conv",
    "gaussian_dropout",
]
