"""ONNX translations of bdlkern's operators, as ONNX Script functions (see :mod:`bdlkern.onnx`).

This module imports onnxscript at the top: :mod:`bdlkern.onnx` imports it only when a translation
is asked for, so ``import bdlkern`` never needs the ONNX packages.

Every function here is a *traced* ONNX Script function: the exporter calls it with the op's
arguments in schema order (tensors as ONNX IR values, ``float`` / ``int`` / ``bool`` arguments as
Python values, ``None`` for an absent optional tensor) while an ``onnxscript`` evaluator records the
``op.*`` calls as ONNX nodes. Shapes are computed in the graph (``Shape``, ``Concat``), so an export
with dynamic batch dimensions stays dynamic. The operators are those of ONNX opset 18.

Randomness: the ops' ``rng_state`` selects bits of bdlkern's counter-based Philox stream, which
ONNX has no operator for. The translations ignore it and draw the same *distributions* from the
runtime's own generator (``RandomUniformLike`` / ``RandomNormalLike``; a Bernoulli keep-mask is
``uniform < 1 - p``), a fresh draw on every run.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from onnxscript import ir
from onnxscript import opset18 as op

OPSET = 18  # the ONNX opset of every operator used below

_EPS_LRT = 1e-8  # sqrt(var + 1e-8), docs/design.md section 1.3
_EPS_CONCRETE = 1e-7
# Uniforms in the open interval (0, 1), as bdlkern.ops.uniform: its smallest value (2**-25) and the
# largest float32 below 1.
_U_MIN, _U_MAX = 2.0**-25, 1.0 - 2.0**-24


# ---- helpers ----------------------------------------------------------------------------------------
def _rank(value, what: str) -> int:
    shape = value.shape
    if shape is None:
        raise ValueError(f"bdlkern ONNX translation: the rank of {what} is unknown at export time")
    return len(shape)


def _ints(values) -> ir.Value:
    """A 1-d int64 constant."""
    values = [int(v) for v in values]
    if not values:  # an empty list attribute has no type: give the tensor
        return op.Constant(value=ir.tensor(np.zeros(0, dtype=np.int64)))
    return op.Constant(value_ints=values)


def _shape_of(size) -> ir.Value:
    """An int64 shape tensor from a ``SymInt[]`` argument: Python ints and (dynamic) scalar values."""
    if all(isinstance(d, int) for d in size):
        return _ints(size)
    parts = [_ints([d]) if isinstance(d, int) else op.Reshape(op.Cast(d, to=ir.DataType.INT64), _ints([1])) for d in size]
    return op.Concat(*parts, axis=0)


def _uniform(shape: ir.Value) -> ir.Value:
    """float32 uniforms of ``shape`` in [0, 1) from the runtime's generator."""
    return op.RandomUniformLike(op.ConstantOfShape(shape), low=0.0, high=1.0)


def _normal(shape: ir.Value) -> ir.Value:
    """float32 standard normals of ``shape`` from the runtime's generator."""
    return op.RandomNormalLike(op.ConstantOfShape(shape), mean=0.0, scale=1.0)


def _cast_to(value: ir.Value, dtype) -> ir.Value:
    """``value`` (float32) as the op's ``dtype`` argument (None / -1: float32)."""
    if dtype is None or int(dtype) in (-1, ir.DataType.FLOAT.value):
        return value
    return op.Cast(value, to=int(dtype))


def _add_eps(value: ir.Value, eps: float) -> ir.Value:
    """``value + eps`` for a tiny ``eps`` (1e-8). The constant has shape [1], not 0-d: onnxscript's
    optimiser removes ``x + c`` for a scalar ``c`` within 1e-8 of zero (its ``add_0`` rule), which
    would drop the epsilon."""
    return op.Add(value, op.CastLike(op.Constant(value_floats=[eps]), value))


def _bias(y: ir.Value, bias) -> ir.Value:
    return y if bias is None else op.Add(y, bias)


