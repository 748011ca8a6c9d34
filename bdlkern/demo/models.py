"""The demo's models: the :class:`Method` spec and :data:`METHODS` (plain, MC dropout, Concrete
dropout, sparse VD, variational dropout and, on request, variance-network MLPs, and the conv
section's MC dropout, Concrete and sparse VD conv nets), the
MLP and conv-net builders, their per-layer statistics, sparse VD's pruning, and the plain-PyTorch
equivalents whose Monte Carlo inference bdlkern is timed against.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.demo.settings import Settings

#: The hidden widths of every MLP; inputs are the 64 pixels, outputs the 10 digit classes.
HIDDEN = (256, 256)
#: Drop probability of the MC-dropout model (before the hidden and output layers).
MC_DROPOUT_P = 0.2
#: Concrete dropout (Gal, Hron & Kendall 2017): prior length-scale l, model precision tau (1 for
#: classification: no observation noise), initial drop probability and relaxation temperature.
CONCRETE_LENGTH_SCALE = 1e-2
CONCRETE_TAU = 1.0
CONCRETE_INIT_P = 0.1
CONCRETE_TEMPERATURE = 0.1
#: The learning rate of the Concrete dropout logits, relative to the weights' (see _rate_groups).
CONCRETE_RATE_LR_SCALE = 10.0


@dataclass(frozen=True)
class LayerStats:
    """Per-layer numbers a method reports (a fixed or learnt dropout rate, a sparsity).

    Attributes:
        short: the name in the printed table (``"p"``).
        label: the axis label and report wording (``"learnt dropout rate p"``).
        read: model -> layer name -> value.
        learnt: the values change in training: recorded after every epoch and plotted.
    """

    short: str
    label: str
    read: Callable[[nn.Module], dict[str, float]]
    learnt: bool = False


@dataclass(frozen=True)
class Method:
    """One model of the demo: a small spec, so that a new method is one entry in :data:`METHODS`.

    Attributes:
        name: key in the report and file names.
        summary: one line for the report.
        build: ``build(widths)`` -> a fresh ``nn.Module`` mapping ``[N, widths[0]]`` (a conv net:
            ``[N, widths[0], 8, 8]``) to logits ``[N, widths[-1]]``; built on the CPU (moved to the
            device after).
        extra_loss: the per-dataset term added to the training objective (a KL divergence or the
            Concrete regulariser, e.g. :func:`bdlkern.nn.regularization`); the trainer minimises
            ``mean cross-entropy + extra_loss(model) / N_train``, the negative ELBO per example.
        extra_loss_warmup: fraction of the epochs over which the extra term's weight rises
            linearly from 0 to 1 (KL annealing; sparse VD from scratch collapses without it).
        param_groups: optional ``param_groups(model, settings)`` -> Adam parameter groups (to give
            a few parameters their own learning rate); default: every parameter at ``settings.lr``.
        post_train: optional step after training (e.g. pruning); returns what it did, for the report.
        layer_stats: optional per-layer numbers to report (and plot when learnt).
        eager_reference: model -> the same network in plain PyTorch whose train-mode forward draws
            one Monte Carlo sample (``nn.Dropout`` active), for the MC-inference timing; None for
            a deterministic model (nothing to sample).
        conv: a conv net of the conv section: it takes the digits as images ``[N, 1, 8, 8]``,
            ``build`` gets the channel widths ``(1, *CONV_CHANNELS, classes)`` instead of the MLP's,
            and it trains for ``settings.conv_epochs`` epochs.
        default: part of a plain ``python -m bdlkern.demo`` run; the others run when named with
            ``--methods``.
    """

    name: str
    summary: str
    build: Callable[[Sequence[int]], nn.Module]
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None
    extra_loss_warmup: float = 0.0
    param_groups: Callable[[nn.Module, "Settings"], list[dict[str, Any]]] | None = None
    post_train: Callable[[nn.Module], dict[str, Any]] | None = None
    layer_stats: LayerStats | None = None
    eager_reference: Callable[[nn.Module], nn.Module] | None = None
    conv: bool = False
    default: bool = True

    @property
    def stochastic(self) -> bool:
        """Whether the model samples (has a plain-PyTorch Monte Carlo equivalent to compare with)."""
        return self.eager_reference is not None


def mlp(
    widths: Sequence[int], linear: Callable[[int, int], nn.Module] = nn.Linear, dropout: float = 0.0
) -> nn.Sequential:
    """``fc1, relu1, [drop1], fc2, ..., fcL`` for ``widths = (in, hidden..., out)``.

    Args:
        widths: layer widths, at least two.
        linear: ``linear(in, out)`` makes each layer (``nn.Linear`` or a bdlkern layer).
        dropout: if > 0, an ``nn.Dropout(dropout)`` before every layer but the first.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        if i > 1:
            layers[f"relu{i - 1}"] = nn.ReLU()
            if dropout > 0:
                layers[f"drop{i - 1}"] = nn.Dropout(dropout)
        layers[f"fc{i}"] = linear(fan_in, fan_out)
    return nn.Sequential(layers)


