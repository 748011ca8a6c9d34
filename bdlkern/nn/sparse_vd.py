"""Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017): :class:`SparseVDLinear` and
:class:`SparseVDConv1d` / :class:`SparseVDConv2d` / :class:`SparseVDConv3d`, trained with the
local reparameterisation trick and pruned by their learnt ``log_alpha``, and the pruned layers
with a CSR weight that their ``to_sparse()`` returns: :class:`SparseLinear` and
:class:`SparseConv1d` / :class:`SparseConv2d` / :class:`SparseConv3d`.

The KL term has two priors (``prior=``): ``"log_uniform"`` (Molchanov et al.'s approximation,
``bdlkern.ops.sparse_vd_kl``) and ``"ard"`` (the exact KL under the Gaussian ARD prior with its
empirical-Bayes variance, Kharitonov, Molchanov & Vetrov 2018, ``bdlkern.ops.ard_kl``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._sampling import current_sampling
from ._base import (
    _F32_F64,
    _check_conv_input,
    _check_dtype,
    _check_width,
    _copied_from,
    _image_out_numel,
    _NotScriptable,
)


#: The priors of the sparse-VD layers' KL term.
PRIORS = ("log_uniform", "ard")


def _check_prior(owner: str, prior) -> str:
    if not isinstance(prior, str) or prior not in PRIORS:
        raise ValueError(f"{owner}: prior must be one of {', '.join(map(repr, PRIORS))}, got {prior!r}")
    return prior


def _conv_template(layer, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device,
                   dtype) -> nn.Module:
    """Sets the geometry of an LRT convolution (sparse VD, variational dropout, variance layer) and
    returns the torch convolution of ``layer._conv_type`` that checked and normalised it, whose
    freshly initialised weight and bias the caller copies."""
    template = layer._conv_type(
        in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=bias, device=device, dtype=dtype,
    )
    layer.in_channels, layer.out_channels = in_channels, out_channels
    layer.kernel_size, layer.stride = template.kernel_size, template.stride
    layer.padding, layer.dilation, layer.groups = template.padding, template.dilation, groups
    return template


def _init_conv_theta(layer, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device,
                     dtype) -> nn.Parameter | None:
    """Sets the geometry and ``theta`` of an LRT convolution (the torch convolution's initial weight)
    and returns its bias parameter (or None), for the caller to register after its own parameters (the
    state-dict order stays theta, the noise parameter, bias)."""
    template = _conv_template(
        layer, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype
    )
    layer.theta = nn.Parameter(template.weight.detach().clone())
    return nn.Parameter(template.bias.detach().clone()) if bias else None


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
        prior: the prior of :meth:`kl` (keyword only): ``"log_uniform"`` (the default, Molchanov et
            al.'s approximation, :func:`bdlkern.ops.sparse_vd_kl`) or ``"ard"`` (the Gaussian ARD
            prior with its optimal variance, Kharitonov et al. 2018: the exact KL
            ``0.5 log1p(1 / alpha)``, :func:`bdlkern.ops.ard_kl`).

    Parameters: ``theta [out, in]``, ``log_sigma2 [out, in]``, ``bias [out]``.
    """

    _bdlkern_kl = True  # picked up by bdlkern.nn.regularization / kl_divergence
    #: The prior of :meth:`kl`; a class default too, so layers pickled before it existed load.
    prior: str = "log_uniform"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        threshold: float = 3.0,
        log_sigma2_init: float = -10.0,
        device=None,
        dtype=None,
        *,
        prior: str = "log_uniform",
    ):
        super().__init__()
        self.prior = _check_prior(type(self).__name__, prior)
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

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, threshold: float = 3.0, log_sigma2_init: float = -10.0, *, prior: str = "log_uniform"
    ) -> "SparseVDLinear":
        """A sparse-VD layer whose ``theta [out, in]`` and bias are copies of ``linear``'s weight and
        bias (to fine-tune a trained network, as Molchanov et al. do), with every ``log_sigma2`` at
        ``log_sigma2_init`` and the KL ``prior``; same device, dtype and training mode as ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features, linear.out_features, bias=linear.bias is not None, threshold=threshold,
            log_sigma2_init=log_sigma2_init, device=linear.weight.device, dtype=linear.weight.dtype, prior=prior,
        )
        return _copied_from(layer, linear, "theta")

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
        """The layer's KL term under its ``prior``, a 0-dim tensor: ``bdlkern.ops.sparse_vd_kl``
        (log-uniform) or ``bdlkern.ops.ard_kl`` (ARD)."""
        dtype = self.theta.dtype
        if dtype not in _F32_F64 and not torch.is_autocast_enabled(self.theta.device.type):
            raise TypeError(
                f"{type(self).__name__}: parameters of dtype {dtype} are not supported by the KL kernel (it takes "
                "torch.float32, torch.float64); keep the parameters in torch.float32 and use torch.autocast "
                "for lower precision"
            )
        kl = ops.ard_kl if self.prior == "ard" else ops.sparse_vd_kl
        return kl(self.theta, self.log_sigma2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` ``[*, in]`` or ``[S, *, in]`` -> ``[S, *, out]``."""
        _check_width(self, x, self.in_features)
        state = current_sampling()
        if state is not None:
            _check_dtype(self, x, self.theta.dtype, _F32_F64, "LRT")
            rng_state, num_samples, x, folded = state.layer_call(self, x, self.in_features, per_row=self.out_features)
            y = ops.lrt_linear(
                x, self.theta, self._lrt_log_sigma2(), self.bias, num_samples=num_samples, rng_state=rng_state
            )
            return state.output(y.flatten(0, 1) if folded else y, "folded" if folded else "stacked")
        if self.training:
            _check_dtype(self, x, self.theta.dtype, _F32_F64, "LRT")
            return ops.lrt_linear(x, self.theta, self._lrt_log_sigma2(), self.bias, num_samples=1).squeeze(0)
        _check_dtype(self, x, self.theta.dtype)
        return F.linear(x, self._mean_weight(), self.bias)

    # The two hooks through which the LRT layers differ (bdlkern.nn.variational reuses forward):
    def _lrt_log_sigma2(self) -> torch.Tensor:
        """The ``log_sigma2`` handed to the LRT op."""
        return self.log_sigma2

    def _mean_weight(self) -> torch.Tensor:
        """The weight of the deterministic eval layer: the pruned mean."""
        return self.pruned_weight()

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
            f"threshold={self.threshold}{self._prior_repr()}"
        )

    def _prior_repr(self) -> str:
        return "" if self.prior == "log_uniform" else f", prior={self.prior!r}"


