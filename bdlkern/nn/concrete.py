"""Concrete dropout (Gal, Hron & Kendall 2017): dropout whose rate is learnt.

:class:`ConcreteDropoutLinear` (dropout on the input of a linear layer), :class:`ConcreteDropout`
(in front of any layer, spatial for a convolution) and :class:`ConcreteDropout2d`, all built on
``_ConcreteDropoutMixin``: the learnt rate, the regulariser and the three regimes of forward
(training, eval, ``bdlkern.sampling``). Inside ``sampling`` a layer with one rate in front of an
``nn.Linear`` runs the fused MC-dropout kernel.
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._sampling import current_sampling
from ._base import (
    _F32_F64,
    _MC_DTYPES,
    _NotScriptable,
    _check_dtype,
    _check_memory_efficient,
    _check_width,
    _copied_from,
    _module_label,
)


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


class _ConcreteDropoutMixin(_NotScriptable, abc.ABC):
    """What every Concrete-dropout module shares: the learnt rate, the regulariser, and the three
    regimes of forward (training: relaxed masks; eval: deterministic; ``sampling(S)``: hard
    Bernoulli masks with the learnt rate, or relaxed ones with ``relaxed_eval``).

    A module provides the three abstract hooks: the weight and bias of the layer behind the
    dropout (for the regulariser) and that layer's forward."""

    p_logit: nn.Parameter

    def _init_concrete(
        self,
        input_dim: int,
        channel_dim: int | None,
        weight_regularizer: float,
        dropout_regularizer: float,
        init_p: float,
        temperature: float,
        per_feature: bool,
        relaxed_eval: bool,
        device=None,
        dtype=None,
    ) -> None:
        name = type(self).__name__
        if not (0.0 < float(init_p) < 1.0):
            raise ValueError(f"{name}: init_p must be in (0, 1), got {init_p}")
        if not (float(temperature) > 0.0 and math.isfinite(float(temperature))):
            raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature}")
        if weight_regularizer < 0 or dropout_regularizer < 0:
            raise ValueError(f"{name}: the regularizer coefficients must be >= 0")
        if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
            raise ValueError(f"{name}: input_dim must be an int >= 1, got {input_dim!r}")
        self.input_dim = input_dim
        self.channel_dim = channel_dim
        self.weight_regularizer = float(weight_regularizer)
        self.dropout_regularizer = float(dropout_regularizer)
        self.temperature = float(temperature)
        self.relaxed_eval = bool(relaxed_eval)
        shape = (input_dim,) if per_feature else ()
        self.p_logit = nn.Parameter(torch.full(shape, _logit(float(init_p)), device=device, dtype=dtype))

    @property
    def p(self) -> torch.Tensor:
        """The learnt drop probability ``sigmoid(p_logit)`` (0-dim, or one per input feature)."""
        return torch.sigmoid(self.p_logit.detach())

    @abc.abstractmethod
    def _dropout_weight(self) -> torch.Tensor:
        """The weight ``[out, in, *]`` of the layer behind the dropout."""

    @abc.abstractmethod
    def _dropout_bias(self) -> torch.Tensor | None:
        """Its bias, or None."""

    def regularization(self) -> torch.Tensor:
        """``concrete_dropout_regularizer`` of the wrapped weight (D = input features / channels),
        plus ``weight_regularizer * ||bias||^2`` for a bias (not dropped, so not rescaled)."""
        reg = ops.concrete_dropout_regularizer(
            self._dropout_weight(), self.p_logit, self.input_dim, self.weight_regularizer, self.dropout_regularizer
        )
        bias = self._dropout_bias()
        if bias is not None:
            reg = reg + self.weight_regularizer * bias.pow(2).sum()
        return reg

    def _relaxed(self, x: torch.Tensor, rng_state: torch.Tensor | None = None) -> torch.Tensor:
        p_logit = self.p_logit.to(x.dtype) if self.p_logit.dtype != x.dtype else self.p_logit
        return ops.concrete_dropout(x, p_logit, self.temperature, channel_dim=self.channel_dim, rng_state=rng_state)

    def _hard(self, x: torch.Tensor, rng_state: torch.Tensor) -> torch.Tensor:
        """Bernoulli(1 - p) keep-masks with the learnt rate(s), from the concrete stream's uniforms
        (keep iff u >= p), for MC inference."""
        if self.channel_dim == 1:
            mask_shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
            p = self.p.reshape(-1, *([1] * (x.dim() - 2))) if self.p_logit.dim() == 1 else self.p
        else:
            mask_shape, p = tuple(x.shape), self.p
        u = ops.uniform(mask_shape, dtype=x.dtype, rng_state=rng_state, stream="concrete_dropout")
        # p < 1, as for the fused kernel: where sigmoid rounds to 1, x / (1 - p) would be inf in the
        # branch where() drops, and its gradient 0 * inf = NaN.
        p = p.to(x.dtype).clamp(max=1.0 - 2.0**-24)
        return torch.where(u >= p, x / (1 - p), torch.zeros((), dtype=x.dtype, device=x.device))

    @abc.abstractmethod
    def _layer(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward on the (dropped) input."""

    def _fused_mc(self, x: torch.Tensor, num_samples: int | None, rng_state: torch.Tensor) -> torch.Tensor | None:
        """The fused MC-dropout kernel, where the layer allows it (Linear with one rate)."""
        return None

    def _fuses(self) -> bool:
        """Whether :meth:`_fused_mc` takes the call (it must agree with it)."""
        return False

    def _fused_conv_mc(self, x: torch.Tensor, num_samples: int, has_samples: bool, rng_state: torch.Tensor):
        """The fused MC-dropout convolution with channel masks, where the layer allows it (a
        zero-padded torch convolution with one rate); None otherwise."""
        return None

    def _check_input(self, x: torch.Tensor, sample_dim: bool) -> None:
        """The width check of the layer behind the dropout (``sample_dim``: ``x`` carries the
        leading sample dimension of ``sampling``)."""

    def _param_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the input must have: that of the layer's parameters."""
        return self.p_logit.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``layer(dropout(x))``; inside ``sampling(S)`` the output carries the samples: a leading
        ``[S, ...]`` dimension, or folded into the batch (``[S * N, ...]``) for a wrapped
        convolution in a folded pass (see :mod:`bdlkern._sampling` for the layouts and for when
        the input has the samples)."""
        state = current_sampling()
        if state is None:
            self._check_input(x, False)
            if self.training or self.relaxed_eval:
                _check_dtype(self, x, self._param_dtype(x), _F32_F64, "Concrete-dropout")
                return self._layer(self._relaxed(x))
            _check_dtype(self, x, self._param_dtype(x))
            return self._layer(x)
        conv = self.channel_dim == 1  # a wrapped convolution: samples folded into the batch
        layout = state.carries(x)
        self._check_input(x, layout is not None and (not conv or layout == "stacked"))
        if self.relaxed_eval:
            _check_dtype(self, x, self._param_dtype(x), _F32_F64, "Concrete-dropout")
        elif self._fuses():
            _check_dtype(self, x, self._param_dtype(x), _MC_DTYPES, "MC-dropout")
        else:
            _check_dtype(self, x, self._param_dtype(x), _F32_F64, "Concrete-dropout")
        S = state.num_samples
        if conv:
            # One mask value per (row, channel) of the folded [S * N, C, ...] input: the same
            # value for a row whether the input arrived with its samples or was repeated here.
            rng_state, has_samples, xs, stacked = state.conv_call(self, x, per_image=self.input_dim)
            out = None if self.relaxed_eval else self._fused_conv_mc(xs, S, has_samples, rng_state)
            if out is None:
                if not has_samples:
                    xs = xs.repeat(S, *([1] * (xs.dim() - 1)))
                dropped = self._relaxed(xs, rng_state) if self.relaxed_eval else self._hard(xs, rng_state)
                out = self._layer(dropped)
            return state.output(out.unflatten(0, (S, -1)) if stacked else out, "stacked" if stacked else "folded")
        rng_state, num_samples, x, folded = state.layer_call(self, x, self.input_dim, per_row=self.input_dim)
        has_sample_dim = num_samples is None
        out = None
        if not self.relaxed_eval:
            out = self._fused_mc(x, num_samples, rng_state)
        if out is None:
            xs = x if has_sample_dim else x.unsqueeze(0).expand(S, *x.shape)
            out = self._layer(self._relaxed(xs, rng_state) if self.relaxed_eval else self._hard(xs, rng_state))
        return state.output(out.flatten(0, 1) if folded else out, "folded" if folded else "stacked")

    def _concrete_repr(self) -> str:
        p = self.p
        shown = f"{p.item():.4g}" if p.dim() == 0 else f"[{p.numel()} rates]"
        return f"p={shown}, temperature={self.temperature}, relaxed_eval={self.relaxed_eval}"


def _fusable_rate(module) -> bool:
    """Whether the fused MC-dropout kernel can take the module's rate: one rate for the layer, read
    as a Python float. Not under ``torch.export``: there the parameter has no value to read
    (``.item()`` of a traced tensor), so the exported program takes the unfused path, the same
    Bernoulli(1 - p) keep-masks from the concrete stream's uniforms (other bits than the fused
    kernel's stream; this is what ``bdlkern.onnx`` exports)."""
    return module.p_logit.dim() == 0 and not torch.compiler.is_exporting()


def _rate_value(module) -> float:
    """The layer's one rate as a Python float for the MC kernel (below 1 even where sigmoid rounds
    to 1). Reading it syncs a CUDA stream, so the value is kept per version of ``p_logit``: one read
    after each change (an optimizer step, a load), none in a loop of sampling calls."""
    logit = module.p_logit
    if torch.compiler.is_compiling():  # fake tensors have no storage to key on
        return min(float(torch.sigmoid(logit.detach()).item()), 1.0 - 2.0**-24)
    key = (logit.data_ptr(), logit._version, logit.device, logit.dtype)
    cached = module.__dict__.get("_rate_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    value = min(float(torch.sigmoid(logit.detach()).item()), 1.0 - 2.0**-24)
    module.__dict__["_rate_cache"] = (key, value)
    return value


def _fused_linear_mc(module, x, weight, bias, num_samples, rng_state):
    if not _fusable_rate(module):
        return None
    p = _rate_value(module)
    return ops.mc_dropout_linear(
        x, weight, bias, p, num_samples, rng_state=rng_state,
        memory_efficient=getattr(module, "memory_efficient", None),
    )


class ConcreteDropoutLinear(_ConcreteDropoutMixin, nn.Linear):
    """Concrete dropout on the input of a linear layer, with a learnt drop rate.

    * training: ``linear(concrete_dropout(x, p_logit, temperature))``, ``[*, in] -> [*, out]``;
    * eval: the deterministic linear layer (or, with ``relaxed_eval``, relaxed masks as in the
      reference notebooks);
    * inside ``bdlkern.sampling(S)``: S hard Bernoulli(1 - p) masks with the learnt p through the
      fused MC-dropout kernel (one rate per layer; per-feature rates use the concrete stream's
      uniforms), with the sample-dimension rule of :mod:`bdlkern._sampling`.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        weight_regularizer, dropout_regularizer: coefficients of :meth:`regularization` (the paper's
            ``l^2 / (tau N)`` and ``2 / (tau N)``).
        init_p: initial drop probability in (0, 1).
        temperature: relaxation temperature > 0.
        per_feature: one learnt rate per input feature instead of one for the layer.
        relaxed_eval: stochastic relaxed masks outside training too.
        memory_efficient: the CUDA path of the fused sampling call (see
            :func:`bdlkern.ops.mc_dropout_linear`): ``None`` lets the cost model pick.

    The state dict holds ``weight``, ``bias`` and ``p_logit``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 1e-5,
        init_p: float = 0.1,
        temperature: float = 0.1,
        per_feature: bool = False,
        relaxed_eval: bool = False,
        memory_efficient: bool | None = None,
        device=None,
        dtype=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_concrete(
            in_features, None, weight_regularizer, dropout_regularizer, init_p, temperature, per_feature,
            relaxed_eval, device, dtype,
        )
        self.memory_efficient = _check_memory_efficient(self, memory_efficient)

    @classmethod
    def from_linear(cls, linear: nn.Linear, init_p: float = 0.1, **concrete_kwargs) -> "ConcreteDropoutLinear":
        """A Concrete-dropout layer with copies of ``linear``'s weight and bias (same device, dtype and
        training mode) and a learnt rate starting at ``init_p``. ``concrete_kwargs`` are the other
        constructor arguments (``weight_regularizer``, ``dropout_regularizer``, ``temperature``,
        ``per_feature``, ``relaxed_eval``, ``memory_efficient``); the shape, bias, device and dtype come from ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        for key in ("in_features", "out_features", "bias", "device", "dtype"):
            if key in concrete_kwargs:
                raise TypeError(f"{cls.__name__}.from_linear: {key} is taken from linear, do not pass it")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, init_p=init_p,
            device=linear.weight.device, dtype=linear.weight.dtype, **concrete_kwargs,
        )
        return _copied_from(layer, linear)

    def _dropout_weight(self):
        return self.weight

    def _dropout_bias(self):
        return self.bias

    def _layer(self, x):
        return F.linear(x, self.weight, self.bias)

    def _fused_mc(self, x, num_samples, rng_state):
        return _fused_linear_mc(self, x, self.weight, self.bias, num_samples, rng_state)

    def _fuses(self):
        return _fusable_rate(self)

    def _check_input(self, x, sample_dim):
        _check_width(self, x, self.in_features)

    def _param_dtype(self, x):
        return self.weight.dtype

    forward = _ConcreteDropoutMixin.forward

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._concrete_repr()}"