_MC_DROPOUT_CONVS = (bdlkern.nn.MCDropoutConv1d, bdlkern.nn.MCDropoutConv2d, bdlkern.nn.MCDropoutConv3d)
_DROPOUT_LAYERS = (
    bdlkern.nn.MCDropoutLinear, bdlkern.nn.ConcreteDropoutLinear, *_MC_DROPOUT_CONVS, bdlkern.nn.ConcreteDropout,
)
_TORCH_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CHANNEL_DROPOUTS = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """Layer name -> the drop probability of its input, for every bdlkern dropout layer (linear,
    convolution, or a ``ConcreteDropout`` wrapper)."""
    return {name: float(m.p) for name, m in model.named_modules() if isinstance(m, _DROPOUT_LAYERS)}


def _plain_copy(module: nn.Module) -> nn.Module:
    """The torch layer behind a bdlkern dropout layer, with a copy of its weights (train mode)."""
    if isinstance(module, bdlkern.nn.ConcreteDropout):
        return copy.deepcopy(module.layer)
    factory = {"device": module.weight.device, "dtype": module.weight.dtype}
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        plain = nn.Linear(module.in_features, module.out_features, bias=bias, **factory)
    else:
        base = next(t for t in _TORCH_CONVS if isinstance(module, t))
        plain = base(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=module.groups, bias=bias, **factory,
        )
    with torch.no_grad():
        plain.weight.copy_(module.weight)
        if bias:
            plain.bias.copy_(module.bias)
    return plain


def _torch_dropout(module: nn.Module) -> nn.Module:
    """The torch dropout with the same masks as a bdlkern dropout layer: ``nn.Dropout`` (one flag
    per element), or ``nn.Dropout1d/2d/3d`` for a channel mask (one flag per sample and channel)."""
    p = float(module.p)
    layer = module.layer if isinstance(module, bdlkern.nn.ConcreteDropout) else module
    channel = getattr(module, "mask", None) == "channel" or getattr(module, "channel_dim", None) == 1
    if channel and isinstance(layer, _TORCH_CONVS):
        return _CHANNEL_DROPOUTS[len(layer.kernel_size) - 1](p)
    return nn.Dropout(p)


