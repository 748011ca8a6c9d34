"""One method end to end (:func:`run_method`): build, train, post-process, evaluate and time, into a
:class:`ModelResult` that the figures and the report read."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

import bdlkern
from bdlkern.demo.data import Data
from bdlkern.demo.evaluation import Evaluation, MCTiming, evaluate, time_mc_inference
from bdlkern.demo.models import CONV_CHANNELS, HIDDEN, Method
from bdlkern.demo.settings import Settings
from bdlkern.demo.training import History, train


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
    """Build (seeded with ``settings.seed``), train, post-process, evaluate and time one method.

    A conv method (``method.conv``) gets the digits as images ``[N, 1, 8, 8]`` (``data.as_images()``),
    the channel widths ``(1, *CONV_CHANNELS, classes)``, ``settings.conv_epochs`` epochs and
    ``settings.conv_lr``."""
    torch.manual_seed(settings.seed)  # the same initial weights for the same architecture
    if method.conv:
        data = data.as_images()
        widths = (data.x_train.shape[1], *CONV_CHANNELS, data.num_classes)
        settings = replace(settings, epochs=settings.conv_epochs, lr=settings.conv_lr)
    else:
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