class _SparseVDConvNd(_NotScriptable, nn.Module):
    """A convolution trained by sparse variational dropout (Molchanov, Ashukha & Vetrov 2017), the
    conv counterpart of :class:`SparseVDLinear`: every weight is ``N(theta, alpha theta^2)``, the
    layer adds :meth:`kl` to the loss, and weights with ``log_alpha >= threshold`` are pruned.

    * training: one LRT sample per input (``bdlkern.ops.lrt_conv``), ``[N, C, *] -> [N, C_out, *]``;
    * eval: the deterministic pruned convolution ``conv(x, theta * (log_alpha < threshold)) + bias``;
    * inside ``bdlkern.sampling(S)``: S stochastic LRT samples folded into the batch, sample-major
      (the folded layout of :mod:`bdlkern._sampling`).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as the
            torch convolution (theta initialised like its weight; ``padding_mode`` is zeros).
        threshold, log_sigma2_init, prior: as :class:`SparseVDLinear` (``prior`` keyword only).

    Parameters: ``theta [C_out, C_in / groups, *kernel]``, ``log_sigma2`` (same shape),
    ``bias [C_out]``.
    """

    _bdlkern_kl = True  # picked up by bdlkern.nn.regularization / kl_divergence
    prior: str = "log_uniform"  # as SparseVDLinear.prior
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
        threshold: float = 3.0,
        log_sigma2_init: float = -10.0,
        device=None,
        dtype=None,
        *,
        prior: str = "log_uniform",
    ):
        super().__init__()
        name = type(self).__name__
        self.prior = _check_prior(name, prior)
        if not math.isfinite(float(threshold)):
            raise ValueError(f"{name}: threshold must be finite, got {threshold}")
        if not math.isfinite(float(log_sigma2_init)):
            raise ValueError(f"{name}: log_sigma2_init must be finite, got {log_sigma2_init}")
        bias_param = _init_conv_theta(
            self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype
        )
        self.threshold = float(threshold)
        self.log_sigma2 = nn.Parameter(torch.full_like(self.theta, float(log_sigma2_init)))
        self.bias = bias_param

    @classmethod
    def from_conv(cls, conv: nn.Module, threshold: float = 3.0, log_sigma2_init: float = -10.0, *,
                  prior: str = "log_uniform"):
        """A sparse-VD layer whose ``theta`` and bias are ``conv``'s weight and bias (to fine-tune a
        trained network, as Molchanov et al. do), with the KL ``prior``; ``padding_mode`` must be
        zeros."""
        if not isinstance(conv, cls._conv_type):
            raise TypeError(f"{cls.__name__}.from_conv: expected an nn.{cls._conv_type.__name__}, got {type(conv).__name__}")
        if conv.padding_mode != "zeros":
            raise ValueError(f"{cls.__name__}.from_conv: padding_mode={conv.padding_mode!r} is not supported; use 'zeros'")
        layer = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, threshold=threshold,
            log_sigma2_init=log_sigma2_init, device=conv.weight.device, dtype=conv.weight.dtype, prior=prior,
        )
        return _copied_from(layer, conv, "theta")

    log_alpha = SparseVDLinear.log_alpha
    mask = SparseVDLinear.mask
    pruned_weight = SparseVDLinear.pruned_weight
    sparsity = SparseVDLinear.sparsity
    kl = SparseVDLinear.kl
    _prior_repr = SparseVDLinear._prior_repr

    def _error_label(self) -> str:
        return f"{type(self).__name__}(in_channels={self.in_channels}, out_channels={self.out_channels})"

    def to_sparse(self) -> "_SparseConvNd":
        """The pruned layer as a :class:`SparseConv2d` (or 1-d / 3-d): CSR of the weights with
        ``log_alpha < threshold``, values theta and alpha theta^2 interleaved on that pattern (so it
        can still draw stochastic LRT samples), and a copy of the bias."""
        sparse_type = {1: SparseConv1d, 2: SparseConv2d, 3: SparseConv3d}[self._dims]
        with torch.no_grad():
            variance = torch.exp(self.log_alpha) * self.theta**2
            return sparse_type.from_dense(
                self.theta, self.bias, variance=variance, mask=self.mask(), stride=self.stride, padding=self.padding,
                dilation=self.dilation, groups=self.groups,
            )

    def _check_channels(self, x: torch.Tensor, where: str) -> None:
        _check_conv_input(self, x, self._dims, self.in_channels, where)

    def _lrt(self, x, num_samples, rng_state=None, input_has_samples=False):
        return ops.lrt_conv(
            x, self.theta, self._lrt_log_sigma2(), self.bias, num_samples, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, input_has_samples=input_has_samples, rng_state=rng_state,
        )

    _lrt_log_sigma2 = SparseVDLinear._lrt_log_sigma2
    _mean_weight = SparseVDLinear._mean_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, *] -> [N, C_out, *]``; inside ``sampling(S)`` see the class docstring."""
        state = current_sampling()
        if state is not None:
            per_image = _image_out_numel(self, x, self._dims, self.theta.shape[2:], self.out_channels)
            rng_state, has_samples, x_op, stacked = state.conv_call(self, x, per_image=per_image)
            self._check_channels(x_op, "an input (samples folded into the batch)" if has_samples else "a batched input")
            _check_dtype(self, x, self.theta.dtype, _F32_F64, "LRT")
            y = self._lrt(x_op, state.num_samples, rng_state, has_samples)
            return state.output(y.unflatten(0, (state.num_samples, -1)) if stacked else y, "stacked" if stacked else "folded")
        if self.training:
            unbatched = x.dim() == self._dims + 1
            xb = x.unsqueeze(0) if unbatched else x
            self._check_channels(xb, "a batched or unbatched input")
            _check_dtype(self, x, self.theta.dtype, _F32_F64, "LRT")
            y = self._lrt(xb, 1)
            return y.squeeze(0) if unbatched else y
        _check_dtype(self, x, self.theta.dtype)
        conv = (F.conv1d, F.conv2d, F.conv3d)[self._dims - 1]
        return conv(x, self._mean_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"threshold={self.threshold}{self._prior_repr()}"
        )


class SparseVDConv1d(_SparseVDConvNd):
    """Sparse variational dropout for ``nn.Conv1d`` (input ``[N, C, L]``); see ``_SparseVDConvNd``."""

    _dims = 1
    _conv_type = nn.Conv1d


class SparseVDConv2d(_SparseVDConvNd):
    """Sparse variational dropout for ``nn.Conv2d`` (input ``[N, C, H, W]``); see ``_SparseVDConvNd``."""

    _dims = 2
    _conv_type = nn.Conv2d


class SparseVDConv3d(_SparseVDConvNd):
    """Sparse variational dropout for ``nn.Conv3d`` (input ``[N, C, D, H, W]``); see ``_SparseVDConvNd``."""

    _dims = 3
    _conv_type = nn.Conv3d


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (-1 for an inference tensor, which keeps none: it cannot be changed in
    place outside inference mode)."""
    return -1 if t.is_inference() else t._version


