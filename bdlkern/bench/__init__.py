"""Benchmark harness: one set of case definitions for ``python -m bdlkern.bench`` and ``bench/``.

A :class:`Case` names the bdlkern variant under test (the *subject*) and the baselines it is compared
with, and has a ``setup(device, quick)`` function that builds the inputs and returns a
:class:`Workload`: the callables to time, one per variant, plus the work they do (elements, bytes
moved, FLOPs) so that throughput can be printed. Cases live in ``bdlkern/bench/cases/<family>.py``;
adding a family is adding a module there and listing it in ``cases.FAMILIES``.

The CLI (:mod:`bdlkern.bench.__main__`) and the pytest-benchmark suites in ``bench/`` both read
:data:`CASES`, so shapes and callables are written once (docs/design.md section 7).

Measurement (:func:`time_fns`): warm-up calls (which also absorb ``torch.compile`` compilation), then
an inner loop of ``number`` calls sized to last about ``target_s`` (0.2 s), repeated ``repeats``
times with :func:`time.perf_counter`, the variants of a case taking turns (round-robin) so that a
drift in the machine's speed hits them all alike; the per-call median and minimum over the repeats
are reported. On CUDA the device is synchronised before the clock starts and after the inner loop.

Memory (:func:`measure_memory`), one separate call per variant:

* CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it,
  i.e. the peak of everything the call allocated (outputs and temporaries);
* CPU: the peak of torch's CPU allocations during the call, replayed from the profiler's memory
  records (``profile_memory=True``), outputs and temporaries alike. (torch has no CPU allocator
  statistics, and ``tracemalloc`` does not see torch's allocations.) The profiler's own log lines
  (libkineto's ``USDT: ... profiler_start`` and, without a GPU, ``ERROR: ... gpuGetDeviceCount``)
  go to file descriptor 2 and are dropped (:func:`_kineto_quiet`); anything else written there
  during the call is passed on.

Both also report the bytes of the returned tensors and the peak beyond them (``extra``: what the
call needed on top of its result, e.g. a materialised ``[S, B, in]`` dropout input).

Ratios are ``baseline time / subject time`` (median over median): the speed-up of the bdlkern
variant over each baseline; below 1 means bdlkern is slower. The headline ratio of a case
(:func:`headline_speedup`) is the one over its fastest library, reference or compiled baseline:
the best a user could do without bdlkern.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

SCHEMA_VERSION = 1

#: What a baseline stands for; printed in the ``kind`` column. The subject's kind is ``"bdlkern"``.
BASELINE_KINDS = (
    "library",  # the closest path through torch or another library (torch.bernoulli_, torch.sparse)
    "reference",  # bdlkern.testing.reference run eagerly (the naive implementation)
    "compiled",  # torch.compile of the reference
    "limit",  # a physical-limit proxy: a plain GEMM or copy of the same shape
    "variant",  # another configuration of the bdlkern op (per-element vs shared masks)
)

#: Default seconds one timed measurement (an inner loop of ``number`` calls) should last.
TARGET_S = 0.2
#: Default number of timed measurements per variant.
REPEATS = 5
#: Settings used by ``--quick``: shorter measurements on the cases' small sizes.
QUICK_TARGET_S = 0.02
QUICK_REPEATS = 3


# ---- case definitions -----------------------------------------------------------------------------
@dataclass
class Workload:
    """What a case's ``setup`` returns: the callables to time and the work they do.

    Attributes:
        variants: variant name -> zero-argument callable that runs it once on pre-built inputs.
            The names must be exactly the case's subject and baselines.
        params: the sizes and settings of this workload (shapes, p, dtype), reported as-is.
        elements: logical elements produced per call (same for every variant), for G elements/s.
        bytes: minimum memory traffic per call, reads plus writes of each tensor once; an int for
            all variants or a mapping variant -> int where they differ (a bool mask writes 1 byte
            per element, a float32 tensor 4). Gives GB/s.
        flops: floating-point operations per call, an int or a mapping like ``bytes``. Gives
            GFLOP/s; when set it is the primary throughput instead of elements.
        check: optional sanity check run once before timing (raise on failure), so a benchmark
            never times a broken kernel.
    """

    variants: dict[str, Callable[[], Any]]
    params: dict[str, Any] = field(default_factory=dict)
    elements: int | None = None
    bytes: int | Mapping[str, int] | None = None
    flops: int | Mapping[str, int] | None = None
    check: Callable[[], None] | None = None

    def work(self, variant: str) -> dict[str, int | None]:
        """Elements, bytes and flops of one call of ``variant``."""

        def pick(metric):
            if isinstance(metric, Mapping):
                return metric.get(variant)
            return metric

        return {"elements": self.elements, "bytes": pick(self.bytes), "flops": pick(self.flops)}


@dataclass(frozen=True)
class Case:
    """One benchmark case: a bdlkern variant against its baselines on one workload.

    Attributes:
        name: unique, dotted by family (``"rng.dropout_mask"``); ``--case`` matches it.
        family: the case family (``"rng"``, ``"mc_dropout"``, ...), one module in ``cases/``.
        description: one line saying what is computed and at what size.
        subject: name of the bdlkern variant.
        baselines: baseline name -> kind (one of :data:`BASELINE_KINDS`), in report order. Any
            number is allowed; each gets a speed-up ratio.
        setup: ``setup(device, quick) -> Workload``; builds inputs on ``device`` (a
            ``torch.device``) at full size, or at a small size when ``quick`` is true.
        devices: device types the case can run on.
    """

    name: str
    family: str
    description: str
    subject: str
    baselines: Mapping[str, str]
    setup: Callable[[torch.device, bool], Workload]
    devices: tuple[str, ...] = ("cpu", "cuda")

    def __post_init__(self):
        for name, kind in self.baselines.items():
            if kind not in BASELINE_KINDS:
                raise ValueError(f"case {self.name}: baseline {name!r} has kind {kind!r}, expected one of {BASELINE_KINDS}")
        if self.subject in self.baselines:
            raise ValueError(f"case {self.name}: subject {self.subject!r} is also listed as a baseline")

    @property
    def variant_names(self) -> list[str]:
        """The subject followed by the baselines: the order variants are run and reported in."""
        return [self.subject, *self.baselines]

    def kind(self, variant: str) -> str:
        """``"bdlkern"`` for the subject, else the baseline's kind."""
        return "bdlkern" if variant == self.subject else self.baselines[variant]

    def build(self, device: torch.device | str, quick: bool = False) -> Workload:
        """Run ``setup`` and check that it returned exactly the declared variants."""
        workload = self.setup(torch.device(device), quick)
        if list(workload.variants) != self.variant_names:
            raise RuntimeError(
                f"case {self.name}: setup returned variants {list(workload.variants)}, "
                f"declared {self.variant_names}"
            )
        return workload