def _csr_rows(crow: ir.Value, col: ir.Value) -> ir.Value:
    """The row of each stored entry of a CSR matrix, int64 ``[nnz]``: a 1 is added at the start of
    every row but the first (``crow[1:N]``; several at one place for empty rows), and the cumulative
    sum counts them. (When ``crow`` is an initializer the runtime folds this at load time.)"""
    starts = op.Slice(crow, _ints([1]), _ints([-1]))  # crow[1:N]
    nnz = op.Shape(col)
    marks = op.ScatterElements(
        op.Expand(_ints([0]), op.Add(nnz, _ints([1]))),  # [nnz + 1]: crow[i] == nnz for trailing empty rows
        starts,
        op.Expand(_ints([1]), op.Shape(starts)),
        axis=0,
        reduction="add",
    )
    return op.Slice(op.CumSum(marks, op.Constant(value_int=0)), _ints([0]), nnz)


def _csr_matmul(x2: ir.Value, crow: ir.Value, col: ir.Value, rows: ir.Value, values: ir.Value) -> ir.Value:
    """``x2 W^T`` for ``x2 [R, K]`` and W given by (crow, col, values [nnz]): ``[R, N]``.

    Stays sparse: the input column of each stored weight is gathered (``[nnz, R]``), scaled by the
    weight, and summed into its output row by ``ScatterND`` with ``reduction="add"``; the work and
    memory are proportional to nnz, not to N * K."""
    gathered = op.Gather(op.Transpose(x2, perm=[1, 0]), col, axis=0)  # [nnz, R]: x[:, col[j]]
    products = op.Mul(gathered, op.Unsqueeze(values, _ints([1])))
    num_rows = op.Sub(op.Shape(crow), _ints([1]))  # N
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), x2), op.Concat(num_rows, op.Shape(x2, start=0, end=1), axis=0))
    out_t = op.ScatterND(zeros, op.Unsqueeze(rows, _ints([1])), products, reduction="add")  # [N, R]
    return op.Transpose(out_t, perm=[1, 0])


def _csr_values(values: ir.Value, column: int) -> ir.Value:
    """Column ``column`` of ``values [nnz, 2]`` (theta, variance), or ``values [nnz]`` itself."""
    if _rank(values, "values") == 1:
        return values
    return op.Gather(values, op.Constant(value_int=column), axis=1)


def _flatten_samples(x: ir.Value) -> ir.Value:
    """``[S, R, K] -> [S * R, K]``."""
    return op.Reshape(x, op.Concat(_ints([-1]), op.Shape(x, start=-1), axis=0))


def _lrt_output(mu: ir.Value, std: ir.Value, x_rank: int, x: ir.Value, num_samples: int):
    """``(mu + std * eps, std)`` with ``eps [S, R, N]``: mu and std are ``[R, N]`` (x without sample
    dimension, broadcast over the samples) or ``[S * R, N]`` (x ``[S, R, K]``)."""
    if x_rank == 2:
        shape = op.Concat(_ints([num_samples]), op.Shape(mu), axis=0)
        eps = op.CastLike(_normal(shape), mu)
        return op.Add(mu, op.Mul(std, eps)), std
    shape = op.Concat(op.Shape(x, start=0, end=2), op.Shape(mu, start=-1), axis=0)
    eps = op.CastLike(_normal(shape), mu)
    return op.Add(op.Reshape(mu, shape), op.Mul(op.Reshape(std, shape), eps)), std


# ---- convolutions: samples folded into the batch, sample-major -------------------------------------
def _conv(x: ir.Value, weight: ir.Value, bias, stride, padding, dilation, groups: int) -> ir.Value:
    """``F.conv{1,2,3}d(x, weight, bias, stride, padding, dilation, groups)`` as an ONNX ``Conv``
    (the ops pad symmetrically: ``pads`` is ``padding`` at the start and at the end)."""
    attrs = dict(
        strides=[int(v) for v in stride],
        pads=[int(v) for v in padding] * 2,
        dilations=[int(v) for v in dilation],
        group=int(groups),
    )
    if bias is None:
        return op.Conv(x, weight, **attrs)
    return op.Conv(x, weight, bias, **attrs)


def _conv_rank(x, what: str) -> int:
    rank = _rank(x, "x")
    if not 3 <= rank <= 5:
        raise ValueError(f"{what}: x must be [batch, channels, *spatial] with 1 to 3 spatial dimensions, got rank {rank}")
    return rank