class _CheckedCsr:
    """What :class:`SparseLinear` and the sparse convolutions share: their CSR structure is validated
    once, at construction, at ``load_state_dict`` and again after any in-place change of a buffer
    (seen by its version counter) or a replaced buffer (``.to()``), and their forward calls the ops
    with ``validate=False``. Validating on every call would copy the structure to the host and wait
    for the device each time on CUDA (and cost ~10 us per call on the CPU). Under ``torch.compile``
    / ``torch.export`` the version check is skipped (the structure was validated eagerly). A write
    that bypasses the version counter (through ``.data`` or shared numpy memory) is not seen: call
    :meth:`validate` after one."""

    _csr_buffers = ("crow", "col", "values", "row_order")
    _csr_checked: tuple | None = None

    def _csr_state(self) -> tuple:
        return tuple((id(t), _version(t)) for t in (getattr(self, n, None) for n in self._csr_buffers) if t is not None)

    def validate(self) -> None:
        """Check the CSR structure now (raises on a malformed one, naming the buffer): the class's
        ``_validate_structure`` runs its ops with ``validate=True`` on an empty batch."""
        self._validate_structure()
        self._csr_checked = self._csr_state()

    def _ensure_valid(self) -> None:
        if torch.compiler.is_compiling() or torch.compiler.is_exporting():
            return
        if self._csr_state() != self._csr_checked:
            self.validate()


