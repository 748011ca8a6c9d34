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

The harness is one module per concern; this package re-exports their names, so
``bdlkern.bench.X`` reaches all of them:

* :mod:`~bdlkern.bench.registry`: :class:`Case`, :class:`Workload`, the :data:`CASES` registry,
  :func:`case`, :func:`select_cases`;
* :mod:`~bdlkern.bench.timing`: :func:`time_fn`, :func:`time_fns`, :func:`synchronize` and the
  default settings;
* :mod:`~bdlkern.bench.memory`: :func:`measure_memory`;
* :mod:`~bdlkern.bench.machine`: :func:`describe_machine`;
* :mod:`~bdlkern.bench.compare`: throughput, :func:`speedups`, :func:`headline_speedup`;
* :mod:`~bdlkern.bench.runner`: :func:`run_case`, :func:`run_benchmarks` (the JSON report);
* :mod:`~bdlkern.bench.report`: the printed header, table and notes;
* :mod:`~bdlkern.bench.baselines`: the eager PyTorch code the cases time as baselines (written
  for speed, the way a competent user would; the test oracle ``bdlkern.testing.reference`` only
  checks results);
* :mod:`~bdlkern.bench.cases`: the case definitions, one module per family.
"""

from __future__ import annotations

from .compare import ALTERNATIVE_KINDS, _throughput, headline_speedup, speedups
from .machine import _cpu_model, describe_machine
from .memory import _KINETO_LOG_LINE, _cpu_peak_bytes, _kineto_quiet, _output_bytes, _tensors, measure_memory
from .registry import BASELINE_KINDS, CASES, Case, Workload, case, register_case, select_cases
from .report import _mib, _ms, _num, _primary_throughput, format_header, format_notes, format_report, format_table
from .runner import SCHEMA_VERSION, _jsonable, _quiet_logger, run_benchmarks, run_case
from .timing import QUICK_REPEATS, QUICK_TARGET_S, REPEATS, TARGET_S, synchronize, time_fn, time_fns

# The case modules register themselves on import (they use the registry above), so this import
# comes after it.
from . import cases  # noqa: E402,F401

__all__ = [
    "ALTERNATIVE_KINDS",
    "BASELINE_KINDS",
    "CASES",
    "QUICK_REPEATS",
    "QUICK_TARGET_S",
    "REPEATS",
    "SCHEMA_VERSION",
    "TARGET_S",
    "Case",
    "Workload",
    "case",
    "describe_machine",
    "format_header",
    "format_notes",
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
