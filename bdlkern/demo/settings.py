"""The settings of a demo run (:class:`Settings`) and what ``--quick`` changes (:data:`QUICK`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run (recorded in ``report.json``).

    Attributes:
        epochs: training epochs per MLP.
        conv_epochs: training epochs per conv net (the conv section; few, to keep the run short).
        conv_lr: the conv nets' Adam learning rate (larger than the MLPs': they train for few epochs;
            sparse VD keeps its own, :data:`~bdlkern.demo.models.SPARSE_VD_LR`).
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
    conv_epochs: int = 15
    conv_lr: float = 3e-3
    samples: int = 64
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    quick: bool = False
    timing_target_s: float = 0.2
    timing_repeats: int = 5


#: What ``--quick`` changes: a few epochs, few samples, short measurements (seconds in all).
QUICK = {"epochs": 5, "conv_epochs": 5, "samples": 8, "timing_target_s": 0.01, "timing_repeats": 2}
