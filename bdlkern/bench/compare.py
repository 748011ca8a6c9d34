"""What a case's timings mean: throughput from the work of a call, the speed-up of the bdlkern
subject over each baseline (:func:`speedups`), and the headline ratio over the fastest baseline a
user could pick instead (:func:`headline_speedup`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def _throughput(work: Mapping[str, int | None], seconds: float) -> dict[str, float]:
    out = {}
    if work.get("elements"):
        out["Gelem/s"] = work["elements"] / seconds / 1e9
    if work.get("bytes"):
        out["GB/s"] = work["bytes"] / seconds / 1e9
    if work.get("flops"):
        out["GFLOP/s"] = work["flops"] / seconds / 1e9
    return out


def speedups(variants: Mapping[str, Mapping[str, Any]], subject: str, baselines: Iterable[str]) -> dict:
    """Speed-up of ``subject`` over each baseline: ``baseline time / subject time``.

    Returns:
        baseline -> ``{"median": ..., "min": ...}`` (ratio of the medians, ratio of the minima).
    """
    s = variants[subject]
    return {
        b: {"median": variants[b]["median_s"] / s["median_s"], "min": variants[b]["min_s"] / s["min_s"]}
        for b in baselines
    }


#: The baseline kinds a user could pick instead of bdlkern; the headline ratio is taken over the
#: fastest of them. Limit proxies (not a way to compute the result) and variants (bdlkern itself)
#: are left out.
ALTERNATIVE_KINDS = ("library", "reference", "compiled")


def headline_speedup(
    variants: Mapping[str, Mapping[str, Any]], subject: str, baselines: Mapping[str, str]
) -> dict[str, Any] | None:
    """The speed-up over the fastest (median) baseline of a kind in :data:`ALTERNATIVE_KINDS`:
    what a user who picks the best way to do it without bdlkern gains. A ``torch.compile`` that is
    slower than eager, say, never makes the headline.

    Returns:
        ``{"baseline": name, "kind": ..., "median": ..., "min": ...}`` (ratios as in
        :func:`speedups`), or None when the case has no such baseline.
    """
    candidates = [b for b, kind in baselines.items() if kind in ALTERNATIVE_KINDS]
    if not candidates:
        return None
    best = min(candidates, key=lambda b: variants[b]["median_s"])
    s, v = variants[subject], variants[best]
    return {
        "baseline": best,
        "kind": baselines[best],
        "median": v["median_s"] / s["median_s"],
        "min": v["min_s"] / s["min_s"],
    }