class SparseLinear(_CheckedCsr, _NotScriptable, nn.Module):
    """A linear layer with a CSR weight, for pruned networks (``SparseVDLinear.to_sparse()``).

    * deterministic: ``y = x W^T + bias`` through ``bdlkern.ops.sparse_linear``; above the
      measured :meth:`crossover_density` of the batch size it uses the dense GEMM instead, so it
      does not lose to ``nn.Linear``;
    * inside ``bdlkern.sampling(S)``, when the layer holds weight variances (``values [nnz, 2]``, as
      ``to_sparse`` keeps them): S stochastic LRT samples from one pass over the sparse structure.

    Buffers (all in the state dict; ``load_state_dict`` takes any nnz): ``crow`` int64 ``[N + 1]``,
    ``col`` int64 ``[nnz]``, ``values`` ``[nnz]`` or ``[nnz, 2]`` (theta, alpha theta^2), ``bias``
    ``[N]`` (optional) and ``row_order`` (rows longest first, for the CUDA kernel's warps). The
    structure is validated at construction and load (and after an in-place change of a buffer),
    not on every call: a forward never waits for the device.
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
        self.validate()  # a malformed structure fails here, at construction

    def _validate_structure(self) -> None:
        probe = self.values.new_zeros(0, self.in_features)
        torch.ops.bdlkern.sparse_linear(probe, self.crow, self.col, self.values, self.bias, self.row_order, True)
        if self.has_variance:  # the variances too (>= 0)
            state = torch.zeros(2, dtype=torch.long, device=self.values.device)
            torch.ops.bdlkern.sparse_linear_lrt(probe, self.crow, self.col, self.values, self.bias, self.row_order,
                                                state, 1, True)

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
        self._ensure_valid()
        state = current_sampling()
        if state is not None and self.has_variance:
            rng_state, num_samples, x, folded = state.layer_call(self, x, self.in_features, per_row=self.out_features)
            y = ops.sparse_linear(
                x, self.crow, self.col, self.values, self.bias, num_samples=num_samples, stochastic=True,
                rng_state=rng_state, row_order=self.row_order, validate=False,
            )
            return state.output(y.flatten(0, 1) if folded else y, "folded" if folded else "stacked")
        rows = x.numel() // max(self.in_features, 1)
        if self.density > self.crossover_density(rows):
            if torch.compiler.is_exporting():  # the cache cannot be filled with a traced tensor
                return F.linear(x, self.to_dense(), self.bias)
            if self._dense is None or self._dense.dtype != self.values.dtype:
                self._dense = self.to_dense()
            return F.linear(x, self._dense, self.bias)
        return ops.sparse_linear(x, self.crow, self.col, self.values, self.bias, row_order=self.row_order,
                                 validate=False)

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
        self.validate()  # what was loaded, checked once

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
            f"density={self.density:.4f}, variance={self.has_variance}, bias={self.bias is not None}"
        )



class _SparseConvNd(_CheckedCsr, _NotScriptable, nn.Module):
    """A convolution with a CSR weight, for pruned networks (``SparseVDConv2d.to_sparse()``): the
    conv counterpart of :class:`SparseLinear`, computed by ``bdlkern.ops.sparse_conv`` without
    im2col.

    * deterministic: ``conv(x, W) + bias``; above :attr:`crossover_density` it uses the dense
      convolution (oneDNN / cuDNN) instead, so it does not lose to ``nn.Conv2d``;
    * inside ``bdlkern.sampling(S)``, when the layer holds weight variances (``values [nnz, 2]``,
      as ``to_sparse`` keeps them): S stochastic LRT samples on the kept weights, folded into the
      batch (the folded layout of :mod:`bdlkern._sampling`).

    Buffers (all in the state dict; ``load_state_dict`` takes any nnz): ``crow`` int64
    ``[C_out + 1]``, ``col`` int64 ``[nnz]`` (columns of ``[C_out, C_in / groups * prod(kernel)]``),
    ``values`` ``[nnz]`` or ``[nnz, 2]`` (theta, alpha theta^2), ``bias`` ``[C_out]`` (optional).
    The structure is validated at construction and load, not on every call (as :class:`SparseLinear`).
    """

    _dims: int
    #: Above this density the dense convolution is used. Measured on the 2-core AVX-512 benchmark
    #: VM (float32, 2 threads, x [32, 64, 16, 16], 3x3 weights [128, 64, 3, 3], stride 1): the CSR
    #: kernel's time grows with nnz and meets oneDNN's dense convolution near 24% kept (4.7-4.9x
    #: faster at 5%); the default keeps a margin below that.
    crossover_density: float = 0.2

    def __init__(self, in_channels: int, out_channels: int, kernel_size, crow, col, values, bias=None, *, stride=1,
                 padding=0, dilation=1, groups: int = 1):
        super().__init__()
        name = type(self).__name__
        dims = self._dims

        def tup(v, what):
            t = (v,) * dims if isinstance(v, int) else tuple(int(e) for e in v)
            if len(t) != dims:
                raise ValueError(f"{name}: {what} must be an int or {dims} ints, got {v!r}")
            return t

        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), int(groups)
        self.kernel_size, self.stride = tup(kernel_size, "kernel_size"), tup(stride, "stride")
        self.padding, self.dilation = tup(padding, "padding"), tup(dilation, "dilation")
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{name}: groups ({groups}) must divide in_channels and out_channels")
        if not (isinstance(crow, torch.Tensor) and crow.dim() == 1 and crow.numel() == self.out_channels + 1):
            raise ValueError(f"{name}: crow must be a 1-d tensor of out_channels + 1 = {self.out_channels + 1} entries")
        if not isinstance(values, torch.Tensor) or values.dtype not in _F32_F64:
            raise TypeError(
                f"{name}: values must be a float32 or float64 tensor (the sparse kernels' dtypes), got "
                f"{getattr(values, 'dtype', type(values).__name__)}"
            )
        self.register_buffer("crow", crow)
        self.register_buffer("col", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)
        self.register_buffer("_dense", None, persistent=False)  # the dense weight, made on demand
        self.validate()  # a malformed structure fails here, at construction

    def _validate_structure(self) -> None:
        probe = self.values.new_zeros(0, self.in_channels, *[d * (k - 1) + 1 for k, d in zip(self.kernel_size,
                                                                                             self.dilation)])
        self._sparse(probe, validate=True)
        if self.has_variance:  # the variances too (>= 0)
            self._sparse(probe, stochastic=True, rng_state=torch.zeros(2, dtype=torch.long, device=probe.device),
                         validate=True)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, variance: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, *, stride=1, padding=0, dilation=1, groups: int = 1):
        """The CSR layer of a pruned dense conv ``weight [C_out, C_in / groups, *kernel]``: the
        entries where ``mask`` (default ``weight != 0``) is true, with ``variance`` (alpha theta^2,
        the weight's shape) interleaved if given."""
        name = cls.__name__
        if not isinstance(weight, torch.Tensor) or weight.dim() != cls._dims + 2:
            raise ValueError(f"{name}.from_dense: weight must be [out_channels, in_channels / groups, {cls._dims} kernel sizes]")
        flat = SparseLinear.from_dense(
            weight.detach().reshape(weight.shape[0], -1),
            None,
            None if variance is None else variance.detach().reshape(weight.shape[0], -1),
            None if mask is None else mask.reshape(weight.shape[0], -1),
        )
        return cls(
            weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), flat.crow, flat.col, flat.values,
            None if bias is None else bias.detach().clone(), stride=stride, padding=padding, dilation=dilation,
            groups=groups,
        )

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @property
    def density(self) -> float:
        """Fraction of the weights kept."""
        total = self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel_size)
        return self.nnz / total if total else 0.0

    @property
    def has_variance(self) -> bool:
        return self.values.dim() == 2

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def to_dense(self) -> torch.Tensor:
        """The dense weight ``[C_out, C_in / groups, *kernel]``."""
        w = torch.zeros(self.out_channels, math.prod(self._weight_shape()[1:]), dtype=self.values.dtype,
                        device=self.values.device)
        rows = torch.repeat_interleave(torch.arange(self.out_channels, device=self.crow.device), self.crow.diff())
        w[rows, self.col] = self.values if self.values.dim() == 1 else self.values[:, 0]
        return w.reshape(self._weight_shape())

    def _sparse(self, x, **kwargs):
        kwargs.setdefault("validate", False)  # validated once (_CheckedCsr)
        return ops.sparse_conv(
            x, self.crow, self.col, self.values, self.bias, kernel_size=self.kernel_size, stride=self.stride,
            padding=self.padding, dilation=self.dilation, groups=self.groups, **kwargs,
        )

    def _check_channels(self, x: torch.Tensor, where: str) -> None:
        _check_conv_input(self, x, self._dims, self.in_channels, where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, *] -> [N, C_out, *]``; inside ``sampling(S)`` with variances see the class docstring."""
        _check_dtype(self, x, self.values.dtype, _F32_F64, "sparse")
        self._ensure_valid()
        state = current_sampling()
        if state is not None and self.has_variance:
            per_image = _image_out_numel(self, x, self._dims, self.kernel_size, self.out_channels)
            rng_state, has_samples, x_op, stacked = state.conv_call(self, x, per_image=per_image)
            self._check_channels(x_op, "an input (samples folded into the batch)" if has_samples else "a batched input")
            y = self._sparse(x_op, num_samples=state.num_samples, stochastic=True, input_has_samples=has_samples,
                             rng_state=rng_state)
            return state.output(y.unflatten(0, (state.num_samples, -1)) if stacked else y, "stacked" if stacked else "folded")
        unbatched = x.dim() == self._dims + 1
        xb = x.unsqueeze(0) if unbatched else x
        self._check_channels(xb, "a batched or unbatched input")
        if self.density > self.crossover_density:
            if torch.compiler.is_exporting():  # the cache cannot be filled with a traced tensor
                weight = self.to_dense()
            else:
                if self._dense is None or self._dense.dtype != self.values.dtype:
                    self._dense = self.to_dense()
                weight = self._dense
            conv = (F.conv1d, F.conv2d, F.conv3d)[self._dims - 1]
            y = conv(xb, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        else:
            y = self._sparse(xb)
        return y.squeeze(0) if unbatched else y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The number of stored weights differs from layer to layer: take the incoming shapes.
        for name in ("crow", "col", "values", "bias"):
            key = prefix + name
            if key in state_dict and state_dict[key] is not None:
                current = getattr(self, name)
                if current is None or current.shape != state_dict[key].shape:
                    setattr(self, name, torch.empty_like(state_dict[key], device=self.col.device))
        self._dense = None
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                        error_msgs)
        self.validate()  # what was loaded, checked once

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, nnz={self.nnz}, "
            f"density={self.density:.4f}, variance={self.has_variance}, bias={self.bias is not None}"
        )


class SparseConv1d(_SparseConvNd):
    """A pruned ``nn.Conv1d`` with a CSR weight (input ``[N, C, L]``); see ``_SparseConvNd``."""

    _dims = 1


class SparseConv2d(_SparseConvNd):
    """A pruned ``nn.Conv2d`` with a CSR weight (input ``[N, C, H, W]``); see ``_SparseConvNd``."""

    _dims = 2


class SparseConv3d(_SparseConvNd):
    """A pruned ``nn.Conv3d`` with a CSR weight (input ``[N, C, D, H, W]``); see ``_SparseConvNd``."""

    _dims = 3
