"""Evaluating a trained demo model: metrics of its Monte Carlo prediction on the test digits and
the OOD sets (:func:`evaluate`), and the timing of its MC inference through bdlkern against the two
plain-PyTorch ways to write it (:func:`time_mc_inference`, :func:`eager_mc_predict`,
:func:`eager_batched_mc_predict`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from bdlkern import uncertainty as U
from bdlkern.demo.data import Data
from bdlkern.demo.settings import Settings

#: Equal-width confidence bins of the ECE and the reliability diagrams.
ECE_BINS = 15


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
    input replicated ``num_samples`` times, so every dropout layer draws S masks at once and each
    layer runs one batched GEMM (or convolution); S times the activation memory. An MLP's input
    ``[N, F]`` is replicated as ``x.expand(S, N, F)``; an image batch ``[N, C, H, W]`` (a conv net,
    whose layers take one batch dimension) is folded sample-major, ``x.repeat(S, 1, 1, 1)`` ->
    ``[S * N, C, H, W]``, and the logits unfolded to ``[S, N, classes]``. Same summaries as
    :func:`eager_mc_predict`."""
    with torch.no_grad():
        if x.dim() > 2:
            logits = model(x.repeat(num_samples, *([1] * (x.dim() - 1)))).unflatten(0, (num_samples, x.shape[0]))
        else:
            logits = model(x.expand(num_samples, *x.shape))
        return _mc_summary(logits.softmax(-1))


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