def _unfold_samples(x: ir.Value, num_samples: int) -> ir.Value:
    """``[S * N, ...] -> [S, N, ...]``."""
    return op.Reshape(x, op.Concat(_ints([num_samples, -1]), op.Shape(x, start=1), axis=0))


def _fold_samples(x: ir.Value) -> ir.Value:
    """``[S, N, ...] -> [S * N, ...]``."""
    return op.Reshape(x, op.Concat(_ints([-1]), op.Shape(x, start=2), axis=0))


def _conv_lrt_output(mean: ir.Value, std: ir.Value, num_samples: int, shared_input: bool):
    """``(mean + std * eps, std)`` in the folded layout: ``mean`` and ``std`` are ``[N, C, *]`` for an
    input shared by the samples (broadcast over them: y ``[S * N, C, *]``, sample-major) or
    ``[S * N, C, *]`` already."""
    if not shared_input:
        eps = op.CastLike(_normal(op.Shape(mean)), mean)
        return op.Add(mean, op.Mul(std, eps)), std
    shape = op.Concat(_ints([num_samples]), op.Shape(mean), axis=0)  # [S, N, C, *]
    eps = op.CastLike(_normal(shape), mean)
    y = op.Add(op.Unsqueeze(mean, _ints([0])), op.Mul(op.Unsqueeze(std, _ints([0])), eps))
    return _fold_samples(y), std


def _csr_conv_weight(x: ir.Value, crow: ir.Value, col: ir.Value, values: ir.Value, kernel_size, groups: int) -> ir.Value:
    """The dense conv weight ``[C_out, C_in / groups, *kernel_size]`` of a CSR matrix over
    ``[C_out, (C_in / groups) * prod(kernel_size)]`` (``values [nnz]``): the stored values written
    into zeros by ``ScatterND`` at (row, col), the rows from ``crow`` (:func:`_csr_rows`).
    (When the CSR buffers are initializers, the exporter's optimiser, or else the runtime at load
    time, folds this into a constant weight.)"""
    rows = _csr_rows(crow, col)
    indices = op.Concat(op.Unsqueeze(rows, _ints([1])), op.Unsqueeze(col, _ints([1])), axis=1)  # [nnz, 2]
    out_channels = op.Sub(op.Shape(crow), _ints([1]))
    in_per_group = op.Div(op.Shape(x, start=1, end=2), _ints([int(groups)]))
    kernel = _ints(kernel_size)
    width = op.Mul(in_per_group, _ints([math.prod(int(k) for k in kernel_size)]))  # (C_in / groups) * prod(kernel)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), values), op.Concat(out_channels, width, axis=0))
    dense = op.ScatterND(zeros, indices, values)  # [C_out, K]; (row, col) pairs are distinct
    return op.Reshape(dense, op.Concat(out_channels, in_per_group, kernel, axis=0))


# ---- the translations (argument order and defaults: csrc/torch/schemas.h) ----------------------------
def mc_dropout_linear(x, weight, bias, rng_state, p: float, num_samples: int, shared_mask: bool = False, memory_efficient=None):
    """``Y[s] = (X[s] * M_s) W^T / (1 - p) + b``, ``[S, R, N]``; keep-masks Bernoulli(1 - p) per
    (sample, row, feature), or per (sample, feature) with ``shared_mask``. ``x`` is ``[R, K]`` (one
    input for every sample) or ``[S, R, K]``."""
    x_rank = _rank(x, "x")
    if x_rank not in (2, 3):
        raise ValueError(f"mc_dropout_linear: x must be [R, K] or [S, R, K], got rank {x_rank}")
    xs = x if x_rank == 3 else op.Unsqueeze(x, _ints([0]))  # [S or 1, R, K]
    samples = _ints([num_samples])
    features = op.Shape(x, start=-1)
    if p > 0.0:
        if shared_mask:
            shape = op.Concat(samples, _ints([1]), features, axis=0)
        else:
            shape = op.Concat(samples, op.Shape(x, start=-2, end=-1), features, axis=0)
        keep = op.Less(_uniform(shape), op.Constant(value_float=1.0 - p))
        scale = op.Where(keep, op.Constant(value_float=1.0 / (1.0 - p)), op.Constant(value_float=0.0))
        xs = op.Mul(xs, op.CastLike(scale, x))
    y = _bias(op.MatMul(xs, op.Transpose(weight, perm=[1, 0])), bias)
    if x_rank == 2 and p <= 0.0:  # no mask: one product, repeated
        y = op.Expand(y, op.Concat(samples, op.Shape(y, start=1), axis=0))
    return y


