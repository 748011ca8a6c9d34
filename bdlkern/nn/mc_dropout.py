"""MC dropout: :class:`MCDropoutLinear` (``nn.Dropout`` followed by ``nn.Linear``) and
:class:`MCDropoutConv1d` / :class:`MCDropoutConv2d` / :class:`MCDropoutConv3d` (``nn.Dropout`` or
``nn.Dropout1d/2d/3d`` followed by the convolution), fused into one op that draws all Monte Carlo
samples at once inside ``bdlkern.sampling``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._sampling import current_sampling
from ._base import (
    _check_conv_input,
    _check_dtype,
    _check_memory_efficient,
    _check_width,
    _copied_from,
    _MC_DTYPES,
    _NotScriptable,
)


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
        memory_efficient: the CUDA path (see :func:`bdlkern.ops.mc_dropout_linear`): ``True``
            never holds the ``[S, *, in]`` masked input, ``False`` materialises it and runs cuBLAS,
            ``None`` (default) lets the cost model pick per call. Ignored on the CPU.

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
        memory_efficient: bool | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not (0.0 <= float(p) < 1.0):
            raise ValueError(f"MCDropoutLinear: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.shared_mask = bool(shared_mask)
        self.memory_efficient = _check_memory_efficient(self, memory_efficient)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, p: float = 0.5, shared_mask: bool = False, memory_efficient: bool | None = None
    ) -> "MCDropoutLinear":
        """An MC layer with a copy of ``linear``'s parameters (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            p=p,
            bias=linear.bias is not None,
            shared_mask=shared_mask,
            memory_efficient=memory_efficient,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        return _copied_from(layer, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` ``[*, in]`` or ``[S, *, in]`` -> ``[S, *, out]``."""
        _check_width(self, x, self.in_features)
        state = current_sampling()
        if state is not None:
            _check_dtype(self, x, self.weight.dtype, _MC_DTYPES, "MC-dropout")
            rng_state, num_samples, x, folded = state.layer_call(
                self, x, self.in_features, per_row=self.in_features, shared=self.shared_mask
            )
            y = ops.mc_dropout_linear(
                x, self.weight, self.bias, self.p, num_samples, shared_mask=self.shared_mask, rng_state=rng_state,
                memory_efficient=getattr(self, "memory_efficient", None),
            )
            return state.output(y.flatten(0, 1) if folded else y, "folded" if folded else "stacked")
        if self.training and self.p > 0.0:
            weight = self.weight
            _check_dtype(self, x, weight.dtype, _MC_DTYPES, "MC-dropout")
            # Training is plain dropout: one sample, per-element masks (shared_mask is a sampling
            # option). The wrapper's eager path serves the common [B, in] CPU input.
            y = ops.mc_dropout_linear(
                x, weight, self.bias, self.p, 1, memory_efficient=getattr(self, "memory_efficient", None)
            )
            return y.squeeze(0)  # a view: its backward is free, [0]'s fills zeros
        _check_dtype(self, x, self.weight.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        extra = f"{super().extra_repr()}, p={self.p}, shared_mask={self.shared_mask}"
        me = getattr(self, "memory_efficient", None)
        return extra if me is None else f"{extra}, memory_efficient={me}"



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
        return _copied_from(layer, conv)

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
            per_image = self.in_channels * (math.prod(x.shape[-self._dims:]) if self.mask == "element" else 1)
            rng_state, has_samples, x_op, stacked = state.conv_call(self, x, per_image=per_image, shared=self.shared_mask)
            self._check_channels(x_op, "an input (samples folded into the batch)" if has_samples else "a batched input")
            _check_dtype(self, x, self.weight.dtype, _MC_DTYPES, "MC-dropout")
            y = self._op(x_op, state.num_samples, rng_state, self.shared_mask, has_samples)
            return state.output(y.unflatten(0, (state.num_samples, -1)) if stacked else y, "stacked" if stacked else "folded")
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


#: torch's dropout modules -> (mask kind, channel-dropout rank, alpha) of the MCDropout replacing them.
_TORCH_DROPOUT_KINDS: dict[type, tuple[str, int | None, bool]] = {
    nn.Dropout: ("element", None, False),
    nn.Dropout1d: ("channel", 1, False),
    nn.Dropout2d: ("channel", 2, False),
    nn.Dropout3d: ("channel", 3, False),
    nn.AlphaDropout: ("element", None, True),
    nn.FeatureAlphaDropout: ("channel", None, True),
}

# SELU's fixed point (Klambauer et al. 2017): alpha dropout sets dropped units to -scale * alpha.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


class MCDropout(nn.Module):
    """A dropout layer that samples: the sampling-aware stand-in for ``nn.Dropout``,
    ``nn.Dropout1d/2d/3d``, ``nn.AlphaDropout`` and ``nn.FeatureAlphaDropout`` that
    :func:`bdlkern.nn.convert` puts wherever those sit in a model (a custom ``forward`` included).

    * training (outside ``sampling``): the torch layer it replaces, with the keep flags drawn from
      the bdlkern Philox stream (``torch.manual_seed`` reproducible): ``x * m / (1 - p)`` with one
      flag per element (``mask="element"``) or per (row, channel) broadcast over the rest
      (``mask="channel"``); with ``alpha=True`` alpha dropout, ``a * (x * m + a' * (1 - m)) + b``
      with ``a' = -scale * alpha`` of SELU, which keeps a SELU network's mean and variance;
    * eval (outside ``sampling``): the identity;
    * inside ``bdlkern.sampling(S)`` (train or eval): S masks at once. An input without samples
      ``[N, ...]`` gives ``[S * N, ...]``, the samples folded into the batch sample-major (so every
      layer after it works unchanged, whatever its forward does with dimensions); an input that
      carries the samples keeps its layout (see :mod:`bdlkern._sampling`). A 0-d or 1-d input
      gives ``[S, ...]``.

    The flags are those of the fused MC-dropout ops (stream ``"mc_dropout"``, the row-major index
    of the folded tensor; channel flags at ``row * C + channel``), so ``MCDropout`` followed by a
    linear or convolution layer draws exactly the samples of the fused ``MCDropoutLinear`` /
    ``MCDropoutConv2d`` with the same ``rng_state``.

    Args:
        p: drop probability in ``[0, 1]`` (``[0, 1)`` with ``alpha``).
        mask: ``"element"`` or ``"channel"`` (dimension 1 of a batched input is the channel).
        dims: for channel masks, the spatial rank of the torch layer replaced (1, 2, 3; None for
            any): a batched input then has ``dims + 2`` dimensions, an unbatched one ``dims + 1``.
        alpha: alpha dropout (for SELU networks).
    """

    def __init__(self, p: float = 0.5, mask: str = "element", dims: int | None = None, alpha: bool = False):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) <= 1.0):
            raise ValueError(f"MCDropout: p must be a number in [0, 1], got {p!r}")
        if alpha and float(p) >= 1.0:
            raise ValueError(f"MCDropout: alpha dropout needs p < 1, got {p}")
        if mask not in ("element", "channel"):
            raise ValueError(f"MCDropout: mask must be 'element' or 'channel', got {mask!r}")
        if dims not in (None, 1, 2, 3) or (dims is not None and mask != "channel"):
            raise ValueError(f"MCDropout: dims must be None, or 1, 2 or 3 with channel masks, got {dims!r}")
        self.p = float(p)
        self.mask = mask
        self.dims = dims
        self.alpha = bool(alpha)

    @classmethod
    def from_dropout(cls, dropout: nn.Module) -> "MCDropout":
        """The ``MCDropout`` of a torch dropout module (same p, kind and training mode)."""
        kind = _TORCH_DROPOUT_KINDS.get(type(dropout))
        if kind is None:
            names = ", ".join(f"nn.{t.__name__}" for t in _TORCH_DROPOUT_KINDS)
            raise TypeError(f"MCDropout.from_dropout: expected one of {names}, got {type(dropout).__name__}")
        mask, dims, alpha = kind
        layer = cls(dropout.p, mask=mask, dims=dims, alpha=alpha)
        layer.train(dropout.training)
        return layer

    def _batched(self, x: torch.Tensor) -> bool:
        """Whether ``x`` (without samples) has a batch dimension in front of the channels."""
        if self.dims is not None:
            if x.dim() not in (self.dims + 1, self.dims + 2):
                raise ValueError(
                    f"MCDropout(mask='channel', dims={self.dims}): expected a {self.dims + 2}-d batched or "
                    f"{self.dims + 1}-d unbatched input, got shape {tuple(x.shape)}"
                )
            return x.dim() == self.dims + 2
        if x.dim() < 2:
            raise ValueError(f"MCDropout(mask='channel'): the input needs a channel dimension, got shape {tuple(x.shape)}")
        return True

    def _drop(self, x: torch.Tensor, flags_shape: tuple[int, ...], rng_state: torch.Tensor) -> torch.Tensor:
        """Dropout of ``x`` with the keep flags of ``flags_shape`` (a prefix of ``x``'s shape,
        broadcast over the rest)."""
        keep = ops.dropout_mask(flags_shape, self.p, rng_state=rng_state, stream="mc_dropout")
        keep = keep.reshape(*flags_shape, *([1] * (x.dim() - len(flags_shape))))
        if not self.alpha:
            if self.p >= 1.0:
                return x * keep.to(x.dtype)  # all zero (x * 0, so NaN stays NaN as in torch)
            return x * (keep.to(x.dtype) * (1.0 / (1.0 - self.p)))
        q = 1.0 - self.p
        dropped = -_SELU_SCALE * _SELU_ALPHA
        a = (q + dropped**2 * q * self.p) ** -0.5
        b = -a * dropped * self.p
        return torch.where(keep, x, torch.full((), dropped, dtype=x.dtype, device=x.device)) * a + b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*] -> [*]``; inside ``sampling(S)`` see the class docstring."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"MCDropout: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        state = current_sampling()
        if state is None:
            if not self.training or self.p == 0.0:
                return x
            rng_state = ops.new_rng_state(device=x.device)
            if self.mask == "element":
                return self._drop(x, tuple(x.shape), rng_state)
            flags = tuple(x.shape[:2]) if self._batched(x) else tuple(x.shape[:1])
            return self._drop(x, flags, rng_state)
        rng_state, layout = state.tensor_call(self, x, channel=self.mask == "channel")
        S = state.num_samples
        if layout is None:
            # Starts the sampling: [N, ...] -> [S, N, ...] (the flags' row-major index is that of
            # the folded [S * N, ...]), folded unless there is no batch to fold into.
            if self.mask == "channel" and not self._batched(x):
                raise ValueError(
                    f"MCDropout(mask='channel'): inside sampling the input needs its batch dimension, got shape "
                    f"{tuple(x.shape)} (unsqueeze(0) an unbatched input)"
                )
            xs = x.unsqueeze(0)
            shape = (S, *x.shape)
            flags = shape if self.mask == "element" else shape[:3]
            y = self._drop(xs.expand(shape), flags, rng_state)
            if x.dim() >= 2:
                return state.output(y.flatten(0, 1), "folded")
            return state.output(y, "stacked")
        if self.mask == "element":
            flags = tuple(x.shape)
        elif layout == "folded":
            flags = tuple(x.shape[:2])
        else:
            flags = tuple(x.shape[:3])
        if self.mask == "channel":
            extra = 0 if layout == "folded" else 1  # a stacked input has [S] in front of its batch
            wanted = (self.dims + 2 + extra,) if self.dims is not None else None
            if x.dim() < 2 + extra or (wanted is not None and x.dim() not in wanted):
                raise ValueError(
                    f"MCDropout(mask='channel'): inside sampling({S}) its input carries the samples ({layout}), so it "
                    f"must be [{'S * N' if layout == 'folded' else 'S, N'}, C, ...], got shape {tuple(x.shape)}"
                )
        return state.output(self._drop(x, flags, rng_state), layout)

    def extra_repr(self) -> str:
        extra = f", dims={self.dims}" if self.dims is not None else ""
        return f"p={self.p}, mask={self.mask!r}{extra}, alpha={self.alpha}"