#: The registry: case name -> :class:`Case`, in registration order.
CASES: dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Add ``case`` to :data:`CASES` (names must be unique) and return it."""
    if case.name in CASES:
        raise ValueError(f"benchmark case {case.name!r} is registered twice")
    CASES[case.name] = case
    return case


def case(
    name: str,
    *,
    family: str,
    description: str,
    subject: str,
    baselines: Mapping[str, str],
    devices: tuple[str, ...] = ("cpu", "cuda"),
) -> Callable[[Callable[[torch.device, bool], Workload]], Case]:
    """Decorator form of :func:`register_case`: decorates the ``setup`` function.

    Example::

        @case("rng.uniform", family="rng", description="...", subject="bdlkern.uniform",
              baselines={"torch.rand": "library"})
        def _uniform(device, quick):
            ...
            return Workload(variants={...}, elements=n, bytes=4 * n)
    """

    def wrap(setup: Callable[[torch.device, bool], Workload]) -> Case:
        return register_case(
            Case(name, family, description, subject, dict(baselines), setup, tuple(devices))
        )

    return wrap


def select_cases(patterns: Sequence[str] | None = None, *, family: str | None = None) -> list[Case]:
    """Cases chosen by ``--case`` patterns, in registry order.

    A pattern that equals a case name selects that case only; otherwise it selects every case whose
    name contains it. No patterns selects all cases. ``family`` further restricts the result.

    Raises:
        KeyError: a pattern matches no case.
    """
    chosen: set[str] = set()
    for pattern in patterns or []:
        if pattern in CASES:
            chosen.add(pattern)
            continue
        hits = [name for name in CASES if pattern in name]
        if not hits:
            raise KeyError(f"no benchmark case matches {pattern!r}; cases: {', '.join(CASES)}")
        chosen.update(hits)
    return [
        c
        for name, c in CASES.items()
        if (not patterns or name in chosen) and (family is None or c.family == family)
    ]


# ---- measurement ----------------------------------------------------------------------------------
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


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item)


def _output_bytes(out: Any) -> int:
    """Bytes of the tensors in ``out``, counting each storage once."""
    storages = {}
    for t in _tensors(out):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return int(sum(storages.values()))


#: A line of libkineto's own log (``LEVEL:date time pid:tid File.cpp:line] text``).
_KINETO_LOG_LINE = re.compile(
    rb"^(USDT|VERBOSE|INFO|WARNING|ERROR):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ \S+:\d+\] "
    # ... and the profiler's own note from c10's CPU allocator, about a block freed during the
    # profiled call that was allocated before it (e.g. by the case's setup)
    rb"|^\[W\d{4} [\d:.]+ \S+:\d+\] Memory block of unknown size was allocated before the profiling"
)


@contextlib.contextmanager
def _kineto_quiet() -> Iterator[None]:
    """Drops libkineto's log lines (written by C++ straight to file descriptor 2, so neither
    ``sys.stderr`` nor ``logging`` can catch them): fd 2 points to a temporary file inside the
    block, and on exit every line of it that is not a kineto log line is written to the real fd 2.

    Process-wide while it lasts (a file descriptor is), so the harness calls it from one thread.
    """
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing to keep quiet
        yield
        return
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True) if not _KINETO_LOG_LINE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def _cpu_peak_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Peak bytes allocated by torch's CPU allocator during ``fn()``, above the level before it.

    Replays the allocation and free records of the profiler (``profile_memory=True``) in time order
    and takes the maximum of the running sum. The profiler's log lines are dropped (:func:`_kineto_quiet`).
    """
    from torch.profiler import ProfilerActivity, profile

    with _kineto_quiet():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
        records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    records.sort(key=lambda e: e.start_ns())
    level = peak = 0
    for record in records:
        level += record.nbytes()
        peak = max(peak, level)
    return int(peak), out


