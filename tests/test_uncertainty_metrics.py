"""Tests of the uncertainty metrics of bdlkern.uncertainty: entropy, NLL, Brier score, expected
calibration error, reliability diagram, Gaussian log-likelihood and OOD AUROC, and their bad-input
messages.

Each metric is checked against numbers worked out by hand, against scikit-learn where it has the
same metric, or against an independent NumPy implementation written here. MC prediction
(mc_predict, MCPrediction) is tested in test_mc_predict.py.
"""

from __future__ import annotations

import io
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

from bdlkern import uncertainty as U


def random_probs(n: int, c: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(n, c, generator=g, dtype=torch.float64)).softmax(-1).to(dtype)


def random_targets(n: int, c: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1000)
    return torch.randint(0, c, (n,), generator=g)


# --------------------------------------------------------------------------------------------
# entropy
# --------------------------------------------------------------------------------------------


def test_entropy_hand_values():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    expected = torch.tensor([0.6931471805599453, 0.0, 1.3862943611198906])  # log 2, 0, log 4
    torch.testing.assert_close(U.entropy(probs), expected)
    # along another dimension
    torch.testing.assert_close(U.entropy(probs.T, dim=0), expected)
    # 0.7, 0.2, 0.1: -(0.7 ln 0.7 + 0.2 ln 0.2 + 0.1 ln 0.1) = 0.249672 + 0.321888 + 0.230259
    h = U.entropy(torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64))
    assert h.item() == pytest.approx(0.8018185525433373, abs=1e-12)


# --------------------------------------------------------------------------------------------
# nll
# --------------------------------------------------------------------------------------------


def test_nll_hand_value():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
    targets = torch.tensor([0, 2, 2])
    # -(ln 0.7 + ln 0.1 + ln 0.5) / 3 = (0.356675 + 2.302585 + 0.693147) / 3
    assert U.nll(probs, targets) == pytest.approx(1.1174690724975744, abs=1e-12)


