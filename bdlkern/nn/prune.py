"""``bdlkern.nn.prune``: turn a trained sparse-VD model into its pruned CSR layers and compact the
structure where that is provably exact.

:func:`prune` replaces every :class:`SparseVDLinear` / :class:`SparseVDConv1d` / ``2d`` / ``3d`` of
a model, in place, by its ``to_sparse()`` layer (CSR weights that keep the weight variances, so the
pruned model can still draw LRT samples inside ``bdlkern.sampling``). With ``compact=True`` it then
removes whole units along the chains ``L1, m_1, ..., m_k, L2`` of an ``nn.Sequential`` (``L1``, ``L2``
converted sparse layers, the ``m_i`` parameter-free elementwise activations, eval-mode dropout,
pooling without padding, and one ``nn.Flatten`` between a convolution and a linear layer):

1. a **dead** output unit of ``L1`` (no kept weight in its row / channel, so its pre-activation is
   the constant ``b_j``) becomes the constant ``c_j = m_k(... m_1(b_j))`` after the chain (pooling
   keeps a constant plane constant, ``Flatten`` spreads it over the channel's features); it is
   removed from ``L1`` and folded into ``L2``'s bias: ``b2[o] += c_j * sum(W2[o, features of j])``
   (for a convolution ``L2`` only with padding 0, where a constant plane stays constant);
2. an **unused** output unit of ``L1`` (no kept weight of ``L2`` reads it) is removed from ``L1`` and
   ``L2`` with nothing to fold;
3. inputs that no kept weight of the **first** layer of a chain reads are dropped by a
   :class:`FeatureGather` in front of it.

The rules are applied until nothing changes (removing a unit can empty another).

Sampling. Inside ``bdlkern.sampling`` a sparse layer with variances draws its LRT noise from the
Philox stream ``"sparse_lrt"`` at the logical index of each output element: element ``(s, r, o)`` of
the linear output ``[S, R, N]`` (``R`` the batch rows), element ``(b, c, *p)`` of the convolution's
folded output ``[S * B, C, *spatial]``. A layer that lost output units would shift those indices, so
it becomes a :class:`CompactSparseLinear` / :class:`CompactSparseConv2d` (and 1-d / 3-d): it keeps
the original width and the original positions of its units (``out_index``) and draws the noise of
those positions, ``ops.normal([..., full width])[..., out_index]``. A folded dead unit contributed a
constant input ``c_j`` to ``L2``'s LRT variance ``x^2 V^T`` too; the fold keeps it as a constant
variance term ``var_bias[o] += c_j^2 * sum(V2[o, features of j])``, so that ``L2``'s noise keeps its
scale. (A unit without kept weights whose ``var_bias`` is not zero still carries noise and is never
treated as dead.)

Exactness. In deterministic evaluation the compacted model computes the same function as the
uncompacted pruned one; the results differ only by rounding (the folded sums are added in another
order). Inside ``sampling`` with the same seed the samples agree except for one term: a dead unit
of the uncompacted model outputs ``b_j + sqrt(0 + 1e-8) * eps`` (noise of std ``1e-4``) where the
compacted one uses its mean, so the samples differ by about ``1e-4 * sum_j |W2[o, j] * m'(b_j)|``
over the folded units ``j`` (plus that change carried through the later layers); without dead units
they agree to rounding.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import ops
from .._sampling import current_sampling
from ._base import _check_dtype, _check_width, _F32_F64, _image_out_numel
from .sparse_vd import (
    SparseConv1d,
    SparseConv2d,
    SparseConv3d,
    SparseLinear,
    SparseVDLinear,
    _SparseConvNd,
    _SparseVDConvNd,
)

__all__ = [
    "prune",
    "PruneReport",
    "PrunedLayer",
    "FeatureGather",
    "CompactSparseLinear",
    "CompactSparseConv1d",
    "CompactSparseConv2d",
    "CompactSparseConv3d",
]

_LRT_EPS = 1e-8  # the variance floor of the LRT kernels: std = sqrt(var + 1e-8)


# ---- the modules compaction makes ----------------------------------------------------------------
class FeatureGather(nn.Module):
    """Keeps the inputs ``index`` of dimension ``dim``: ``x.index_select(dim, index)``.

    :func:`prune` puts one in front of the first layer of a chain whose pruned weights leave some
    inputs unread (``dim=-1``: the features of a linear layer; ``dim=-(d + 1)``: the channels of a
    ``d``-dimensional convolution, which is dimension 1 of ``[N, C, *spatial]`` and 2 of a stacked
    ``[S, N, C, *spatial]`` inside ``bdlkern.sampling``).

    Args:
        index: int64 ``[K_kept]``, the kept positions (stored as a buffer).
        dim: the dimension gathered, negative (counted from the end).
        in_features: the width of that dimension in the input.
    """

    def __init__(self, index: torch.Tensor, dim: int, in_features: int):
        super().__init__()
        if not isinstance(index, torch.Tensor) or index.dim() != 1 or index.dtype != torch.long:
            raise TypeError("FeatureGather: index must be a 1-d int64 tensor")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim >= 0:
            raise ValueError(f"FeatureGather: dim must be a negative int (counted from the end), got {dim!r}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= in_features):
            raise ValueError(f"FeatureGather: index entries must lie in [0, in_features = {in_features})")
        self.dim = dim
        self.in_features = int(in_features)
        self.register_buffer("index", index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features, *rest] -> [..., K_kept, *rest]`` along ``dim``."""
        if x.dim() < -self.dim or x.shape[self.dim] != self.in_features:
            raise ValueError(
                f"FeatureGather: expected an input with {self.in_features} entries in dimension {self.dim}, got shape "
                f"{tuple(x.shape)}"
            )
        return x.index_select(self.dim, self.index)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        key = prefix + "index"
        if key in state_dict and state_dict[key].shape != self.index.shape:
            self.index = torch.empty_like(state_dict[key], device=self.index.device)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, in_features={self.in_features}, kept={self.index.numel()}"


