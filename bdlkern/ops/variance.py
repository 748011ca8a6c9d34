"""Variance layers (Neklyudov, Molchanov, Ashukha & Vetrov 2018, "Variance Networks: When Expectation
Does Not Meet Your Expectations", arXiv:1803.03764): a linear layer (:func:`variance_linear`) and a
convolution (:func:`variance_conv`) whose weights have zero mean and a learnt variance,
``w ~ N(0, sigma^2)``, sampled by the local reparameterisation trick, and the fake kernels of their
forward and backward ops.

With a zero mean the LRT needs no mean product at all: one GEMM (or convolution) of ``x^2`` with the
variances, against the two of :func:`bdlkern.ops.lrt_linear`. The information such a layer passes on
is in the variance of its output, which a following non-linearity turns into a mean."""

from __future__ import annotations

import torch

from ._common import _check_devices, _conv_args, _conv_out_shape, _resolve_state, _sample_dim_input


def variance_linear(
    x: torch.Tensor,
    log_sigma2: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer with zero-mean Gaussian weights ``w ~ N(0, exp(log_sigma2))``, sampled by the
    local reparameterisation trick::

        var = x^2 exp(log_sigma2)^T,   y = bias + sqrt(var + 1e-8) * eps

    with ``eps`` standard normal from the Philox stream (tag ``"lrt"``, the stream and layout of
    :func:`lrt_linear`) at the output's logical coordinates (sample, row, output feature). One GEMM
    plus the fused noise pass; backward re-makes ``eps`` (it saves x, ``log_sigma2`` and
    ``sqrt(var + 1e-8)``).

    The sample dimension follows :func:`lrt_linear`: ``num_samples=S`` with ``x [*batch, in]`` (var
    computed once, S noise draws), or ``num_samples=None`` with ``x [S, *batch, in]``.

    Args:
        x: float32 or float64.
        log_sigma2: ``[out, in]``, the log-variances, same dtype and device as ``x``.
        bias: ``[out]`` or None (the output's mean).

    Returns:
        ``[S, *batch, out]``, differentiable in x, log_sigma2 and bias.
    """
    for name, t in (("x", x), ("log_sigma2", log_sigma2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"variance_linear: {name} must be a tensor, got {type(t).__name__}")
    if log_sigma2.dim() != 2:
        raise ValueError(
            f"variance_linear: log_sigma2 must be [out_features, in_features], got shape {tuple(log_sigma2.shape)}"
        )
    x_op, samples, batch = _sample_dim_input(x, log_sigma2.shape[1], num_samples, "variance_linear", "log_sigma2 has")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.variance_linear.default(x_op, log_sigma2, bias, state, samples)
    return y if len(batch) == 1 else y.reshape(samples, *batch, log_sigma2.shape[0])


def variance_conv(
    x: torch.Tensor,
    log_sigma2: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_samples: int = 1,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    input_has_samples: bool = False,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """A convolution (1-d, 2-d or 3-d by the rank of ``log_sigma2``) with zero-mean Gaussian weights
    ``w ~ N(0, exp(log_sigma2))``, sampled by the local reparameterisation trick, the samples folded
    into the batch sample-major::

        var = conv(x^2, exp(log_sigma2)),   y = bias + sqrt(var + 1e-8) * eps

    with ``eps`` from the ``"lrt"`` stream at the row-major index of the output element in
    ``y [S * N, C_out, *spatial_out]`` (the layout of :func:`lrt_conv`). One ATen convolution (once
    for the N images of a shared input) and the fused noise pass; backward re-makes ``eps``.

    Args:
        x: ``[N, C_in, *spatial]`` shared by the samples, or ``[S * N, C_in, *spatial]``
            sample-major with ``input_has_samples=True``; float32 or float64.
        log_sigma2: ``[C_out, C_in / groups, *kernel]``, same dtype and device as ``x``.
        bias: ``[C_out]`` or None.
        num_samples: S >= 1.
        stride, padding, dilation, groups: as ``F.conv2d`` (``padding`` also ``"valid"`` / ``"same"``).
        generator / rng_state: where the noise comes from (see :func:`new_rng_state`).

    Returns:
        ``[S * N, C_out, *spatial_out]``, differentiable in x, log_sigma2 and bias.
    """
    stride_, padding_, dilation_, groups = _conv_args(
        x, log_sigma2, num_samples, stride, padding, dilation, groups, "variance_conv", "log_sigma2"
    )
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.variance_conv.default(
        x, log_sigma2, bias, state, num_samples, not input_has_samples, stride_, padding_, dilation_, groups
    )
    return y


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::variance_linear")
    def _variance_fake(x, log_sigma2, bias, rng_state, num_samples):
        _check_devices("variance_linear", "x", x, log_sigma2=log_sigma2, bias=bias, rng_state=rng_state)
        rows = x.shape[-2]
        std_rows = rows if x.dim() == 2 else num_samples * rows
        out = log_sigma2.shape[0]
        return x.new_empty((num_samples, rows, out)), x.new_empty((std_rows, out))

    @torch.library.register_fake(f"{ns}::variance_linear_backward")
    def _variance_backward_fake(grad_out, x, log_sigma2, std, rng_state):
        _check_devices(
            "variance_linear_backward", "x", x, grad_out=grad_out, log_sigma2=log_sigma2, std=std, rng_state=rng_state
        )
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(log_sigma2, memory_format=torch.contiguous_format),
            log_sigma2.new_empty((log_sigma2.shape[0],)),
        )

    @torch.library.register_fake(f"{ns}::variance_conv")
    def _variance_conv_fake(x, log_sigma2, bias, rng_state, num_samples, shared_input, stride, padding, dilation,
                            groups):
        _check_devices("variance_conv", "x", x, log_sigma2=log_sigma2, bias=bias, rng_state=rng_state)
        shape = _conv_out_shape(x, log_sigma2, num_samples, shared_input, stride, padding, dilation)
        return x.new_empty(shape), x.new_empty((x.shape[0], *shape[1:]))

    @torch.library.register_fake(f"{ns}::variance_conv_backward")
    def _variance_conv_backward_fake(grad_out, x, log_sigma2, std, rng_state, num_samples, shared_input, stride,
                                     padding, dilation, groups):
        _check_devices(
            "variance_conv_backward", "x", x, grad_out=grad_out, log_sigma2=log_sigma2, std=std, rng_state=rng_state
        )
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(log_sigma2, memory_format=torch.contiguous_format),
            log_sigma2.new_empty((log_sigma2.shape[0],)),
        )


_register_fakes("bdlkern")
