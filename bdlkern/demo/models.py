"""The demo's models: the :class:`Method` spec and :data:`METHODS` (plain, MC dropout, Concrete
dropout, sparse VD), the MLP builders, their per-layer statistics, sparse VD's pruning to CSR, and
the plain-PyTorch equivalents whose Monte Carlo inference bdlkern is timed against.
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
        build: ``build(widths)`` -> a fresh ``nn.Module`` mapping ``[N, widths[0]]`` to logits
            ``[N, widths[-1]]``; built on the CPU (moved to the device after).
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


_DROPOUT_LAYERS = (bdlkern.nn.MCDropoutLinear, bdlkern.nn.ConcreteDropoutLinear)


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """Layer name -> the drop probability of its input, for every bdlkern dropout layer."""
    return {name: float(m.p) for name, m in model.named_modules() if isinstance(m, _DROPOUT_LAYERS)}


def eager_equivalent(model: nn.Sequential) -> nn.Sequential:
    """The same network in plain PyTorch, in train mode: each bdlkern dropout layer becomes
    ``nn.Dropout(p)`` (its fixed or learnt rate) followed by an ``nn.Linear`` with a copy of its
    weights; other modules are copied. One forward pass is one Monte Carlo sample, with the hard
    Bernoulli masks that ``bdlkern.sampling`` draws."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, module in model.named_children():
        if isinstance(module, _DROPOUT_LAYERS):
            linear = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None,
                device=module.weight.device, dtype=module.weight.dtype,
            )
            with torch.no_grad():
                linear.weight.copy_(module.weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            layers[f"{name}_dropout"] = nn.Dropout(float(module.p))
            layers[name] = linear
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


def _sparse_vd_groups(model: nn.Module, settings: Settings) -> list[dict[str, Any]]:
    """Sparse VD's learning rates (:data:`SPARSE_VD_LR`): log sigma^2 must travel several units for
    a weight to be pruned, so it gets a larger step than theta."""
    lr, scale = SPARSE_VD_LR["short" if settings.epochs < SPARSE_VD_SHORT_EPOCHS else "full"]
    return _scaled_groups(model, "log_sigma2", lr, scale)


def sparsity(model: nn.Module) -> dict[str, float]:
    """Layer name -> fraction of its weights pruned (SparseVDLinear at its threshold, or a pruned
    SparseLinear)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, bdlkern.nn.SparseVDLinear):
            out[name] = m.sparsity()
        elif isinstance(m, bdlkern.nn.SparseLinear):
            out[name] = 1.0 - m.density
    return out


def prune_to_sparse(model: nn.Module) -> dict[str, Any]:
    """Replace every SparseVDLinear of ``model`` (an ``nn.Sequential``) by its pruned
    :class:`bdlkern.nn.SparseLinear` (CSR of the kept weights, theta and alpha theta^2), in place.

    Returns:
        per layer: kept weights, shape, sparsity and the histogram of log alpha before pruning
        (``LOG_ALPHA_BINS``); and the whole network's pruned fraction.
    """
    layers, kept, total = {}, 0, 0
    for name, module in list(model.named_children()):
        if not isinstance(module, bdlkern.nn.SparseVDLinear):
            continue
        log_alpha = module.log_alpha.detach().cpu().numpy().ravel()
        counts, _ = np.histogram(np.clip(log_alpha, LOG_ALPHA_BINS[0], LOG_ALPHA_BINS[-1]), bins=LOG_ALPHA_BINS)
        sparse = module.to_sparse()
        setattr(model, name, sparse)
        kept += sparse.nnz
        total += module.theta.numel()
        layers[name] = {
            "shape": list(module.theta.shape),
            "nnz": sparse.nnz,
            "sparsity": 1.0 - sparse.density,
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
    """Plain-PyTorch LRT layer on the pruned dense weights: one sample per forward,
    ``x W^T + b + sqrt(x^2 V^T + 1e-8) * randn`` -- the eager MC baseline of the sparse model."""

    def __init__(self, sparse: bdlkern.nn.SparseLinear):
        super().__init__()
        weight, variance = sparse._dense_matrices()
        self.register_buffer("weight", weight)
        self.register_buffer("variance", variance)
        self.register_buffer("bias", None if sparse.bias is None else sparse.bias.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = F.linear(x, self.weight, self.bias)
        return mu + torch.sqrt(F.linear(x * x, self.variance) + 1e-8) * torch.randn_like(mu)


def eager_sparse_vd(model: nn.Sequential) -> nn.Sequential:
    """The pruned sparse VD network in plain PyTorch: every SparseLinear a :class:`DenseLRTLinear`."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for name, module in model.named_children():
        layers[name] = DenseLRTLinear(module) if isinstance(module, bdlkern.nn.SparseLinear) else copy.deepcopy(module)
    return nn.Sequential(layers).train()



# ---- the methods ----------------------------------------------------------------------------------
#: The models of the demo, in report order. A new method is one more entry.
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
)