def _compact_buffers(module: nn.Module, out: int, out_index, full_out, var_bias, values) -> None:
    """Registers ``out_index`` (int64 ``[out]``, default ``arange(out)``), ``var_bias`` (``[out]`` or
    None) and ``full_out`` on a compact layer, checked."""
    name = type(module).__name__
    device = values.device
    if out_index is None:
        out_index = torch.arange(out, device=device)
    if not isinstance(out_index, torch.Tensor) or out_index.dtype != torch.long or out_index.shape != (out,):
        raise ValueError(f"{name}: out_index must be an int64 tensor [{out}] (one original position per output unit)")
    full_out = out if full_out is None else int(full_out)
    if full_out < out or (out and (int(out_index.min()) < 0 or int(out_index.max()) >= full_out)):
        raise ValueError(f"{name}: full_out ({full_out}) must be >= the output width and bound out_index")
    if var_bias is not None:
        if not isinstance(var_bias, torch.Tensor) or var_bias.shape != (out,):
            raise ValueError(f"{name}: var_bias must be a tensor [{out}] or None")
        if bool((var_bias < 0).any()):
            raise ValueError(f"{name}: var_bias must be >= 0 (it is a variance)")
        var_bias = var_bias.to(values.dtype)
    module.full_out = full_out
    module.register_buffer("out_index", out_index.to(device))
    module.register_buffer("var_bias", var_bias)


def _load_compact_buffers(module, state_dict, prefix) -> None:
    for name in ("out_index", "var_bias"):
        key = prefix + name
        if key in state_dict and state_dict[key] is not None:
            current = getattr(module, name)
            if current is None or current.shape != state_dict[key].shape:
                setattr(module, name, torch.empty_like(state_dict[key], device=module.col.device))