def eager_equivalent(model: nn.Sequential) -> nn.Sequential:
    """The same network in plain PyTorch, in train mode: each bdlkern dropout layer becomes its
    torch dropout (``nn.Dropout(p)``, or ``nn.Dropout2d(p)`` for a channel mask, with its fixed or
    learnt rate) followed by the torch layer (``nn.Linear``, ``nn.Conv2d``) with a copy of its
    weights; other modules are copied. One forward pass is one Monte Carlo sample, with the hard
    Bernoulli masks that ``bdlkern.sampling`` draws."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, module in model.named_children():
        if isinstance(module, _DROPOUT_LAYERS):
            layers[f"{name}_dropout"] = _torch_dropout(module)
            layers[name] = _plain_copy(module)
        else:
            layers[name] = copy.deepcopy(module)
    return nn.Sequential(layers).train()


def _build_mc_dropout(widths: Sequence[int]) -> nn.Module:
    # The headline API: a plain PyTorch model with nn.Dropout, converted in place; every
    # nn.Dropout -> nn.Linear pair becomes one MCDropoutLinear with the same weights.
    return bdlkern.nn.convert(mlp(widths, dropout=MC_DROPOUT_P))


def concrete_coefficients(
    length_scale: float = CONCRETE_LENGTH_SCALE, tau: float = CONCRETE_TAU
) -> dict[str, float]:
    """The Concrete-dropout coefficients of the *per-dataset* regulariser.

    Gal, Hron & Kendall (2017) add ``l^2 / (tau N) * ||W||^2 / (1 - p)`` and
    ``2 / (tau N) * D * (p log p + (1 - p) log(1 - p))`` to a mean loss. The demo's trainer adds
    ``bdlkern.nn.regularization(model) / N`` to the mean cross-entropy (like a KL term), so the
    layers hold the coefficients times N: ``weight_regularizer = l^2 / tau`` and
    ``dropout_regularizer = 2 / tau``; the objective is the paper's.
    """
    return {"weight_regularizer": length_scale**2 / tau, "dropout_regularizer": 2.0 / tau}


def _rate_groups(model: nn.Module, settings: Settings) -> list[dict[str, Any]]:
    """The dropout logits at :data:`CONCRETE_RATE_LR_SCALE` times the weights' learning rate.

    Each is one scalar per layer that Adam moves by about ``lr`` per step: at the weights' rate it
    would need thousands of steps to reach the rate the regulariser and the data agree on.
    """
    return _scaled_groups(model, "p_logit", settings.lr, CONCRETE_RATE_LR_SCALE)


def _scaled_groups(model: nn.Module, suffix: str, lr: float, scale: float) -> list[dict[str, Any]]:
    """Two Adam groups: the parameters named ``*suffix`` at ``lr * scale``, the rest at ``lr``."""
    chosen = [p for name, p in model.named_parameters() if name.endswith(suffix)]
    others = [p for name, p in model.named_parameters() if not name.endswith(suffix)]
    return [{"params": others, "lr": lr}, {"params": chosen, "lr": lr * scale}]


def _build_concrete(widths: Sequence[int]) -> nn.Module:
    def layer(fan_in: int, fan_out: int) -> nn.Module:
        return bdlkern.nn.ConcreteDropoutLinear(
            fan_in, fan_out, init_p=CONCRETE_INIT_P, temperature=CONCRETE_TEMPERATURE, **concrete_coefficients()
        )

    return mlp(widths, linear=layer)



# ---- sparse variational dropout -------------------------------------------------------------------
#: Sparse VD: weights with log alpha >= this are pruned (alpha ~ 20, a dropout rate above 0.95).
SPARSE_VD_THRESHOLD = 3.0
#: Bins of the log alpha histograms recorded before pruning (the clamp's range).
LOG_ALPHA_BINS = np.linspace(-8.0, 8.0, 65)


#: Initial log sigma^2 (log alpha starts near 0 for the initial weights, so pruning needs fewer
#: steps), the KL annealing fraction, and the learning rates of a full run (60 epochs) and of a
#: short one (the 5-epoch --quick smoke run, which needs larger steps to reach the pruned regime).
SPARSE_VD_LOG_SIGMA2_INIT = -6.0
SPARSE_VD_KL_WARMUP = 0.25
SPARSE_VD_LR = {"full": (3e-3, 3.0), "short": (1e-2, 10.0)}  # (weights, log_sigma2 multiplier)
SPARSE_VD_SHORT_EPOCHS = 20


def _build_sparse_vd(widths: Sequence[int]) -> nn.Module:
    return mlp(
        widths,
        linear=lambda fan_in, fan_out: bdlkern.nn.SparseVDLinear(
            fan_in, fan_out, threshold=SPARSE_VD_THRESHOLD, log_sigma2_init=SPARSE_VD_LOG_SIGMA2_INIT
        ),
    )


def _build_ard(widths: Sequence[int]) -> nn.Module:
    # The sparse-VD MLP with the ARD prior's exact KL (Kharitonov, Molchanov & Vetrov 2018).
    return mlp(
        widths,
        linear=lambda fan_in, fan_out: bdlkern.nn.SparseVDLinear(
            fan_in, fan_out, threshold=SPARSE_VD_THRESHOLD, log_sigma2_init=SPARSE_VD_LOG_SIGMA2_INIT, prior="ard"
        ),
    )


def _sparse_vd_groups(model: nn.Module, settings: Settings) -> list[dict[str, Any]]:
    """Sparse VD's learning rates (:data:`SPARSE_VD_LR`): log sigma^2 must travel several units for
    a weight to be pruned, so it gets a larger step than theta."""
    lr, scale = SPARSE_VD_LR["short" if settings.epochs < SPARSE_VD_SHORT_EPOCHS else "full"]
    return _scaled_groups(model, "log_sigma2", lr, scale)


_SPARSE_VD_CONVS = (bdlkern.nn.SparseVDConv1d, bdlkern.nn.SparseVDConv2d, bdlkern.nn.SparseVDConv3d)


def sparsity(model: nn.Module) -> dict[str, float]:
    """Layer name -> fraction of its weights pruned (SparseVDLinear or a sparse-VD convolution at
    its threshold, or a pruned SparseLinear)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (bdlkern.nn.SparseVDLinear, *_SPARSE_VD_CONVS)):
            out[name] = m.sparsity()
        elif isinstance(m, bdlkern.nn.SparseLinear):
            out[name] = 1.0 - m.density
    return out


