"""Variational (Gaussian) dropout (Kingma, Salimans & Welling 2015): :class:`VariationalDropoutLinear`
and :class:`VariationalDropoutConv2d`, trained with the local reparameterisation trick on the fused
LRT ops of :mod:`bdlkern.ops.sparse_vd` (``lrt_linear`` / ``lrt_conv``).

Every weight is multiplicative Gaussian noise on a learnt mean, ``w = theta * (1 + sqrt(alpha) eps)``,
i.e. ``w ~ N(theta, alpha theta^2)``, with ``alpha`` learnt per layer, per input unit or per weight.
The LRT ops take ``log_sigma2`` and use ``log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)``,
so the layers pass ``log_sigma2 = log_alpha_eff + log(theta^2 + 1e-8)`` and the op recovers
``log_alpha_eff`` (up to float rounding). ``log_alpha_eff`` is the learnt ``log_alpha`` clamped to
``[-8, 0]``: ``alpha <= 1`` as the paper restricts it (its KL approximation is fitted on ``alpha <= 1``),
and ``alpha >= exp(-8)`` the floor the op applies anyway, so that :meth:`kl` and the noise see the
same ``alpha``; the clamp's gradient is 0 outside (so a ``log_alpha`` that an optimiser step takes above 0
stays there, at ``alpha = 1``, the bound the KL pushes it to).

The KL term (:func:`variational_dropout_kl`) is the negative of the paper's approximation of
``-KL(q(w) || p(w))`` for the log-uniform prior (Kingma et al. 2015, section 3.3, arXiv:1506.02557)::

    KL(alpha) ~= -(0.5 log alpha + c1 alpha + c2 alpha^2 + c3 alpha^3) + const,
    c1 = 1.16145124, c2 = -1.50204118, c3 = 0.58629921

(the constant dropped), summed over the weights each ``alpha`` applies to; add it to the loss
(scaled by ``1 / N_train`` when the data loss is a mean over a batch).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._base import _copied_from, _NotScriptable
from .sparse_vd import SparseVDLinear, _init_conv_theta, _SparseVDConvNd

#: Kingma et al. (2015)'s constants of the polynomial approximation of the negative KL.
KL_C1, KL_C2, KL_C3 = 1.16145124, -1.50204118, 0.58629921
#: The bounds of ``log_alpha_eff``: ``alpha <= 1`` (the paper's range) and the LRT op's own floor.
LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 0.0
_KINDS = ("layer", "input", "weight")


def variational_dropout_kl(log_alpha: torch.Tensor) -> torch.Tensor:
    """Kingma et al.'s KL approximation ``-(0.5 log alpha + c1 alpha + c2 alpha^2 + c3 alpha^3)``,
    elementwise (any shape, differentiable), at ``log alpha`` as given (no clamp: the layers clamp
    first; the approximation is meant for ``alpha <= 1``)."""
    alpha = torch.exp(log_alpha)
    return -(0.5 * log_alpha + alpha * (KL_C1 + alpha * (KL_C2 + alpha * KL_C3)))


def _check_alpha_args(name: str, alpha: str, init_alpha: float) -> float:
    if not isinstance(alpha, str) or alpha not in _KINDS:
        raise ValueError(f"{name}: alpha must be one of {', '.join(map(repr, _KINDS))}, got {alpha!r}")
    try:
        value = float(init_alpha)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: init_alpha must be a real number, got {type(init_alpha).__name__}") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ValueError(
            f"{name}: init_alpha must be finite and in (0, 1] (the paper's range; above 1 the clamp of alpha to 1 "
            f"would leave it without a gradient), got {init_alpha}"
        )
    return value


class _VariationalDropoutMixin:
    """What the linear and the conv layer share: the alpha parameterisation, ``kl`` and the
    effective ``log_sigma2`` handed to the LRT ops. Needs ``theta``, ``log_alpha``, ``alpha_kind``."""

    _bdlkern_kl = True  # picked up by bdlkern.nn.regularization / kl_divergence
    theta: nn.Parameter
    log_alpha: nn.Parameter
    alpha_kind: str

    def _clamped_log_alpha(self) -> torch.Tensor:
        """The learnt ``log_alpha`` (its own shape) clamped to ``[-8, 0]``; the gradient is 1 inside
        the closed interval (so ``init_alpha=1`` can still move) and 0 outside."""
        la = self.log_alpha
        la = torch.where(la > LOG_ALPHA_MAX, la.new_tensor(LOG_ALPHA_MAX), la)
        return torch.where(la < LOG_ALPHA_MIN, la.new_tensor(LOG_ALPHA_MIN), la)

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of ``log_alpha``'s shape expanded to the weight's shape."""
        return t.expand(self.theta.shape)

    def log_alpha_eff(self) -> torch.Tensor:
        """The clamped ``log alpha`` every weight uses, expanded to ``theta``'s shape (differentiable)."""
        return self._broadcast(self._clamped_log_alpha())

    def alpha(self) -> torch.Tensor:
        """``exp(log_alpha_eff())``: the noise variance ratio of every weight, ``theta``'s shape."""
        return torch.exp(self.log_alpha_eff())

    def _lrt_log_sigma2(self) -> torch.Tensor:
        """``log_alpha_eff + log(theta^2 + 1e-8)``: the LRT op then uses exactly ``alpha_eff``."""
        return self.log_alpha_eff() + torch.log(self.theta**2 + 1e-8)

    def _mean_weight(self) -> torch.Tensor:
        """The eval layer's weight: the mean, ``theta`` (nothing is pruned)."""
        return self.theta

    def kl(self) -> torch.Tensor:
        """The layer's KL term, a 0-dim tensor: :func:`variational_dropout_kl` of each clamped alpha
        times the number of weights it applies to (all of them for ``"layer"``, ``out`` (or
        ``C_out / groups * prod(kernel)``) for ``"input"``, one for ``"weight"``)."""
        la = self._clamped_log_alpha()
        per_alpha = self.theta.numel() // max(la.numel(), 1)
        return variational_dropout_kl(la).sum() * per_alpha

    def _alpha_repr(self) -> str:
        return f"alpha={self.alpha_kind!r}"


