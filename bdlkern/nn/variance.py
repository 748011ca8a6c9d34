"""Variance networks (Neklyudov, Molchanov, Ashukha & Vetrov 2018, "Variance Networks: When Expectation
Does Not Meet Your Expectations", arXiv:1803.03764): :class:`VarianceLinear` and
:class:`VarianceConv1d` / :class:`VarianceConv2d` / :class:`VarianceConv3d`, layers whose weights
have **zero mean** and a learnt variance, ``w ~ N(0, sigma^2)``, trained with the local
reparameterisation trick on the fused ops of :mod:`bdlkern.ops.variance`::

    mean = bias,   var = x^2 sigma^2,   y = bias + sqrt(var + 1e-8) * eps

A variance layer passes information only through the variance of its output; a following
non-linearity (ReLU: ``E[relu(y)] = sqrt(var) / sqrt(2 pi)`` for a zero bias) turns it into a mean,
so a network of them still learns. The paper's point, which the tests reproduce on the digits: as an
ensemble of samples (``bdlkern.sampling(S)`` / :func:`bdlkern.uncertainty.mc_predict`) such a network
classifies well, while the network with every weight replaced by its mean (zero) answers at chance.

A variance layer is the limit ``alpha -> infinity`` of variational dropout; under the log-uniform
prior that limit has a constant KL, so these layers add no KL term to the loss (they are not picked
up by :func:`bdlkern.nn.kl_divergence`); train them on the data loss alone (optionally with a weight
decay on ``log_sigma2``).

Regimes:

* training (outside ``sampling``): one LRT sample per input;
* inside ``bdlkern.sampling(S)`` (train or eval): S samples with the sample rule of
  :mod:`bdlkern._sampling`, the way to predict with a variance network;
* eval (outside ``sampling``): the layer with its weights' means, i.e. the bias alone. That is the
  expectation the paper shows to be useless, so the layer warns (:class:`VarianceMeanWarning`) when it
  runs so.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import ops
from .._sampling import current_sampling
from ._base import (
    _F32_F64,
    _check_conv_input,
    _check_dtype,
    _check_width,
    _conv_out_spatial,
    _image_out_numel,
    _NotScriptable,
)
from .sparse_vd import _conv_template

class VarianceMeanWarning(UserWarning):
    """A variance layer ran in eval mode outside ``bdlkern.sampling``: it returned the mean of its
    zero-mean weights' output, its bias alone, whatever the input (filter this class to silence it
    where that is what you want, e.g. to show the paper's point)."""


_EVAL_WARNING = (
    "{}: in eval mode outside bdlkern.sampling a variance layer returns the mean of its zero-mean "
    "weights' output, i.e. its bias alone, whatever the input; predict with bdlkern.sampling(S) or "
    "bdlkern.uncertainty.mc_predict"
)