def _prune_conv_in_place(module: nn.Module) -> int:
    """Zero the pruned weights of a sparse-VD convolution and their variance; the layer stays dense.
    (The demo's conv layers keep 40-90% of their weights, above the density where the CSR
    convolution of ``SparseVDConv2d.to_sparse()`` beats the dense one, ``SparseConv2d.crossover_density``.)
    ``theta = 0`` gives ``alpha theta^2 = 0``, so MC
    samples draw on the kept weights only; ``log_sigma2 = 0`` keeps ``log_alpha`` at its clamp (8),
    so the mask, and the sparsity, do not change. Returns the number of weights kept."""
    with torch.no_grad():
        keep = module.mask()
        module.theta.masked_fill_(~keep, 0.0)
        module.log_sigma2.masked_fill_(~keep, 0.0)
    return int(keep.sum().item())


def prune_to_sparse(model: nn.Module) -> dict[str, Any]:
    """Prune the sparse-VD layers of ``model`` (an ``nn.Sequential``) at their threshold, in place:
    every SparseVDLinear becomes its :class:`bdlkern.nn.SparseLinear` (CSR of the kept weights,
    theta and alpha theta^2); a sparse-VD convolution stays dense with its pruned weights zeroed
    (:func:`_prune_conv_in_place`).

    Returns:
        per layer: kept weights, shape, sparsity, storage (``"csr"`` or ``"dense"``) and the
        histogram of log alpha before pruning (``LOG_ALPHA_BINS``); and the whole network's pruned
        fraction.
    """
    layers, kept, total = {}, 0, 0
    for name, module in list(model.named_children()):
        if not isinstance(module, (bdlkern.nn.SparseVDLinear, *_SPARSE_VD_CONVS)):
            continue
        log_alpha = module.log_alpha.detach().cpu().numpy().ravel()
        counts, _ = np.histogram(np.clip(log_alpha, LOG_ALPHA_BINS[0], LOG_ALPHA_BINS[-1]), bins=LOG_ALPHA_BINS)
        size = module.theta.numel()
        if isinstance(module, bdlkern.nn.SparseVDLinear):
            sparse = module.to_sparse()
            setattr(model, name, sparse)
            nnz, storage = sparse.nnz, "csr"
        else:
            nnz, storage = _prune_conv_in_place(module), "dense"
        kept += nnz
        total += size
        layers[name] = {
            "shape": list(module.theta.shape),
            "nnz": nnz,
            "sparsity": 1.0 - nnz / size if size else 0.0,
            "storage": storage,
            "log_alpha_histogram": counts.tolist(),
        }
    return {
        "threshold": SPARSE_VD_THRESHOLD,
        "layers": layers,
        "weights_kept": kept,
        "weights_total": total,
        "sparsity": 1.0 - kept / total if total else 0.0,
        "log_alpha_bins": LOG_ALPHA_BINS.tolist(),
    }