class VariationalDropoutLinear(_VariationalDropoutMixin, _NotScriptable, nn.Module):
    """A linear layer trained by variational (Gaussian) dropout (Kingma, Salimans & Welling 2015).

    Every weight is ``N(theta, alpha theta^2)`` (``w = theta (1 + sqrt(alpha) eps)``), ``alpha <= 1``
    learnt; training minimises the data loss plus :meth:`kl` (scaled by ``1 / N_train`` when the data
    loss is a mean).

    * training: one LRT sample per input (``bdlkern.ops.lrt_linear``), ``[*, in] -> [*, out]``;
    * eval: the deterministic mean ``x theta^T + bias``;
    * inside ``bdlkern.sampling(S)``: S stochastic LRT samples with the sample-dimension rule of
      :mod:`bdlkern._sampling` (``[*, in]`` -> ``[S, *, out]``).

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (theta initialised like its weight).
        alpha: where alpha is shared: ``"layer"`` (one alpha, the paper's "type A"-like variant;
            ``log_alpha []``), ``"input"`` (one per input unit, Kingma et al.'s per-unit Gaussian
            dropout of the layer's input; ``log_alpha [1, in]``) or ``"weight"`` (one per weight,
            ``log_alpha [out, in]``).
        init_alpha: initial alpha, in (0, 1] (0.1: a Gaussian dropout of rate ~0.09).

    Parameters: ``theta [out, in]``, ``log_alpha`` (shape by ``alpha``), ``bias [out]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        alpha: str = "layer",
        init_alpha: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        init = _check_alpha_args(type(self).__name__, alpha, init_alpha)
        self.in_features = in_features
        self.out_features = out_features
        self.alpha_kind = alpha
        factory = {"device": device, "dtype": dtype}
        self.theta = nn.Parameter(torch.empty(out_features, in_features, **factory))
        shape = {"layer": (), "input": (1, in_features), "weight": (out_features, in_features)}[alpha]
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(init), **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        nn.init.kaiming_uniform_(self.theta, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, alpha: str = "layer", init_alpha: float = 0.1
    ) -> "VariationalDropoutLinear":
        """A variational-dropout layer whose ``theta [out, in]`` and bias are copies of ``linear``'s
        weight and bias, every alpha at ``init_alpha``; same device, dtype and training mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, alpha=alpha, init_alpha=init_alpha,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        return _copied_from(layer, linear, "theta")

    # The sparse-VD layer's regimes, through the hooks _lrt_log_sigma2 and _mean_weight.
    forward = SparseVDLinear.forward

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._alpha_repr()}"
        )