def test_nll_clamps_at_eps():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    assert U.nll(probs, targets, eps=1e-6) == pytest.approx((-math.log(1e-6) + math.log(2.0)) / 2)
    assert math.isfinite(U.nll(probs, targets))  # default eps 1e-12: -ln(1e-12) = 27.63
    assert U.nll(probs, targets) == pytest.approx((27.631021115928547 + 0.6931471805599453) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nll_matches_sklearn(seed, dtype):
    probs, targets = random_probs(200, 5, seed, dtype), random_targets(200, 5, seed)
    p64 = probs.double()
    p64 = p64 / p64.sum(1, keepdim=True)  # sklearn warns when float32 rows miss 1 by ~1e-7
    expected = log_loss(targets.numpy(), p64.numpy(), labels=list(range(5)))
    assert U.nll(probs, targets) == pytest.approx(expected, rel=1e-6 if dtype == torch.float32 else 1e-12)


# --------------------------------------------------------------------------------------------
# brier
# --------------------------------------------------------------------------------------------


def test_brier_hand_value():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    # row 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.14; row 1: 0.1^2 + 0.8^2 + 0.9^2 = 1.46; mean 0.8
    assert U.brier(probs, targets) == pytest.approx(0.8, abs=1e-12)
    # a perfect prediction scores 0, a confidently wrong one 2
    eye = torch.eye(3, dtype=torch.float64)
    assert U.brier(eye, torch.tensor([0, 1, 2])) == 0.0
    assert U.brier(eye, torch.tensor([1, 2, 0])) == 2.0


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_binary_is_twice_sklearn(seed):
    probs, targets = random_probs(100, 2, seed), random_targets(100, 2, seed)
    binary = brier_score_loss(targets.numpy(), probs[:, 1].numpy())  # mean (p1 - y)^2
    assert U.brier(probs, targets) == pytest.approx(2.0 * binary, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_multiclass_matches_sklearn(seed):
    probs, targets = random_probs(100, 4, seed), random_targets(100, 4, seed)
    expected = brier_score_loss(targets.numpy(), probs.numpy(), labels=list(range(4)), scale_by_half=False)
    assert U.brier(probs, targets) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------
# expected calibration error
# --------------------------------------------------------------------------------------------


def ece_loop(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """Independent ECE: a loop over bins (lo, hi], with confidence 0 in the first bin."""
    probs = probs.astype(np.float64)
    conf = probs.max(1)
    correct = (probs.argmax(1) == targets).astype(np.float64)
    total = 0.0
    for i in range(n_bins):
        lo, hi = i / n_bins, (i + 1) / n_bins
        in_bin = (conf <= hi) & ((conf > lo) if i > 0 else (conf >= lo))
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return total


ECE_PROBS = torch.tensor(
    [
        [0.9, 0.05, 0.05],  # conf 0.9, predicts 0, target 0: correct
        [0.8, 0.1, 0.1],  # conf 0.8, predicts 0, target 1: wrong
        [0.2, 0.6, 0.2],  # conf 0.6, predicts 1, target 1: correct
        [0.4, 0.3, 0.3],  # conf 0.4, predicts 0, target 2: wrong
        [0.5, 0.25, 0.25],  # conf 0.5 (a bin edge for n_bins=2), predicts 0, target 0: correct
    ],
    dtype=torch.float64,
)
ECE_TARGETS = torch.tensor([0, 1, 1, 2, 0])


def test_ece_hand_value():
    # n_bins=2: bin (0, .5] holds rows 3, 4: acc 1/2, conf .45 -> 2/5 * .05 = .02
    #           bin (.5, 1] holds rows 0-2: acc 2/3, conf 2.3/3 -> 3/5 * .1 = .06
    assert U.expected_calibration_error(ECE_PROBS, ECE_TARGETS, n_bins=2) == pytest.approx(0.08, abs=1e-12)
    # had the edge value 0.5 gone to the upper bin, the ECE would be .2 * .4 + .8 * .05 = .12
    # n_bins=1: |acc - mean conf| = |3/5 - 3.2/5| = 0.04
    assert U.expected_calibration_error(ECE_PROBS, ECE_TARGETS, n_bins=1) == pytest.approx(0.04, abs=1e-12)
    assert ece_loop(ECE_PROBS.numpy(), ECE_TARGETS.numpy(), 2) == pytest.approx(0.08, abs=1e-12)


def test_ece_perfectly_calibrated_is_zero():
    # confidence 0.75 and 3 of 4 correct in the one occupied bin
    probs = torch.tensor([[0.75, 0.25]] * 4, dtype=torch.float64)
    targets = torch.tensor([0, 0, 0, 1])
    assert U.expected_calibration_error(probs, targets) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n_bins", [1, 2, 5, 10, 15, 37])
@pytest.mark.parametrize("seed", [0, 1])
def test_ece_matches_loop(n_bins, seed):
    probs, targets = random_probs(300, 4, seed), random_targets(300, 4, seed)
    expected = ece_loop(probs.numpy(), targets.numpy(), n_bins)
    assert U.expected_calibration_error(probs, targets, n_bins) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_bins", [5, 10, 20])
def test_ece_matches_loop_on_bin_edges(n_bins):
    # binary confidences k/20 in float64: many fall exactly on the edges i/n_bins
    p1 = torch.arange(10, 21, dtype=torch.float64).repeat(3) / 20
    probs = torch.stack([1 - p1, p1], 1)
    targets = random_targets(p1.numel(), 2, 3)
    expected = ece_loop(probs.numpy(), targets.numpy(), n_bins)
    assert U.expected_calibration_error(probs, targets, n_bins) == pytest.approx(expected, abs=1e-12)


def test_ece_float32_matches_loop_in_float64():
    probs, targets = random_probs(300, 3, 5, torch.float32), random_targets(300, 3, 5)
    expected = ece_loop(probs.double().numpy(), targets.numpy(), 15)
    assert U.expected_calibration_error(probs, targets) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# gaussian_log_likelihood
# --------------------------------------------------------------------------------------------


def gll_direct(samples: np.ndarray, targets: np.ndarray, tau: float) -> float:
    """log of the mean over samples of the Gaussian densities, product over dimensions."""
    samples = samples.astype(np.float64)
    if samples.ndim == 2:
        samples, targets = samples[..., None], targets[..., None]
    dens = np.sqrt(tau / (2 * np.pi)) * np.exp(-0.5 * tau * (targets[None] - samples) ** 2)
    return float(np.mean(np.log(np.mean(np.prod(dens, axis=2), axis=0))))


def test_gaussian_log_likelihood_hand_value():
    samples = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # S=2, N=1
    targets = torch.tensor([1.0], dtype=torch.float64)
    # logsumexp(-.5, -.5) - ln 2 = -.5; + .5 (ln 1 - ln 2 pi) = -.918939
    assert U.gaussian_log_likelihood(samples, targets, 1.0) == pytest.approx(-1.4189385332046727, abs=1e-12)
    # tau = 4: -.5 * 4 * 1 + .5 ln 4 - .5 ln 2 pi = -2 + .693147 - .918939
    assert U.gaussian_log_likelihood(samples, targets, 4.0) == pytest.approx(-2.2257913526447273, abs=1e-12)


@pytest.mark.parametrize("shape", [(8, 20), (8, 20, 3)])
@pytest.mark.parametrize("tau", [0.5, 2.0, 10.0])
def test_gaussian_log_likelihood_matches_direct(shape, tau):
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(shape, generator=g)
    targets = torch.randn(shape[1:], generator=g)
    expected = gll_direct(samples.numpy(), targets.numpy(), tau)
    assert U.gaussian_log_likelihood(samples, targets, tau) == pytest.approx(expected, rel=1e-10)


def test_gaussian_log_likelihood_tau_dependence():
    # S = 1: ll(tau) = -tau/2 * mse + ln(tau)/2 - ln(2 pi)/2, maximal at tau = 1 / mse
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(1, 50, generator=g, dtype=torch.float64)
    targets = torch.randn(50, generator=g, dtype=torch.float64)
    mse = (samples[0] - targets).square().mean().item()
    for tau in (0.1, 1.0, 3.0):
        expected = -0.5 * tau * mse + 0.5 * math.log(tau) - 0.5 * math.log(2 * math.pi)
        assert U.gaussian_log_likelihood(samples, targets, tau) == pytest.approx(expected, rel=1e-12)
    best = U.gaussian_log_likelihood(samples, targets, 1.0 / mse)
    assert best > U.gaussian_log_likelihood(samples, targets, 0.5 / mse)
    assert best > U.gaussian_log_likelihood(samples, targets, 2.0 / mse)


def test_gaussian_log_likelihood_is_stable_far_from_samples():
    # every density underflows in float64 (exp(-5e5)), logsumexp does not
    samples = torch.zeros(4, 1, dtype=torch.float64)
    targets = torch.tensor([1000.0], dtype=torch.float64)
    expected = -0.5 * 1e6 - 0.5 * math.log(2 * math.pi)
    assert U.gaussian_log_likelihood(samples, targets, 1.0) == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------------------------
# ood_auroc
# --------------------------------------------------------------------------------------------


def test_ood_auroc_hand_values():
    scores_in = torch.tensor([0.1, 0.4, 0.35])
    scores_out = torch.tensor([0.8, 0.4])
    # 0.8 beats all 3; 0.4 beats 0.1 and 0.35, ties 0.4 (1/2): (3 + 2.5) / 6
    assert U.ood_auroc(scores_in, scores_out) == pytest.approx(5.5 / 6, abs=1e-12)
    assert U.ood_auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])) == 1.0
    assert U.ood_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 0.0
    assert U.ood_auroc(torch.ones(3), torch.ones(5)) == 0.5
    # integer scores work too
    assert U.ood_auroc(torch.tensor([1, 2, 3]), torch.tensor([3, 4])) == pytest.approx(5.5 / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", [False, True])
def test_ood_auroc_matches_sklearn(seed, ties):
    g = torch.Generator().manual_seed(seed)
    scores_in = torch.randn(70, generator=g, dtype=torch.float64)
    scores_out = torch.randn(45, generator=g, dtype=torch.float64) + 0.7
    if ties:  # few distinct values: many ties within and across the two sets
        scores_in, scores_out = scores_in.round(), scores_out.round()
    y = np.r_[np.zeros(70), np.ones(45)]
    expected = roc_auc_score(y, np.r_[scores_in.numpy(), scores_out.numpy()])
    assert U.ood_auroc(scores_in, scores_out) == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------------------------
# reliability_diagram
# --------------------------------------------------------------------------------------------


def test_reliability_diagram_returns_figure():
    probs, targets = random_probs(200, 3, 0), random_targets(200, 3, 0)
    fig = U.reliability_diagram(probs, targets, n_bins=10, title="test model")
    try:
        assert isinstance(fig, Figure)
        (ax,) = fig.axes
        assert ax.get_title() == "test model"
        ece = U.expected_calibration_error(probs, targets, n_bins=10)
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(f"ECE = {ece:.4f}" in label for label in labels)
        confidence = probs.max(1).values
        occupied = torch.unique((confidence * 10).ceil().clamp(1, 10)).numel()
        assert len(ax.patches) == 2 * occupied  # an accuracy bar and a gap bar per occupied bin
        fig.savefig(io.BytesIO(), format="png")  # renders headless
    finally:
        plt.close(fig)


def test_reliability_diagram_draws_on_given_axes():
    fig, ax = plt.subplots()
    try:
        out = U.reliability_diagram(ECE_PROBS, ECE_TARGETS, n_bins=2, ax=ax)
        assert out is fig
        assert ax.get_title() == "Reliability diagram"
        heights = sorted(round(p.get_height(), 12) for p in ax.patches[:2])
        assert heights == [0.5, round(2 / 3, 12)]  # the accuracies of the two bins
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------

P = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
T = torch.tensor([0, 1])


@pytest.mark.parametrize("fn", [U.nll, U.brier, U.expected_calibration_error])
@pytest.mark.parametrize(
    "probs, targets, exc, match",
    [
        (P.tolist(), T, TypeError, "probs must be a torch.Tensor"),
        (P, T.tolist(), TypeError, "targets must be a torch.Tensor"),
        (P.long(), T, TypeError, "probs must be a floating-point tensor"),
        (P, T.float(), TypeError, "targets must be an integer tensor"),
        (P[0], T, ValueError, r"probs must be \[N, C\]"),
        (P, T[:1], ValueError, "targets has 1 entries but probs has 2 rows"),
        (P, T[None], ValueError, r"targets must be \[N\]"),
        (torch.empty(0, 2), torch.empty(0, dtype=torch.long), ValueError, "probs must not be empty"),
        (torch.tensor([[0.5, float("nan")], [0.4, 0.6]]), T, ValueError, "probs contains NaN"),
        (torch.tensor([[1.2, -0.2], [0.4, 0.6]]), T, ValueError, r"probs must lie in \[0, 1\]"),
        (torch.tensor([[0.7, 0.2], [0.4, 0.6]]), T, ValueError, "probs must sum to 1"),
        (P, torch.tensor([0, 2]), ValueError, r"targets must be class indices in \[0, 2\)"),
        (P, torch.tensor([-1, 0]), ValueError, "targets must be class indices"),
    ],
)
def test_classification_metrics_reject_bad_input(fn, probs, targets, exc, match):
    with pytest.raises(exc, match=match):
        fn(probs, targets)


def test_row_sum_tolerance():
    U.nll(torch.tensor([[0.7, 0.3005], [0.4, 0.6]]), T)  # within 1e-3
    with pytest.raises(ValueError, match="probs must sum to 1"):
        U.nll(torch.tensor([[0.7, 0.302], [0.4, 0.6]]), T)


@pytest.mark.parametrize("n_bins, exc", [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError)])
def test_ece_rejects_bad_n_bins(n_bins, exc):
    with pytest.raises(exc, match="n_bins"):
        U.expected_calibration_error(P, T, n_bins=n_bins)
    with pytest.raises(exc, match="n_bins"):
        U.reliability_diagram(P, T, n_bins=n_bins)