class DenseLRTLinear(nn.Module):
    """Plain-PyTorch LRT layer: one sample per forward, ``x W^T + b + sqrt(x^2 V^T + 1e-8) * randn``
    (without ``W``, a variance layer: ``b + sqrt(x^2 V^T + 1e-8) * randn``) -- the eager MC baseline of
    the LRT models (pruned sparse VD, variational dropout, variance networks)."""

    def __init__(self, weight: torch.Tensor | None, variance: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.register_buffer("variance", variance.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_sparse(cls, sparse: bdlkern.nn.SparseLinear) -> "DenseLRTLinear":
        """The pruned layer's dense weights and variances."""
        weight, variance = sparse._dense_matrices()
        return cls(weight, variance, sparse.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = torch.sqrt(F.linear(x * x, self.variance) + 1e-8)
        if self.weight is not None:
            mean = F.linear(x, self.weight, self.bias)
        else:
            mean = torch.zeros_like(std) if self.bias is None else self.bias
        return mean + std * torch.randn_like(std)


class DenseLRTConv(nn.Module):
    """Plain-PyTorch LRT convolution on the pruned weights of a sparse-VD convolution: one sample
    per forward, ``conv(x, W) + b + sqrt(conv(x^2, V) + 1e-8) * randn`` -- the eager MC baseline of
    the sparse-VD conv net."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        with torch.no_grad():
            keep = layer.mask().to(layer.theta.dtype)
            self.register_buffer("weight", layer.theta.detach() * keep)
            self.register_buffer("variance", torch.exp(layer.log_alpha.detach()) * layer.theta.detach() ** 2 * keep)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.conv = (F.conv1d, F.conv2d, F.conv3d)[layer.theta.dim() - 3]
        self.geometry = (layer.stride, layer.padding, layer.dilation, layer.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.conv(x, self.weight, self.bias, *self.geometry)
        return mu + torch.sqrt(self.conv(x * x, self.variance, None, *self.geometry) + 1e-8) * torch.randn_like(mu)


def eager_sparse_vd(model: nn.Sequential) -> nn.Sequential:
    """The pruned sparse VD network in plain PyTorch: every SparseLinear a :class:`DenseLRTLinear`,
    every sparse-VD convolution a :class:`DenseLRTConv`."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, module in model.named_children():
        if isinstance(module, bdlkern.nn.SparseLinear):
            layers[name] = DenseLRTLinear.from_sparse(module)
        elif isinstance(module, _SPARSE_VD_CONVS):
            layers[name] = DenseLRTConv(module)
        else:
            layers[name] = copy.deepcopy(module)
    return nn.Sequential(layers).train()


# ---- the conv section -----------------------------------------------------------------------------
#: The conv nets' channels: ``conv1`` 1 -> 8 and ``conv2`` 8 -> 16, 3x3 with padding 1, each
#: followed by ReLU and 2x2 max pooling (8x8 -> 4x4 -> 2x2), then ``fc``: 16 * 2 * 2 -> 10. Narrow:
#: MC inference of S = 64 samples runs them on S * 540 images, in the timing loops too.
CONV_CHANNELS = (8, 16)
CONV_KERNEL = 3
#: The side of the digit images the conv nets take (``[N, 1, 8, 8]``).
IMAGE_SIDE = 8


def lenet(widths: Sequence[int], dropout: float = 0.0, side: int = IMAGE_SIDE) -> nn.Sequential:
    """A LeNet-style conv net for ``widths = (in_channels, conv channels..., classes)`` on
    ``side x side`` images: ``conv1, relu1, pool1, [drop2], conv2, relu2, pool2, ..., flatten,
    [drop_fc], fc`` (3x3 convolutions with padding 1, 2x2 max pooling).

    Args:
        widths: channels, at least ``(in, one conv, classes)``.
        dropout: if > 0, ``nn.Dropout2d(dropout)`` (one flag per channel) before every convolution
            but the first, and ``nn.Dropout(dropout)`` before ``fc``.
        side: the input images' side; each pooling halves it.
    """
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    channels = list(widths[:-1])
    for i, (fan_in, fan_out) in enumerate(zip(channels[:-1], channels[1:]), start=1):
        if i > 1 and dropout > 0:
            layers[f"drop{i}"] = nn.Dropout2d(dropout)
        layers[f"conv{i}"] = nn.Conv2d(fan_in, fan_out, CONV_KERNEL, padding=CONV_KERNEL // 2)
        layers[f"relu{i}"] = nn.ReLU()
        layers[f"pool{i}"] = nn.MaxPool2d(2)
        side //= 2
    layers["flatten"] = nn.Flatten()
    if dropout > 0:
        layers["drop_fc"] = nn.Dropout(dropout)
    layers["fc"] = nn.Linear(channels[-1] * side * side, widths[-1])
    return nn.Sequential(layers)


def _build_conv_mc_dropout(widths: Sequence[int]) -> nn.Module:
    # As for the MLP: a plain PyTorch model, converted in place. nn.Dropout2d -> nn.Conv2d becomes
    # an MCDropoutConv2d with channel masks, nn.Dropout -> nn.Linear an MCDropoutLinear.
    return bdlkern.nn.convert(lenet(widths, dropout=MC_DROPOUT_P))


def _build_conv_concrete(widths: Sequence[int]) -> nn.Module:
    # The paper's wrapper API around the plain net's layers (same initial weights): spatial
    # Concrete dropout (one flag per channel) before every convolution but the first, element-wise
    # Concrete dropout before the linear layer.
    model = lenet(widths)
    options = {"init_p": CONCRETE_INIT_P, "temperature": CONCRETE_TEMPERATURE, **concrete_coefficients()}
    convs = [name for name, m in model.named_children() if isinstance(m, nn.Conv2d)]
    for name in convs[1:]:
        setattr(model, name, bdlkern.nn.ConcreteDropout2d(getattr(model, name), **options))
    model.fc = bdlkern.nn.ConcreteDropout(model.fc, **options)
    return model


def _build_conv_sparse_vd(widths: Sequence[int]) -> nn.Module:
    # Every layer of the plain net (same initial weights) becomes its sparse-VD layer.
    model = lenet(widths)
    options = {"threshold": SPARSE_VD_THRESHOLD, "log_sigma2_init": SPARSE_VD_LOG_SIGMA2_INIT}
    for name, m in list(model.named_children()):
        if isinstance(m, nn.Conv2d):
            setattr(model, name, bdlkern.nn.SparseVDConv2d.from_conv(m, **options))
    fc = bdlkern.nn.SparseVDLinear(model.fc.in_features, model.fc.out_features, **options)
    with torch.no_grad():
        fc.theta.copy_(model.fc.weight)
        fc.bias.copy_(model.fc.bias)
    model.fc = fc
    return model


# ---- variational dropout and variance networks (issue 19) --------------------------------------------
#: Variational dropout (Kingma et al. 2015): alpha per input unit, starting at 0.25 (a Gaussian
#: dropout of rate 0.2); the log alphas learn at this multiple of the weights' rate.
VD_INIT_ALPHA = 0.25
VD_ALPHA_LR_SCALE = 10.0
#: Variance networks (Neklyudov et al. 2018): the read-out learns at this multiple of the MLPs' rate
#: and the log-variances at this multiple of the read-out's (they move in log space).
VARIANCE_LR = (3.0, 10.0)


def _build_variational_dropout(widths: Sequence[int]) -> nn.Module:
    return mlp(
        widths,
        linear=lambda fan_in, fan_out: bdlkern.nn.VariationalDropoutLinear(
            fan_in, fan_out, alpha="input", init_alpha=VD_INIT_ALPHA
        ),
    )


def _vd_groups(model: nn.Module, settings: Settings) -> list[dict[str, Any]]:
    return _scaled_groups(model, "log_alpha", settings.lr, VD_ALPHA_LR_SCALE)


def mean_alpha(model: nn.Module) -> dict[str, float]:
    """Layer name -> mean learnt alpha of a variational-dropout layer (its Gaussian noise variance)."""
    return {
        name: m.alpha().mean().item()
        for name, m in model.named_modules()
        if isinstance(m, bdlkern.nn.VariationalDropoutLinear)
    }


def _build_variance(widths: Sequence[int]) -> nn.Module:
    # Variance layers (zero-mean weights, no bias) for the hidden layers, the plain read-out fcL: the
    # hidden units carry their information in the variance, which the ReLU turns into a mean.
    model = mlp(widths, linear=lambda fan_in, fan_out: bdlkern.nn.VarianceLinear(fan_in, fan_out, bias=False))
    last = f"fc{len(widths) - 1}"
    setattr(model, last, nn.Linear(widths[-2], widths[-1]))
    return model


def _variance_groups(model: nn.Module, settings: Settings) -> list[dict[str, Any]]:
    base, scale = VARIANCE_LR
    return _scaled_groups(model, "log_sigma2", settings.lr * base, scale)


#: Gaussian dropout (Srivastava et al. 2014; learnt rate: Kingma et al. 2015): the initial rate p
#: (alpha = p / (1 - p)) of the GaussianDropout before the hidden and output layers.
GAUSSIAN_P = MC_DROPOUT_P


def _build_gaussian(widths: Sequence[int]) -> nn.Module:
    # The plain MLP's nn.Dropout slots hold GaussianDropout layers with a learnt alpha per unit.
    model = mlp(widths, dropout=GAUSSIAN_P)
    for name, module in list(model.named_children()):
        if isinstance(module, nn.Dropout):
            width = widths[int(name.removeprefix("drop"))]
            setattr(model, name, bdlkern.nn.GaussianDropout(GAUSSIAN_P, learn_alpha=True, num_features=width))
    return model


def _gaussian_groups(model: nn.Module, settings: Settings) -> list[dict[str, Any]]:
    return _scaled_groups(model, "log_alpha", settings.lr, VD_ALPHA_LR_SCALE)


def gaussian_alpha(model: nn.Module) -> dict[str, float]:
    """Layer name -> mean learnt alpha of a GaussianDropout layer."""
    return {
        name: m.alpha().mean().item() for name, m in model.named_modules() if isinstance(m, bdlkern.nn.GaussianDropout)
    }


class EagerGaussianDropout(nn.Module):
    """Plain-PyTorch Gaussian dropout with a layer's alpha: ``x * (1 + sqrt(alpha) * randn)`` -- the
    eager MC baseline of the Gaussian-dropout MLP."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.register_buffer("std", layer.alpha().detach().sqrt().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + self.std * torch.randn_like(x))


def eager_lrt(model: nn.Sequential) -> nn.Sequential:
    """A variational-dropout, variance or Gaussian-dropout MLP in plain PyTorch: every LRT layer a
    :class:`DenseLRTLinear` with its weights and variances, every GaussianDropout an
    :class:`EagerGaussianDropout`."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    with torch.no_grad():
        for name, module in model.named_children():
            if isinstance(module, bdlkern.nn.VariationalDropoutLinear):
                variance = module.alpha() * module.theta**2
                layers[name] = DenseLRTLinear(module.theta, variance, module.bias)
            elif isinstance(module, bdlkern.nn.VarianceLinear):
                layers[name] = DenseLRTLinear(None, module.weight_variance, module.bias)
            elif isinstance(module, bdlkern.nn.GaussianDropout):
                layers[name] = EagerGaussianDropout(module)
            else:
                layers[name] = copy.deepcopy(module)
    return nn.Sequential(layers).train()


# ---- the methods ----------------------------------------------------------------------------------
#: The models of the demo, in report order. A new method is one more entry; those with
#: ``default=False`` run only when named with ``--methods``.
METHODS: tuple[Method, ...] = (
    Method(
        name="plain",
        summary="nn.Linear MLP without dropout: deterministic, one forward pass (zero epistemic uncertainty)",
        build=mlp,
    ),
    Method(
        name="mc_dropout",
        summary=(
            f"the plain MLP with nn.Dropout(p={MC_DROPOUT_P}) before the hidden and output layers, "
            "converted by bdlkern.nn.convert into MCDropoutLinear layers (Gal & Ghahramani 2016)"
        ),
        build=_build_mc_dropout,
        layer_stats=LayerStats("p", "dropout rate p (fixed)", dropout_rates),
        eager_reference=eager_equivalent,
    ),
    Method(
        name="concrete",
        summary=(
            "ConcreteDropoutLinear layers (dropout before every layer, input included) that learn "
            "their dropout rate (Gal, Hron & Kendall 2017)"
        ),
        build=_build_concrete,
        extra_loss=bdlkern.nn.regularization,
        param_groups=_rate_groups,
        layer_stats=LayerStats("p", "learnt dropout rate p", dropout_rates, learnt=True),
        eager_reference=eager_equivalent,
    ),
    Method(
        name="sparse_vd",
        summary=(
            "SparseVDLinear layers trained with the local reparameterisation trick and the KL term "
            f"(Molchanov et al. 2017), then pruned at log alpha >= {SPARSE_VD_THRESHOLD:g} to SparseLinear "
            "(CSR); MC samples are LRT draws on the kept weights"
        ),
        build=_build_sparse_vd,
        extra_loss=bdlkern.nn.kl_divergence,
        extra_loss_warmup=SPARSE_VD_KL_WARMUP,
        param_groups=_sparse_vd_groups,
        post_train=prune_to_sparse,
        layer_stats=LayerStats("sparsity", "fraction of weights pruned", sparsity, learnt=True),
        eager_reference=eager_sparse_vd,
    ),
    Method(
        name="ard",
        summary=(
            "the sparse-VD MLP with the ARD prior instead of the log-uniform one: the exact KL 0.5 log(1 + 1/alpha) "
            "of a Gaussian prior whose variance is set by empirical Bayes (Kharitonov, Molchanov & Vetrov 2018), "
            f"pruned at log alpha >= {SPARSE_VD_THRESHOLD:g} to SparseLinear (CSR)"
        ),
        build=_build_ard,
        extra_loss=bdlkern.nn.kl_divergence,
        extra_loss_warmup=SPARSE_VD_KL_WARMUP,
        param_groups=_sparse_vd_groups,
        post_train=prune_to_sparse,
        layer_stats=LayerStats("sparsity", "fraction of weights pruned", sparsity, learnt=True),
        eager_reference=eager_sparse_vd,
    ),
    Method(
        name="variational_dropout",
        summary=(
            "VariationalDropoutLinear layers: Gaussian multiplicative noise w (1 + sqrt(alpha) eps) with alpha "
            "learnt per input unit, trained with the LRT and Kingma et al.'s KL approximation (Kingma, Salimans & "
            "Welling 2015)"
        ),
        build=_build_variational_dropout,
        extra_loss=bdlkern.nn.kl_divergence,
        param_groups=_vd_groups,
        layer_stats=LayerStats("alpha", "mean learnt alpha", mean_alpha, learnt=True),
        eager_reference=eager_lrt,
    ),
    Method(
        name="variance",
        summary=(
            "a variance network: VarianceLinear hidden layers whose weights have zero mean and a learnt variance "
            "(Neklyudov et al. 2018), a linear read-out; it predicts only as an ensemble of samples (its "
            "deterministic test accuracy, with the weights at their means, is chance)"
        ),
        build=_build_variance,
        param_groups=_variance_groups,
        eager_reference=eager_lrt,
        default=False,
    ),
    Method(
        name="gaussian_dropout",
        summary=(
            f"the plain MLP with GaussianDropout (x (1 + sqrt(alpha) eps), alpha starting at p / (1 - p), p = "
            f"{GAUSSIAN_P}) before the hidden and output layers, alpha learnt per unit with Kingma et al.'s KL"
        ),
        build=_build_gaussian,
        extra_loss=bdlkern.nn.kl_divergence,
        param_groups=_gaussian_groups,
        layer_stats=LayerStats("alpha", "mean learnt alpha", gaussian_alpha, learnt=True),
        eager_reference=eager_lrt,
        default=False,
    ),
    # The conv section: LeNet-style nets on the digits as [N, 1, 8, 8] images (see lenet).
    Method(
        name="conv_mc_dropout",
        summary=(
            f"conv net with nn.Dropout2d(p={MC_DROPOUT_P}) before conv2 and nn.Dropout(p={MC_DROPOUT_P}) before fc, "
            "converted by bdlkern.nn.convert into MCDropoutConv2d (channel masks) and MCDropoutLinear"
        ),
        build=_build_conv_mc_dropout,
        layer_stats=LayerStats("p", "dropout rate p (fixed)", dropout_rates),
        eager_reference=eager_equivalent,
        conv=True,
    ),
    Method(
        name="conv_concrete",
        summary=(
            "conv net with ConcreteDropout2d (spatial, one flag per channel) around conv2 and ConcreteDropout "
            "around fc, learning their dropout rates"
        ),
        build=_build_conv_concrete,
        extra_loss=bdlkern.nn.regularization,
        param_groups=_rate_groups,
        layer_stats=LayerStats("p", "learnt dropout rate p", dropout_rates, learnt=True),
        eager_reference=eager_equivalent,
        conv=True,
    ),
    Method(
        name="conv_sparse_vd",
        summary=(
            "conv net of SparseVDConv2d layers and a SparseVDLinear (LRT, KL term / N_train), pruned at log alpha "
            f">= {SPARSE_VD_THRESHOLD:g}: the convolutions stay dense with the pruned weights zeroed, fc becomes "
            "SparseLinear (CSR)"
        ),
        build=_build_conv_sparse_vd,
        extra_loss=bdlkern.nn.kl_divergence,
        extra_loss_warmup=SPARSE_VD_KL_WARMUP,
        param_groups=_sparse_vd_groups,
        post_train=prune_to_sparse,
        layer_stats=LayerStats("sparsity", "fraction of weights pruned", sparsity, learnt=True),
        eager_reference=eager_sparse_vd,
        conv=True,
    ),
)