def sparse_linear(x, crow, col, values, bias=None, row_order=None, validate: bool = True):
    """``x W^T + bias`` for the CSR weight (``values [nnz]``, or column 0 of ``[nnz, 2]``), ``x [R, K]``.
    ``row_order`` only schedules the CUDA kernel's warps: unused."""
    rows = _csr_rows(crow, col)
    return _bias(_csr_matmul(x, crow, col, rows, _csr_values(values, 0)), bias)


def sparse_linear_lrt(x, crow, col, values, bias, row_order, rng_state, num_samples: int, validate: bool = True):
    """LRT samples of the CSR layer: ``(mu + sqrt(v + 1e-8) * eps, sqrt(v + 1e-8))`` with
    ``mu = x W^T + bias``, ``v = x^2 V^T`` (``values [nnz, 2]``: W, V), eps standard normal."""
    x_rank = _rank(x, "x")
    if _rank(values, "values") != 2:
        raise ValueError("sparse_linear_lrt: values must be [nnz, 2] (weights and variances)")
    x2 = x if x_rank == 2 else _flatten_samples(x)
    rows = _csr_rows(crow, col)
    mu = _bias(_csr_matmul(x2, crow, col, rows, _csr_values(values, 0)), bias)
    var = _csr_matmul(op.Mul(x2, x2), crow, col, rows, _csr_values(values, 1))
    std = op.Sqrt(_add_eps(var, _EPS_LRT))
    return _lrt_output(mu, std, x_rank, x, num_samples)


def lrt_linear(x, theta, log_sigma2, bias, rng_state, num_samples: int):
    """The LRT layer: ``log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)``,
    ``mu = x theta^T + b``, ``v = x^2 (alpha theta^2)^T``, output ``(mu + sqrt(v + 1e-8) * eps, std)``."""
    x_rank = _rank(x, "x")
    x2 = x if x_rank == 2 else _flatten_samples(x)
    theta2 = op.Mul(theta, theta)
    log_alpha = op.Clip(
        op.Sub(log_sigma2, op.Log(_add_eps(theta2, 1e-8))),
        op.CastLike(op.Constant(value_float=-8.0), theta),
        op.CastLike(op.Constant(value_float=8.0), theta),
    )
    variance = op.Mul(op.Exp(log_alpha), theta2)
    mu = _bias(op.MatMul(x2, op.Transpose(theta, perm=[1, 0])), bias)
    var = op.MatMul(op.Mul(x2, x2), op.Transpose(variance, perm=[1, 0]))
    std = op.Sqrt(_add_eps(var, _EPS_LRT))
    return _lrt_output(mu, std, x_rank, x, num_samples)


