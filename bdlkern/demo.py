"""``python -m bdlkern.demo``: Bayesian MLPs on scikit-learn's digits, end to end (``make demo``).

What it does:

1. **Data.** scikit-learn's bundled 8x8 digits (1797 images, no download), scaled to [0, 1] and
   flattened to 64 features; one fixed stratified 70/30 train/test split (split seed 0, whatever
   ``--seed`` says, so every run sees the same data).
2. **Out-of-distribution sets**, both made from the *test* digits (:data:`OOD_TRANSFORMS`):
   ``rot90`` (each image rotated by 90 degrees, ``np.rot90``) and ``inverted`` (``1 - x``).
3. **Models** (:data:`METHODS`), all MLPs 64-256-256-10 with ReLU, trained with Adam on the same
   minibatches from the same initial weights where the architectures agree:

   * ``plain``: ``nn.Linear`` layers, no dropout (deterministic);
   * ``mc_dropout``: the plain MLP with ``nn.Dropout(p)`` before the hidden and output layers,
     turned into :class:`bdlkern.nn.MCDropoutLinear` layers by :func:`bdlkern.nn.convert`;
   * ``concrete``: :class:`bdlkern.nn.ConcreteDropoutLinear` layers that learn their dropout rate.

4. **Evaluation** by :func:`bdlkern.uncertainty.mc_predict` with S samples: accuracy, NLL, ECE,
   Brier score, OOD AUROC by mutual information and by predictive entropy per OOD set, and the
   time of MC inference through bdlkern's fused kernels against the faster of the two ways to
   write it without bdlkern: the same network in plain PyTorch with ``nn.Dropout`` active, run S
   times in a loop, or run once on the input replicated S times (``x.expand(S, ...)``).
5. **Outputs** in ``--out`` (default ``results/``): ``report.json``, ``report.md`` and the figures
   of :data:`FIGURES`; the table is printed too.

Adding a method (e.g. sparse variational dropout) is adding one :class:`Method` to
:data:`METHODS`: how to build it, the extra per-dataset loss term (``bdlkern.nn.regularization``
collects Concrete regularisers and KL terms alike), an optional post-training step (pruning), the
per-layer numbers to report (learnt rate, sparsity) and the plain-PyTorch equivalent to time.

Exit status: 0 on success, 2 for bad arguments (argparse's usage errors, CUDA asked for but absent).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import bdlkern
from bdlkern import uncertainty as U

SCHEMA_VERSION = 1

#: The hidden widths of every MLP; inputs are the 64 pixels, outputs the 10 digit classes.
HIDDEN = (256, 256)
#: Fraction of the digits held out for testing, and the seed of that (stratified) split.
TEST_FRACTION = 0.3
SPLIT_SEED = 0
#: Equal-width confidence bins of the ECE and the reliability diagrams.
ECE_BINS = 15
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


# ---- settings -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run (recorded in ``report.json``).

    Attributes:
        epochs: training epochs per model.
        samples: Monte Carlo samples S for evaluation and timing.
        batch_size: training minibatch size.
        lr: Adam learning rate.
        seed: seeds the initial weights, the minibatch order and every dropout mask.
        device: ``"cpu"`` or ``"cuda"``.
        quick: the reduced run of ``--quick`` (tests).
        timing_target_s, timing_repeats: one timed measurement lasts about ``timing_target_s``;
            ``timing_repeats`` of them per variant (:func:`bdlkern.bench.time_fns`).
    """

    epochs: int = 60
    samples: int = 64
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    quick: bool = False
    timing_target_s: float = 0.2
    timing_repeats: int = 5


#: What ``--quick`` changes: a few epochs, few samples, short measurements (seconds in all).
QUICK = {"epochs": 5, "samples": 8, "timing_target_s": 0.01, "timing_repeats": 2}


# ---- data -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OODTransform:
    """A held-out transformation of the test digits that makes an out-of-distribution set.

    Attributes:
        name: short key (``report.json``, table headers).
        description: one sentence for the report.
        apply: images ``[N, 8, 8]`` in [0, 1] -> transformed images of the same shape.
    """

    name: str
    description: str
    apply: Callable[[np.ndarray], np.ndarray]


#: The out-of-distribution sets, each made from the test digits.
OOD_TRANSFORMS: tuple[OODTransform, ...] = (
    OODTransform(
        "rot90",
        "test digits rotated by 90 degrees counter-clockwise (np.rot90 of each 8x8 image)",
        lambda images: np.rot90(images, k=1, axes=(1, 2)),
    ),
    OODTransform(
        "inverted",
        "test digits with inverted intensities, 1 - x (white background, dark strokes)",
        lambda images: 1.0 - images,
    ),
)


