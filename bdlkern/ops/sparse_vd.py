"""Sparse variational dropout in training: the local-reparameterisation linear layer
(:func:`lrt_linear`) and convolution (:func:`lrt_conv`), and the KL term under the log-uniform prior
(:func:`sparse_vd_kl`) or the ARD prior (:func:`ard_kl`), with the fake kernels of their forward,
backward and fused KL-with-gradient ops."""

from __future__ import annotations

import torch

from ._common import _check_devices, _conv_args, _conv_out_shape, _resolve_state, _sample_dim_input


def lrt_linear(
    x: torch.Tensor,
    theta: torch.Tensor,
    log_sigma2: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer with Gaussian weights, sampled by the local reparameterisation trick.

    Each weight is ``N(theta, alpha theta^2)`` with
    ``log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)`` (sparse variational dropout,
    Molchanov et al. 2017). Instead of sampling weights, the pre-activations are sampled (Kingma et
    al. 2015)::

        mu = x theta^T + bias,   var = x^2 (alpha theta^2)^T,   y = mu + sqrt(var + 1e-8) * eps

    with ``eps`` standard normal from the Philox stream (tag ``"lrt"``) over the output's logical
    coordinates (sample, row, output feature). Two GEMMs plus fused passes for ``alpha theta^2``,
    the square root, the noise and the bias; backward re-makes ``eps`` (it saves x, the weights and
    ``sqrt(var + 1e-8)``, one value per output element of a sample).

    The sample dimension follows :func:`mc_dropout_linear`: ``num_samples=S`` with ``x [*batch, in]``
    (mu and var computed once, S noise draws), or ``num_samples=None`` with ``x [S, *batch, in]``.

    Args:
        x: float32 or float64.
        theta, log_sigma2: ``[out, in]``, same dtype and device as ``x``.
        bias: ``[out]`` or None.

    Returns:
        ``[S, *batch, out]``, differentiable in x, theta, log_sigma2 and bias.
    """
    for name, t in (("x", x), ("theta", theta), ("log_sigma2", log_sigma2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lrt_linear: {name} must be a tensor, got {type(t).__name__}")
    if theta.dim() != 2:
        raise ValueError(f"lrt_linear: theta must be [out_features, in_features], got shape {tuple(theta.shape)}")
    x_op, samples, batch = _sample_dim_input(x, theta.shape[1], num_samples, "lrt_linear")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.lrt_linear.default(x_op, theta, log_sigma2, bias, state, samples)
    return y if len(batch) == 1 else y.reshape(samples, *batch, theta.shape[0])


def lrt_conv(
    x: torch.Tensor,
    theta: torch.Tensor,
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
    """A convolution (1-d, 2-d or 3-d by the rank of ``theta``) with Gaussian weights, sampled by
    the local reparameterisation trick, the samples folded into the batch sample-major.

    Each weight is ``N(theta, alpha theta^2)`` with the clamped ``log_alpha`` of
    :func:`lrt_linear`; the pre-activations are sampled::

        mean = conv(x, theta) + bias,   var = conv(x^2, alpha theta^2),
        y = mean + sqrt(var + 1e-8) * eps

    with ``eps`` standard normal from the Philox stream (tag ``"lrt"``) at the row-major index of
    the output element in ``y [S * N, C_out, *spatial_out]``. ATen convolves the mean and the
    variance (once for the N images of a shared input); fused passes make ``alpha theta^2`` and
    the noise, the square root and the bias, and backward re-makes ``eps`` (it saves x, the
    weights and ``sqrt(var + 1e-8)``).

    Args:
        x: ``[N, C_in, *spatial]`` shared by the samples, or ``[S * N, C_in, *spatial]``
            sample-major with ``input_has_samples=True``; float32 or float64.
        theta, log_sigma2: ``[C_out, C_in / groups, *kernel]``, same dtype and device as ``x``.
        bias: ``[C_out]`` or None.
        num_samples: S >= 1.
        stride, padding, dilation, groups: as ``F.conv2d`` (``padding`` also ``"valid"`` /
            ``"same"``).
        generator / rng_state: where the noise comes from (see :func:`new_rng_state`).

    Returns:
        ``[S * N, C_out, *spatial_out]``, differentiable in x, theta, log_sigma2 and bias.
    """
    if not isinstance(log_sigma2, torch.Tensor):
        raise TypeError(f"lrt_conv: log_sigma2 must be a tensor, got {type(log_sigma2).__name__}")
    stride_, padding_, dilation_, groups = _conv_args(
        x, theta, num_samples, stride, padding, dilation, groups, "lrt_conv", "theta"
    )
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.lrt_conv.default(
        x, theta, log_sigma2, bias, state, num_samples, not input_has_samples, stride_, padding_, dilation_, groups
    )
    return y


def sparse_vd_kl(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """The KL term of sparse variational dropout, summed over the weights (a 0-dim tensor).

    Molchanov et al. (2017)'s approximation of ``KL(q(w) || p(w))`` for the log-uniform prior::

        KL ~= -(k1 sigmoid(k2 + k3 log_alpha) - 0.5 log1p(exp(-log_alpha)) - k1)

    with ``k1, k2, k3 = 0.63576, 1.87320, 1.48695`` and the clamped ``log_alpha`` of
    :func:`lrt_linear`. One fused reduction (chunk sums in double, added in a fixed order). When a
    gradient will be needed (grad mode on and an input requiring grad), the same pass also writes
    the KL's gradient (``sparse_vd_kl_with_grad``; on the CPU from the exponentials the KL computes
    anyway), held until backward, which only scales it: the memory of ``theta`` and
    ``log_sigma2`` once more, for half the transcendental work of recomputing it.

    Args:
        theta, log_sigma2: any shape (the same), float32 or float64.
    """
    if not isinstance(theta, torch.Tensor) or not isinstance(log_sigma2, torch.Tensor):
        raise TypeError("sparse_vd_kl: theta and log_sigma2 must be tensors")
    if torch.is_grad_enabled() and (theta.requires_grad or log_sigma2.requires_grad):
        return torch.ops.bdlkern.sparse_vd_kl_with_grad(theta, log_sigma2)[0]
    return torch.ops.bdlkern.sparse_vd_kl(theta, log_sigma2)


def ard_kl(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """The KL term of sparse variational dropout under the ARD prior, summed over the weights (a
    0-dim tensor).

    Kharitonov, Molchanov & Vetrov (2018), "Variational Dropout via Empirical Bayes"
    (arXiv:1811.00596): each weight gets a Gaussian prior ``N(0, lambda^2)`` whose variance is set
    to its optimum ``lambda^2 = theta^2 + sigma^2`` for the posterior ``N(theta, sigma^2)``. The KL
    is then exact, no approximation::

        KL = 0.5 log(1 + theta^2 / sigma^2) = 0.5 log1p(1 / alpha) = 0.5 log1p(exp(-log_alpha))

    with the clamped ``log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)`` of
    :func:`lrt_linear` (no gradient through the clamp). It is one of the two terms of
    :func:`sparse_vd_kl`'s approximation, and it too drives ``alpha`` up, so the layers prune the
    same way. The same fused kernels: one reduction (chunk sums in double, added in a fixed order),
    and with a gradient needed the same pass writes it (``ard_kl_with_grad``), held until backward.

    Args:
        theta, log_sigma2: any shape (the same), float32 or float64.
    """
    if not isinstance(theta, torch.Tensor) or not isinstance(log_sigma2, torch.Tensor):
        raise TypeError("ard_kl: theta and log_sigma2 must be tensors")
    if torch.is_grad_enabled() and (theta.requires_grad or log_sigma2.requires_grad):
        return torch.ops.bdlkern.ard_kl_with_grad(theta, log_sigma2)[0]
    return torch.ops.bdlkern.ard_kl(theta, log_sigma2)


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::lrt_linear")
    def _lrt_fake(x, theta, log_sigma2, bias, rng_state, num_samples):
        _check_devices("lrt_linear", "x", x, theta=theta, log_sigma2=log_sigma2, bias=bias, rng_state=rng_state)
        rows = x.shape[-2]
        std_rows = rows if x.dim() == 2 else num_samples * rows
        return x.new_empty((num_samples, rows, theta.shape[0])), x.new_empty((std_rows, theta.shape[0]))

    @torch.library.register_fake(f"{ns}::lrt_linear_backward")
    def _lrt_backward_fake(grad_out, x, theta, log_sigma2, std, rng_state):
        _check_devices(
            "lrt_linear_backward", "x", x, grad_out=grad_out, theta=theta, log_sigma2=log_sigma2, std=std,
            rng_state=rng_state,
        )
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(theta),
            torch.empty_like(log_sigma2),
            theta.new_empty((theta.shape[0],)),
        )

    @torch.library.register_fake(f"{ns}::lrt_conv")
    def _lrt_conv_fake(x, theta, log_sigma2, bias, rng_state, num_samples, shared_input, stride, padding, dilation,
                       groups):
        _check_devices("lrt_conv", "x", x, theta=theta, log_sigma2=log_sigma2, bias=bias, rng_state=rng_state)
        shape = _conv_out_shape(x, theta, num_samples, shared_input, stride, padding, dilation)
        return x.new_empty(shape), x.new_empty((x.shape[0], *shape[1:]))

    @torch.library.register_fake(f"{ns}::lrt_conv_backward")
    def _lrt_conv_backward_fake(grad_out, x, theta, log_sigma2, std, rng_state, num_samples, shared_input, stride,
                                padding, dilation, groups):
        _check_devices(
            "lrt_conv_backward", "x", x, grad_out=grad_out, theta=theta, log_sigma2=log_sigma2, std=std,
            rng_state=rng_state,
        )
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(theta, memory_format=torch.contiguous_format),
            torch.empty_like(log_sigma2, memory_format=torch.contiguous_format),
            theta.new_empty((theta.shape[0],)),
        )

    for kl in ("sparse_vd_kl", "ard_kl"):  # the same shapes under either prior
        _register_kl_fakes(ns, kl)


def _register_kl_fakes(ns: str, kl: str) -> None:
    @torch.library.register_fake(f"{ns}::{kl}")
    def _kl_fake(theta, log_sigma2):
        _check_devices(kl, "theta", theta, log_sigma2=log_sigma2)
        return theta.new_empty(())

    @torch.library.register_fake(f"{ns}::{kl}_backward")
    def _kl_backward_fake(grad, theta, log_sigma2):
        _check_devices(f"{kl}_backward", "theta", theta, grad=grad, log_sigma2=log_sigma2)
        return torch.empty_like(theta), torch.empty_like(log_sigma2)

    @torch.library.register_fake(f"{ns}::{kl}_with_grad")
    def _kl_with_grad_fake(theta, log_sigma2):
        _check_devices(f"{kl}_with_grad", "theta", theta, log_sigma2=log_sigma2)
        return theta.new_empty(()), theta.new_empty(theta.shape), log_sigma2.new_empty(log_sigma2.shape)


_register_fakes("bdlkern")