class _VariationalDropoutConvNd(_VariationalDropoutMixin, _NotScriptable, nn.Module):
    """A convolution trained by variational (Gaussian) dropout (Kingma, Salimans & Welling 2015),
    the conv counterpart of :class:`VariationalDropoutLinear`: every weight is
    ``N(theta, alpha theta^2)``, ``alpha <= 1`` learnt, and the layer adds :meth:`kl` to the loss.

    * training: one LRT sample per input (``bdlkern.ops.lrt_conv``), ``[N, C, *] -> [N, C_out, *]``;
    * eval: the deterministic mean ``conv(x, theta) + bias``;
    * inside ``bdlkern.sampling(S)``: S stochastic LRT samples folded into the batch, sample-major
      (the folded layout of :mod:`bdlkern._sampling`).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as the
            torch convolution (theta initialised like its weight; ``padding_mode`` is zeros).
        alpha: ``"layer"`` (``log_alpha []``), ``"input"`` (one per input channel, ``log_alpha
            [C_in]``; with groups, channel ``c`` acts on the weights of its group that read it) or
            ``"weight"`` (``log_alpha`` of ``theta``'s shape).
        init_alpha: as :class:`VariationalDropoutLinear`.

    Parameters: ``theta [C_out, C_in / groups, *kernel]``, ``log_alpha``, ``bias [C_out]``.
    """

    _dims: int
    _conv_type: type

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        alpha: str = "layer",
        init_alpha: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        init = _check_alpha_args(type(self).__name__, alpha, init_alpha)
        bias_param = _init_conv_theta(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype
        )
        self.alpha_kind = alpha
        shape = {"layer": (), "input": (in_channels,), "weight": tuple(self.theta.shape)}[alpha]
        self.log_alpha = nn.Parameter(torch.full(shape, math.log(init), device=device, dtype=self.theta.dtype))
        self.bias = bias_param

    @classmethod
    def from_conv(cls, conv: nn.Module, alpha: str = "layer", init_alpha: float = 0.1):
        """A variational-dropout layer whose ``theta`` and bias are ``conv``'s weight and bias, every
        alpha at ``init_alpha``; ``padding_mode`` must be zeros."""
        if not isinstance(conv, cls._conv_type):
            raise TypeError(
                f"{cls.__name__}.from_conv: expected an nn.{cls._conv_type.__name__}, got {type(conv).__name__}"
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"{cls.__name__}.from_conv: padding_mode={conv.padding_mode!r} is not supported; use 'zeros'"
            )
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, alpha=alpha,
            init_alpha=init_alpha, device=conv.weight.device, dtype=conv.weight.dtype,
        )
        return _copied_from(layer, conv, "theta")

    def _broadcast(self, t: torch.Tensor) -> torch.Tensor:
        if self.alpha_kind != "input":
            return t.expand(self.theta.shape)
        # [C_in] -> [groups, C_out / groups, C_in / groups, *1] -> theta's shape: weight (o, j) of group
        # g = o // (C_out / groups) reads input channel g * (C_in / groups) + j.
        g = self.groups
        c_out_g, c_in_g = self.out_channels // g, self.in_channels // g
        per_group = t.reshape(g, 1, c_in_g, *([1] * self._dims))
        return per_group.expand(g, c_out_g, c_in_g, *self.theta.shape[2:]).reshape(self.theta.shape)

    # The sparse-VD convolution's checks, op call and regimes, through the hooks _lrt_log_sigma2
    # and _mean_weight.
    _error_label = _SparseVDConvNd._error_label
    _check_channels = _SparseVDConvNd._check_channels
    _lrt = _SparseVDConvNd._lrt
    forward = _SparseVDConvNd.forward

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"{self._alpha_repr()}"
        )


class VariationalDropoutConv2d(_VariationalDropoutConvNd):
    """Variational (Gaussian) dropout for ``nn.Conv2d`` (input ``[N, C, H, W]``); see
    ``_VariationalDropoutConvNd``."""

    _dims = 2
    _conv_type = nn.Conv2d
