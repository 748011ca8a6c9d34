"""MC dropout: :class:`MCDropoutLinear` (``nn.Dropout`` followed by ``nn.Linear``) and
:class:`MCDropoutConv1d` / :class:`MCDropoutConv2d` / :class:`MCDropoutConv3d` (``nn.Dropout`` or
``nn.Dropout1d/2d/3d`` followed by the convolution), fused into one op that draws all Monte Carlo
samples at once inside ``bdlkern.sampling``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._sampling import current_sampling
from ._base import _check_conv_input, _MC_DTYPES, _NotScriptable, _check_dtype, _check_width


class MCDropoutLinear(_NotScriptable, nn.Linear):
    """``nn.Dropout(p)`` followed by ``nn.Linear``, fused, with Monte Carlo sampling.

    * training (outside ``sampling``): exactly dropout then linear, ``[*, in] -> [*, out]``, with
      the mask drawn from the bdlkern Philox stream (``torch.manual_seed`` reproducible);
    * eval (outside ``sampling``): the deterministic linear layer;
    * inside ``bdlkern.sampling(S)`` (train or eval): S samples in one fused kernel. The first MC
      layer of a pass maps ``[*, in]`` to ``[S, *, out]``; later ones map ``[S, *, in]`` to
      ``[S, *, out]`` (see :mod:`bdlkern._sampling` for the exact rule).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        p: drop probability of the layer's *input*, in ``[0, 1)``.
        shared_mask: inside ``sampling``, one mask per (sample, input feature) shared by every row
            of the batch: each sample is one weight sample applied to the whole batch (joint
            predictions); on the CPU the kernel skips the dropped features.

    The state dict is that of ``nn.Linear`` (``weight``, ``bias``). The input is checked like
    ``nn.Linear``'s (last dimension ``in_features``; the parameters' dtype): see :mod:`bdlkern.nn`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        p: float = 0.5,
        bias: bool = True,
        shared_mask: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not (0.0 <= float(p) < 1.0):
            raise ValueError(f"MCDropoutLinear: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.shared_mask = bool(shared_mask)

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float = 0.5, shared_mask: bool = False) -> "MCDropoutLinear":
        """An MC layer with a copy of ``linear``'s parameters (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            p=p,
            bias=linear.bias is not None,
            shared_mask=shared_mask,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` ``[*, in]`` or ``[S, *, in]`` -> ``[S, *, out]``."""
        _check_width(self, x, self.in_features)
        state = current_sampling()
        if state is not None:
            _check_dtype(self, x, self.weight.dtype, _MC_DTYPES, "MC-dropout")
            rng_state, num_samples, x, folded = state.layer_call(self, x, self.in_features)
            y = ops.mc_dropout_linear(
                x, self.weight, self.bias, self.p, num_samples, shared_mask=self.shared_mask, rng_state=rng_state
            )
            return y.flatten(0, 1) if folded else y
        if self.training and self.p > 0.0:
            weight = self.weight
            _check_dtype(self, x, weight.dtype, _MC_DTYPES, "MC-dropout")
            # Training is plain dropout: one sample, per-element masks (shared_mask is a sampling
            # option). The wrapper's eager path serves the common [B, in] CPU input.
            y = ops.mc_dropout_linear(x, weight, self.bias, self.p, 1)
            return y.squeeze(0)  # a view: its backward is free, [0]'s fills zeros
        _check_dtype(self, x, self.weight.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, shared_mask={self.shared_mask}"



class _MCDropoutConvNd(_NotScriptable):
    """What the MC-dropout convolutions share (mixed into ``nn.Conv1d/2d/3d``): dropout of the
    layer's input followed by the convolution, fused, with Monte Carlo sampling.

    * training (outside ``sampling``): exactly ``nn.Dropout`` (``mask="element"``) or
      ``nn.Dropout1d/2d/3d`` (``mask="channel"``) then the convolution, with the mask drawn from
      the bdlkern Philox stream (``torch.manual_seed`` reproducible);
    * eval (outside ``sampling``): the deterministic convolution;
    * inside ``bdlkern.sampling(S)``: S samples in one call, folded into the batch sample-major.
      The first MC layer of a pass maps ``[N, C, *]`` to ``[S * N, C_out, *]``, later ones
      ``[S * N, C, *]`` to ``[S * N, C_out, *]``, so ordinary layers in between work unchanged
      (see :mod:`bdlkern._sampling`; ``bdlkern.unfold_samples`` gives ``[S, N, ...]``).

    Args (beyond those of the torch convolution):
        p: drop probability of the layer's *input*, in ``[0, 1)``.
        mask: ``"element"`` (one flag per input element) or ``"channel"`` (one per channel plane).
        shared_mask: inside ``sampling``, one mask per sample shared by its N images (a posterior
            sample of the filter bank); with channel masks and ``groups == 1`` the convolution runs
            on the kept channels only.

    ``padding_mode`` must be ``"zeros"``: other modes pad with copies of the input, which the
    fused op (masking before zero padding) does not reproduce. The state dict is that of the torch
    convolution (``weight``, ``bias``).
    """

    _conv_type: type
    _dims: int

    def _init_mc(self, p: float, mask: str, shared_mask: bool) -> None:
        name = type(self).__name__
        if not (0.0 <= float(p) < 1.0):
            raise ValueError(f"{name}: p must be in [0, 1), got {p}")
        if mask not in ("element", "channel"):
            raise ValueError(f"{name}: mask must be 'element' or 'channel', got {mask!r}")
        if self.padding_mode != "zeros":
            raise ValueError(
                f"{name}: padding_mode={self.padding_mode!r} is not supported (the fused op masks the input "
                "before zero padding); use padding_mode='zeros', or nn.Dropout followed by the torch convolution"
            )
        self.p = float(p)
        self.mask = mask
        self.shared_mask = bool(shared_mask)

    @classmethod
    def from_conv(cls, conv: nn.Module, p: float = 0.5, mask: str = "element", shared_mask: bool = False):
        """An MC layer with a copy of ``conv``'s parameters (same device, dtype and mode)."""
        if not isinstance(conv, cls._conv_type):
            raise TypeError(f"{cls.__name__}.from_conv: expected an nn.{cls._conv_type.__name__}, got {type(conv).__name__}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            p=p,
            mask=mask,
            shared_mask=shared_mask,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.train(conv.training)
        return layer

    def _error_label(self) -> str:
        return f"{type(self).__name__}(in_channels={self.in_channels}, out_channels={self.out_channels})"

    def _check_channels(self, x: torch.Tensor, where: str) -> None:
        _check_conv_input(self, x, self._dims, self.in_channels, where)

    def _op(self, x, num_samples, rng_state=None, shared_mask=False, input_has_samples=False):
        return ops.mc_dropout_conv(
            x, self.weight, self.bias, self.p, num_samples, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, mask=self.mask, shared_mask=shared_mask,
            input_has_samples=input_has_samples, rng_state=rng_state,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, *] -> [B, C_out, *]``; inside ``sampling(S)`` see the class docstring."""
        state = current_sampling()
        if state is not None:
            rng_state, has_samples, x_op, stacked = state.conv_call(self, x)
            self._check_channels(x_op, "an input (samples folded into the batch)" if has_samples else "a batched input")
            _check_dtype(self, x, self.weight.dtype, _MC_DTYPES, "MC-dropout")
            y = self._op(x_op, state.num_samples, rng_state, self.shared_mask, has_samples)
            return y.unflatten(0, (state.num_samples, -1)) if stacked else y
        if self.training and self.p > 0.0:
            # Training is plain dropout: one sample (shared_mask is a sampling option).
            unbatched = x.dim() == self._dims + 1
            xb = x.unsqueeze(0) if unbatched else x
            self._check_channels(xb, "a batched or unbatched input")
            _check_dtype(self, x, self.weight.dtype, _MC_DTYPES, "MC-dropout")
            y = self._op(xb, 1)
            return y.squeeze(0) if unbatched else y
        _check_dtype(self, x, self.weight.dtype)
        return self._conv_forward(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, mask={self.mask!r}, shared_mask={self.shared_mask}"


def _conv_init(self, conv_type, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
               padding_mode, p, mask, shared_mask, device, dtype):
    conv_type.__init__(
        self, in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
        groups=groups, bias=bias, padding_mode=padding_mode, device=device, dtype=dtype,
    )
    self._init_mc(p, mask, shared_mask)


class MCDropoutConv1d(_MCDropoutConvNd, nn.Conv1d):
    """``nn.Dropout`` / ``nn.Dropout1d`` followed by ``nn.Conv1d``, fused, with Monte Carlo
    sampling; input ``[B, C, L]`` (see ``_MCDropoutConvNd`` for the regimes and arguments)."""

    _conv_type = nn.Conv1d
    _dims = 1

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", p: float = 0.5, mask: str = "element", shared_mask: bool = False,
                 device=None, dtype=None):
        _conv_init(self, nn.Conv1d, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                   padding_mode, p, mask, shared_mask, device, dtype)


class MCDropoutConv2d(_MCDropoutConvNd, nn.Conv2d):
    """``nn.Dropout`` / ``nn.Dropout2d`` followed by ``nn.Conv2d``, fused, with Monte Carlo
    sampling; input ``[B, C, H, W]`` (see ``_MCDropoutConvNd`` for the regimes and arguments)."""

    _conv_type = nn.Conv2d
    _dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", p: float = 0.5, mask: str = "element", shared_mask: bool = False,
                 device=None, dtype=None):
        _conv_init(self, nn.Conv2d, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                   padding_mode, p, mask, shared_mask, device, dtype)


class MCDropoutConv3d(_MCDropoutConvNd, nn.Conv3d):
    """``nn.Dropout`` / ``nn.Dropout3d`` followed by ``nn.Conv3d``, fused, with Monte Carlo
    sampling; input ``[B, C, D, H, W]`` (see ``_MCDropoutConvNd`` for the regimes and arguments)."""

    _conv_type = nn.Conv3d
    _dims = 3

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", p: float = 0.5, mask: str = "element", shared_mask: bool = False,
                 device=None, dtype=None):
        _conv_init(self, nn.Conv3d, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                   padding_mode, p, mask, shared_mask, device, dtype)