def test_nll_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        U.nll(P, T, eps=0.0)


def test_entropy_rejects_bad_input():
    with pytest.raises(TypeError, match="probs must be a torch.Tensor"):
        U.entropy([0.5, 0.5])
    with pytest.raises(ValueError, match="probs must sum to 1 along dim 0"):
        U.entropy(torch.tensor([[0.5, 0.5], [0.4, 0.4]]), dim=0)
    with pytest.raises(ValueError, match="probs contains NaN"):
        U.entropy(torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="probs must not be empty"):
        U.entropy(torch.empty(0))


def test_reliability_diagram_rejects_bad_input():
    with pytest.raises(ValueError, match="targets has 1 entries"):
        U.reliability_diagram(P, T[:1])
    with pytest.raises(TypeError, match="ax must be a matplotlib Axes"):
        U.reliability_diagram(P, T, ax="axes")


@pytest.mark.parametrize(
    "samples, targets, tau, exc, match",
    [
        (torch.zeros(3, 4), torch.zeros(5), 1.0, ValueError, r"targets must have shape samples.shape\[1:\]"),
        (torch.zeros(3, 4, 2), torch.zeros(4), 1.0, ValueError, "targets must have shape"),
        (torch.zeros(4), torch.zeros(4), 1.0, ValueError, r"samples must be \[S, N\] or \[S, N, D\]"),
        (torch.zeros(3, 4), torch.zeros(4), 0.0, ValueError, "tau must be finite and > 0"),
        (torch.zeros(3, 4), torch.zeros(4), -1.0, ValueError, "tau must be finite and > 0"),
        (torch.zeros(3, 4), torch.zeros(4), float("inf"), ValueError, "tau must be finite"),
        (torch.zeros(3, 4), torch.zeros(4), "1", TypeError, "tau must be a real number"),
        (torch.zeros(3, 4), torch.full((4,), float("nan")), 1.0, ValueError, "targets contains NaN"),
        (torch.full((3, 4), float("nan")), torch.zeros(4), 1.0, ValueError, "samples contains NaN"),
        (torch.zeros(0, 4), torch.zeros(4), 1.0, ValueError, "samples must not be empty"),
        (torch.zeros(3, 4, dtype=torch.long), torch.zeros(4), 1.0, TypeError, "samples must be a floating"),
        (np.zeros((3, 4)), torch.zeros(4), 1.0, TypeError, "samples must be a torch.Tensor"),
    ],
)
def test_gaussian_log_likelihood_rejects_bad_input(samples, targets, tau, exc, match):
    with pytest.raises(exc, match=match):
        U.gaussian_log_likelihood(samples, targets, tau)


@pytest.mark.parametrize(
    "scores_in, scores_out, exc, match",
    [
        (torch.empty(0), torch.ones(3), ValueError, "scores_in must not be empty"),
        (torch.ones(3), torch.empty(0), ValueError, "scores_out must not be empty"),
        (torch.ones(3, 1), torch.ones(3), ValueError, "scores_in must be 1-D"),
        (torch.tensor([0.1, float("nan")]), torch.ones(3), ValueError, "scores_in contains NaN"),
        (torch.ones(3), torch.tensor([float("nan")]), ValueError, "scores_out contains NaN"),
        ([0.1, 0.2], torch.ones(3), TypeError, "scores_in must be a torch.Tensor"),
        (torch.ones(3), torch.ones(3, dtype=torch.bool), TypeError, "scores_out must be a real tensor"),
    ],
)
def test_ood_auroc_rejects_bad_input(scores_in, scores_out, exc, match):
    with pytest.raises(exc, match=match):
        U.ood_auroc(scores_in, scores_out)