def mc_dropout_conv(x, weight, bias, rng_state, p: float, num_samples: int, shared_input: bool, stride, padding,
                    dilation, groups: int, channel_mask: bool = False, shared_mask: bool = False):
    """``Y = Conv(Xs * M / (1 - p), weight, bias)``, ``[S * N, C_out, *]`` sample-major, where ``Xs``
    is ``x [N, C, *]`` repeated for the S samples (``shared_input``) or ``x [S * N, C, *]`` itself,
    and M a Bernoulli(1 - p) keep-mask per element of ``Xs`` (per (row, channel), broadcast over
    space, with ``channel_mask``); with ``shared_mask`` one mask per sample, broadcast over its N
    images. Computed on the ``[S, N, C, *]`` view: the mask broadcasts over what it shares, and a
    shared input is broadcast over the samples by the product (no separate tile)."""
    rank = _conv_rank(x, "mc_dropout_conv")
    spatial = rank - 2
    if p <= 0.0:  # no mask: one convolution; a shared input's result is tiled for the samples
        y = _conv(x, weight, bias, stride, padding, dilation, groups)
        return op.Tile(y, _ints([num_samples] + [1] * (rank - 1))) if shared_input else y
    if shared_input:
        xv = op.Unsqueeze(x, _ints([0]))  # [1, N, C, *]
        images = op.Shape(x, start=0, end=1)
    else:
        xv = _unfold_samples(x, num_samples)  # [S, N, C, *]
        images = op.Shape(xv, start=1, end=2)
    shape = op.Concat(
        _ints([num_samples]),
        _ints([1]) if shared_mask else images,
        op.Shape(x, start=1, end=2),
        _ints([1] * spatial) if channel_mask else op.Shape(x, start=2),
        axis=0,
    )
    keep = op.Less(_uniform(shape), op.Constant(value_float=1.0 - p))
    scale = op.Where(keep, op.Constant(value_float=1.0 / (1.0 - p)), op.Constant(value_float=0.0))
    xs = op.Mul(xv, op.CastLike(scale, x))  # [S, N, C, *]: xv has N, C and space, the mask S
    return _conv(_fold_samples(xs), weight, bias, stride, padding, dilation, groups)


def lrt_conv(x, theta, log_sigma2, bias, rng_state, num_samples: int, shared_input: bool, stride, padding, dilation,
             groups: int):
    """The LRT convolution: ``mean = Conv(x, theta, bias)``, ``var = Conv(x^2, alpha theta^2)`` with
    ``log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)``; output
    ``(mean + sqrt(var + 1e-8) * eps, sqrt(var + 1e-8))`` in the folded layout (mean and var once
    for the N images of a shared input)."""
    _conv_rank(x, "lrt_conv")
    theta2 = op.Mul(theta, theta)
    log_alpha = op.Clip(
        op.Sub(log_sigma2, op.Log(_add_eps(theta2, 1e-8))),
        op.CastLike(op.Constant(value_float=-8.0), theta),
        op.CastLike(op.Constant(value_float=8.0), theta),
    )
    variance = op.Mul(op.Exp(log_alpha), theta2)
    mean = _conv(x, theta, bias, stride, padding, dilation, groups)
    var = _conv(op.Mul(x, x), variance, None, stride, padding, dilation, groups)
    std = op.Sqrt(_add_eps(var, _EPS_LRT))
    return _conv_lrt_output(mean, std, num_samples, shared_input)


def _zero_mean(var: ir.Value, bias, spatial: int | None) -> ir.Value:
    """The mean of a variance layer's output: zeros like ``var`` plus ``bias [C]``, along the last
    dimension (``spatial=None``: the features of a linear layer) or along dimension 1 of
    ``[N, C, *spatial]``."""
    zeros = op.CastLike(op.ConstantOfShape(op.Shape(var)), var)
    if bias is None:
        return zeros
    if spatial:
        bias = op.Unsqueeze(bias, _ints(range(1, spatial + 1)))  # [C, 1, ...]
    return op.Add(zeros, bias)


def variance_linear(x, log_sigma2, bias, rng_state, num_samples: int):
    """The variance layer: ``var = x^2 exp(log_sigma2)^T``, output ``(bias + sqrt(var + 1e-8) * eps, std)``."""
    x_rank = _rank(x, "x")
    x2 = x if x_rank == 2 else _flatten_samples(x)
    var = op.MatMul(op.Mul(x2, x2), op.Transpose(op.Exp(log_sigma2), perm=[1, 0]))
    std = op.Sqrt(_add_eps(var, _EPS_LRT))
    return _lrt_output(_zero_mean(var, bias, None), std, x_rank, x, num_samples)


def variance_conv(x, log_sigma2, bias, rng_state, num_samples: int, shared_input: bool, stride, padding, dilation,
                  groups: int):
    """The variance convolution: ``var = Conv(x^2, exp(log_sigma2))``, output
    ``(bias + sqrt(var + 1e-8) * eps, sqrt(var + 1e-8))`` in the folded layout."""
    rank = _conv_rank(x, "variance_conv")
    var = _conv(op.Mul(x, x), op.Exp(log_sigma2), None, stride, padding, dilation, groups)
    std = op.Sqrt(_add_eps(var, _EPS_LRT))
    return _conv_lrt_output(_zero_mean(var, bias, rank - 2), std, num_samples, shared_input)


