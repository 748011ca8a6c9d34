"""Uncertainty and calibration metrics of :mod:`bdlkern.uncertainty`: :func:`entropy`,
:func:`nll`, :func:`brier`, :func:`expected_calibration_error` and the :func:`reliability_diagram`
that draws it, :func:`gaussian_log_likelihood` (regression) and :func:`ood_auroc`. They take
tensors and return Python floats (``entropy``: a tensor); entropies are in nats. Pure PyTorch;
matplotlib is imported lazily, only by ``reliability_diagram``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ._checks import (
    _check_classification,
    _check_floating,
    _check_int,
    _check_positive_float,
    _check_probs,
    _check_tensor,
)

if TYPE_CHECKING:  # matplotlib is imported lazily, only by reliability_diagram
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    # xlogy(0, 0) = 0, so classes of probability zero contribute nothing.
    return -torch.special.xlogy(probs, probs).sum(dim)


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
