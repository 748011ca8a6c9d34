"""``nn`` modules built on bdlkern's fused kernels.

MC layers follow one convention for the sample dimension, documented in :mod:`bdlkern._sampling`:
outside ``bdlkern.sampling(S)`` they behave like the PyTorch layers they replace; inside it they
sample, and the tensors computed from their outputs carry the samples (stacked ``[S, ...]`` or
folded into the batch, ``[S * N, ...]``).

Every module checks its input before it reaches a kernel, so that a wrong input gives an error in
the module's terms (never a silently wrong result or a message about an internal op):

* the width: the input's last dimension must be the layer's ``in_features`` (for a wrapped
  convolution: dimension 1, after the sample dimension inside ``sampling``, must be its
  ``in_channels``), as ``nn.Linear`` requires; a ``ValueError`` otherwise;
* the dtype: the input must have the dtype of the module's parameters, and a path that runs a
  bdlkern kernel needs a parameter dtype that kernel supports (the MC-dropout kernel: float32,
  float64, bfloat16 and, on CUDA, float16; the Concrete, LRT, KL and sparse kernels: float32 and
  float64); a ``TypeError`` otherwise. Under ``torch.autocast`` the dtype checks are skipped: the
  ops' autocast rules choose the dtypes there.

None of the modules can be compiled by TorchScript (``torch.jit.script`` raises a
``RuntimeError`` saying so); ``torch.compile`` and ``torch.export`` are the supported routes.

Layout: one module per family, :mod:`~bdlkern.nn.mc_dropout` (:class:`MCDropout`, :class:`MCDropoutLinear`,
:class:`MCDropoutConv2d` and its 1-d / 3-d siblings), :mod:`~bdlkern.nn.concrete` (the Concrete-dropout
modules) and :mod:`~bdlkern.nn.sparse_vd` (:class:`SparseVDLinear`, :class:`SparseVDConv2d` and its 1-d /
3-d siblings, :class:`SparseLinear`, :class:`SparseConv2d`) and :mod:`~bdlkern.nn.variational`
(:class:`VariationalDropoutLinear`, :class:`VariationalDropoutConv2d`: Kingma et al.'s variational dropout),
:mod:`~bdlkern.nn.gaussian` (:class:`GaussianDropout`: multiplicative Gaussian noise on activations, fixed or
learnt alpha) and :mod:`~bdlkern.nn.variance` (:class:`VarianceLinear`, :class:`VarianceConv2d` and its 1-d /
3-d siblings: the zero-mean layers of variance networks); then what works on a whole model: ``convert``
(:func:`convert`, :func:`regularization`, :func:`kl_divergence`), ``bayesianize`` (:func:`bayesianize`:
dense layers to bdlkern layers) and ``prune`` (:func:`prune`: sparse-VD layers to compacted sparse ones);
``_base`` holds the input checks every module shares. Every name is importable from ``bdlkern.nn`` itself.
"""

from __future__ import annotations

from ._base import (  # noqa: F401  (the shared checks stay reachable as bdlkern.nn._name)
    _F32_F64,
    _MC_DTYPES,
    _NotScriptable,
    _check_dtype,
    _check_width,
    _dtype_error,
    _module_label,
    _width_error,
)
from .mc_dropout import MCDropout, MCDropoutConv1d, MCDropoutConv2d, MCDropoutConv3d, MCDropoutLinear
from .concrete import (  # noqa: F401
    ConcreteDropout,
    ConcreteDropout2d,
    ConcreteDropoutLinear,
    _ConcreteDropoutMixin,
    _fusable_rate,
    _fused_linear_mc,
    _input_dim_of,
    _logit,
)
from .sparse_vd import (
    SparseConv1d,
    SparseConv2d,
    SparseConv3d,
    SparseLinear,
    SparseVDConv1d,
    SparseVDConv2d,
    SparseVDConv3d,
    SparseVDLinear,
)
from .variational import VariationalDropoutConv2d, VariationalDropoutLinear, variational_dropout_kl
from .variance import VarianceConv1d, VarianceConv2d, VarianceConv3d, VarianceLinear, VarianceMeanWarning
# Importing the submodule binds bdlkern.nn.convert to it; this import then rebinds the name to the
# function, which is what the public name has always been.
from .convert import ConvertReport, convert, kl_divergence, regularization
from .bayesianize import BayesianizeReport, bayesianize
from .prune import (
    CompactSparseConv1d,
    CompactSparseConv2d,
    CompactSparseConv3d,
    CompactSparseLinear,
    FeatureGather,
    PrunedLayer,
    PruneReport,
    prune,
)
from .gaussian import GaussianDropout

__all__ = [
    "MCDropout",
    "MCDropoutLinear",
    "MCDropoutConv1d",
    "MCDropoutConv2d",
    "MCDropoutConv3d",
    "ConcreteDropout",
    "ConcreteDropout2d",
    "ConcreteDropoutLinear",
    "SparseLinear",
    "SparseConv1d",
    "SparseConv2d",
    "SparseConv3d",
    "SparseVDLinear",
    "SparseVDConv1d",
    "SparseVDConv2d",
    "SparseVDConv3d",
    "VariationalDropoutLinear",
    "VariationalDropoutConv2d",
    "variational_dropout_kl",
    "VarianceLinear",
    "VarianceConv1d",
    "VarianceConv2d",
    "VarianceConv3d",
    "VarianceMeanWarning",
    "convert",
    "ConvertReport",
    "kl_divergence",
    "regularization",
    "bayesianize",
    "BayesianizeReport",
    "prune",
    "PruneReport",
    "PrunedLayer",
    "CompactSparseLinear",
    "CompactSparseConv1d",
    "CompactSparseConv2d",
    "CompactSparseConv3d",
    "FeatureGather",
    "GaussianDropout",
]