def sparse_conv(x, crow, col, values, bias, kernel_size, stride, padding, dilation, groups: int,
                validate: bool = True):
    """``Conv(x, W, bias)`` with W the dense weight of the CSR buffers (``values [nnz]``, or column 0
    of ``[nnz, 2]``), made in the graph (:func:`_csr_conv_weight`)."""
    _conv_rank(x, "sparse_conv")
    weight = _csr_conv_weight(x, crow, col, _csr_values(values, 0), kernel_size, groups)
    return _conv(x, weight, bias, stride, padding, dilation, groups)


def sparse_conv_lrt(x, crow, col, values, bias, rng_state, num_samples: int, shared_input: bool, kernel_size, stride,
                    padding, dilation, groups: int, validate: bool = True):
    """LRT samples of the CSR convolution (``values [nnz, 2]``: W, V): ``mean = Conv(x, W, bias)``,
    ``var = Conv(x^2, V)``, output ``(mean + sqrt(var + 1e-8) * eps, sqrt(var + 1e-8))`` folded."""
    _conv_rank(x, "sparse_conv_lrt")
    if _rank(values, "values") != 2:
        raise ValueError("sparse_conv_lrt: values must be [nnz, 2] (weights and variances)")
    weight = _csr_conv_weight(x, crow, col, _csr_values(values, 0), kernel_size, groups)
    variance = _csr_conv_weight(x, crow, col, _csr_values(values, 1), kernel_size, groups)
    mean = _conv(x, weight, bias, stride, padding, dilation, groups)
    var = _conv(op.Mul(x, x), variance, None, stride, padding, dilation, groups)
    std = op.Sqrt(_add_eps(var, _EPS_LRT))
    return _conv_lrt_output(mean, std, num_samples, shared_input)


def concrete_dropout(x, p_logit, rng_state, temperature: float = 0.1, channel_dim: int = -1):
    """Relaxed Bernoulli dropout: ``y = x (1 - z) / (1 - p)``,
    ``z = sigmoid((log(p + eps) - log(1 - p + eps) + log(u + eps) - log(1 - u + eps)) / t)``, u uniform
    per element of x, or per (n, c) of ``[N, C, *]`` with ``channel_dim=1``."""
    x_rank = _rank(x, "x")
    rate = p_logit
    if channel_dim == 1:
        shape = op.Concat(op.Shape(x, start=0, end=2), _ints([1] * (x_rank - 2)), axis=0) if x_rank > 2 else op.Shape(x)
        if _rank(p_logit, "p_logit") == 1 and x_rank > 2:
            rate = op.Unsqueeze(p_logit, _ints(range(1, x_rank - 1)))  # [C, 1, ...]
    else:
        shape = op.Shape(x)
    u = op.CastLike(op.Clip(_uniform(shape), op.Constant(value_float=_U_MIN),
                            op.Constant(value_float=_U_MAX)), x)

    def c(v):
        return op.CastLike(op.Constant(value_float=v), x)

    one, eps = c(1.0), c(_EPS_CONCRETE)
    p = op.Sigmoid(rate)
    drop = op.Add(
        op.Sub(op.Log(op.Add(p, eps)), op.Log(op.Add(op.Sub(one, p), eps))),
        op.Sub(op.Log(op.Add(u, eps)), op.Log(op.Add(op.Sub(one, u), eps))),
    )
    z = op.Sigmoid(op.Div(drop, c(temperature)))
    return op.Div(op.Mul(x, op.Sub(one, z)), op.Sub(one, p))


def uniform(rng_state, size, stream: int = 0, dtype=None):
    """Uniforms in the open interval (0, 1) of shape ``size`` (clipped to bdlkern's grid ends)."""
    u = op.Clip(_uniform(_shape_of(size)), op.Constant(value_float=_U_MIN),
                op.Constant(value_float=_U_MAX))
    return _cast_to(u, dtype)


def normal(rng_state, size, stream: int = 0, dtype=None):
    """Standard normals of shape ``size``."""
    return _cast_to(_normal(_shape_of(size)), dtype)