class CompactSparseLinear(SparseLinear):
    """A :class:`SparseLinear` whose output units are a subset of a wider pruned layer's, as
    :func:`prune` leaves it after removing dead or unused units.

    Deterministic calls are :class:`SparseLinear`'s. Inside ``bdlkern.sampling(S)`` (with variances)
    the layer draws the LRT noise the original, ``full_out``-wide layer would have drawn for its
    units: ``mu = x W^T + bias`` and ``v = x^2 V^T + var_bias`` from the deterministic CSR kernel,
    ``eps = ops.normal([S, R, full_out], stream="sparse_lrt")[..., out_index]``,
    ``y = mu + sqrt(v + 1e-8) * eps``, with the sample-dimension rule of :mod:`bdlkern._sampling`.

    Buffers: those of :class:`SparseLinear`, ``out_index`` int64 ``[out_features]`` (the original
    position of each unit) and ``var_bias`` ``[out_features]`` or None (a constant LRT variance: the
    contribution of constant inputs folded into the bias). Attribute ``full_out``: the original width.
    """

    def __init__(self, in_features: int, out_features: int, crow, col, values, bias=None, *, out_index=None,
                 full_out: int | None = None, var_bias=None):
        super().__init__(in_features, out_features, crow, col, values, bias)
        _compact_buffers(self, self.out_features, out_index, full_out, var_bias, values)

    @classmethod
    def from_dense(cls, weight, bias=None, variance=None, mask=None, *, out_index=None, full_out=None,
                   var_bias=None) -> "CompactSparseLinear":
        """As :meth:`SparseLinear.from_dense`, plus the compact layer's ``out_index``, ``full_out``
        and ``var_bias``."""
        layer = SparseLinear.from_dense(weight, bias, variance, mask)
        return cls(layer.in_features, layer.out_features, layer.crow, layer.col, layer.values, layer.bias,
                   out_index=out_index, full_out=full_out, var_bias=var_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` with variances ``[*, in]`` or ``[S, *, in]``
        -> ``[S, *, out]`` (class docstring)."""
        state = current_sampling()
        if state is None or not self.has_variance:
            return super().forward(x)
        _check_width(self, x, self.in_features)
        _check_dtype(self, x, self.values.dtype, _F32_F64, "sparse")
        self._ensure_valid()
        rng_state, num_samples, x_op, folded = state.layer_call(self, x, self.in_features, per_row=self.full_out)
        # A folded input is used as it comes, [S * N, ..., in] (not the [S, N, ...] view): its rows
        # are the kernel's rows in the same order, and no tensor here has N as its leading size.
        src = x if folded else x_op
        mean = ops.sparse_linear(src, self.crow, self.col, self.values, self.bias, row_order=self.row_order,
                                 validate=False)
        var = ops.sparse_linear(src * src, self.crow, self.col, self.values[:, 1].contiguous(), None,
                                row_order=self.row_order, validate=False)
        if self.var_bias is not None:
            var = var + self.var_bias
        std = torch.sqrt(var + _LRT_EPS)
        lead = src.shape[:-1]
        samples = () if num_samples is None else (num_samples,)
        rows = math.prod(lead) * (num_samples or 1)
        eps = ops.normal((rows, self.full_out), dtype=self.values.dtype, rng_state=rng_state, stream="sparse_lrt")
        eps = eps.index_select(1, self.out_index).reshape(*samples, *lead, self.out_features)
        y = mean + std * eps
        return state.output(y, "folded" if folded else "stacked")

    def _load_from_state_dict(self, state_dict, prefix, *args):
        _load_compact_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_out={self.full_out}"


class _CompactSparseConvNd(_SparseConvNd):
    """A sparse convolution whose output channels are a subset of a wider pruned layer's, as
    :func:`prune` leaves it (the conv counterpart of :class:`CompactSparseLinear`).

    Deterministic calls are the sparse convolution's. Inside ``bdlkern.sampling(S)`` (with
    variances): ``mu = conv(x, W) + bias`` and ``v = conv(x^2, V) + var_bias`` from the deterministic
    CSR kernel, ``eps = ops.normal([S * N, full_out, *spatial], stream="sparse_lrt")[:, out_index]``
    (the original layer's noise, samples folded into the batch sample-major), ``y = mu + sqrt(v +
    1e-8) * eps``, with the layouts of :mod:`bdlkern._sampling`.

    Buffers: those of the sparse convolution, ``out_index`` int64 ``[C_out]`` and ``var_bias``
    ``[C_out]`` or None. Attribute ``full_out``: the original number of output channels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, crow, col, values, bias=None, *, stride=1,
                 padding=0, dilation=1, groups: int = 1, out_index=None, full_out: int | None = None, var_bias=None):
        super().__init__(in_channels, out_channels, kernel_size, crow, col, values, bias, stride=stride,
                         padding=padding, dilation=dilation, groups=groups)
        _compact_buffers(self, self.out_channels, out_index, full_out, var_bias, values)

    @classmethod
    def from_dense(cls, weight, bias=None, variance=None, mask=None, *, stride=1, padding=0, dilation=1,
                   groups: int = 1, out_index=None, full_out=None, var_bias=None):
        """As ``SparseConv2d.from_dense``, plus the compact layer's ``out_index``, ``full_out`` and
        ``var_bias``."""
        plain = _PLAIN_CONV[cls._dims].from_dense(weight, bias, variance, mask, stride=stride, padding=padding,
                                                  dilation=dilation, groups=groups)
        return cls(plain.in_channels, plain.out_channels, plain.kernel_size, plain.crow, plain.col, plain.values,
                   plain.bias, stride=plain.stride, padding=plain.padding, dilation=plain.dilation, groups=plain.groups,
                   out_index=out_index, full_out=full_out, var_bias=var_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, *] -> [N, C_out, *]``; inside ``sampling(S)`` with variances see the class docstring."""
        state = current_sampling()
        if state is None or not self.has_variance:
            return super().forward(x)
        _check_dtype(self, x, self.values.dtype, _F32_F64, "sparse")
        self._ensure_valid()
        per_image = _image_out_numel(self, x, self._dims, self.kernel_size, self.full_out)
        rng_state, has_samples, x_op, stacked = state.conv_call(self, x, per_image=per_image)
        self._check_channels(x_op, "an input (samples folded into the batch)" if has_samples else "a batched input")
        S = state.num_samples
        mean = self._sparse(x_op)
        var_values = self.values[:, 1].contiguous()
        var = ops.sparse_conv(
            x_op * x_op, self.crow, self.col, var_values, None, kernel_size=self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, validate=False,
        )
        if self.var_bias is not None:
            var = var + self.var_bias.view(-1, *([1] * self._dims))
        std = torch.sqrt(var + _LRT_EPS)
        rows = mean.shape[0] * (1 if has_samples else S)
        eps = ops.normal((rows, self.full_out, *mean.shape[2:]), dtype=self.values.dtype, rng_state=rng_state,
                         stream="sparse_lrt").index_select(1, self.out_index)
        if has_samples:
            y = mean + std * eps
        else:  # x is shared by the samples: [N, ...] against the noise [S, N, ...], sample-major
            y = (mean.unsqueeze(0) + std.unsqueeze(0) * eps.unflatten(0, (S, mean.shape[0]))).flatten(0, 1)
        return state.output(y.unflatten(0, (S, -1)) if stacked else y, "stacked" if stacked else "folded")

    def _load_from_state_dict(self, state_dict, prefix, *args):
        _load_compact_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, full_out={self.full_out}"


class CompactSparseConv1d(_CompactSparseConvNd, SparseConv1d):
    """A compacted :class:`SparseConv1d` (input ``[N, C, L]``); see ``_CompactSparseConvNd``."""


class CompactSparseConv2d(_CompactSparseConvNd, SparseConv2d):
    """A compacted :class:`SparseConv2d` (input ``[N, C, H, W]``); see ``_CompactSparseConvNd``."""


class CompactSparseConv3d(_CompactSparseConvNd, SparseConv3d):
    """A compacted :class:`SparseConv3d` (input ``[N, C, D, H, W]``); see ``_CompactSparseConvNd``."""


_COMPACT_CONV = {1: CompactSparseConv1d, 2: CompactSparseConv2d, 3: CompactSparseConv3d}
_PLAIN_CONV = {1: SparseConv1d, 2: SparseConv2d, 3: SparseConv3d}


# ---- the report ------------------------------------------------------------------------------------
@dataclass
class PrunedLayer:
    """One converted layer. Shapes are ``(out, in)``: features of a linear layer, channels of a
    convolution. ``kept``: the weights the threshold kept; ``stored``: the weights the final layer
    stores (fewer when compaction removed units that still had kept weights); ``total``: the
    original layer's weights; ``density = kept / total``."""

    path: str
    type_before: str
    type_after: str
    shape_before: tuple[int, int]
    shape_after: tuple[int, int]
    kept: int
    stored: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 0.0


@dataclass
class PruneReport:
    """What :func:`prune` did: ``model`` (the pruned model, the same object as the argument unless
    the model itself was a sparse-VD layer), ``layers`` (one :class:`PrunedLayer` per converted
    layer, in module order) and ``notes`` (what was folded or gathered, what could not be compacted
    and why). ``str(report)`` is a table with the totals."""

    model: nn.Module
    layers: list[PrunedLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_weights(self) -> int:
        return sum(layer.total for layer in self.layers)

    @property
    def kept_weights(self) -> int:
        return sum(layer.kept for layer in self.layers)

    @property
    def stored_weights(self) -> int:
        return sum(layer.stored for layer in self.layers)

    @property
    def compression_ratio(self) -> float:
        """``total_weights / stored_weights`` (inf when nothing is stored)."""
        return self.total_weights / self.stored_weights if self.stored_weights else math.inf

    def __str__(self) -> str:
        header = ("layer", "type", "shape (out, in)", "kept / total", "density", "stored")
        rows = [
            (
                layer.path or "(model)",
                f"{layer.type_before} -> {layer.type_after}",
                f"{layer.shape_before} -> {layer.shape_after}",
                f"{layer.kept} / {layer.total}",
                f"{layer.density:.4f}",
                str(layer.stored),
            )
            for layer in self.layers
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
        total = self.total_weights
        density = self.kept_weights / total if total else 0.0
        lines.append(
            f"total: {self.kept_weights} / {total} weights kept (density {density:.4f}), {self.stored_weights} stored "
            f"after compaction, compression {self.compression_ratio:.1f}x"
        )
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  - {note}" for note in self.notes)
        return "\n".join(lines)


# ---- compaction --------------------------------------------------------------------------------------
_ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.ELU, nn.SiLU, nn.Softplus, nn.Hardtanh,
    nn.Identity,
)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_ADAPTIVE_POOL = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


class _Work:
    """A converted layer under compaction: its dense pruned weight ``W``, variance ``V`` and mask
    ``M`` (``[out, in, *kernel]``; zero off the mask), bias, constant variance ``var_bias`` and the
    original positions of its outputs and inputs."""

    def __init__(self, path: str, vd: nn.Module, sparse: nn.Module, threshold: float):
        self.path, self.vd, self.sparse = path, vd, sparse
        self.conv = isinstance(vd, _SparseVDConvNd)
        self.dims = vd._dims if self.conv else 0
        with torch.no_grad():
            keep = vd.log_alpha.detach() < threshold  # the mask to_sparse used
            theta = vd.theta.detach()
            variance = torch.exp(vd.log_alpha.detach()) * theta**2
            self.M = keep
            self.W = theta * keep
            self.V = variance * keep
            self.b = None if vd.bias is None else vd.bias.detach().clone()
        self.var_bias: torch.Tensor | None = None
        out, inp = self.W.shape[0], self.W.shape[1] * (vd.groups if self.conv else 1)
        self.full_out, self.full_in = out, inp
        self.out_index = torch.arange(out, device=self.W.device)
        self.in_index = torch.arange(inp, device=self.W.device)
        self.changed = False
        self.gathered = False

    @property
    def out(self) -> int:
        return self.W.shape[0]

    @property
    def groups(self) -> int:
        return self.vd.groups if self.conv else 1

    def padding_is_zero(self) -> bool:
        return self.conv and all(p == 0 for p in self.vd.padding)

    def unit_dead(self) -> torch.Tensor:
        """Bool ``[out]``: no kept weight and no constant variance (a constant output)."""
        dead = ~self.M.reshape(self.out, -1).any(1)
        if self.var_bias is not None:
            dead &= self.var_bias == 0
        return dead

    def grouped(self, units: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """W, V, M viewed ``[out, units, features per unit]`` (the inputs by unit of the previous layer)."""
        return tuple(t.reshape(self.out, units, -1) for t in (self.W, self.V, self.M))

    def keep_rows(self, keep: torch.Tensor) -> None:
        self.W, self.V, self.M = self.W[keep], self.V[keep], self.M[keep]
        if self.b is not None:
            self.b = self.b[keep]
        if self.var_bias is not None:
            self.var_bias = self.var_bias[keep]
        self.out_index = self.out_index[keep]
        self.changed = True

    def keep_inputs(self, keep: torch.Tensor, units: int) -> None:
        """Keeps the input units ``keep`` (bool ``[units]``) of the grouped view."""
        shape = self.W.shape
        W, V, M = (t[:, keep] for t in self.grouped(units))
        kept = int(keep.sum())
        new_shape = (shape[0], kept, *shape[2:]) if self.conv else (shape[0], W.shape[1] * W.shape[2])
        self.W, self.V, self.M = W.reshape(new_shape), V.reshape(new_shape), M.reshape(new_shape)
        self.changed = True

    def build(self) -> nn.Module:
        """The final sparse layer: the converted one when nothing changed, else a rebuilt one (a
        compact one when it lost output units or holds a constant variance)."""
        if not self.changed:
            return self.sparse
        has_var = self.var_bias is not None and bool((self.var_bias != 0).any())
        compact = has_var or self.out != self.full_out
        extra = {"out_index": self.out_index, "full_out": self.full_out, "var_bias": self.var_bias if has_var else None}
        if self.conv:
            geometry = {"stride": self.vd.stride, "padding": self.vd.padding, "dilation": self.vd.dilation,
                        "groups": self.vd.groups}
            if compact:
                return _COMPACT_CONV[self.dims].from_dense(self.W, self.b, self.V, self.M, **geometry, **extra)
            return _PLAIN_CONV[self.dims].from_dense(self.W, self.b, self.V, self.M, **geometry)
        if compact:
            return CompactSparseLinear.from_dense(self.W, self.b, variance=self.V, mask=self.M, **extra)
        return SparseLinear.from_dense(self.W, self.b, variance=self.V, mask=self.M)


@dataclass
class _Link:
    """``L1, between..., L2`` in one Sequential. L2 reads each output unit of L1 through a block of
    its input features (1 for linear -> linear, ``prod(kernel)`` taps of one input channel for
    conv -> conv, the ``H' * W'`` features of one channel for conv -> Flatten -> linear): ``L2.W``
    viewed ``[out, L1.out, block]`` (:meth:`_Work.grouped`)."""

    l1: _Work
    l2: _Work
    between: list[nn.Module]
    where: str
    fold_blocked: str | None = None  # why dead units of L1 cannot be folded into L2
    blocked_count: int = 0


def _chain_step(module: nn.Module, l1: _Work, flattened: bool) -> tuple[str, str | None]:
    """Classifies a module between two sparse layers: ("ok" | "flatten" | "stop", reason)."""
    kind = type(module)
    if kind in _ELEMENTWISE:
        return "ok", None
    if kind in _DROPOUT:
        if module.training:
            return "stop", f"{kind.__name__} is in training mode (it would not keep a constant unit constant)"
        return "ok", None
    if kind in _POOL or kind in _ADAPTIVE_POOL:
        if not l1.conv or flattened:
            return "stop", f"{kind.__name__} does not follow a convolution"
        if getattr(module, "return_indices", False):
            return "stop", f"{kind.__name__} returns indices"
        padding = module.padding if kind in _POOL else 0
        if any(p != 0 for p in ((padding,) if isinstance(padding, int) else padding)):
            return "stop", f"{kind.__name__} has padding {padding}"
        if getattr(module, "divisor_override", None) is not None:
            return "stop", f"{kind.__name__} has a divisor_override"
        return "ok", None
    if kind is nn.Flatten:
        if not l1.conv or flattened:
            return "stop", "nn.Flatten does not follow a convolution"
        if module.start_dim != 1 or module.end_dim != -1:
            return "stop", f"nn.Flatten(start_dim={module.start_dim}, end_dim={module.end_dim}) is not Flatten(1, -1)"
        return "flatten", None
    return "stop", f"{kind.__name__} is not a parameter-free elementwise module, pooling or Flatten"


def _links_of(seq_path: str, seq: nn.Sequential, works: dict[int, _Work], notes: list[str]) -> list[_Link]:
    """The compactable links of one Sequential (entries are the converted layers already)."""
    entries = list(seq._modules.items())
    links = []
    for i, (_, first) in enumerate(entries):
        l1 = works.get(id(first))
        if l1 is None:
            continue
        flattened, between, eval_dropout = False, [], False
        for name, module in entries[i + 1 :]:
            l2 = works.get(id(module))
            if l2 is None and isinstance(module, (SparseLinear, _SparseConvNd)):
                break  # a sparse layer this call did not convert (or could not compact): the chain ends
            if l2 is not None:
                where = f"{l1.path} -> {l2.path}"
                reason = None
                if l1.conv and l1.groups != 1:
                    reason = f"{l1.path} has groups={l1.groups}"
                elif l2.conv and l2.groups != 1:
                    reason = f"{l2.path} has groups={l2.groups}"
                elif not l1.conv and (l2.conv or flattened):
                    reason = "a linear layer does not feed a convolution directly"
                elif l1.conv and l2.conv and (flattened or l1.dims != l2.dims):
                    reason = "the convolutions do not match"
                elif l1.conv and not l2.conv and not flattened:
                    reason = "a convolution feeds a linear layer without nn.Flatten(1, -1)"
                elif l1.conv and not l2.conv and l2.full_in % l1.full_out:
                    reason = f"{l2.path}'s {l2.full_in} inputs are not a multiple of {l1.path}'s {l1.full_out} channels"
                if reason is not None:
                    notes.append(f"no compaction between {where}: {reason}")
                    break
                link = _Link(l1, l2, between, where)
                if l2.conv and not l2.padding_is_zero():
                    link.fold_blocked = (
                        f"{l2.path} has padding {l2.vd.padding}, so a constant plane is not constant at its borders"
                    )
                if eval_dropout:
                    notes.append(f"{where}: compacted across dropout in eval mode (exact in eval mode only)")
                links.append(link)
                break
            status, reason = _chain_step(module, l1, flattened)
            if status == "stop":
                notes.append(f"chain from {l1.path} ends at {f'{seq_path}.{name}' if seq_path else name}: {reason}")
                break
            flattened |= status == "flatten"
            eval_dropout |= type(module) in _DROPOUT
            between.append(module)
    return links


def _positions(index: torch.Tensor, limit: int = 12) -> str:
    """The original positions ``index`` for a note, at most ``limit`` of them."""
    values = index.tolist()
    shown = ", ".join(str(v) for v in values[:limit])
    return f"[{shown}{', ...' if len(values) > limit else ''}]"


def _apply_link(link: _Link, notes: list[str]) -> bool:
    """One application of rules 1 and 2 to a link; True when something was removed."""
    l1, l2 = link.l1, link.l2
    units = l1.out
    if units == 0 or l2.out == 0:
        return False
    W2, V2, M2 = l2.grouped(units)
    unused = ~M2.any(2).any(0)
    dead = l1.unit_dead() & ~unused
    if link.fold_blocked is not None:
        if bool(dead.any()):
            link.blocked_count = max(link.blocked_count, int(dead.sum()))
        dead = torch.zeros_like(dead)
    remove = unused | dead
    if bool(remove.all()):  # keep one unit: a layer of width 0 is not worth the edge cases
        first = int(remove.nonzero()[0])
        remove[first] = dead[first] = False
    if not bool(remove.any()):
        return False
    if bool(dead.any()):
        idx = dead.nonzero().squeeze(1)
        with torch.no_grad():
            pre = l1.b[idx] if l1.b is not None else torch.zeros(idx.numel(), dtype=l1.W.dtype, device=l1.W.device)
            c = pre.reshape(1, -1).clone()
            for module in link.between:
                if type(module) in _ELEMENTWISE or type(module) in _DROPOUT:
                    c = module(c)  # pooling and Flatten keep a constant as it is
            c = c.reshape(-1).double()
            shift = (W2[:, idx].double().sum(2) * c).sum(1)
            var_shift = (V2[:, idx].double().sum(2) * c**2).sum(1)
        dtype = l2.W.dtype
        if bool((shift != 0).any()):
            base = torch.zeros(l2.out, dtype=dtype, device=l2.W.device) if l2.b is None else l2.b
            l2.b = (base.double() + shift).to(dtype)
        if bool((var_shift != 0).any()):
            base = torch.zeros(l2.out, dtype=torch.float64, device=l2.W.device) if l2.var_bias is None else l2.var_bias
            l2.var_bias = (base.double() + var_shift).to(dtype)
        notes.append(
            f"{link.where}: folded {idx.numel()} dead unit(s) of {l1.path} (original positions "
            f"{_positions(l1.out_index[idx])}) into the bias of {l2.path}"
        )
    if bool((remove & ~dead).any()):
        idx = (remove & ~dead).nonzero().squeeze(1)
        notes.append(
            f"{link.where}: removed {idx.numel()} unit(s) of {l1.path} that {l2.path} does not read (original "
            f"positions {_positions(l1.out_index[idx])})"
        )
    keep = ~remove
    l2.keep_inputs(keep, units)
    l1.keep_rows(keep)
    return True


def _gather_inputs(work: _Work, notes: list[str]) -> None:
    """Rule 3: drops the inputs no kept weight of ``work`` reads (the first layer of a chain)."""
    if work.conv and work.groups != 1:
        notes.append(f"{work.path}: unread input channels kept (groups={work.groups})")
        return
    read = work.M.transpose(0, 1).reshape(work.W.shape[1], -1).any(1)
    if bool(read.all()) or not bool(read.any()):
        return
    work.keep_inputs(read, work.W.shape[1])
    work.in_index = work.in_index[read]
    work.gathered = True
    what = "input channels" if work.conv else "inputs"
    notes.append(
        f"{work.path}: {work.full_in - int(read.sum())} of {work.full_in} {what} are read by no kept weight; "
        f"a FeatureGather in front keeps {int(read.sum())} (the entry is now nn.Sequential(FeatureGather, layer))"
    )


def _is_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


# ---- prune -------------------------------------------------------------------------------------------
def _shape(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, (SparseVDLinear, SparseLinear)):
        return (layer.out_features, layer.in_features)
    return (layer.out_channels, layer.in_channels)


def _set_child(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, module)


def prune(model: nn.Module, threshold: float | None = None, *, compact: bool = True) -> PruneReport:
    """Converts every sparse-VD layer of ``model`` to its pruned sparse layer, in place, and (with
    ``compact``) removes the units whose removal is provably exact (module docstring).

    Args:
        model: the trained model. Its ``SparseVDLinear`` / ``SparseVDConv1d/2d/3d`` become
            ``SparseLinear`` / ``SparseConv1d/2d/3d`` (``to_sparse()``: CSR weights with their
            variances, so that ``bdlkern.sampling`` still draws LRT samples), or after compaction
            their compact versions (:class:`CompactSparseLinear`, ...); a first layer of a chain with
            unread inputs becomes ``nn.Sequential(FeatureGather, layer)`` in its place.
        threshold: ``None`` prunes each layer at its own ``threshold`` (``log_alpha >= threshold``
            is pruned); a finite float overrides it for every layer.
        compact: compact the chains of ``nn.Sequential`` containers (layers elsewhere, in a custom
            ``forward``, are converted and reported as not compacted).

    Returns:
        A :class:`PruneReport`; ``report.model`` is the pruned model (``model`` itself, or the new
        layer when ``model`` is a single sparse-VD layer).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``threshold`` is not a real number.
        ValueError: ``threshold`` is not finite, or ``model`` has no sparse-VD layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune: model must be an nn.Module, got {type(model).__name__}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
            raise TypeError(f"prune: threshold must be a float or None, got {type(threshold).__name__}")
        if not math.isfinite(float(threshold)):
            raise ValueError(f"prune: threshold must be finite, got {threshold}")
        threshold = float(threshold)
    # Every place each sparse-VD layer sits (a shared layer sits at several paths).
    places: dict[int, list[str]] = {}
    layers: dict[int, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (SparseVDLinear, _SparseVDConvNd)):
            places.setdefault(id(module), []).append(path)
            layers[id(module)] = module
    if not layers:
        raise ValueError(
            f"prune: {type(model).__name__} has no sparse variational dropout layer (SparseVDLinear, "
            "SparseVDConv1d/2d/3d) to prune"
        )
    notes: list[str] = []
    converted: dict[int, nn.Module] = {}
    works: dict[int, _Work] = {}  # by the id of the converted layer, for the compactable ones
    order = []
    for key, vd in layers.items():
        paths = places[key]
        layer_threshold = vd.threshold if threshold is None else threshold
        saved = vd.threshold
        vd.threshold = layer_threshold
        try:
            sparse = vd.to_sparse()
        finally:
            vd.threshold = saved
        sparse.train(vd.training)
        converted[key] = sparse
        for path in paths:
            if path:
                _set_child(model, path, sparse)
            else:
                model = sparse
                notes.append("the model is a single sparse-VD layer: report.model is its sparse layer")
        order.append((key, paths[0]))
        if not compact:
            continue
        parent_path = paths[0].rpartition(".")[0]
        if len(paths) > 1:
            notes.append(f"{paths[0]}: not compacted: the layer is shared ({', '.join(paths)})")
        elif not paths[0] or not _is_sequential(model.get_submodule(parent_path)):
            notes.append(f"{paths[0] or '(model)'}: not compacted: not in an nn.Sequential chain")
        else:
            works[id(sparse)] = _Work(paths[0], vd, sparse, layer_threshold)

    rebuilt: dict[int, nn.Module] = {}
    if works:
        links = []
        for seq_path, seq in model.named_modules():
            if _is_sequential(seq):
                links.extend(_links_of(seq_path, seq, works, notes))
        changed = True
        while changed:
            changed = False
            for link in links:
                changed |= _apply_link(link, notes)
        for link in links:
            if link.blocked_count:
                notes.append(
                    f"{link.where}: kept {link.blocked_count} dead unit(s) of {link.l1.path}: {link.fold_blocked}"
                )
        seconds = {id(link.l2) for link in links}
        for work in works.values():
            if id(work) not in seconds:
                _gather_inputs(work, notes)
        for key, work in works.items():
            layer = work.build()
            if layer is not work.sparse:
                layer.train(work.sparse.training)
            rebuilt[key] = layer
            if work.gathered:
                dim = -(work.dims + 1) if work.conv else -1
                gather = FeatureGather(work.in_index.clone(), dim, work.full_in)
                _set_child(model, work.path, nn.Sequential(gather, layer).train(work.sparse.training))
            elif layer is not work.sparse:
                _set_child(model, work.path, layer)

    report = PruneReport(model=model, notes=notes)
    for key, path in order:
        vd = layers[key]
        sparse = converted[key]
        final = rebuilt.get(id(sparse), sparse)
        kept = sparse.nnz
        report.layers.append(PrunedLayer(
            path=path, type_before=type(vd).__name__, type_after=type(final).__name__, shape_before=_shape(vd),
            shape_after=_shape(final), kept=kept, stored=final.nnz, total=vd.theta.numel(),
        ))
    return report
