"""The demo's figures (:data:`FIGURES`, written by :func:`write_figures`): reliability diagrams,
learnt per-layer values, mutual-information histograms, training curves, OOD examples and sparse
VD's log alpha histograms and sparsity patterns.

matplotlib (the ``[demo]`` extra) is imported when a figure is drawn, not with this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import bdlkern
from bdlkern import uncertainty as U
from bdlkern.demo.data import OOD_TRANSFORMS, Data
from bdlkern.demo.evaluation import ECE_BINS
from bdlkern.demo.pipeline import ModelResult


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