def dropout_mask(rng_state, size, p: float, stream: int = 0):
    """Bool keep-mask, True with probability ``1 - p`` (``p = 0``: all True; ``p = 1``: all False)."""
    return op.Less(_uniform(_shape_of(size)), op.Constant(value_float=1.0 - p))


def randint_low_generator(low, high, size, generator=None, dtype=None, layout=None, device=None, pin_memory=None):
    """``aten.randint.low_generator`` (torchlib has no translation of this overload), which
    ``bdlkern.ops.new_rng_state`` calls for the ``rng_state`` of an unseeded ``sampling`` block:
    ``floor(low + u (high - low))`` with u uniform in [0, 1) in float64 (exact for ranges below
    2**53, within 2**-53 relative for wider ones such as a 63-bit seed). The bdlkern translations
    ignore their ``rng_state``, so in a bdlkern model this node is dead and the exporter's
    optimiser removes it."""

    def as_double(v):
        if isinstance(v, (int, float)):
            return op.Constant(value_float=float(v)) if abs(v) < 2**24 else op.Constant(value=ir.tensor(np.array(float(v))))
        return op.Cast(v, to=ir.DataType.DOUBLE)

    low_d, high_d = as_double(low), as_double(high)
    low_d, high_d = op.Cast(low_d, to=ir.DataType.DOUBLE), op.Cast(high_d, to=ir.DataType.DOUBLE)
    u = op.RandomUniformLike(op.ConstantOfShape(_shape_of(size)), dtype=ir.DataType.DOUBLE.value)
    value = op.Add(op.Floor(op.Mul(u, op.Sub(high_d, low_d))), low_d)
    to = ir.DataType.INT64.value if dtype is None or int(dtype) == -1 else int(dtype)
    return op.Cast(value, to=to)


def gaussian_dropout(x, log_alpha, rng_state, channel_dim: int = -1):
    """Gaussian dropout: ``y = x (1 + exp(0.5 log_alpha) eps)``, eps standard normal per element of x,
    or per (n, c) of ``[N, C, *]`` with ``channel_dim=1`` (``RandomNormalLike``: the distribution of
    the op's noise, not its bits)."""
    x_rank = _rank(x, "x")
    rate = log_alpha
    if channel_dim == 1:
        shape = op.Concat(op.Shape(x, start=0, end=2), _ints([1] * (x_rank - 2)), axis=0) if x_rank > 2 else op.Shape(x)
        if _rank(log_alpha, "log_alpha") == 1 and x_rank > 2:
            rate = op.Unsqueeze(log_alpha, _ints(range(1, x_rank - 1)))  # [C, 1, ...]
    else:
        shape = op.Shape(x)
    eps = op.CastLike(_normal(shape), x)
    scale = op.Exp(op.Mul(rate, op.CastLike(op.Constant(value_float=0.5), x)))
    return op.Mul(x, op.Add(op.CastLike(op.Constant(value_float=1.0), x), op.Mul(scale, eps)))


def table() -> dict:
    """``{OpOverload: translation}``: the translated ops of ``torch.ops.bdlkern``, and the overload of
    ``aten.randint`` that an unseeded ``sampling`` block calls."""
    ns = torch.ops.bdlkern
    return {
        ns.mc_dropout_linear.default: mc_dropout_linear,
        ns.sparse_linear.default: sparse_linear,
        ns.sparse_linear_lrt.default: sparse_linear_lrt,
        ns.lrt_linear.default: lrt_linear,
        ns.mc_dropout_conv.default: mc_dropout_conv,
        ns.lrt_conv.default: lrt_conv,
        ns.variance_linear.default: variance_linear,
        ns.variance_conv.default: variance_conv,
        ns.sparse_conv.default: sparse_conv,
        ns.sparse_conv_lrt.default: sparse_conv_lrt,
        ns.concrete_dropout.default: concrete_dropout,
        ns.uniform.default: uniform,
        ns.normal.default: normal,
        ns.dropout_mask.default: dropout_mask,
        torch.ops.aten.randint.low_generator: randint_low_generator,
        ns.gaussian_dropout.default: gaussian_dropout,
    }
