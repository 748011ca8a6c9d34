"""``nn`` modules built on bdlkern's fused kernels.

MC layers follow one convention for the sample dimension, documented in :mod:`bdlkern._sampling`:
outside ``bdlkern.sampling(S)`` they behave like the PyTorch layers they replace; inside it they
sample and carry an explicit leading sample dimension ``S``.

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
"""

from __future__ import annotations

import abc
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._sampling import current_sampling

# ---- input checks shared by the modules ------------------------------------------------------------
#: Parameter dtypes of the kernels: the Concrete, LRT, KL and sparse kernels take float32/float64;
#: the MC-dropout kernel also bfloat16 (and float16 on CUDA, allowed in :func:`_dtype_error`).
_F32_F64 = frozenset({torch.float32, torch.float64})
_MC_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16})


def _module_label(module: nn.Module) -> str:
    """``Name(in_features=.., out_features=..)``: how error messages name a module."""
    name = type(module).__name__
    if isinstance(module, ConcreteDropout):
        layer = module.layer
        if isinstance(layer, nn.Linear):
            return f"{name}({type(layer).__name__}(in_features={layer.in_features}, out_features={layer.out_features}))"
        if isinstance(layer, nn.modules.conv._ConvNd):
            return f"{name}({type(layer).__name__}(in_channels={layer.in_channels}, out_channels={layer.out_channels}))"
        return f"{name}({type(layer).__name__})"
    return f"{name}(in_features={module.in_features}, out_features={module.out_features})"


def _width_error(module: nn.Module, x: torch.Tensor, expected: int) -> ValueError:
    """The error for an input whose last dimension is not ``expected`` (the layer's in_features)."""
    if x.dim() == 0:
        got = "is a 0-dim tensor (a scalar)"
    else:
        got = f"has {x.shape[-1]} features in its last dimension"
    return ValueError(f"{_module_label(module)}: input {got}, expected {expected}")


def _check_width(module: nn.Module, x: torch.Tensor, expected: int) -> None:
    """``x.shape[-1] == expected`` (the check ``nn.Linear`` makes), in the module's terms."""
    try:
        ok = x.shape[-1] == expected
    except IndexError:  # a 0-dim input
        ok = False
    if not ok:
        raise _width_error(module, x, expected)


def _check_dtype(
    module: nn.Module, x: torch.Tensor, param_dtype: torch.dtype, kernel_dtypes=None, kernel: str = ""
) -> None:
    """``x`` has the parameters' dtype, which the kernel the call runs supports (``kernel_dtypes``;
    None: the call runs no bdlkern kernel). The common case is two compares."""
    if x.dtype != param_dtype or (kernel_dtypes is not None and param_dtype not in kernel_dtypes):
        _dtype_error(module, x, param_dtype, kernel_dtypes, kernel)


def _dtype_error(module, x, param_dtype, kernel_dtypes, kernel) -> None:
    """The slow path of :func:`_check_dtype`: raises, unless autocast or a CUDA-only dtype allows it."""
    if torch.is_autocast_enabled(x.device.type):
        return  # the ops' autocast rules cast the inputs: mixed dtypes are legal here
    name = type(module).__name__
    if x.dtype != param_dtype:
        raise TypeError(
            f"{name}: input is {x.dtype} but the parameters are {param_dtype}; convert one of them "
            f"(module.to({x.dtype}) or x.to({param_dtype}))"
        )
    if kernel_dtypes is _MC_DTYPES and param_dtype == torch.float16 and x.device.type == "cuda":
        return
    supported = ", ".join(str(d) for d in sorted(kernel_dtypes, key=str))
    if kernel_dtypes is _MC_DTYPES:
        supported += ", torch.float16 (CUDA only)"
    raise TypeError(
        f"{name}: parameters of dtype {param_dtype} are not supported by the {kernel} kernel (it takes "
        f"{supported}); keep the parameters in torch.float32 and run the model under "
        f"torch.autocast(\"{x.device.type}\", dtype={param_dtype}) for lower precision"
    )


