"""Monte Carlo prediction and uncertainty metrics (pure PyTorch).

:func:`mc_predict` runs a network once inside ``bdlkern.sampling(S)`` and summarises the ``S``
Monte Carlo samples of its output:

* classification (logits ``[S, N, C]``): the predictive distribution ``mean_probs`` (the mean of
  the per-sample softmax), its entropy (total uncertainty), the expected per-sample entropy
  (aleatoric part) and their difference, the mutual information between prediction and weights
  (epistemic part; BALD, Houlsby et al. 2011, Gal et al. 2017);
* regression (outputs ``[S, N]`` or ``[S, N, D]``): the MC mean and (epistemic) variance.

The metrics take tensors and return Python floats: :func:`nll`, :func:`brier`,
:func:`expected_calibration_error`, :func:`gaussian_log_likelihood` (the test log-likelihood of
Gal & Ghahramani 2016) and :func:`ood_auroc`; :func:`reliability_diagram` draws the calibration
curve. Entropies are in nats.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from ._sampling import NoStochasticLayerWarning, current_sampling, sampling

if TYPE_CHECKING:  # matplotlib is imported lazily, only by reliability_diagram
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "MCPrediction",
    "NoStochasticLayerWarning",
    "mc_predict",
    "entropy",
    "nll",
    "brier",
    "expected_calibration_error",
    "gaussian_log_likelihood",
    "ood_auroc",
    "reliability_diagram",
]

_ROW_SUM_TOL = 1e-3  # how far a row of probabilities may sum from 1


# --------------------------------------------------------------------------------------------
# Argument checks. Every message starts with "<function>: <argument> ...".
# --------------------------------------------------------------------------------------------


def _check_tensor(fn: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_int(fn: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def _check_positive_float(fn: str, name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {value}")
    return value


def _check_floating(fn: str, name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} must not be empty, got shape {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"{fn}: {name} contains NaN")


def _check_probs(fn: str, probs: object, dim: int = -1, name: str = "probs") -> torch.Tensor:
    """A floating tensor of probabilities in [0, 1] whose slices along ``dim`` sum to 1."""
    probs = _check_tensor(fn, name, probs)
    _check_floating(fn, name, probs)
    if probs.dim() == 0:
        raise ValueError(f"{fn}: {name} must have at least one dimension, got a scalar")
    if (probs < 0).any() or (probs > 1).any():
        lo, hi = probs.min().item(), probs.max().item()
        raise ValueError(f"{fn}: {name} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")
    err = (probs.sum(dim, dtype=torch.float64) - 1.0).abs().max().item()
    if err > _ROW_SUM_TOL:
        raise ValueError(
            f"{fn}: {name} must sum to 1 along dim {dim} (tolerance {_ROW_SUM_TOL:g}), "
            f"largest deviation {err:.6g}"
        )
    return probs


def _check_classification(fn: str, probs: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [N, C] (checked by _check_probs) and integer targets [N] in [0, C), on probs' device."""
    probs = _check_tensor(fn, "probs", probs)
    if probs.dim() != 2:
        raise ValueError(f"{fn}: probs must be [N, C], got shape {tuple(probs.shape)}")
    probs = _check_probs(fn, probs)
    targets = _check_tensor(fn, "targets", targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: targets must be an integer tensor of class indices, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"{fn}: targets must be [N], got shape {tuple(targets.shape)}")
    if targets.shape[0] != probs.shape[0]:
        raise ValueError(
            f"{fn}: targets has {targets.shape[0]} entries but probs has {probs.shape[0]} rows"
        )
    num_classes = probs.shape[1]
    if (targets < 0).any() or (targets >= num_classes).any():
        raise ValueError(
            f"{fn}: targets must be class indices in [0, {num_classes}), got values in "
            f"[{targets.min().item()}, {targets.max().item()}]"
        )
    return probs, targets.to(device=probs.device, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Monte Carlo prediction
# --------------------------------------------------------------------------------------------


@dataclass
class MCPrediction:
    """The ``S`` Monte Carlo samples of a prediction and their summaries (see :func:`mc_predict`).

    Attributes:
        samples: the raw model outputs ``[S, N, ...]`` (logits for classification).
        mean_probs: ``[N, C]``, mean over samples of ``softmax(logits)`` (classification).
        predictive_entropy: ``[N]``, ``H[mean_probs]``, total uncertainty in nats (classification).
        expected_entropy: ``[N]``, mean over samples of ``H[softmax(logits_s)]``, the aleatoric
            part (classification).
        mutual_information: ``[N]``, ``predictive_entropy - expected_entropy`` clamped at 0, the
            epistemic part (BALD) (classification).
        prediction: ``[N]`` int64, ``mean_probs.argmax(-1)`` (classification).
        mean: ``[N]`` or ``[N, D]``, the MC mean of the samples (regression).
        variance: same shape as ``mean``, the MC (epistemic) variance (regression).

    Fields of the other task are None. Tensors live on the device of the model's output.
    """

    samples: torch.Tensor
    mean_probs: torch.Tensor | None = None
    predictive_entropy: torch.Tensor | None = None
    expected_entropy: torch.Tensor | None = None
    mutual_information: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    variance: torch.Tensor | None = None


def _entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # xlogy(0, 0) = 0, so classes of probability zero contribute nothing.
    return -torch.special.xlogy(probs, probs).sum(dim)


def _run_block(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, num_samples: int, seed: int | None
) -> tuple[torch.Tensor, bool]:
    """``model(x)`` in one ``sampling`` block: (``[S, ...]``, whether no MC layer ran). A
    deterministic model's output is broadcast over the samples."""
    with sampling(num_samples, seed=seed):
        state = current_sampling()
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"mc_predict: model must return a torch.Tensor, got {type(out).__name__}")
    # The block counts the MC layer calls: none means a deterministic model (never a guess from
    # the output's shape, which misfires when the batch size equals num_samples).
    if state.mc_layer_calls == 0:
        # No bdlkern MC layer ran: the model is deterministic, every sample is the same output.
        return out.unsqueeze(0).expand(num_samples, *out.shape).contiguous(), True
    if out.dim() < 2 or out.shape[0] != num_samples:
        raise ValueError(
            f"mc_predict: the model's output must have a leading sample dimension of size "
            f"num_samples={num_samples}, got shape {tuple(out.shape)}"
        )
    return out, False


