"""The sparse (CSR) linear layer and convolution: pruned sparse variational dropout at inference
(:func:`sparse_linear`, :func:`sparse_conv`, deterministic or with stochastic LRT samples), and the
fake kernels of ``sparse_linear``, ``sparse_linear_lrt``, ``sparse_conv``, ``sparse_conv_lrt`` and
their backward ops.

The package re-exports the function under this module's name, so ``bdlkern.ops.sparse_linear`` (and
``import bdlkern.ops.sparse_linear as m``) is the function; ``from bdlkern.ops.sparse_linear import
...`` reads this module as usual, and ``sys.modules["bdlkern.ops.sparse_linear"]`` is the module.
"""

from __future__ import annotations

import math

import torch

from ._common import _check_devices, _conv_arg, _conv_args, _conv_out_shape, _resolve_state, _sample_dim_input


def sparse_linear(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
    row_order: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """A linear layer whose weight W [N, K] is stored in CSR: the pruned sparse VD layer.

    ``crow`` (int64 ``[N + 1]``), ``col`` (int64 ``[nnz]``, ascending within each row) and ``values``:
    ``[nnz]`` (theta) or ``[nnz, 2]`` (theta and the weight variance ``alpha theta^2`` interleaved on
    the same pattern). The structure is validated before any kernel runs (``validate=False`` skips it,
    see below).

    * deterministic (default): ``y = x W^T + bias``, ``x [*, K] -> [*, N]``;
    * ``stochastic=True``: S local-reparameterisation samples ``y_s = mu + sqrt(v + 1e-8) * eps_s``
      with ``mu = x W^T + bias`` and ``v = x^2 V^T`` from one pass over the sparse structure, the
      noise from the Philox stream (tag ``"sparse_lrt"``) over the output's logical coordinates, and
      the sample-dimension rule of :func:`mc_dropout_linear` (``num_samples=S`` with ``x [*batch, K]``,
      or ``x [S, *batch, K]``); needs ``values [nnz, 2]`` with variances ``>= 0``.

    Differentiable in ``x`` only (saliency and adversarial uses); no gradient reaches the values.

    Args:
        row_order: optional int64 ``[N]`` permutation in which the CUDA kernel hands rows to warps
            (longest first balances the work; ``bdlkern.nn.SparseLinear`` keeps one).
        validate: check the structure's data (``crow`` non-decreasing from 0 to nnz, ``col`` in range
            and increasing within rows, ``row_order`` a permutation, variances ``>= 0``) before any
            kernel runs. That check reads the structure on the host, which on CUDA copies it and waits
            for the device on every call. ``False`` keeps the shape, dtype and device checks and skips
            it: only for a structure already validated (``bdlkern.nn.SparseLinear`` validates at
            construction and load, then calls with ``False``); a malformed one then reads out of bounds.
    """
    for name, t in (("x", x), ("crow", crow), ("col", col), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sparse_linear: {name} must be a tensor, got {type(t).__name__}")
    if not stochastic:
        if num_samples is not None:
            raise ValueError("sparse_linear: num_samples needs stochastic=True (the deterministic layer has no samples)")
        if x.dim() < 1:
            raise ValueError("sparse_linear: x must have a feature dimension")
        if x.dim() == 2:  # the usual [B, K]: no views (two reshapes cost more than a small layer)
            return torch.ops.bdlkern.sparse_linear(x, crow, col, values, bias, row_order, validate)
        y = torch.ops.bdlkern.sparse_linear(
            x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), crow, col, values, bias, row_order, validate
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])
    # in_features is whatever the CSR's columns allow: the op checks col against x's last dim.
    x_op, samples, batch = _sample_dim_input(x, None, num_samples, "sparse_linear")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.sparse_linear_lrt(x_op, crow, col, values, bias, row_order, state, samples, validate)
    return y.reshape(samples, *batch, y.shape[-1])


