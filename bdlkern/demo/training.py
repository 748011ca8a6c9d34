"""Training a demo model: Adam on minibatches with the method's extra loss term (:func:`train`), a
per-epoch record (:class:`History`) and a tqdm progress bar on stderr (shown in a terminal only).

tqdm (the ``[demo]`` extra) is imported with this module, as it was with the one-file demo.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import bdlkern

from bdlkern.demo.data import Data
from bdlkern.demo.models import Method
from bdlkern.demo.settings import Settings


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
    # A variance network's mean is its biases: chance accuracy, recorded on purpose (the paper's point).
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", bdlkern.nn.VarianceMeanWarning)
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
