"""Evaluating a trained demo model: metrics of its Monte Carlo prediction on the test digits and
the OOD sets (:func:`evaluate`), and the timing of its MC inference through bdlkern against the three
plain-PyTorch ways to write it (:func:`time_mc_inference`: a loop, :func:`eager_mc_predict`; the replicated
input, :func:`eager_batched_mc_predict`; ``torch.func.vmap`` over the samples, :func:`eager_vmap_mc_predict`).
``torch.compile`` of the replicated model is measured by ``python -m bdlkern.bench --case models`` only:
compiling every demo model would add minutes to the demo.
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


def eager_vmap_mc_predict(
    model: nn.Module, x: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The third way to write it without bdlkern: ``torch.func.vmap`` of the train-mode model over a
    dummy sample axis ``torch.arange(S)`` with ``randomness="different"``, so each of the S samples
    draws its own dropout masks (or LRT noise) in one vectorised call. The input is not mapped (the
    function ignores the sample index), so the layers before the first random op run once, and the
    later ones run batched over the S samples; the model's layers see ``x`` with its own shape
    (``[N, F]`` or ``[N, C, H, W]``), so the same call serves the MLPs and the conv nets. Same summaries
    as :func:`eager_mc_predict`.

    Args:
        model: a train-mode plain-PyTorch model mapping ``x`` to logits ``[N, classes]``.
        x: the inputs, ``[N, ...]``.
        num_samples: S >= 1.

    Returns:
        ``(mean_probs [N, C], mutual_information [N])``.

    Raises:
        ValueError: ``num_samples < 1``.
        RuntimeError, NotImplementedError: vmap cannot run the model (a layer without a batching rule,
            an in-place or data-dependent op).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    with torch.no_grad():
        samples = torch.arange(num_samples, device=x.device)
        logits = torch.func.vmap(lambda _: model(x), randomness="different")(samples)  # [S, N, C]
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
        eager_vmap_s: :func:`eager_vmap_mc_predict` (``torch.func.vmap`` over the samples); None also
            where vmap cannot run the model (:attr:`eager_vmap_error` says why).
        eager_accuracy, eager_nll: what the eager loop's prediction scores (seeded), to show it is
            the same model: equal to bdlkern's up to Monte Carlo noise.
        eager_batched_accuracy, eager_vmap_accuracy: the same for the batched replication and vmap.
        eager_vmap_error: why vmap could not run the model (``"ExceptionType: message"``), else None.
    """

    samples: int
    rows: int
    bdlkern_s: float
    eager_loop_s: float | None = None
    eager_batched_s: float | None = None
    eager_accuracy: float | None = None
    eager_nll: float | None = None
    eager_batched_accuracy: float | None = None
    eager_vmap_s: float | None = None
    eager_vmap_accuracy: float | None = None
    eager_vmap_error: str | None = None

    def _eager_times(self) -> dict[str, float]:
        """Baseline name -> its time, for the plain-PyTorch ways that were timed (none for a
        deterministic model; loop and batched, and vmap where it runs, for a stochastic one)."""
        if self.eager_loop_s is None or self.eager_batched_s is None:
            return {}
        times = {"loop": self.eager_loop_s, "batched": self.eager_batched_s}
        if self.eager_vmap_s is not None:
            times["vmap"] = self.eager_vmap_s
        return times

    @property
    def eager_baseline(self) -> str | None:
        """The fastest way to do it in plain PyTorch: ``"loop"``, ``"batched"`` or ``"vmap"``."""
        times = self._eager_times()
        return min(times, key=times.__getitem__) if times else None

    @property
    def eager_s(self) -> float | None:
        """The time of the fastest plain-PyTorch way (:attr:`eager_baseline`): what bdlkern is
        compared with."""
        baseline = self.eager_baseline
        return None if baseline is None else self._eager_times()[baseline]

    @property
    def speedup(self) -> float | None:
        """``eager_s / bdlkern_s``: how many times faster bdlkern's MC inference is than the fastest
        plain-PyTorch way."""
        return None if self.eager_s is None else self.eager_s / self.bdlkern_s

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "eager_baseline": self.eager_baseline, "eager_s": self.eager_s, "speedup": self.speedup}


def time_mc_inference(model: nn.Module, eager: nn.Module | None, data: Data, settings: Settings) -> MCTiming:
    """Time MC inference on the whole test set with S samples: ``mc_predict(model.eval(), ...)``
    through bdlkern's fused kernels and, for a stochastic model, the plain-PyTorch ways on its
    equivalent ``eager`` (:func:`eager_mc_predict`, a loop of S passes;
    :func:`eager_batched_mc_predict`, one pass on the replicated input; :func:`eager_vmap_mc_predict`,
    ``torch.func.vmap`` over the samples), interleaved by one :func:`bdlkern.bench.time_fns` call;
    bdlkern is compared with the fastest. vmap is tried once first (seeded, its accuracy recorded);
    if it cannot run the model, its fields stay None and :attr:`MCTiming.eager_vmap_error` says why."""
    from bdlkern import bench

    x, S = data.x_test, settings.samples
    model.eval()
    fns: dict[str, Callable[[], Any]] = {"bdlkern": lambda: U.mc_predict(model, x, S, seed=0)}
    vmap_probs: torch.Tensor | None = None
    vmap_error: str | None = None
    if eager is not None:
        fns["eager loop"] = lambda: eager_mc_predict(eager, x, S)
        fns["eager batched"] = lambda: eager_batched_mc_predict(eager, x, S)
        torch.manual_seed(settings.seed)
        try:
            vmap_probs, _ = eager_vmap_mc_predict(eager, x, S)
        except (RuntimeError, NotImplementedError) as e:
            message = str(e).strip().splitlines()
            vmap_error = f"{type(e).__name__}: {message[0] if message else 'no message'}"
        else:
            fns["eager vmap"] = lambda: eager_vmap_mc_predict(eager, x, S)
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
        result.eager_vmap_error = vmap_error
        if vmap_probs is not None:
            result.eager_vmap_s = timings["eager vmap"]["median_s"]
            result.eager_vmap_accuracy = (vmap_probs.argmax(-1) == data.y_test).float().mean().item()
    return result