#: torch's dropout modules that bdlkern does not sample (their masks are one draw, not S).
_TORCH_DROPOUTS = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def _no_stochastic_layer_message(model: object, num_samples: int) -> str:
    """What :func:`mc_predict` says when no bdlkern stochastic layer ran: the torch dropout
    modules it can see in ``model`` (by name), and that functional dropout is invisible."""
    found = []
    if isinstance(model, torch.nn.Module):
        found = [
            f"{name or '(the model itself)'} ({type(m).__name__})"
            for name, m in model.named_modules()
            if isinstance(m, _TORCH_DROPOUTS)
        ]
    message = (
        f"mc_predict: no bdlkern stochastic layer ran inside sampling({num_samples}), so the "
        f"{num_samples} samples are one deterministic output repeated and the epistemic uncertainty "
        "(mutual information, regression variance) is exactly 0."
    )
    if found:
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
        message += (
            f" The model has torch dropout modules that bdlkern does not sample: {shown}; replace them "
            "with bdlkern layers (bdlkern.nn.convert fuses nn.Dropout -> nn.Linear pairs into "
            "MCDropoutLinear; ConcreteDropout / ConcreteDropout2d wrap other layers)."
        )
    message += (
        " Functional dropout (F.dropout and friends) is invisible to bdlkern and is not sampled either."
        " For a model that is deterministic on purpose, ignore bdlkern.NoStochasticLayerWarning."
    )
    return message


def _no_stochastic_layer(model: object, num_samples: int, strict: bool) -> None:
    """Warns (or raises, ``strict``) that the samples of ``mc_predict`` are all the same; called
    once the output has passed its shape checks, so a malformed output gets its own error."""
    message = _no_stochastic_layer_message(model, num_samples)
    if strict:
        raise RuntimeError(message + " (strict=True)")
    warnings.warn(message, NoStochasticLayerWarning, stacklevel=3)