class _NotScriptable:
    """TorchScript cannot compile bdlkern's modules (their forward reads the Python-side
    ``sampling`` state and calls Python op wrappers): ``torch.jit.script`` calls this hook on a
    module and each of its submodules before it compiles anything, so it fails with a clear
    message instead of an error from deep inside the compiler."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"bdlkern.nn.{type(self).__name__}: TorchScript (torch.jit.script) is not supported; use "
            "torch.compile or torch.export (torch.export.export) to compile or serialise the model"
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
            rng_state, num_samples = state.layer_call(self, x, self.in_features)
            return ops.mc_dropout_linear(
                x, self.weight, self.bias, self.p, num_samples, shared_mask=self.shared_mask, rng_state=rng_state
            )
        if self.training and self.p > 0.0:
            _check_dtype(self, x, self.weight.dtype, _MC_DTYPES, "MC-dropout")
            return ops.mc_dropout_linear(x, self.weight, self.bias, self.p, 1).squeeze(0)  # a view: its backward is free, [0]'s fills zeros
        _check_dtype(self, x, self.weight.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, shared_mask={self.shared_mask}"


# ---- Concrete dropout ------------------------------------------------------------------------------
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

    def _check_input(self, x: torch.Tensor, sample_dim: bool) -> None:
        """The width check of the layer behind the dropout (``sample_dim``: ``x`` carries the
        leading sample dimension of ``sampling``)."""

    def _param_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the input must have: that of the layer's parameters."""
        return self.p_logit.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``layer(dropout(x))``; inside ``sampling(S)`` the output has the leading sample dimension
        (see :mod:`bdlkern._sampling` for when the input has it)."""
        state = current_sampling()
        if state is None:
            self._check_input(x, False)
            if self.training or self.relaxed_eval:
                _check_dtype(self, x, self._param_dtype(x), _F32_F64, "Concrete-dropout")
                return self._layer(self._relaxed(x))
            _check_dtype(self, x, self._param_dtype(x))
            return self._layer(x)
        self._check_input(x, state.next_has_sample_dim(self))
        if self.relaxed_eval:
            _check_dtype(self, x, self._param_dtype(x), _F32_F64, "Concrete-dropout")
        elif self._fuses():
            _check_dtype(self, x, self._param_dtype(x), _MC_DTYPES, "MC-dropout")
        else:
            _check_dtype(self, x, self._param_dtype(x), _F32_F64, "Concrete-dropout")
        rng_state, num_samples = state.layer_call(self, x, self.input_dim)
        has_sample_dim = num_samples is None
        S = state.num_samples
        if not self.relaxed_eval:
            fused = self._fused_mc(x, num_samples, rng_state)
            if fused is not None:
                return fused
        xs = x if has_sample_dim else x.unsqueeze(0).expand(S, *x.shape)
        flat = xs.reshape(S * xs.shape[1], *xs.shape[2:]) if self.channel_dim == 1 else xs
        dropped = self._relaxed(flat, rng_state) if self.relaxed_eval else self._hard(flat, rng_state)
        out = self._layer(dropped)
        return out.reshape(S, xs.shape[1], *out.shape[1:]) if self.channel_dim == 1 else out

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


def _fused_linear_mc(module, x, weight, bias, num_samples, rng_state):
    if not _fusable_rate(module):
        return None
    # p < 1 for the MC kernel even where sigmoid rounds to 1.
    p = min(float(module.p.item()), 1.0 - 2.0**-24)
    return ops.mc_dropout_linear(x, weight, bias, p, num_samples, rng_state=rng_state)


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
        device=None,
        dtype=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_concrete(
            in_features, None, weight_regularizer, dropout_regularizer, init_p, temperature, per_feature,
            relaxed_eval, device, dtype,
        )

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


# ---- sparse variational dropout -----------------------------------------------------------------------
class SparseVDLinear(_NotScriptable, nn.Module):
    """A linear layer trained by sparse variational dropout (Molchanov, Ashukha & Vetrov 2017).

    Every weight is ``N(theta, alpha theta^2)``; training maximises the ELBO, i.e. minimises the
    data loss plus :meth:`kl` (scaled by ``1 / N_train`` when the data loss is a mean), which
    drives most ``alpha`` to infinity: those weights are pure noise and are pruned.

    * training: one LRT sample per input (``bdlkern.ops.lrt_linear``), ``[*, in] -> [*, out]``;
    * eval: the deterministic pruned layer ``x (theta * (log_alpha < threshold))^T + bias``;
    * inside ``bdlkern.sampling(S)``: S stochastic LRT samples with the sample-dimension rule of
      :mod:`bdlkern._sampling`.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (theta initialised like its weight).
        threshold: prune weights with ``log_alpha >= threshold`` (3.0: alpha ~ 20, a dropout rate
            above 0.95). Must be finite.
        log_sigma2_init: initial ``log sigma^2`` of every weight (-10: almost deterministic).

    Parameters: ``theta [out, in]``, ``log_sigma2 [out, in]``, ``bias [out]``.
    """

    _bdlkern_kl = True  # picked up by bdlkern.nn.regularization / kl_divergence

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 3.0,
        log_sigma2_init: float = -10.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if not math.isfinite(float(threshold)):
            raise ValueError(f"SparseVDLinear: threshold must be finite, got {threshold}")
        if not math.isfinite(float(log_sigma2_init)):
            raise ValueError(f"SparseVDLinear: log_sigma2_init must be finite, got {log_sigma2_init}")
        self.in_features = in_features
        self.out_features = out_features
        self.threshold = float(threshold)
        factory = {"device": device, "dtype": dtype}
        self.theta = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.log_sigma2 = nn.Parameter(torch.full((out_features, in_features), float(log_sigma2_init), **factory))
        self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        nn.init.kaiming_uniform_(self.theta, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def log_alpha(self) -> torch.Tensor:
        """``clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)``, ``[out, in]`` (differentiable)."""
        return torch.clamp(self.log_sigma2 - torch.log(self.theta**2 + 1e-8), -8.0, 8.0)

    def mask(self) -> torch.Tensor:
        """Boolean ``[out, in]``: the weights kept after pruning (``log_alpha < threshold``)."""
        return self.log_alpha.detach() < self.threshold

    def pruned_weight(self) -> torch.Tensor:
        """``theta`` with the pruned weights zeroed (what eval uses)."""
        return self.theta * self.mask().to(self.theta.dtype)

    def sparsity(self) -> float:
        """Fraction of weights pruned at the current ``threshold``."""
        return 1.0 - self.mask().double().mean().item()

    def kl(self) -> torch.Tensor:
        """The layer's KL term (``bdlkern.ops.sparse_vd_kl``), a 0-dim tensor."""
        dtype = self.theta.dtype
        if dtype not in _F32_F64 and not torch.is_autocast_enabled(self.theta.device.type):
            raise TypeError(
                f"SparseVDLinear: parameters of dtype {dtype} are not supported by the KL kernel (it takes "
                "torch.float32, torch.float64); keep the parameters in torch.float32 and use torch.autocast "
                "for lower precision"
            )
        return ops.sparse_vd_kl(self.theta, self.log_sigma2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` ``[*, in]`` or ``[S, *, in]`` -> ``[S, *, out]``."""
        _check_width(self, x, self.in_features)
        state = current_sampling()
        if state is not None:
            _check_dtype(self, x, self.theta.dtype, _F32_F64, "LRT")
            rng_state, num_samples = state.layer_call(self, x, self.in_features)
            return ops.lrt_linear(
                x, self.theta, self.log_sigma2, self.bias, num_samples=num_samples, rng_state=rng_state
            )
        if self.training:
            _check_dtype(self, x, self.theta.dtype, _F32_F64, "LRT")
            return ops.lrt_linear(x, self.theta, self.log_sigma2, self.bias, num_samples=1).squeeze(0)
        _check_dtype(self, x, self.theta.dtype)
        return F.linear(x, self.pruned_weight(), self.bias)

    def to_sparse(self) -> "SparseLinear":
        """The pruned layer as a :class:`SparseLinear`: CSR of the weights with
        ``log_alpha < threshold``, values theta and alpha theta^2 interleaved on that pattern (so it
        can still draw stochastic LRT samples), and a copy of the bias."""
        with torch.no_grad():
            keep = self.mask()
            variance = torch.exp(self.log_alpha) * self.theta**2
            return SparseLinear.from_dense(self.theta, self.bias, variance=variance, mask=keep)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"threshold={self.threshold}"
        )


class SparseLinear(_NotScriptable, nn.Module):
    """A linear layer with a CSR weight, for pruned networks (``SparseVDLinear.to_sparse()``).

    * deterministic: ``y = x W^T + bias`` through ``bdlkern.ops.sparse_linear``; above the
      measured :meth:`crossover_density` of the batch size it uses the dense GEMM instead, so it
      does not lose to ``nn.Linear``;
    * inside ``bdlkern.sampling(S)``, when the layer holds weight variances (``values [nnz, 2]``, as
      ``to_sparse`` keeps them): S stochastic LRT samples from one pass over the sparse structure.

    Buffers (all in the state dict; ``load_state_dict`` takes any nnz): ``crow`` int64 ``[N + 1]``,
    ``col`` int64 ``[nnz]``, ``values`` ``[nnz]`` or ``[nnz, 2]`` (theta, alpha theta^2), ``bias``
    ``[N]`` (optional) and ``row_order`` (rows longest first, for the CUDA kernel's warps).
    ``values`` is float32 or float64 (the sparse kernels' dtypes, on both paths, so that what runs
    does not depend on the batch size); the input must have its dtype and ``in_features`` features
    in its last dimension.
    """

    #: (largest batch, density) rows: above that density the dense GEMM is faster at that batch
    #: size. Measured on the 2-core AVX2 benchmark VM with W [1024, 1024], float32, 2 threads
    #: (a sweep of densities 0.02-0.4 at 1-256 rows against ``F.linear``): a single row's GEMV is
    #: overhead-bound on both paths and the CSR kernel wins below ~6%; from 4 to 64 rows it wins up
    #: to 33-40%, at 256 rows up to ~30%. The table keeps a margin below those.
    crossover_table: tuple[tuple[float, float], ...] = ((1, 0.04), (64, 0.28), (256, 0.25), (math.inf, 0.2))

    def crossover_density(self, batch: int) -> float:
        """The density above which a batch of ``batch`` rows takes the dense GEMM."""
        for max_batch, density in self.crossover_table:
            if batch <= max_batch:
                return density
        return self.crossover_table[-1][1]

    def __init__(self, in_features: int, out_features: int, crow, col, values, bias=None):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if not (isinstance(crow, torch.Tensor) and crow.dim() == 1 and crow.numel() == out_features + 1):
            raise ValueError(f"SparseLinear: crow must be a 1-d tensor of out_features + 1 = {out_features + 1} entries")
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)
        self.register_buffer("row_order", self._row_order(crow))
        self.register_buffer("_dense", None, persistent=False)  # the dense weight, made on demand
        if values.dtype not in _F32_F64:
            raise TypeError(
                f"SparseLinear: values of dtype {values.dtype} are not supported by the sparse kernels (they "
                "take torch.float32, torch.float64); build the layer in torch.float32 and use torch.autocast "
                "for lower precision around it"
            )
        # A malformed structure fails here, at construction (the op checks it on every call too).
        probe = torch.zeros(1, self.in_features, dtype=values.dtype, device=values.device)
        torch.ops.bdlkern.sparse_linear(probe, crow, col, values, bias, None)

    @staticmethod
    def _row_order(crow: torch.Tensor) -> torch.Tensor:
        return torch.argsort(crow[1:] - crow[:-1], descending=True, stable=True)

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        variance: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> "SparseLinear":
        """The CSR layer of a pruned dense ``weight [N, K]``: the entries where ``mask`` (default
        ``weight != 0``) is true, with ``variance [N, K]`` (alpha theta^2) interleaved if given."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError("SparseLinear.from_dense: weight must be a 2-d tensor [out_features, in_features]")
        weight = weight.detach()
        keep = (weight != 0) if mask is None else mask.to(torch.bool)
        if keep.shape != weight.shape:
            raise ValueError(f"SparseLinear.from_dense: mask must have the weight's shape {tuple(weight.shape)}")
        rows, cols = keep.nonzero(as_tuple=True)  # row-major: rows ascending, cols ascending within
        counts = torch.bincount(rows, minlength=weight.shape[0])
        crow = torch.cat([torch.zeros(1, dtype=torch.long, device=weight.device), counts.cumsum(0)])
        values = weight[rows, cols]
        if variance is not None:
            if variance.shape != weight.shape:
                raise ValueError("SparseLinear.from_dense: variance must have the weight's shape")
            values = torch.stack([values, variance.detach()[rows, cols].to(values.dtype)], dim=1)
        return cls(
            weight.shape[1], weight.shape[0], crow, cols.contiguous(), values.contiguous(),
            None if bias is None else bias.detach().clone(),
        )

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @property
    def density(self) -> float:
        """Fraction of the weights kept."""
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    @property
    def has_variance(self) -> bool:
        return self.values.dim() == 2

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]``."""
        return self._dense_matrices()[0]

    def _dense_matrices(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, V or None): the dense ``[out, in]`` weight and, with variances, the weight variance.

        Made from the CSR buffers in ops of static sizes, out of place, so that the same code serves
        eager calls and ``torch.export`` (and so ``bdlkern.onnx``), where the dense path must be
        built in the graph."""
        starts = self.crow[1:-1]
        # The row of each stored weight: a 1 where each row but the first starts, summed.
        marks = torch.zeros(self.nnz + 1, dtype=torch.long, device=self.col.device)
        rows = marks.scatter_add(0, starts, torch.ones_like(starts)).cumsum(0)[:-1]
        values = self.values if self.values.dim() == 2 else self.values.unsqueeze(1)
        planes = values.new_zeros(values.shape[1], self.out_features, self.in_features)
        planes = planes.index_put((torch.arange(values.shape[1], device=values.device)[:, None], rows, self.col), values.t())
        return planes[0], (planes[1] if self.values.dim() == 2 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` with variances ``[*, in]`` or
        ``[S, *, in]`` -> ``[S, *, out]``."""
        _check_width(self, x, self.in_features)
        _check_dtype(self, x, self.values.dtype, _F32_F64, "sparse")
        state = current_sampling()
        if state is not None and self.has_variance:
            rng_state, num_samples = state.layer_call(self, x, self.in_features)
            return ops.sparse_linear(
                x, self.crow, self.col, self.values, self.bias, num_samples=num_samples, stochastic=True,
                rng_state=rng_state, row_order=self.row_order,
            )
        rows = x.numel() // max(self.in_features, 1)
        if self.density > self.crossover_density(rows):
            if torch.compiler.is_exporting():  # the cache cannot be filled with a traced tensor
                return F.linear(x, self.to_dense(), self.bias)
            if self._dense is None or self._dense.dtype != self.values.dtype:
                self._dense = self.to_dense()
            return F.linear(x, self._dense, self.bias)
        return ops.sparse_linear(x, self.crow, self.col, self.values, self.bias, row_order=self.row_order)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The number of stored weights differs from layer to layer: take the incoming shapes.
        for name in ("crow", "col", "values", "row_order", "bias"):
            key = prefix + name
            if key in state_dict and state_dict[key] is not None:
                current = getattr(self, name)
                if current is None or current.shape != state_dict[key].shape:
                    setattr(self, name, torch.empty_like(state_dict[key], device=self.col.device))
        self._dense = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"density={self.density:.4f}, variance={self.has_variance}, bias={self.bias is not None}"
        )


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """The sum of the KL terms of every :class:`SparseVDLinear` in ``model`` (0-dim)."""
    terms = [m.kl() for m in model.modules() if isinstance(m, SparseVDLinear)]
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(terms).sum()


def regularization(model: nn.Module) -> torch.Tensor:
    """The sum of every bdlkern regulariser and KL term in ``model`` (add it to the loss).

    Returns:
        0-dim tensor (0 when the model has no such module).
    """
    total = None
    for module in model.modules():
        term = None
        if isinstance(module, _ConcreteDropoutMixin):
            term = module.regularization()
        elif callable(getattr(module, "kl", None)) and getattr(module, "_bdlkern_kl", False):
            term = module.kl()
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


def convert(model: nn.Module, shared_mask: bool = False) -> nn.Module:
    """Fuse every ``nn.Dropout -> nn.Linear`` pair of the ``nn.Sequential`` containers of ``model``
    (nested ones included) into one :class:`MCDropoutLinear`, in place.

    The fused layer takes the Linear's name in its container, so ``state_dict`` keys of the
    weights are unchanged (the Dropout had none). Pairs split across containers are left alone.

    Returns:
        ``model`` itself (a bare ``nn.Sequential`` is modified and returned too).
    """
    for child in model.children():
        convert(child, shared_mask=shared_mask)
    if isinstance(model, nn.Sequential):
        names = list(model._modules.keys())
        fused: list[tuple[str, nn.Module]] = []
        i = 0
        while i < len(names):
            module = model._modules[names[i]]
            nxt = model._modules[names[i + 1]] if i + 1 < len(names) else None
            if type(module) is nn.Dropout and type(nxt) is nn.Linear:
                fused.append((names[i + 1], MCDropoutLinear.from_linear(nxt, module.p, shared_mask)))
                i += 2
            else:
                fused.append((names[i], module))
                i += 1
        if len(fused) != len(names):
            model._modules.clear()
            for name, module in fused:
                model._modules[name] = module
    return model


__all__ = [
    "MCDropoutLinear",
    "ConcreteDropout",
    "ConcreteDropout2d",
    "ConcreteDropoutLinear",
    "SparseLinear",
    "SparseVDLinear",
    "convert",
    "kl_divergence",
    "regularization",
]