def sparse_conv(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kernel_size,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    num_samples: int = 1,
    stochastic: bool = False,
    input_has_samples: bool = False,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """A convolution (1-d, 2-d or 3-d by the rank of ``x``) whose pruned weight is stored in CSR:
    the pruned sparse-VD conv layer, computed without im2col (per kept weight, the weight times a
    shifted input plane is added into the output plane, vectorised along the output row).

    The weight ``W [C_out, C_in / groups, *kernel_size]`` is CSR over
    ``[C_out, (C_in / groups) * prod(kernel_size)]``: ``crow`` int64 ``[C_out + 1]``, ``col`` int64
    ``[nnz]`` (ascending within each row; column ``((c * kd + a) * kh + b) * kw + e`` is channel
    ``c``, kernel offset ``(a, b, e)``), ``values`` ``[nnz]`` (theta) or ``[nnz, 2]`` (theta and
    ``alpha theta^2``). The structure is validated before any kernel runs unless ``validate=False``
    (as :func:`sparse_linear`'s; ``bdlkern.nn.SparseConv2d`` validates at construction and load).

    * deterministic (default): ``y = conv(x, W) + bias``, ``[N, C_in, *] -> [N, C_out, *]``;
    * ``stochastic=True``: S local-reparameterisation samples on the kept weights,
      ``y = conv(x, W) + bias + sqrt(conv(x^2, V) + 1e-8) * eps`` with ``eps`` from the Philox
      stream ``"sparse_lrt"`` at the row-major index of ``y [S * N, C_out, *]`` (samples folded
      into the batch, sample-major, as :func:`lrt_conv`); ``x`` is shared by the samples, or
      ``[S * N, ...]`` with ``input_has_samples``. Needs ``values [nnz, 2]``.

    Differentiable in ``x`` only (the values are the pruned model's constants).
    """
    for name, t in (("x", x), ("crow", crow), ("col", col), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sparse_conv: {name} must be a tensor, got {type(t).__name__}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"sparse_conv: x must be [batch, channels, *spatial] with 1 to 3 spatial dimensions, got shape {tuple(x.shape)}"
        )
    dims = x.dim() - 2
    kernel = _conv_arg(kernel_size, dims, "kernel_size", 1, "sparse_conv")
    # A stand-in weight of the right shape for the shared argument checks (no data).
    weight_like = x.new_empty((0, 1, *kernel), device="meta")
    stride_, padding_, dilation_, groups = _conv_args(
        x, weight_like, num_samples, stride, padding, dilation, groups, "sparse_conv", "weight"
    )
    if not stochastic:
        if num_samples != 1 or input_has_samples:
            raise ValueError("sparse_conv: num_samples and input_has_samples need stochastic=True")
        return torch.ops.bdlkern.sparse_conv(
            x, crow, col, values, bias, kernel, stride_, padding_, dilation_, groups, validate
        )
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.sparse_conv_lrt(
        x, crow, col, values, bias, state, num_samples, not input_has_samples, kernel, stride_, padding_, dilation_,
        groups, validate,
    )
    return y


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::sparse_linear")
    def _fake(x, crow, col, values, bias=None, row_order=None, validate=True):
        _check_devices("sparse_linear", "x", x, crow=crow, col=col, values=values, bias=bias, row_order=row_order)
        return x.new_empty((x.shape[0], crow.shape[0] - 1))

    @torch.library.register_fake(f"{ns}::sparse_linear_backward")
    def _fake_backward(grad_out, crow, col, values, in_features, validate=True):
        _check_devices("sparse_linear_backward", "grad_out", grad_out, crow=crow, col=col, values=values)
        return grad_out.new_empty((grad_out.shape[0], in_features))

    @torch.library.register_fake(f"{ns}::sparse_linear_lrt")
    def _fake_lrt(x, crow, col, values, bias, row_order, rng_state, num_samples, validate=True):
        _check_devices(
            "sparse_linear_lrt", "x", x, crow=crow, col=col, values=values, bias=bias, row_order=row_order,
            rng_state=rng_state,
        )
        n = crow.shape[0] - 1
        rows = x.shape[-2]
        std_rows = rows if x.dim() == 2 else num_samples * rows
        return x.new_empty((num_samples, rows, n)), x.new_empty((std_rows, n))

    @torch.library.register_fake(f"{ns}::sparse_linear_lrt_backward")
    def _fake_lrt_backward(grad_out, x, crow, col, values, std, rng_state, validate=True):
        _check_devices(
            "sparse_linear_lrt_backward", "x", x, grad_out=grad_out, crow=crow, col=col, values=values, std=std,
            rng_state=rng_state,
        )
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def conv_shape(x, crow, kernel_size, stride, padding, dilation, num_samples=1, shared_input=True):
        weight_like = x.new_empty((crow.shape[0] - 1, 1, *kernel_size), device="meta")
        return _conv_out_shape(x, weight_like, num_samples, shared_input, stride, padding, dilation)

    @torch.library.register_fake(f"{ns}::sparse_conv")
    def _fake_conv(x, crow, col, values, bias, kernel_size, stride, padding, dilation, groups, validate=True):
        _check_devices("sparse_conv", "x", x, crow=crow, col=col, values=values, bias=bias)
        return x.new_empty(conv_shape(x, crow, kernel_size, stride, padding, dilation))

    @torch.library.register_fake(f"{ns}::sparse_conv_backward")
    def _fake_conv_backward(grad_out, crow, col, values, input_size, kernel_size, stride, padding, dilation, groups,
                            validate=True):
        _check_devices("sparse_conv_backward", "grad_out", grad_out, crow=crow, col=col, values=values)
        return grad_out.new_empty(input_size)

    @torch.library.register_fake(f"{ns}::sparse_conv_lrt")
    def _fake_conv_lrt(x, crow, col, values, bias, rng_state, num_samples, shared_input, kernel_size, stride, padding,
                       dilation, groups, validate=True):
        _check_devices("sparse_conv_lrt", "x", x, crow=crow, col=col, values=values, bias=bias, rng_state=rng_state)
        y = conv_shape(x, crow, kernel_size, stride, padding, dilation, num_samples, shared_input)
        return x.new_empty(y), x.new_empty((x.shape[0], *y[1:]))

    @torch.library.register_fake(f"{ns}::sparse_conv_lrt_backward")
    def _fake_conv_lrt_backward(grad_out, x, crow, col, values, std, rng_state, num_samples, shared_input,
                                kernel_size, stride, padding, dilation, groups, validate=True):
        _check_devices(
            "sparse_conv_lrt_backward", "x", x, grad_out=grad_out, crow=crow, col=col, values=values, std=std,
            rng_state=rng_state,
        )
        return torch.empty_like(x, memory_format=torch.contiguous_format)


_register_fakes("bdlkern")