def _input_dim_of(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.in_features
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels
    weight = getattr(layer, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2:
        return int(weight.shape[1])
    raise TypeError(
        f"ConcreteDropout: cannot tell the input dimension of a {type(layer).__name__} (no weight [out, in, ...]); "
        "pass input_dim"
    )


class ConcreteDropout(_ConcreteDropoutMixin, nn.Module):
    """Concrete dropout in front of any layer (the paper's wrapper API): ``layer(dropout(x))``.

    For a convolution the mask is spatial (one value per (sample, input channel), ``channel_dim=1``)
    and D is the number of input channels; otherwise one mask value per input element and D is the
    layer's input features. Regimes (training / eval / ``sampling``) as in
    :class:`ConcreteDropoutLinear`; a wrapped ``nn.Linear`` with one rate uses the fused MC-dropout
    kernel inside ``sampling``.

    Args:
        layer: the layer that receives the dropped input (its weight enters the regulariser).
        weight_regularizer, dropout_regularizer, init_p, temperature, per_feature, relaxed_eval: as
            :class:`ConcreteDropoutLinear`.
        input_dim: D, when it cannot be read from ``layer`` (a layer without a ``weight [out, in, ...]``).
    """

    def __init__(
        self,
        layer: nn.Module,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 1e-5,
        init_p: float = 0.1,
        temperature: float = 0.1,
        per_feature: bool = False,
        relaxed_eval: bool = False,
        input_dim: int | None = None,
    ):
        nn.Module.__init__(self)
        if not isinstance(layer, nn.Module):
            raise TypeError(f"ConcreteDropout: layer must be an nn.Module, got {type(layer).__name__}")
        self.layer = layer
        spatial = isinstance(layer, nn.modules.conv._ConvNd)
        param = next(layer.parameters(), None)
        self._init_concrete(
            input_dim if input_dim is not None else _input_dim_of(layer),
            1 if spatial else None,
            weight_regularizer,
            dropout_regularizer,
            init_p,
            temperature,
            per_feature,
            relaxed_eval,
            device=param.device if param is not None else None,
            dtype=param.dtype if param is not None and param.is_floating_point() else None,
        )
        weight = getattr(layer, "weight", None)
        if per_feature and isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.shape[1] != self.input_dim:
            raise ValueError(
                f"ConcreteDropout: per-feature rates need input_dim = weight.shape[1] = {weight.shape[1]}, got {self.input_dim}"
            )
        # What the forward checks of the input, where the layer's type tells it: an nn.Linear takes
        # in_features in the last dimension; an N-d convolution [B, in_channels, *N spatial].
        # Other layers are left to check their input themselves.
        self._in_width: int | None = None
        self._conv_dims: int | None = None
        if isinstance(layer, nn.Linear):
            self._in_width = layer.in_features
        elif isinstance(layer, nn.modules.conv._ConvNd):
            self._in_width = layer.in_channels
            self._conv_dims = len(layer.kernel_size)

    def _error_label(self) -> str:
        """How error messages name the wrapper: by the layer it wraps (see ``_module_label``)."""
        name = type(self).__name__
        layer = self.layer
        if isinstance(layer, nn.Linear):
            return f"{name}({type(layer).__name__}(in_features={layer.in_features}, out_features={layer.out_features}))"
        if isinstance(layer, nn.modules.conv._ConvNd):
            return f"{name}({type(layer).__name__}(in_channels={layer.in_channels}, out_channels={layer.out_channels}))"
        return f"{name}({type(layer).__name__})"

    def _dropout_weight(self):
        weight = getattr(self.layer, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight
        # No single weight: every parameter of the layer enters the L2 term.
        params = [q.reshape(-1) for q in self.layer.parameters()]
        return torch.cat(params) if params else self.p_logit.new_zeros(())

    def _dropout_bias(self):
        return getattr(self.layer, "bias", None) if isinstance(getattr(self.layer, "weight", None), torch.Tensor) else None

    def regularization(self) -> torch.Tensor:
        weight = self._dropout_weight()
        if weight.dim() < 2 and self.p_logit.dim() == 1:
            raise ValueError("ConcreteDropout: per-feature rates need a layer with a weight [out, in, ...]")
        return _ConcreteDropoutMixin.regularization(self)

    def _layer(self, x):
        return self.layer(x)

    def _fused_mc(self, x, num_samples, rng_state):
        if type(self.layer) is nn.Linear:
            return _fused_linear_mc(self, x, self.layer.weight, self.layer.bias, num_samples, rng_state)
        return None

    def _fuses(self):
        return type(self.layer) is nn.Linear and _fusable_rate(self)

    def _fused_conv_mc(self, x, num_samples, has_samples, rng_state):
        # Hard channel masks with the learnt rate, drawn by the MC-dropout conv op (its stream and
        # integer threshold, as the Linear path uses mc_dropout_linear) instead of masking a
        # repeated input in eager mode.
        layer = self.layer
        if type(layer) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or layer.padding_mode != "zeros":
            return None
        if not _fusable_rate(self):
            return None
        p = _rate_value(self)
        return ops.mc_dropout_conv(
            x, layer.weight, layer.bias, p, num_samples, stride=layer.stride, padding=layer.padding,
            dilation=layer.dilation, groups=layer.groups, mask="channel", input_has_samples=has_samples,
            rng_state=rng_state,
        )

    def _check_input(self, x, sample_dim):
        # getattr: a module pickled whole before these attributes existed has neither
        width = getattr(self, "_in_width", None)
        if width is None:
            return
        if getattr(self, "_conv_dims", None) is None:
            _check_width(self, x, width)
            return
        # A convolution: [B, C, *spatial], with the sample dimension in front inside sampling.
        batched = 2 + self._conv_dims + int(sample_dim)
        channel = 1 + int(sample_dim)
        if x.dim() != batched or x.shape[channel] != width:
            self._conv_input_error(x, sample_dim, batched, channel, width)

    def _conv_input_error(self, x, sample_dim, batched, channel, width):
        label = _module_label(self)
        spatial = ", ".join(["*"] * self._conv_dims)
        layout = f"[S, B, {width}, {spatial}]" if sample_dim else f"[B, {width}, {spatial}]"
        where = "inside sampling, after the first MC layer of the pass" if sample_dim else "a batch"
        if x.dim() != batched:
            raise ValueError(
                f"{label}: expected {where} {layout} ({batched}-d; the mask is spatial, one value per "
                f"channel, so the input must be batched), got shape {tuple(x.shape)}"
            )
        raise ValueError(
            f"{label}: input has {x.shape[channel]} channels in dimension {channel}, expected {width} "
            f"(shape {layout}, got {tuple(x.shape)})"
        )

    def _param_dtype(self, x):
        weight = getattr(self.layer, "weight", None)
        if self._in_width is not None and isinstance(weight, torch.Tensor):
            return weight.dtype
        # A layer of unknown type: only the dropout's own kernel dtypes are checked.
        return x.dtype

    forward = _ConcreteDropoutMixin.forward

    def extra_repr(self) -> str:
        return self._concrete_repr()


class ConcreteDropout2d(ConcreteDropout):
    """Spatial Concrete dropout in front of an ``nn.Conv2d``: one mask value per (sample, input
    channel), D = input channels (the paper's ``SpatialConcreteDropout``). Arguments as
    :class:`ConcreteDropout`; ``conv`` must be an ``nn.Conv2d``."""

    def __init__(self, conv: nn.Conv2d, **kwargs):
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"ConcreteDropout2d: expected an nn.Conv2d, got {type(conv).__name__}")
        super().__init__(conv, **kwargs)

