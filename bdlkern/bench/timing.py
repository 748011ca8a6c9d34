"""Timing: how long one call of a variant takes (:func:`time_fn`, :func:`time_fns`).

Warm-up calls first, then an inner loop of ``number`` calls sized to last about ``target_s``,
repeated ``repeats`` times with :func:`time.perf_counter` and the garbage collector off; the
variants of a case take turns so that a drift in the machine's speed hits them all alike. On CUDA
the device is synchronised around each measurement (:func:`synchronize`). The default settings,
full and ``--quick``, are the constants below.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

#: Default seconds one timed measurement (an inner loop of ``number`` calls) should last.
TARGET_S = 0.2
#: Default number of timed measurements per variant.
REPEATS = 5
#: Settings used by ``--quick``: shorter measurements on the cases' small sizes.
QUICK_TARGET_S = 0.02
QUICK_REPEATS = 3


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any],
    device: torch.device | str = "cpu",
    *,
    target_s: float = TARGET_S,
    repeats: int = REPEATS,
    warmup: int = 2,
) -> dict[str, Any]:
    """Time ``fn()`` per call.

    ``warmup`` untimed calls first (these also absorb one-off costs: compilation, allocator growth,
    thread-pool start). Then the inner-loop size ``number`` is chosen from one timed call so that a
    measurement of ``number`` back-to-back calls lasts about ``target_s``, and ``repeats`` such
    measurements are taken with :func:`time.perf_counter`, the garbage collector off. On CUDA the
    device is synchronised before each measurement starts and before it stops.

    Returns:
        dict with ``median_s`` and ``min_s`` (seconds per call over the repeats), ``times_s`` (every
        measurement, per call), ``number`` and ``repeats``.
    """
    return time_fns({"fn": fn}, device, target_s=target_s, repeats=repeats, warmup=warmup)["fn"]


def time_fns(
    fns: Mapping[str, Callable[[], Any]],
    device: torch.device | str = "cpu",
    *,
    target_s: float = TARGET_S,
    repeats: int = REPEATS,
    warmup: int = 2,
) -> dict[str, dict[str, Any]]:
    """Time several callables with their measurements interleaved (round-robin).

    Each callable is warmed up and gets its own inner-loop size ``number`` as in :func:`time_fn`;
    then measurement ``r`` of every callable is taken before measurement ``r + 1`` of any. On a
    shared machine whose speed drifts (another tenant, frequency changes) every variant sees the
    same drift, so the ratios between them stay fair.

    Returns:
        name -> the dict :func:`time_fn` returns.
    """
    if repeats < 1 or target_s <= 0:
        raise ValueError(f"need repeats >= 1 and target_s > 0, got {repeats} and {target_s}")
    device = torch.device(device)

    def measure(fn: Callable[[], Any], number: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(number):
            fn()
        synchronize(device)
        return (time.perf_counter() - start) / number

    numbers: dict[str, int] = {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for name, fn in fns.items():
            for _ in range(warmup):
                fn()
            synchronize(device)
            once = measure(fn, 1)
            numbers[name] = max(1, math.ceil(target_s / max(once, 1e-9)))
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(measure(fn, numbers[name]))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "times_s": t,
            "number": numbers[name],
            "repeats": repeats,
        }
        for name, t in times.items()
    }