def measure_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Peak memory of one call of ``fn`` (see module docstring).

    Returns:
        dict with ``bytes`` (peak bytes allocated during the call above what was allocated before
        it, outputs included), ``output_bytes`` (the returned tensors, each storage once),
        ``extra_bytes`` (peak beyond the output: temporaries) and ``measure``
        (``"cuda_peak_allocated"`` or ``"cpu_peak_allocated"``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device) - before)
        measure = "cuda_peak_allocated"
    else:
        peak, out = _cpu_peak_bytes(fn)
        measure = "cpu_peak_allocated"
    output = _output_bytes(out)
    del out
    return {"bytes": peak, "output_bytes": output, "extra_bytes": max(peak - output, 0), "measure": measure}


# ---- machine and build --------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine and software a run was measured on.

    Returns:
        dict with ``cpu`` (model), ``cpu_capability`` (the vector ISA torch dispatches to),
        ``logical_cpus``, ``usable_cpus`` (affinity), ``torch_threads`` (intra-op threads now),
        ``platform``, ``python``, ``torch``, ``bdlkern`` (:func:`bdlkern.build_info`) and, on CUDA,
        ``gpu`` (name, capability, memory, CUDA runtime).
    """
    import bdlkern

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bdlkern": bdlkern.build_info(),
    }
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "cuda_runtime": torch.version.cuda,
        }
    return info


# ---- running cases --------------------------------------------------------------------------------
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


# ---- report -------------------------------------------------------------------------------------
def _num(x: float) -> str:
    """Three significant digits below 100, one decimal above (no exponents for big numbers)."""
    return f"{x:#.3g}" if abs(x) < 99.95 else f"{x:.1f}"


def _ms(seconds: float) -> str:
    return _num(seconds * 1e3)


def _primary_throughput(throughput: Mapping[str, float]) -> str:
    for unit in ("GFLOP/s", "Gelem/s"):
        if unit in throughput:
            return f"{_num(throughput[unit])} {unit}"
    return "-"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def format_header(report: Mapping[str, Any]) -> str:
    """The machine, build and settings lines printed above the table."""
    m = report["machine"]
    b = m["bdlkern"]
    s = report["settings"]
    lines = [
        f"machine : {m['cpu']} ({m['cpu_capability']}), {m['usable_cpus']}/{m['logical_cpus']} usable cpus, "
        f"torch threads {m['torch_threads']}; {m['platform']}",
        f"software: python {m['python']}, torch {m['torch']}; bdlkern {b.get('version')} "
        f"(built for torch {b.get('torch_version')}, compiler {b.get('compiler')}, {b.get('parallel_backend')}, "
        f"cuda kernels {'yes ' + str(b.get('cuda_version')) if b.get('cuda') else 'no'})",
    ]
    if "gpu" in m:
        g = m["gpu"]
        lines.append(f"gpu     : {g['name']} (sm {g['capability']}, {g['memory_bytes'] / 2**30:.0f} GiB, CUDA {g['cuda_runtime']})")
    lines.append(
        f"settings: device {s['device']}, {'quick' if s['quick'] else 'full'} sizes, "
        f"median/min of {s['repeats']} measurements of ~{s['target_s']:g} s each"
    )
    return "\n".join(lines)


def format_table(report: Mapping[str, Any]) -> str:
    """The results as a fixed-width table, one row per variant.

    The last column is the speed-up of the case's bdlkern variant over the baseline of that row
    (baseline median / bdlkern median), so a case may have any number of baselines. The headline
    ratio (:func:`headline_speedup`: over the fastest library, reference or compiled baseline) is
    marked with ``*``.
    """
    header = ["case", "variant", "kind", "median ms", "min ms", "throughput", "GB/s", "peak MiB", "extra MiB", "bdlkern speed-up"]
    rows = []
    for c in report["cases"]:
        headline = (c.get("headline") or {}).get("baseline")
        for i, (name, v) in enumerate(c["variants"].items()):
            if name == c["subject"]:
                ratio = "(subject)"
            else:
                ratio = ("* " if name == headline else "") + f"{c['speedup'][name]['median']:.2f}x"
            gbs = v["throughput"].get("GB/s")
            rows.append(
                [
                    c["name"] if i == 0 else "",
                    name,
                    v["kind"],
                    _ms(v["median_s"]),
                    _ms(v["min_s"]),
                    _primary_throughput(v["throughput"]),
                    _num(gbs) if gbs is not None else "-",
                    _mib(v["memory"]["bytes"]),
                    _mib(v["memory"]["extra_bytes"]),
                    ratio,
                ]
            )
    right = {3, 4, 5, 6, 7, 8, 9}
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(cell).rjust(w) if i in right else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for r in rows:
        if r[0] and previous is not None:
            out.append("")
        out.append(line(r))
        previous = r
    return "\n".join(out)


def format_notes(report: Mapping[str, Any]) -> str:
    """Footnotes: case descriptions and sizes, what the memory column measures, skipped cases."""
    cuda = report["settings"]["device"].startswith("cuda")
    lines = []
    for c in report["cases"]:
        params = ", ".join(f"{k}={v}" for k, v in c["params"].items())
        lines.append(f"{c['name']}: {c['description']}" + (f" [{params}]" if params else ""))
    lines.append(
        "throughput: G elements/s (or GFLOP/s); GB/s: minimum traffic (each tensor read/written once) / median; "
        + "peak MiB: "
        + ("torch.cuda.max_memory_allocated" if cuda else "torch CPU allocations (profiler records)")
        + " during one call, above the level before it; extra MiB: peak beyond the returned tensors."
    )
    lines.append(
        "bdlkern speed-up: baseline median / bdlkern median (>1: bdlkern faster); * marks the headline: the "
        "fastest baseline a user could pick instead (library, reference or compiled; not a limit proxy or a variant)."
    )
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['name']}: {s['reason']}")
    return "\n".join(lines)


def format_report(report: Mapping[str, Any]) -> str:
    """Header, table and notes: what the CLI prints."""
    return "\n\n".join([format_header(report), format_table(report), format_notes(report)])


# The case modules register themselves on import; they import the names defined above, so this
# import stays at the bottom.
from . import cases  # noqa: E402,F401

__all__ = [
    "BASELINE_KINDS",
    "CASES",
    "Case",
    "Workload",
    "case",
    "describe_machine",
    "format_report",
    "format_table",
    "headline_speedup",
    "measure_memory",
    "register_case",
    "run_benchmarks",
    "run_case",
    "select_cases",
    "speedups",
    "synchronize",
    "time_fn",
    "time_fns",
]