def mc_predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_samples: int,
    *,
    batch_size: int | None = None,
    seed: int | None = None,
    task: Literal["classification", "regression"] = "classification",
    strict: bool = False,
) -> MCPrediction:
    """Monte Carlo prediction: ``model(x)`` inside ``bdlkern.sampling(num_samples)``, summarised.

    The model runs under ``torch.no_grad()`` in whatever train/eval mode it is in (bdlkern MC
    layers sample inside ``sampling`` in either mode; call ``model.eval()`` first so that layers
    such as batch norm use their running statistics). The training flags of the model and its
    submodules are the same afterwards.

    A model without any bdlkern MC layer (no layer ran in the ``sampling`` block) is treated as
    deterministic: its output ``[N, ...]`` is repeated ``num_samples`` times, so its epistemic
    uncertainty (mutual information, regression variance) is exactly zero. Since that is usually a
    mistake (torch's ``nn.Dropout*`` modules and ``F.dropout`` are not sampled by bdlkern), it
    warns with :class:`NoStochasticLayerWarning`, naming the torch dropout modules it finds in the
    model, or raises with ``strict=True``. Silence the warning for a model that is deterministic
    on purpose (``warnings.simplefilter("ignore", bdlkern.NoStochasticLayerWarning)``).

    ``mc_predict`` opens its own ``sampling`` block, so it cannot be called inside one (blocks do
    not nest): it raises a ``RuntimeError`` naming both sample counts.

    Args:
        model: a callable (usually an ``nn.Module``) mapping ``x`` to logits ``[N, C]`` for
            classification, or to ``[N]`` / ``[N, D]`` for regression, per sample.
        x: the input batch ``[N, ...]``, on the model's device.
        num_samples: the number S of Monte Carlo samples, >= 1.
        batch_size: if given, ``x`` is split along dim 0 into chunks of at most this many rows,
            each run in its own ``sampling`` block (bounding memory to ``S * batch_size`` rows) and
            the outputs are concatenated along the batch dimension. With ``shared_mask=True``
            layers, sample ``s`` of different chunks then comes from different weight samples.
        seed: if given, the result is reproducible from it alone (chunk ``i`` uses ``seed + i``,
            so one chunk gives the same result as no chunking): chunk ``i`` runs in
            ``sampling(num_samples, seed=seed + i)``, which also forks torch's generators (CPU, and
            the CUDA devices in use) and seeds them from it, so random torch ops in the model
            (``F.dropout``, an ``nn.Dropout`` in training mode) repeat too, and torch's random
            stream is left as it was. Without a seed torch's generator is used (and advanced).
        task: ``"classification"`` (outputs are logits ``[S, N, C]``) or ``"regression"``
            (outputs ``[S, N]`` or ``[S, N, D]``).
        strict: raise a ``RuntimeError`` instead of warning when no bdlkern stochastic layer ran.

    Returns:
        :class:`MCPrediction`; tensors are on the device of the model's output. Probabilities and
        entropies are computed in the logits' dtype, promoted to at least float32. Entropies are
        in nats. For regression ``variance`` is the epistemic variance
        ``samples.var(0, unbiased=False)``; for a model with known precision ``tau`` (homoscedastic
        noise) the predictive variance is ``variance + 1 / tau``.

    Raises:
        TypeError / ValueError: for invalid arguments, a non-tensor model output, or an output
            whose shape does not fit ``task``.
        RuntimeError: inside a ``sampling`` block; with ``strict=True``, when no bdlkern
            stochastic layer ran.

    Warns:
        NoStochasticLayerWarning: when no bdlkern stochastic layer ran (and not ``strict``).
    """
    fn = "mc_predict"
    if not callable(model):
        raise TypeError(f"{fn}: model must be callable, got {type(model).__name__}")
    x = _check_tensor(fn, "x", x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{fn}: x must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    if x.is_floating_point() and torch.isnan(x).any():
        raise ValueError(f"{fn}: x contains NaN")
    _check_int(fn, "num_samples", num_samples, 1)
    if batch_size is not None:
        _check_int(fn, "batch_size", batch_size, 1)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{fn}: seed must be an int or None, got {type(seed).__name__}")
    if task not in ("classification", "regression"):
        raise ValueError(f"{fn}: task must be 'classification' or 'regression', got {task!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"{fn}: strict must be a bool, got {type(strict).__name__}")
    outer = current_sampling()
    if outer is not None:
        raise RuntimeError(
            f"{fn}(num_samples={num_samples}) was called inside an active bdlkern.sampling({outer.num_samples}); "
            "mc_predict opens its own sampling block and blocks do not nest. Call mc_predict outside "
            "the block (it samples by itself), or call the model directly inside the block"
        )

    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    training_flags = [m.training for m in modules]
    try:
        with torch.no_grad():
            chunks = [x] if batch_size is None else list(torch.split(x, batch_size, dim=0))
            runs = [
                _run_block(model, chunk, num_samples, None if seed is None else seed + i)
                for i, chunk in enumerate(chunks)
            ]
    finally:
        for module, flag in zip(modules, training_flags):
            module.training = flag
    outputs = [out for out, _ in runs]
    deterministic = all(det for _, det in runs)
    samples = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    if task == "regression":
        if samples.dim() not in (2, 3):
            raise ValueError(
                f"{fn}: for task='regression' the model must return [N] or [N, D] per sample "
                f"(samples [S, N] or [S, N, D]), got samples of shape {tuple(samples.shape)}"
            )
        if deterministic:
            _no_stochastic_layer(model, num_samples, strict)
        values = samples if samples.is_floating_point() else samples.double()
        variance = torch.zeros_like(values[0]) if deterministic else values.var(0, unbiased=False)
        return MCPrediction(samples=samples, mean=values.mean(0), variance=variance)

    if samples.dim() != 3:
        raise ValueError(
            f"{fn}: for task='classification' the model must return logits [N, C] per sample "
            f"(samples [S, N, C]), got samples of shape {tuple(samples.shape)}"
        )
    if not samples.is_floating_point():
        raise TypeError(f"{fn}: the model's logits must be floating point, got dtype {samples.dtype}")
    if deterministic:
        _no_stochastic_layer(model, num_samples, strict)
    logits = samples.to(torch.promote_types(samples.dtype, torch.float32))
    probs = logits.softmax(-1)  # [S, N, C]
    mean_probs = probs[0] if deterministic else probs.mean(0)  # [N, C]
    predictive_entropy = _entropy(mean_probs)
    if deterministic:  # identical samples: no epistemic part, exactly (not up to rounding)
        expected_entropy = predictive_entropy.clone()
        mutual_information = torch.zeros_like(predictive_entropy)
    else:
        expected_entropy = _entropy(probs).mean(0)
        mutual_information = (predictive_entropy - expected_entropy).clamp(min=0.0)
    return MCPrediction(
        samples=samples,
        mean_probs=mean_probs,
        predictive_entropy=predictive_entropy,
        expected_entropy=expected_entropy,
        mutual_information=mutual_information,
        prediction=mean_probs.argmax(-1),
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy ``-sum_c p_c log p_c`` in nats along ``dim`` (``0 log 0 = 0``).

    Args:
        probs: floating tensor of probabilities in [0, 1], summing to 1 along ``dim``
            (tolerance 1e-3), e.g. ``[N, C]``.
        dim: the class dimension.

    Returns:
        A tensor of ``probs``' dtype and device with ``dim`` removed, e.g. ``[N]``.
    """
    probs = _check_probs("entropy", probs, dim=dim)
    return _entropy(probs, dim)


def nll(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood ``-1/N sum_n log p_n[y_n]`` of the targets (nats).

    Args:
        probs: ``[N, C]`` floating predictive probabilities (rows sum to 1, tolerance 1e-3).
        targets: ``[N]`` integer class indices in ``[0, C)``.
        eps: probabilities are clamped at ``eps > 0`` before the log, so a confident wrong
            prediction costs ``-log(eps)`` instead of infinity.

    Returns:
        The mean NLL as a Python float.
    """
    probs, targets = _check_classification("nll", probs, targets)
    eps = _check_positive_float("nll", "eps", eps)
    p_true = probs.double().gather(1, targets[:, None]).squeeze(1)
    return -p_true.clamp(min=eps).log().mean().item()


def brier(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Multi-class Brier score ``1/N sum_n sum_c (p_nc - [y_n = c])^2`` (in [0, 2]).

    For two classes this is twice the binary Brier score ``1/N sum_n (p_n1 - y_n)^2``.

    Args:
        probs: ``[N, C]`` floating predictive probabilities (rows sum to 1, tolerance 1e-3).
        targets: ``[N]`` integer class indices in ``[0, C)``.

    Returns:
        The Brier score as a Python float.
    """
    probs, targets = _check_classification("brier", probs, targets)
    probs = probs.double()
    onehot = torch.nn.functional.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return (probs - onehot).square().sum(1).mean().item()


def _calibration_bins(
    fn: str, probs: torch.Tensor, targets: torch.Tensor, n_bins: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per confidence bin: (count, number correct, sum of confidences), float64 ``[n_bins]``.

    Bin ``i`` is ``(i / n_bins, (i + 1) / n_bins]``; a confidence of exactly 0 goes to bin 0.
    """
    probs, targets = _check_classification(fn, probs, targets)
    _check_int(fn, "n_bins", n_bins, 1)
    confidence, predicted = probs.double().max(1)
    correct = (predicted == targets).double()
    # Edges i / n_bins computed exactly as in float64 division, so confidences on an edge land in
    # the lower bin: bucketize(right=False) returns i with edges[i-1] < c <= edges[i].
    edges = torch.arange(n_bins + 1, dtype=torch.float64, device=probs.device) / n_bins
    index = (torch.bucketize(confidence, edges) - 1).clamp(0, n_bins - 1)
    zeros = torch.zeros(n_bins, dtype=torch.float64, device=probs.device)
    count = zeros.index_add(0, index, torch.ones_like(confidence))
    num_correct = zeros.index_add(0, index, correct)
    conf_sum = zeros.index_add(0, index, confidence)
    return count, num_correct, conf_sum


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins (Guo et al. 2017).

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, where the confidence of a row is its
    largest probability, the prediction its argmax (first index on ties), and bin ``b`` holds the
    rows with confidence in ``(b / n_bins, (b + 1) / n_bins]`` (confidence 0 goes to the first bin).

    Args:
        probs: ``[N, C]`` floating predictive probabilities (rows sum to 1, tolerance 1e-3).
        targets: ``[N]`` integer class indices in ``[0, C)``.
        n_bins: number of bins, >= 1.

    Returns:
        The ECE in [0, 1] as a Python float.
    """
    count, num_correct, conf_sum = _calibration_bins("expected_calibration_error", probs, targets, n_bins)
    # |B| / N * |acc - conf| = |sum correct - sum conf| / N
    return ((num_correct - conf_sum).abs().sum() / count.sum()).item()


def gaussian_log_likelihood(
    samples: torch.Tensor, targets: torch.Tensor, tau: float | torch.Tensor
) -> float:
    """Test log-likelihood of MC-dropout regression (Gal & Ghahramani 2016, eq. 8).

    The predictive density is the mixture of ``S`` isotropic Gaussians with means ``y_hat_s`` and
    precision ``tau``::

        ll = 1/N sum_n [ logsumexp_s(-tau/2 ||y_n - y_hat_sn||^2) - log S
                         + D/2 (log tau - log 2 pi) ]

    computed in float64 with ``torch.logsumexp``.

    Args:
        samples: ``[S, N]`` or ``[S, N, D]`` floating MC predictions (e.g. ``mc_predict(...,
            task="regression").samples``).
        targets: ``[N]`` or ``[N, D]`` floating targets, ``samples.shape[1:]``.
        tau: the model precision (inverse observation-noise variance), > 0.

    Returns:
        The mean log-likelihood per data point (nats) as a Python float; higher is better.
    """
    fn = "gaussian_log_likelihood"
    samples = _check_tensor(fn, "samples", samples)
    targets = _check_tensor(fn, "targets", targets)
    _check_floating(fn, "samples", samples)
    _check_floating(fn, "targets", targets)
    if samples.dim() not in (2, 3):
        raise ValueError(f"{fn}: samples must be [S, N] or [S, N, D], got shape {tuple(samples.shape)}")
    if tuple(targets.shape) != tuple(samples.shape[1:]):
        raise ValueError(
            f"{fn}: targets must have shape samples.shape[1:] = {tuple(samples.shape[1:])}, "
            f"got {tuple(targets.shape)}"
        )
    tau = _check_positive_float(fn, "tau", tau)
    samples = samples.double()
    targets = targets.to(device=samples.device, dtype=torch.float64)
    num_samples = samples.shape[0]
    dims = 1 if samples.dim() == 2 else samples.shape[2]
    sq = (targets.unsqueeze(0) - samples).square()  # [S, N(, D)]
    if sq.dim() == 3:
        sq = sq.sum(-1)  # isotropic: the per-dimension exponents add up
    ll = torch.logsumexp(-0.5 * tau * sq, dim=0) - math.log(num_samples)
    ll = ll + 0.5 * dims * (math.log(tau) - math.log(2.0 * math.pi))
    return ll.mean().item()


def ood_auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """Area under the ROC curve for detecting out-of-distribution inputs by an uncertainty score.

    Out-of-distribution inputs are the positives and should score higher (e.g. predictive entropy
    or mutual information). Computed exactly as the Mann-Whitney U statistic with average ranks
    for ties: the probability that a random OOD input scores higher than a random in-distribution
    one, ties counting one half.

    Args:
        scores_in: ``[N_in]`` real scores of in-distribution inputs (negatives), N_in >= 1.
        scores_out: ``[N_out]`` real scores of out-of-distribution inputs (positives), N_out >= 1.

    Returns:
        The AUROC in [0, 1] as a Python float (0.5: no better than chance).
    """
    fn = "ood_auroc"
    for name, scores in (("scores_in", scores_in), ("scores_out", scores_out)):
        _check_tensor(fn, name, scores)
        if scores.is_complex() or scores.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must be a real tensor, got dtype {scores.dtype}")
        if scores.dim() != 1:
            raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(scores.shape)}")
        if scores.numel() == 0:
            raise ValueError(f"{fn}: {name} must not be empty")
        if scores.is_floating_point() and torch.isnan(scores).any():
            raise ValueError(f"{fn}: {name} contains NaN")
    n_in, n_out = scores_in.numel(), scores_out.numel()
    dtype = torch.promote_types(scores_in.dtype, scores_out.dtype)
    combined = torch.cat([scores_in.to(dtype), scores_out.to(device=scores_in.device, dtype=dtype)])
    # Average rank of each distinct value: its block of equal values occupies ranks
    # start + 1 .. start + count (1-based), whose mean is start + (count + 1) / 2.
    _, inverse, counts = torch.unique(combined, sorted=True, return_inverse=True, return_counts=True)
    counts = counts.double()
    start = torch.cumsum(counts, 0) - counts
    ranks = (start + (counts + 1.0) / 2.0)[inverse]
    rank_sum_out = ranks[n_in:].sum().item()
    u_out = rank_sum_out - n_out * (n_out + 1) / 2.0
    return u_out / (n_in * n_out)


def reliability_diagram(
    probs: torch.Tensor,
    targets: torch.Tensor,
    n_bins: int = 15,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Draw a reliability diagram: accuracy against confidence per equal-width bin.

    Bars show the accuracy of each non-empty confidence bin (bins as in
    :func:`expected_calibration_error`), hatched bars the gap to the bin's mean confidence, the
    dashed diagonal perfect calibration; the legend gives the ECE.

    Without ``ax`` a new ``matplotlib.figure.Figure`` is made without pyplot, so no GUI backend is
    involved (headless-safe) and nothing is registered with pyplot: save it with
    ``fig.savefig(path)`` or display it in a notebook. Pass ``ax=plt.gca()`` to draw into a pyplot
    figure instead.

    Args:
        probs: ``[N, C]`` floating predictive probabilities (rows sum to 1, tolerance 1e-3).
        targets: ``[N]`` integer class indices in ``[0, C)``.
        n_bins: number of bins, >= 1.
        ax: matplotlib Axes to draw on; a new figure when None.
        title: the axes title (default ``"Reliability diagram"``).

    Returns:
        The matplotlib Figure drawn on (``ax.figure`` when ``ax`` was given).
    """
    fn = "reliability_diagram"
    count, num_correct, conf_sum = _calibration_bins(fn, probs, targets, n_bins)
    if title is not None and not isinstance(title, str):
        raise TypeError(f"{fn}: title must be a str or None, got {type(title).__name__}")

    from matplotlib.axes import Axes as _Axes
    from matplotlib.figure import Figure as _Figure

    if ax is None:
        fig = _Figure(figsize=(4.5, 4.5), layout="constrained")
        ax = fig.add_subplot()
    elif not isinstance(ax, _Axes):
        raise TypeError(f"{fn}: ax must be a matplotlib Axes or None, got {type(ax).__name__}")
    else:
        fig = ax.figure

    count, num_correct, conf_sum = count.cpu(), num_correct.cpu(), conf_sum.cpu()
    ece = ((num_correct - conf_sum).abs().sum() / count.sum()).item()
    filled = count > 0
    width = 1.0 / n_bins
    centers = (torch.arange(n_bins, dtype=torch.float64)[filled] + 0.5) * width
    accuracy = num_correct[filled] / count[filled]
    confidence = conf_sum[filled] / count[filled]

    ax.bar(centers.tolist(), accuracy.tolist(), width=width, color="tab:blue", edgecolor="black",
           linewidth=0.6, label=f"accuracy (ECE = {ece:.4f})")
    ax.bar(centers.tolist(), (confidence - accuracy).tolist(), bottom=accuracy.tolist(), width=width,
           color="tab:red", alpha=0.3, edgecolor="tab:red", hatch="//", linewidth=0.6, label="gap")
    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title if title is not None else "Reliability diagram")
    ax.legend(loc="upper left")
    return fig
