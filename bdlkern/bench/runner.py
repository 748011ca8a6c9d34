"""Running cases: build, check, time and measure every variant (:func:`run_case`), and a whole
run with its settings and machine description (:func:`run_benchmarks`): the report that ``--json``
writes and :mod:`bdlkern.bench.report` prints.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import torch

from .compare import _throughput, headline_speedup, speedups
from .machine import describe_machine
from .memory import measure_memory
from .registry import Case
from .timing import QUICK_REPEATS, QUICK_TARGET_S, REPEATS, TARGET_S, time_fns

#: Version of the report's layout (the dict :func:`run_benchmarks` returns).
SCHEMA_VERSION = 1


def run_case(
    case: Case,
    device: torch.device | str = "cpu",
    *,
    quick: bool = False,
    target_s: float | None = None,
    repeats: int | None = None,
    on_variant: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build ``case``'s workload on ``device``, check it, and time and measure every variant.

    ``target_s`` and ``repeats`` default to :data:`TARGET_S`/:data:`REPEATS`, or to the quick
    settings when ``quick``. ``on_variant(name)`` is called after each variant (progress bars).

    Returns:
        a JSON-ready dict: ``name``, ``family``, ``description``, ``params``, ``subject``,
        ``baselines`` (name -> kind), ``variants`` (name -> ``kind``, timings of :func:`time_fn`,
        ``work``, ``throughput``, ``memory``), ``speedup`` (:func:`speedups`) and ``headline``
        (:func:`headline_speedup`: the ratio over the fastest alternative a user could pick).
    """
    device = torch.device(device)
    target_s = target_s if target_s is not None else (QUICK_TARGET_S if quick else TARGET_S)
    repeats = repeats if repeats is not None else (QUICK_REPEATS if quick else REPEATS)
    workload = case.build(device, quick)
    if workload.check is not None:
        workload.check()
    results: dict[str, dict[str, Any]] = {}
    timings = time_fns(workload.variants, device, target_s=target_s, repeats=repeats)
    for name, fn in workload.variants.items():
        timing = timings[name]
        work = workload.work(name)
        results[name] = {
            "kind": case.kind(name),
            **timing,
            "work": work,
            "throughput": _throughput(work, timing["median_s"]),
            "memory": measure_memory(fn, device),
        }
        if on_variant is not None:
            on_variant(name)
    params = _jsonable(workload.params)
    del workload, fn  # free the inputs (held by the variants' closures) before the next case
    return {
        "name": case.name,
        "family": case.family,
        "description": case.description,
        "params": params,
        "subject": case.subject,
        "baselines": dict(case.baselines),
        "variants": results,
        "speedup": speedups(results, case.subject, case.baselines),
        "headline": headline_speedup(results, case.subject, case.baselines),
    }


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    return str(obj)  # dtypes, devices, shapes


def run_benchmarks(
    cases: Sequence[Case],
    device: torch.device | str = "cpu",
    *,
    quick: bool = False,
    target_s: float | None = None,
    repeats: int | None = None,
    progress: bool | None = None,
    argv: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run ``cases`` on ``device`` and return the whole report (what ``--json`` writes).

    Args:
        progress: ``None`` (default): a tqdm bar on stderr when it is a terminal, else one line per
            case on stderr (``[i/n] name: k variants``) before the case runs; ``True``: the bar;
            ``False``: nothing.
        argv: the command line, recorded in the report.

    Only the harness's own output reaches the terminal: the profiler's log lines are dropped (see
    :func:`measure_memory`) and torch's notice that no CUDA runtime was found (logged when
    ``torch.compile`` baselines load the C++ extension helpers on a machine without CUDA) is
    silenced for the run.

    Returns:
        dict with ``schema``, ``created`` (UTC, ISO 8601), ``argv``, ``settings`` (device, quick,
        target_s, repeats), ``machine`` (:func:`describe_machine`) and ``cases`` (a list of
        :func:`run_case` results, in order). A case that does not support ``device`` is listed
        under ``skipped`` with the reason.
    """
    from tqdm import tqdm

    device = torch.device(device)
    target_s = target_s if target_s is not None else (QUICK_TARGET_S if quick else TARGET_S)
    repeats = repeats if repeats is not None else (QUICK_REPEATS if quick else REPEATS)
    runnable = [c for c in cases if device.type in c.devices]
    skipped = [
        {"name": c.name, "reason": f"runs on {', '.join(c.devices)}, not {device.type}"}
        for c in cases
        if device.type not in c.devices
    ]
    results = []
    total = sum(len(c.variant_names) for c in runnable)
    use_bar = progress is True or (progress is None and sys.stderr.isatty())
    lines = progress is None and not use_bar
    with (
        tqdm(total=total, unit="variant", file=sys.stderr, disable=not use_bar) as bar,
        _quiet_logger("torch.utils.cpp_extension", logging.ERROR),
    ):
        for i, c in enumerate(runnable):
            bar.set_description(c.name)
            if lines:
                line = f"[{i + 1}/{len(runnable)}] {c.name}: {len(c.variant_names)} variants"
                print(line, file=sys.stderr, flush=True)

            def advance(variant: str) -> None:
                bar.set_postfix_str(variant)
                bar.update()

            results.append(
                run_case(c, device, quick=quick, target_s=target_s, repeats=repeats, on_variant=advance)
            )
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv) if argv is not None else None,
        "settings": {"device": str(device), "quick": quick, "target_s": target_s, "repeats": repeats},
        "machine": describe_machine(device),
        "cases": results,
        "skipped": skipped,
    }


@contextlib.contextmanager
def _quiet_logger(name: str, level: int) -> Iterator[None]:
    """Raises the level of logger ``name`` to ``level`` for the block."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(max(level, before))
    try:
        yield
    finally:
        logger.setLevel(before)