@dataclass
class Data:
    """The digits split, flattened to ``[N, 64]`` float32 tensors on the run's device.

    Attributes:
        x_train, y_train, x_test, y_test: the stratified split (labels int64).
        ood: OOD set name -> inputs ``[N_test, 64]`` (the transformed test digits).
        test_images: the test images ``[N_test, 8, 8]`` (NumPy, for the example figure).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    ood: dict[str, torch.Tensor]
    test_images: np.ndarray

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max().item()) + 1


def load_data(device: torch.device | str = "cpu") -> Data:
    """scikit-learn's digits, scaled to [0, 1], split 70/30 stratified with seed :data:`SPLIT_SEED`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel values are 0..16
    train_images, test_images, y_train, y_test = train_test_split(
        images, digits.target, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED
    )

    def flat(batch: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32).reshape(len(batch), -1)).to(device)

    def labels(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y.astype(np.int64)).to(device)

    return Data(
        x_train=flat(train_images),
        y_train=labels(y_train),
        x_test=flat(test_images),
        y_test=labels(y_test),
        ood={t.name: flat(t.apply(test_images)) for t in OOD_TRANSFORMS},
        test_images=test_images,
    )


# ---- methods --------------------------------------------------------------------------------------
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


# ---- training -------------------------------------------------------------------------------------
@dataclass
class History:
    """Per-epoch record of a training run.

    Attributes:
        loss: mean training objective over the epoch's minibatches (cross-entropy + extra term / N;
            the Concrete regulariser can make it negative).
        cross_entropy: the cross-entropy part of it alone.
        test_accuracy: deterministic (eval-mode) test accuracy after each epoch.
        layers: layer name -> the method's learnt per-layer value, at initialisation (index 0) and
            after each epoch; empty when the method has no learnt layer statistics.
        seconds: wall time of the training.
    """

    loss: list[float] = field(default_factory=list)
    cross_entropy: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    layers: dict[str, list[float]] = field(default_factory=dict)
    seconds: float = 0.0

    def record_layers(self, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.layers.setdefault(name, []).append(value)


def _deterministic_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def train(method: Method, model: nn.Module, data: Data, settings: Settings) -> History:
    """Adam on minibatches of cross-entropy (+ the method's extra term / N), ``settings.epochs`` epochs.

    The minibatch order comes from a generator seeded with ``settings.seed`` (the same batches for
    every method); dropout masks come from torch's generator, seeded by the caller.
    """
    num_train = data.x_train.shape[0]
    groups = model.parameters() if method.param_groups is None else method.param_groups(model, settings)
    optimizer = torch.optim.Adam(groups, lr=settings.lr)
    order = torch.Generator().manual_seed(settings.seed)
    tracked = method.layer_stats if method.layer_stats is not None and method.layer_stats.learnt else None
    history = History()
    if tracked is not None:
        history.record_layers(tracked.read(model))
    start = time.perf_counter()
    # The bar shows in a terminal and stays out of logs and captured output (disable=None).
    bar = tqdm(range(settings.epochs), desc=f"{method.name:>10}", unit="epoch", file=sys.stderr, disable=None)
    warmup_epochs = method.extra_loss_warmup * settings.epochs
    for epoch in bar:
        extra_weight = min(1.0, epoch / warmup_epochs) if warmup_epochs > 0 else 1.0
        model.train()
        total = total_ce = torch.zeros((), device=data.x_train.device)  # summed on the device: no sync per step
        batches = 0
        for index in torch.randperm(num_train, generator=order).split(settings.batch_size):
            index = index.to(data.x_train.device)
            ce = F.cross_entropy(model(data.x_train[index]), data.y_train[index])
            loss = ce if method.extra_loss is None else ce + extra_weight * method.extra_loss(model) / num_train
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total = total + loss.detach()
            total_ce = total_ce + ce.detach()
            batches += 1
        history.loss.append(total.item() / batches)
        history.cross_entropy.append(total_ce.item() / batches)
        history.test_accuracy.append(_deterministic_accuracy(model, data.x_test, data.y_test))
        if tracked is not None:
            history.record_layers(tracked.read(model))
        bar.set_postfix(loss=f"{history.loss[-1]:.3f}", test_acc=f"{history.test_accuracy[-1]:.3f}")
    history.seconds = time.perf_counter() - start
    return history


# ---- evaluation -----------------------------------------------------------------------------------
def _mc_summary(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``probs [S, N, C]`` -> the predictive mean and the mutual information (the entropy of the
    mean minus the mean entropy), as ``mc_predict`` computes them."""
    mean_probs = probs.mean(0)
    mutual_information = (U.entropy(mean_probs) - U.entropy(probs).mean(0)).clamp(min=0.0)
    return mean_probs, mutual_information


def eager_mc_predict(
    model: nn.Module, x: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo prediction the way it is written without bdlkern, as a loop: ``num_samples``
    forward passes of a train-mode model (``nn.Dropout`` active), then the predictive mean, its
    entropy, the expected entropy and their difference, as ``mc_predict`` computes them.

    Returns:
        ``(mean_probs [N, C], mutual_information [N])``.
    """
    with torch.no_grad():
        return _mc_summary(torch.stack([model(x).softmax(-1) for _ in range(num_samples)]))  # [S, N, C]


def eager_batched_mc_predict(
    model: nn.Module, x: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The other way to write it without bdlkern: one forward pass of the train-mode model on the
    input replicated ``num_samples`` times (``x.expand(S, *x.shape)``), so every dropout layer
    draws S masks at once and each layer runs one batched GEMM; S times the activation memory.
    Same summaries as :func:`eager_mc_predict`."""
    with torch.no_grad():
        return _mc_summary(model(x.expand(num_samples, *x.shape)).softmax(-1))


def prediction_summary(pred: U.MCPrediction) -> dict[str, Any]:
    """What a set of inputs got: mean mutual information, predictive entropy and confidence (the
    largest mean probability), and the most predicted class with the fraction of inputs in it."""
    counts = torch.bincount(pred.prediction, minlength=pred.mean_probs.shape[1])
    top = int(counts.argmax().item())
    return {
        "mean_mutual_information": pred.mutual_information.mean().item(),
        "mean_predictive_entropy": pred.predictive_entropy.mean().item(),
        "mean_confidence": pred.mean_probs.max(-1).values.mean().item(),
        "most_predicted_class": top,
        "most_predicted_fraction": counts[top].item() / pred.prediction.numel(),
    }


@dataclass
class Evaluation:
    """MC-prediction metrics of one model (see :func:`evaluate`); ``predictions`` maps ``"test"``
    and each OOD set name to its :class:`bdlkern.uncertainty.MCPrediction` (not serialised)."""

    accuracy: float
    nll: float
    ece: float
    brier: float
    ood: dict[str, dict[str, Any]]
    predictions: dict[str, U.MCPrediction]

    def to_json(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "nll": self.nll,
            "ece": self.ece,
            "brier": self.brier,
            **prediction_summary(self.predictions["test"]),
            "ood": self.ood,
        }


def evaluate(model: nn.Module, data: Data, num_samples: int) -> Evaluation:
    """``mc_predict(model.eval(), x, S, seed=0)`` on the test set and each OOD set.

    Metrics on the test set: accuracy of the predictive mean, NLL, ECE (:data:`ECE_BINS` bins),
    Brier score. Per OOD set: AUROC of telling it from the test set by mutual information and by
    predictive entropy (OOD = positive), and its :func:`prediction_summary`.
    """
    model.eval()
    predictions = {"test": U.mc_predict(model, data.x_test, num_samples, seed=0)}
    for name, x in data.ood.items():
        predictions[name] = U.mc_predict(model, x, num_samples, seed=0)
    test, y = predictions["test"], data.y_test
    ood = {
        name: {
            "auroc_mutual_information": U.ood_auroc(test.mutual_information, predictions[name].mutual_information),
            "auroc_predictive_entropy": U.ood_auroc(test.predictive_entropy, predictions[name].predictive_entropy),
            **prediction_summary(predictions[name]),
        }
        for name in data.ood
    }
    return Evaluation(
        accuracy=(test.prediction == y).float().mean().item(),
        nll=U.nll(test.mean_probs, y),
        ece=U.expected_calibration_error(test.mean_probs, y, n_bins=ECE_BINS),
        brier=U.brier(test.mean_probs, y),
        ood=ood,
        predictions=predictions,
    )


@dataclass
class MCTiming:
    """MC inference on the test set, timed (median seconds per call, see :func:`time_mc_inference`).

    Attributes:
        samples, rows: S and the number of test digits.
        bdlkern_s: ``mc_predict`` through bdlkern's fused kernels.
        eager_loop_s: :func:`eager_mc_predict` (S passes) on the plain-PyTorch equivalent (None for
            every eager field: a deterministic model).
        eager_batched_s: :func:`eager_batched_mc_predict` (one pass on the replicated input).
        eager_accuracy, eager_nll: what the eager loop's prediction scores (seeded), to show it is
            the same model: equal to bdlkern's up to Monte Carlo noise.
        eager_batched_accuracy: the same for the batched replication.
    """

    samples: int
    rows: int
    bdlkern_s: float
    eager_loop_s: float | None = None
    eager_batched_s: float | None = None
    eager_accuracy: float | None = None
    eager_nll: float | None = None
    eager_batched_accuracy: float | None = None

    @property
    def eager_baseline(self) -> str | None:
        """The faster way to do it in plain PyTorch: ``"loop"`` or ``"batched"``."""
        if self.eager_loop_s is None or self.eager_batched_s is None:
            return None
        return "batched" if self.eager_batched_s < self.eager_loop_s else "loop"

    @property
    def eager_s(self) -> float | None:
        """The time of the faster plain-PyTorch way (:attr:`eager_baseline`): what bdlkern is
        compared with."""
        baseline = self.eager_baseline
        return None if baseline is None else (self.eager_batched_s if baseline == "batched" else self.eager_loop_s)

    @property
    def speedup(self) -> float | None:
        """``eager_s / bdlkern_s``: how many times faster bdlkern's MC inference is than the faster
        plain-PyTorch way."""
        return None if self.eager_s is None else self.eager_s / self.bdlkern_s

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "eager_baseline": self.eager_baseline, "eager_s": self.eager_s, "speedup": self.speedup}


def time_mc_inference(model: nn.Module, eager: nn.Module | None, data: Data, settings: Settings) -> MCTiming:
    """Time MC inference on the whole test set with S samples: ``mc_predict(model.eval(), ...)``
    through bdlkern's fused kernels and, for a stochastic model, both plain-PyTorch ways on its
    equivalent ``eager`` (:func:`eager_mc_predict`, a loop of S passes, and
    :func:`eager_batched_mc_predict`, one pass on the replicated input), interleaved by
    :func:`bdlkern.bench.time_fns`; bdlkern is compared with the faster of the two."""
    from bdlkern import bench

    x, S = data.x_test, settings.samples
    model.eval()
    fns: dict[str, Callable[[], Any]] = {"bdlkern": lambda: U.mc_predict(model, x, S, seed=0)}
    if eager is not None:
        fns["eager loop"] = lambda: eager_mc_predict(eager, x, S)
        fns["eager batched"] = lambda: eager_batched_mc_predict(eager, x, S)
    timings = bench.time_fns(
        fns, settings.device, target_s=settings.timing_target_s, repeats=settings.timing_repeats
    )
    result = MCTiming(samples=S, rows=x.shape[0], bdlkern_s=timings["bdlkern"]["median_s"])
    if eager is not None:
        torch.manual_seed(settings.seed)
        mean_probs, _ = eager_mc_predict(eager, x, S)
        torch.manual_seed(settings.seed)
        batched_probs, _ = eager_batched_mc_predict(eager, x, S)
        result.eager_loop_s = timings["eager loop"]["median_s"]
        result.eager_batched_s = timings["eager batched"]["median_s"]
        result.eager_accuracy = (mean_probs.argmax(-1) == data.y_test).float().mean().item()
        result.eager_nll = U.nll(mean_probs, data.y_test)
        result.eager_batched_accuracy = (batched_probs.argmax(-1) == data.y_test).float().mean().item()
    return result


# ---- one model, end to end ------------------------------------------------------------------------
@dataclass
class ModelResult:
    """What the demo learnt about one method (``report.json["models"][name]``, minus the model)."""

    method: Method
    model: nn.Module
    history: History
    evaluation: Evaluation
    mc_inference: MCTiming
    post_train: dict[str, Any] | None

    def to_json(self) -> dict[str, Any]:
        stats = self.method.layer_stats
        layers = None
        if stats is not None:
            layers = {
                "short": stats.short, "label": stats.label, "learnt": stats.learnt, "values": stats.read(self.model),
            }
        return {
            "summary": self.method.summary,
            "stochastic": self.method.stochastic,
            "architecture": repr(self.model),
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "metrics": self.evaluation.to_json(),
            "mc_inference": self.mc_inference.to_json(),
            "layers": layers,
            "post_train": self.post_train,
            "history": asdict(self.history),
        }


def run_method(method: Method, data: Data, settings: Settings) -> ModelResult:
    """Build (seeded with ``settings.seed``), train, post-process, evaluate and time one method."""
    torch.manual_seed(settings.seed)  # the same initial weights for the same architecture
    widths = (data.num_features, *HIDDEN, data.num_classes)
    model = method.build(widths).to(settings.device)
    history = train(method, model, data, settings)
    post = method.post_train(model) if method.post_train is not None else None
    with warnings.catch_warnings():
        if not method.stochastic:  # deterministic on purpose: its zero uncertainty is the point
            warnings.simplefilter("ignore", bdlkern.NoStochasticLayerWarning)
        evaluation = evaluate(model, data, settings.samples)
        eager = method.eager_reference(model) if method.eager_reference is not None else None
        mc_inference = time_mc_inference(model, eager, data, settings)
    return ModelResult(method, model, history, evaluation, mc_inference, post)


# ---- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A column of the results table: header, minimum width (printed table), the cell of a model
    record, and whether it holds numbers (right-aligned)."""

    header: str
    width: int
    cell: Callable[[str, Mapping[str, Any]], str]
    numeric: bool = True


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _layers_cell(record: Mapping[str, Any]) -> str:
    layers = record["layers"]
    if not layers:
        return "-"
    return f"{layers['short']} " + "/".join(f"{v:.2f}" for v in layers["values"].values())


def table_columns(ood_names: Sequence[str]) -> list[Column]:
    """The columns, two OOD AUROC columns per OOD set: by mutual information (MI) and by predictive
    entropy (H), the latter for every model (the plain one's MI is 0, its MI AUROC chance)."""
    columns = [
        Column("model", 11, lambda name, r: name, numeric=False),
        Column("acc", 6, lambda name, r: _fmt(r["metrics"]["accuracy"], ".4f")),
        Column("NLL", 6, lambda name, r: _fmt(r["metrics"]["nll"], ".4f")),
        Column("ECE", 6, lambda name, r: _fmt(r["metrics"]["ece"], ".4f")),
        Column("Brier", 6, lambda name, r: _fmt(r["metrics"]["brier"], ".4f")),
    ]
    for ood in ood_names:
        def auroc(name: str, r: Mapping[str, Any], ood: str = ood) -> str:
            return _fmt(r["metrics"]["ood"][ood]["auroc_mutual_information"], ".3f")

        def auroc_entropy(name: str, r: Mapping[str, Any], ood: str = ood) -> str:
            return _fmt(r["metrics"]["ood"][ood]["auroc_predictive_entropy"], ".3f")

        columns.append(Column(f"AUROC {ood} MI", 9, auroc))
        columns.append(Column(f"AUROC {ood} H", 9, auroc_entropy))
    columns += [
        Column("bdlkern ms", 10, lambda name, r: _fmt(r["mc_inference"]["bdlkern_s"], ".2f", 1e3)),
        Column("eager ms", 9, lambda name, r: _fmt(r["mc_inference"]["eager_s"], ".2f", 1e3)),
        Column("eager", 7, lambda name, r: r["mc_inference"]["eager_baseline"] or "-", numeric=False),
        Column("speed-up", 8, lambda name, r: _fmt(r["mc_inference"]["speedup"], ".2f")),
        Column("per layer", 16, lambda name, r: _layers_cell(r), numeric=False),
    ]
    return columns


def format_table(
    models: Mapping[str, Mapping[str, Any]], ood_names: Sequence[str], markdown: bool = False
) -> str:
    """The results table, fixed-width text or markdown, one row per model record."""
    columns = table_columns(ood_names)
    rows = [[c.cell(name, record) for c in columns] for name, record in models.items()]
    if markdown:
        lines = ["| " + " | ".join(c.header for c in columns) + " |",
                 "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(c.width, len(c.header), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if c.numeric else cell.ljust(w)
                         for c, cell, w in zip(columns, cells, widths)).rstrip()

    header = line([c.header for c in columns])
    return "\n".join([header, "-" * len(header), *(line(row) for row in rows)])


# ---- figures --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FigureSpec:
    """A figure of the report: stable file name, one-line description, and how to draw it."""

    file: str
    description: str
    draw: Callable[[Sequence[ModelResult], Data], Any]  # -> matplotlib Figure, or None (nothing to draw)


def _figure(ncols: int, nrows: int = 1, size: tuple[float, float] = (4.6, 4.2)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def draw_reliability(results: Sequence[ModelResult], data: Data):
    """One reliability diagram per model (:func:`bdlkern.uncertainty.reliability_diagram`)."""
    fig, axes = _figure(len(results))
    for ax, result in zip(axes[0], results):
        pred = result.evaluation.predictions["test"]
        U.reliability_diagram(pred.mean_probs, data.y_test, n_bins=ECE_BINS, ax=ax,
                              title=f"{result.method.name}: test accuracy {result.evaluation.accuracy:.3f}")
    fig.suptitle("Reliability of the MC predictive mean on the test digits")
    return fig


def draw_layer_stats(results: Sequence[ModelResult], data: Data):
    """Learnt per-layer values (e.g. Concrete dropout rates) over training, one panel per method."""
    tracked = [r for r in results if r.history.layers]
    if not tracked:
        return None
    fig, axes = _figure(len(tracked), size=(6.0, 4.2))
    for ax, result in zip(axes[0], tracked):
        for name, values in result.history.layers.items():
            ax.plot(range(len(values)), values, marker="." if len(values) < 30 else None, label=name)
        ax.set_xlabel("epoch (0 = initialisation)")
        ax.set_ylabel(result.method.layer_stats.label)
        ax.set_title(f"{result.method.name}: {result.method.layer_stats.label} per layer")
        ax.grid(alpha=0.3)
        ax.legend(title="layer")
    return fig


def draw_mutual_information(results: Sequence[ModelResult], data: Data, floor: float = 1e-5):
    """Histograms of mutual information on the test digits and each OOD set, per stochastic model.

    Log-spaced bins (the in-distribution values span decades); values below ``floor`` are counted
    in the first bin. Bar heights are fractions of each set, so the sets compare directly.
    """
    stochastic = [r for r in results if r.method.stochastic]
    if not stochastic:
        return None
    fig, axes = _figure(len(stochastic), size=(5.6, 4.2))
    for ax, result in zip(axes[0], stochastic):
        preds = result.evaluation.predictions
        top = max(p.mutual_information.max().item() for p in preds.values())
        bins = np.geomspace(floor, max(top, 10 * floor), 41)
        for name, pred in preds.items():
            label = "test (in-distribution)" if name == "test" else (
                f"{name} (AUROC {result.evaluation.ood[name]['auroc_mutual_information']:.3f})")
            values = np.clip(pred.mutual_information.cpu().numpy(), floor, None)
            ax.hist(values, bins=bins, weights=np.full(len(values), 1.0 / len(values)), histtype="step",
                    linewidth=1.6, label=label)
        ax.set_xscale("log")
        ax.set_xlabel(f"mutual information (nats, log scale; < {floor:g} in the first bin)")
        ax.set_ylabel("fraction of the set")
        ax.set_title(f"{result.method.name}: epistemic uncertainty, S = {preds['test'].samples.shape[0]}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return fig


def draw_training(results: Sequence[ModelResult], data: Data):
    """Training cross-entropy and deterministic test accuracy per epoch, every model."""
    fig, axes = _figure(2, size=(5.4, 4.0))
    loss_ax, acc_ax = axes[0]
    for result in results:
        epochs = range(1, len(result.history.cross_entropy) + 1)
        loss_ax.plot(epochs, result.history.cross_entropy, label=result.method.name)
        acc_ax.plot(epochs, result.history.test_accuracy, label=result.method.name)
    loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="training cross-entropy (nats, log scale)",
                title="Training cross-entropy (dropout on)")
    acc_ax.set(xlabel="epoch", ylabel="test accuracy (eval mode, no sampling)", title="Test accuracy during training")
    for ax in axes[0]:
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def draw_ood_examples(results: Sequence[ModelResult], data: Data, count: int = 8):
    """The first ``count`` test digits and their OOD transformations, one row per set."""
    rows = [("test", data.test_images[:count])] + [(t.name, t.apply(data.test_images[:count])) for t in OOD_TRANSFORMS]
    fig, axes = _figure(count, len(rows), size=(1.0, 1.15))
    for r, (name, images) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            ax.imshow(images[c], cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center")
    fig.suptitle("Test digits and the out-of-distribution sets made from them")
    return fig


def _pruned(results: Sequence[ModelResult]) -> list[ModelResult]:
    return [r for r in results if r.post_train is not None and r.post_train.get("layers")]


def draw_log_alpha(results: Sequence[ModelResult], data: Data):
    """Histogram of log alpha per layer at the end of training, with the pruning threshold."""
    pruned = _pruned(results)
    if not pruned:
        return None
    fig, axes = _figure(len(pruned), size=(6.0, 4.2))
    for ax, result in zip(axes[0], pruned):
        post = result.post_train
        edges = np.asarray(post["log_alpha_bins"])
        for name, layer in post["layers"].items():
            counts = np.asarray(layer["log_alpha_histogram"], dtype=float)
            ax.stairs(counts / counts.sum(), edges, label=f"{name} ({layer['sparsity']:.1%} pruned)", linewidth=1.6)
        ax.axvline(post["threshold"], color="k", linestyle="--", linewidth=1.0, label=f"threshold {post['threshold']:g}")
        ax.set_xlabel("log alpha (clamped to [-8, 8])")
        ax.set_ylabel("fraction of the layer's weights")
        ax.set_title(f"{result.method.name}: log alpha after training, {post['sparsity']:.1%} of weights pruned")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
    return fig


def draw_sparsity_pattern(results: Sequence[ModelResult], data: Data):
    """The kept weights of every pruned layer (black = kept), one panel per layer."""
    pruned = _pruned(results)
    if not pruned:
        return None
    panels = [(r, name, m) for r in pruned for name, m in r.model.named_children() if isinstance(m, bdlkern.nn.SparseLinear)]
    fig, axes = _figure(len(panels), size=(4.2, 4.4))
    for ax, (result, name, layer) in zip(axes[0], panels):
        kept = (layer.to_dense() != 0).cpu().numpy()
        ax.imshow(kept, cmap="gray_r", interpolation="nearest", aspect="auto")
        ax.set_xlabel(f"input feature (0-{layer.in_features - 1})")
        ax.set_ylabel(f"output feature (0-{layer.out_features - 1})")
        ax.set_title(f"{result.method.name}.{name}: {layer.nnz} kept ({layer.density:.1%})")
    fig.suptitle("Sparsity pattern after pruning (black: kept weight)")
    return fig


#: The figures written to ``--out``, in report order (a figure with nothing to draw is skipped).
FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("reliability.png", "reliability diagrams of the MC predictive mean on the test set, one panel per model",
               draw_reliability),
    FigureSpec("layer_stats.png",
               "learnt per-layer values over training, one panel per method that learns them (concrete: the rate p; "
               "sparse_vd: the pruned fraction)",
               draw_layer_stats),
    FigureSpec("mutual_information.png",
               "histograms of mutual information (BALD) on the test digits and each OOD set, per stochastic model",
               draw_mutual_information),
    FigureSpec("training.png", "training cross-entropy and eval-mode test accuracy per epoch, every model",
               draw_training),
    FigureSpec("ood_examples.png", "examples of the test digits and of each OOD transformation", draw_ood_examples),
    FigureSpec("log_alpha.png", "sparse VD: histogram of log alpha per layer after training, with the pruning threshold",
               draw_log_alpha),
    FigureSpec("sparsity_pattern.png", "sparse VD: the kept weights of every pruned layer (CSR pattern)",
               draw_sparsity_pattern),
)


def write_figures(results: Sequence[ModelResult], data: Data, out: Path) -> dict[str, str]:
    """Draw and save :data:`FIGURES`; returns file name -> description of those written.

    The figures are ``matplotlib.figure.Figure`` objects made without pyplot, so PNGs are rendered by
    the Agg canvas whatever pyplot's backend: headless, and nothing global changes.
    """
    written = {}
    for spec in FIGURES:
        fig = spec.draw(results, data)
        if fig is not None:
            fig.savefig(out / spec.file, dpi=110)
            written[spec.file] = spec.description
    return written


# ---- report ---------------------------------------------------------------------------------------
def build_report(
    results: Sequence[ModelResult],
    data: Data,
    settings: Settings,
    figures: Mapping[str, str],
    argv: Sequence[str],
    wall_s: float,
) -> dict[str, Any]:
    """Everything ``report.json`` holds: settings, data, OOD sets, machine, one record per model
    (:meth:`ModelResult.to_json`) and the figures written (file -> description)."""
    from bdlkern.bench import describe_machine

    concrete = {
        "length_scale": CONCRETE_LENGTH_SCALE,
        "tau": CONCRETE_TAU,
        "init_p": CONCRETE_INIT_P,
        "temperature": CONCRETE_TEMPERATURE,
        "rate_lr_scale": CONCRETE_RATE_LR_SCALE,
        **concrete_coefficients(),
        "objective": "mean cross-entropy + bdlkern.nn.regularization(model) / N_train",
    }
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
        "settings": {
            **asdict(settings),
            "hidden": list(HIDDEN),
            "optimizer": "Adam",
            "ece_bins": ECE_BINS,
            "mc_dropout_p": MC_DROPOUT_P,
            "concrete": concrete,
        },
        "data": {
            "dataset": "sklearn.datasets.load_digits (8x8, pixels / 16)",
            "features": data.num_features,
            "classes": data.num_classes,
            "train": data.x_train.shape[0],
            "test": data.x_test.shape[0],
            "split": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SPLIT_SEED}",
        },
        "ood": {t.name: t.description for t in OOD_TRANSFORMS},
        "machine": describe_machine(settings.device),
        "wall_seconds": wall_s,
        "models": {r.method.name: r.to_json() for r in results},
        "figures": dict(figures),
    }


def observations(report: Mapping[str, Any]) -> list[str]:
    """What the OOD numbers say, per OOD set and stochastic model (lines of report.md)."""
    models = {name: r for name, r in report["models"].items() if r["stochastic"]}
    lines = []
    for ood in report["ood"]:
        parts = []
        for name, record in models.items():
            o, test = record["metrics"]["ood"][ood], record["metrics"]
            parts.append(
                f"{name} has AUROC {o['auroc_mutual_information']:.3f} (mean mutual information "
                f"{o['mean_mutual_information']:.3g} vs {test['mean_mutual_information']:.3g} on the test digits), "
                f"predicts class {o['most_predicted_class']} for {o['most_predicted_fraction']:.1%} of them with mean "
                f"confidence {o['mean_confidence']:.2f} (test digits: {test['mean_confidence']:.2f})"
            )
        lines.append(f"- `{ood}`: " + "; ".join(parts) + ".")
        by_entropy = ", ".join(
            f"{name} {record['metrics']['ood'][ood]['auroc_predictive_entropy']:.3f}"
            for name, record in report["models"].items()
        )
        lines.append(f"- `{ood}` by predictive entropy, every model (the plain one included): AUROC {by_entropy}.")
    aurocs = [r["metrics"]["ood"][ood]["auroc_mutual_information"] for r in models.values() for ood in report["ood"]]
    if any(auroc < 0.5 for auroc in aurocs):
        lines.append(
            "- An AUROC below 0.5 means the set gets *less* mutual information than the test digits: the "
            "network extrapolates to it confidently and the dropout samples agree, so dropout uncertainty "
            "does not flag that shift."
        )
    return lines


_MC_SNIPPET = """\
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 256), nn.ReLU(),
                      nn.Dropout(p), nn.Linear(256, 10))
bdlkern.nn.convert(model)        # each nn.Dropout -> nn.Linear pair becomes one MCDropoutLinear
pred = bdlkern.uncertainty.mc_predict(model.eval(), x_test, S, seed=0)   # fused MC inference"""


def format_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the table, what it means, the models and the figures."""
    settings, models = report["settings"], report["models"]
    ood_names = list(report["ood"])
    machine = report["machine"]
    S = settings["samples"]
    lines = [
        "# bdlkern demo: Bayesian MLPs on scikit-learn's digits",
        "",
        f"{report['data']['train']} training and {report['data']['test']} test digits "
        f"({report['data']['split']}), {settings['epochs']} epochs of Adam (lr {settings['lr']}, batch "
        f"{settings['batch_size']}), seed {settings['seed']}, S = {S} Monte Carlo samples, device "
        f"{settings['device']}{' (quick run)' if settings['quick'] else ''}. Machine: {machine['cpu']}, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}. "
        f"Whole run {report['wall_seconds']:.0f} s.",
        "",
        format_table(models, ood_names, markdown=True),
        "",
        "## Columns",
        "",
        "- **acc, NLL, ECE, Brier**: of the MC predictive mean (`mc_predict(model.eval(), x_test, S, seed=0)`) "
        f"on the test digits; ECE with {settings['ece_bins']} equal-width bins.",
        "- **AUROC <set> MI**: how well the mutual information (BALD, the epistemic part of the predictive "
        "entropy) tells the out-of-distribution set from the test digits (0.5 = chance). The plain model "
        "has no epistemic uncertainty (its mutual information is 0 up to float rounding), so its MI AUROC "
        "is chance by construction.",
        "- **AUROC <set> H**: the same by the predictive entropy (total uncertainty), for every model: "
        "the score the plain network can offer, to compare the stochastic models with.",
        f"- **bdlkern ms / eager ms / eager / speed-up**: median time of MC inference on the {report['data']['test']} "
        f"test digits with S = {S}: `mc_predict` through bdlkern's fused kernels, against the faster of two ways "
        "to write it without bdlkern (the same network in plain PyTorch, `nn.Dropout` active, same summaries): "
        "`loop`, S forward passes, or `batched`, one forward pass on the input replicated S times "
        "(`x.expand(S, ...)`); the **eager** column names the faster, which the speed-up is over. "
        "bdlkern also runs the layers before the first dropout once instead of S times.",
        "- **per layer**: each method's per-layer numbers, in layer order ("
        + "; ".join(f"{name}: {r['layers']['label']}" for name, r in models.items() if r["layers"])
        + "); p is the drop probability of the layer's input.",
        "",
        "## Out-of-distribution sets",
        "",
        *(f"- `{name}`: {desc}." for name, desc in report["ood"].items()),
        "",
        "What the stochastic models do with them:",
        "",
        *observations(report),
        "",
        "## Models",
        "",
        *(f"- **{name}**: {record['summary']}." for name, record in models.items()),
        "",
        *(line for name, record in models.items()
          for line in (f"<details><summary>{name}: {record['parameters']:,} parameters</summary>", "",
                       "```text", record["architecture"], "```", "", "</details>", "")),
        "The MC-dropout model is an ordinary PyTorch model converted in place:",
        "",
        "```python",
        _MC_SNIPPET,
        "```",
        "",
        f"Concrete dropout: prior length-scale l = {settings['concrete']['length_scale']}, tau = "
        f"{settings['concrete']['tau']}; the layers hold `weight_regularizer = l^2 / tau = "
        f"{settings['concrete']['weight_regularizer']:g}` and `dropout_regularizer = 2 / tau = "
        f"{settings['concrete']['dropout_regularizer']:g}`, and the objective is `mean cross-entropy + "
        "bdlkern.nn.regularization(model) / N`: the paper's `l^2 / (tau N)` and `2 / (tau N)` on a mean loss. "
        f"The dropout logits learn at {settings['concrete']['rate_lr_scale']:g} times the weights' learning rate.",
        "",
        "## Figures",
        "",
    ]
    for file, description in report["figures"].items():
        lines += [f"- {description}:", "", f"  ![{file}]({file})", ""]
    return "\n".join(lines)


# ---- command line ---------------------------------------------------------------------------------
def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (bad values exit with status 2 and a usage message)."""
    parser = argparse.ArgumentParser(
        prog="python -m bdlkern.demo",
        description="Train plain, MC-dropout and Concrete-dropout MLPs on scikit-learn's digits; report "
        "accuracy, calibration, OOD detection and MC-inference speed (bdlkern vs eager PyTorch).",
    )
    add = parser.add_argument
    add("--out", default="results", metavar="DIR", help="output folder, created if missing (default: results)")
    add("--quick", action="store_true", help=f"a short run for tests: {QUICK}")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="where to train and run (default: cpu)")
    add("--samples", type=_int_at_least(1), metavar="S",
        help=f"Monte Carlo samples (default {Settings.samples}, quick {QUICK['samples']})")
    add("--epochs", type=_int_at_least(1), metavar="E",
        help=f"training epochs per model (default {Settings.epochs}, quick {QUICK['epochs']})")
    add("--seed", type=_int_at_least(0), default=0, help="seed of the weights, batches and masks (default 0)")
    add("--threads", type=_int_at_least(1), metavar="N", help="torch.set_num_threads(N) (default: torch's)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """:class:`Settings` from the parsed command line (quick defaults, then explicit values)."""
    settings = Settings(seed=args.seed, device=args.device, quick=args.quick)
    if args.quick:
        settings = replace(settings, **QUICK)
    if args.samples is not None:
        settings = replace(settings, samples=args.samples)
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    return settings


def _check_environment(args: argparse.Namespace) -> str | None:
    """The reason the run cannot start, or None."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            return "--device cuda, but torch sees no CUDA device"
        if not bdlkern.build_info()["cuda"]:
            return "--device cuda, but this bdlkern was built without its CUDA kernels (BDLKERN_CUDA=0)"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0, or 2 for bad arguments)."""
    args = parse_args(argv)
    problem = _check_environment(args)
    out = Path(args.out)
    if problem is None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = f"--out {out}: cannot create it ({e.strerror})"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)

    start = time.perf_counter()
    data = load_data(settings.device)
    print(
        f"bdlkern demo: digits, {data.x_train.shape[0]} train / {data.x_test.shape[0]} test, "
        f"{settings.epochs} epochs, S = {settings.samples}, device {settings.device}, "
        f"{torch.get_num_threads()} threads{', quick' if settings.quick else ''}"
    )
    results = []
    for method in METHODS:
        result = run_method(method, data, settings)
        print(
            f"  {method.name:<11} trained in {result.history.seconds:5.1f} s, "
            f"test accuracy {result.evaluation.accuracy:.4f}"
        )
        results.append(result)
    figures = write_figures(results, data, out)
    argv = ["python", "-m", "bdlkern.demo", *(sys.argv[1:] if argv is None else argv)]
    report = build_report(results, data, settings, figures, argv, time.perf_counter() - start)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(format_markdown(report) + "\n")

    print()
    print(format_table(report["models"], list(report["ood"])))
    print()
    print("OOD sets: " + "; ".join(f"{name}: {text}" for name, text in report["ood"].items()))
    print(
        f"AUROC: OOD detection by mutual information (MI) and by predictive entropy (H). Times: MC inference "
        f"with S = {settings.samples} on the {data.x_test.shape[0]} test digits; eager: the faster plain-PyTorch "
        "way (a loop of S passes, or one pass on the input replicated S times); speed-up = eager / bdlkern."
    )
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {len(figures)} figures "
          f"in {report['wall_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