def _init_log_sigma2(log_sigma2: torch.Tensor, fan_in: int) -> None:
    """``log sigma^2`` of weights whose standard deviations are ``|U(-1/sqrt(fan_in), 1/sqrt(fan_in))|``
    (the scale of ``nn.Linear``'s initial weights, as the paper's code starts its variance layers),
    floored at 1e-4 of that bound so that no log-variance starts near minus infinity."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 1.0
    with torch.no_grad():
        sigma = torch.empty_like(log_sigma2).uniform_(-bound, bound).abs_().clamp_(min=1e-4 * bound)
        log_sigma2.copy_(2.0 * torch.log(sigma))


def _warn_eval(layer: nn.Module) -> None:
    warnings.warn(_EVAL_WARNING.format(type(layer).__name__), VarianceMeanWarning, stacklevel=3)


class VarianceLinear(_NotScriptable, nn.Module):
    """A linear layer with zero-mean Gaussian weights ``w ~ N(0, exp(log_sigma2))`` (a variance layer,
    Neklyudov et al. 2018); see :mod:`bdlkern.nn.variance` for the regimes.

    * training: ``bdlkern.ops.variance_linear`` with one sample, ``[*, in] -> [*, out]``;
    * inside ``bdlkern.sampling(S)``: ``[*, in]`` or ``[S, *, in]`` (an input that carries the samples)
      ``-> [S, *, out]`` (or folded, as the sample rule says);
    * eval outside ``sampling``: ``bias`` broadcast to ``[*, out]`` (zeros without bias), with a warning.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bias: learn an additive bias (the mean of the output); as ``nn.Linear``'s it starts in
            ``U(-1/sqrt(in), 1/sqrt(in))``.

    Parameters: ``log_sigma2 [out, in]``, ``bias [out]``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"VarianceLinear: {name} must be an int >= 0, got {value!r}")
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.log_sigma2 = nn.Parameter(torch.empty(out_features, in_features, **factory))
        _init_log_sigma2(self.log_sigma2, in_features)
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def weight_variance(self) -> torch.Tensor:
        """``sigma^2 = exp(log_sigma2)``, ``[out, in]`` (differentiable)."""
        return torch.exp(self.log_sigma2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` ``[*, in]`` or ``[S, *, in]`` -> ``[S, *, out]``."""
        _check_width(self, x, self.in_features)
        state = current_sampling()
        if state is not None:
            _check_dtype(self, x, self.log_sigma2.dtype, _F32_F64, "variance")
            rng_state, num_samples, x, folded = state.layer_call(self, x, self.in_features, per_row=self.out_features)
            y = ops.variance_linear(x, self.log_sigma2, self.bias, num_samples=num_samples, rng_state=rng_state)
            return state.output(y.flatten(0, 1) if folded else y, "folded" if folded else "stacked")
        if self.training:
            _check_dtype(self, x, self.log_sigma2.dtype, _F32_F64, "variance")
            return ops.variance_linear(x, self.log_sigma2, self.bias, num_samples=1).squeeze(0)
        _check_dtype(self, x, self.log_sigma2.dtype)
        _warn_eval(self)
        mean = x.new_zeros((*x.shape[:-1], self.out_features))
        return mean if self.bias is None else mean + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class _VarianceConvNd(_NotScriptable, nn.Module):
    """A convolution with zero-mean Gaussian weights ``w ~ N(0, exp(log_sigma2))`` (a variance layer,
    Neklyudov et al. 2018), the conv counterpart of :class:`VarianceLinear`.

    * training: ``bdlkern.ops.variance_conv`` with one sample, ``[N, C, *] -> [N, C_out, *]``;
    * inside ``bdlkern.sampling(S)``: S samples folded into the batch, sample-major;
    * eval outside ``sampling``: the bias broadcast over the output (zeros without bias), with a warning.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as the torch
            convolution (``padding_mode`` zeros; the bias initialised like its bias).

    Parameters: ``log_sigma2 [C_out, C_in / groups, *kernel]``, ``bias [C_out]``.
    """

    _dims: int
    _conv_type: type

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, device=None, dtype=None):
        super().__init__()
        template = _conv_template(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype
        )
        self.log_sigma2 = nn.Parameter(torch.empty_like(template.weight))
        _init_log_sigma2(self.log_sigma2, template.weight[0].numel())
        self.bias = nn.Parameter(template.bias.detach().clone()) if bias else None

    weight_variance = VarianceLinear.weight_variance

    def _error_label(self) -> str:
        return f"{type(self).__name__}(in_channels={self.in_channels}, out_channels={self.out_channels})"

    def _check_channels(self, x: torch.Tensor, where: str) -> None:
        _check_conv_input(self, x, self._dims, self.in_channels, where)

    def _sample(self, x, num_samples, rng_state=None, input_has_samples=False):
        return ops.variance_conv(
            x, self.log_sigma2, self.bias, num_samples, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, input_has_samples=input_has_samples, rng_state=rng_state,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, *] -> [N, C_out, *]``; inside ``sampling(S)`` see the class docstring."""
        state = current_sampling()
        if state is not None:
            per_image = _image_out_numel(self, x, self._dims, self.log_sigma2.shape[2:], self.out_channels)
            rng_state, has_samples, x_op, stacked = state.conv_call(self, x, per_image=per_image)
            self._check_channels(x_op, "an input (samples folded into the batch)" if has_samples else "a batched input")
            _check_dtype(self, x, self.log_sigma2.dtype, _F32_F64, "variance")
            y = self._sample(x_op, state.num_samples, rng_state, has_samples)
            return state.output(y.unflatten(0, (state.num_samples, -1)) if stacked else y, "stacked" if stacked else "folded")
        unbatched = x.dim() == self._dims + 1
        xb = x.unsqueeze(0) if unbatched else x
        self._check_channels(xb, "a batched or unbatched input")
        if self.training:
            _check_dtype(self, x, self.log_sigma2.dtype, _F32_F64, "variance")
            y = self._sample(xb, 1)
        else:
            _check_dtype(self, x, self.log_sigma2.dtype)
            _warn_eval(self)
            shape = (xb.shape[0], self.out_channels, *_conv_out_spatial(self, xb.shape[2:], self.log_sigma2.shape[2:]))
            y = xb.new_zeros(shape)
            if self.bias is not None:
                y = y + self.bias.reshape(-1, *([1] * self._dims))
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}"
        )


class VarianceConv1d(_VarianceConvNd):
    """The 1-d :class:`_VarianceConvNd` (``[N, C, L]``)."""

    _dims = 1
    _conv_type = nn.Conv1d


class VarianceConv2d(_VarianceConvNd):
    """The 2-d :class:`_VarianceConvNd` (``[N, C, H, W]``), the variance counterpart of ``nn.Conv2d``."""

    _dims = 2
    _conv_type = nn.Conv2d


class VarianceConv3d(_VarianceConvNd):
    """The 3-d :class:`_VarianceConvNd` (``[N, C, D, H, W]``)."""

    _dims = 3
    _conv_type = nn.Conv3d
