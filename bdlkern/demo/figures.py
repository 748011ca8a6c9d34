"""The demo's figures (:data:`FIGURES`, written by :func:`write_figures`): reliability diagrams,
learnt per-layer values, mutual-information histograms, training curves, OOD examples, sparse
VD's log alpha histograms and sparsity patterns, and the conv section's kept filters and learnt
Concrete rates.

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
from bdlkern.demo.models import CONCRETE_INIT_P, dropout_rates
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


def _rows(results: Sequence[ModelResult], size: tuple[float, float]):
    """A figure with one row of panels per family (the MLPs, then the conv nets), unused panels
    hidden; returns it and ``[(ax, result), ...]``."""
    rows = [row for row in ([r for r in results if not r.method.conv], [r for r in results if r.method.conv]) if row]
    fig, axes = _figure(max(len(row) for row in rows), len(rows), size=size)
    panels = []
    for axes_row, row in zip(axes, rows):
        panels += list(zip(axes_row, row))
        for ax in axes_row[len(row):]:
            ax.set_visible(False)
    return fig, panels


def draw_reliability(results: Sequence[ModelResult], data: Data):
    """One reliability diagram per model (:func:`bdlkern.uncertainty.reliability_diagram`), the
    MLPs in the first row and the conv nets in the second."""
    fig, panels = _rows(results, (4.6, 4.2))
    for ax, result in panels:
        pred = result.evaluation.predictions["test"]
        U.reliability_diagram(pred.mean_probs, data.y_test, n_bins=ECE_BINS, ax=ax,
                              title=f"{result.method.name}: test accuracy {result.evaluation.accuracy:.3f}")
    fig.suptitle("Reliability of the MC predictive mean on the test digits")
    return fig


def draw_layer_stats(results: Sequence[ModelResult], data: Data):
    """Learnt per-layer values (e.g. Concrete dropout rates) over training, one panel per method
    (a row per family)."""
    tracked = [r for r in results if r.history.layers]
    if not tracked:
        return None
    fig, panels = _rows(tracked, (6.0, 4.2))
    for ax, result in panels:
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
    in the first bin. Bar heights are fractions of each set, so the sets compare directly. A row
    per family (MLPs, conv nets).
    """
    stochastic = [r for r in results if r.method.stochastic]
    if not stochastic:
        return None
    fig, panels = _rows(stochastic, (5.6, 4.2))
    for ax, result in panels:
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
    """Training cross-entropy and deterministic test accuracy per epoch, every model (the conv nets
    dashed: they train for fewer epochs)."""
    fig, axes = _figure(2, size=(5.4, 4.0))
    loss_ax, acc_ax = axes[0]
    for result in results:
        epochs = range(1, len(result.history.cross_entropy) + 1)
        style = {"label": result.method.name, "linestyle": "--" if result.method.conv else "-"}
        loss_ax.plot(epochs, result.history.cross_entropy, **style)
        acc_ax.plot(epochs, result.history.test_accuracy, **style)
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


def _filter_mosaic(weights: np.ndarray, keep: np.ndarray, columns: int, pruned_rgb=(0.82, 0.82, 0.82)):
    """An RGB mosaic of convolution kernels ``[C_out, C_in, kh, kw]`` (kept values on a diverging
    colour scale, pruned weights grey, 1-pixel white gaps between kernels), and the colour norm.

    A layer with one input channel shows its filters in a grid of ``columns`` columns; otherwise
    one row per output channel and one column per input channel.
    """
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    c_out, c_in, kh, kw = weights.shape
    tiles = weights.reshape(c_out * c_in, kh, kw)
    kept = keep.reshape(c_out * c_in, kh, kw)
    if c_in == 1:
        cols, rows = min(columns, c_out), -(-c_out // min(columns, c_out))
    else:
        cols, rows = c_in, c_out
    limit = float(np.abs(weights[keep]).max()) if keep.any() else 1.0
    norm = Normalize(-limit, limit)
    cmap = colormaps["RdBu_r"]
    image = np.ones((rows * (kh + 1) + 1, cols * (kw + 1) + 1, 3))
    for index in range(len(tiles)):
        r, c = divmod(index, cols)
        rgb = cmap(norm(tiles[index]))[..., :3]
        rgb[~kept[index]] = pruned_rgb
        image[1 + r * (kh + 1): 1 + r * (kh + 1) + kh, 1 + c * (kw + 1): 1 + c * (kw + 1) + kw] = rgb
    return image, norm, cmap


def draw_conv_filters(results: Sequence[ModelResult], data: Data):
    """The kept weights ``theta * mask`` of every sparse-VD convolution, as filter grids: the first
    layer's 3x3 filters in a grid, a deeper layer's kernels with one row per output channel and one
    column per input channel; pruned weights grey."""
    from matplotlib.cm import ScalarMappable

    panels = [(r, name, m) for r in results for name, m in r.model.named_children()
              if isinstance(m, bdlkern.nn.SparseVDConv2d)]
    if not panels:
        return None
    fig, axes = _figure(len(panels), size=(4.4, 5.6))
    for ax, (result, name, layer) in zip(axes[0], panels):
        keep = layer.mask().cpu().numpy()
        weights = (layer.theta.detach() * layer.mask().to(layer.theta.dtype)).cpu().numpy()
        image, norm, cmap = _filter_mosaic(weights, keep, columns=4)
        ax.imshow(image, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        c_out, c_in = weights.shape[:2]
        ax.set_xlabel(f"{c_out} filters of {weights.shape[2]}x{weights.shape[3]}" if c_in == 1
                      else f"input channel (0-{c_in - 1})")
        if c_in > 1:
            ax.set_ylabel(f"output channel (0-{c_out - 1})")
        ax.set_title(f"{result.method.name}.{name}:\n{int(keep.sum())} of {keep.size} weights kept ({keep.mean():.1%})")
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.6, label="theta (kept weights)")
    fig.suptitle("Sparse VD conv filters after training: theta * mask (grey: pruned)")
    return fig


def draw_concrete_rates(results: Sequence[ModelResult], data: Data):
    """The learnt Concrete dropout rate of each layer of the conv nets, as bars, with the initial
    rate."""
    learnt = [r for r in results if r.method.conv and r.method.layer_stats is not None and r.method.layer_stats.learnt
              and r.method.layer_stats.read is dropout_rates]
    if not learnt:
        return None
    fig, axes = _figure(len(learnt), size=(4.2, 3.6))
    for ax, result in zip(axes[0], learnt):
        rates = dropout_rates(result.model)
        bars = ax.bar(list(rates), list(rates.values()), color="tab:blue")
        ax.bar_label(bars, fmt="%.3f")
        ax.axhline(CONCRETE_INIT_P, color="k", linestyle="--", linewidth=1.0, label=f"initial p = {CONCRETE_INIT_P:g}")
        ax.set_ylim(0.0, max(0.5, 1.2 * max(rates.values(), default=0.0)))
        ax.set(xlabel="layer (the dropout is on its input)", ylabel="learnt dropout rate p",
               title=f"{result.method.name}: learnt rate per layer")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper left")
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
    FigureSpec("conv_filters.png",
               "conv sparse VD: the kept weights (theta * mask) of each sparse-VD convolution as filter grids, pruned "
               "weights grey",
               draw_conv_filters),
    FigureSpec("conv_concrete_rates.png", "conv Concrete dropout: the learnt dropout rate of each layer",
               draw_concrete_rates),
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
