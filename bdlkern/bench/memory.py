"""Memory: the peak a call allocates, and the bytes of what it returns (:func:`measure_memory`).

One separate call per variant, outside the timed loops:

* CUDA: ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it,
  i.e. the peak of everything the call allocated (outputs and temporaries);
* CPU: the peak of torch's CPU allocations during the call, replayed from the profiler's memory
  records (``profile_memory=True``), outputs and temporaries alike. (torch has no CPU allocator
  statistics, and ``tracemalloc`` does not see torch's allocations.) The profiler's own log lines
  (libkineto's ``USDT: ... profiler_start`` and, without a GPU, ``ERROR: ... gpuGetDeviceCount``)
  go to file descriptor 2 and are dropped (:func:`_kineto_quiet`); anything else written there
  during the call is passed on.

Both also report the bytes of the returned tensors (each storage once) and the peak beyond them
(``extra``: what the call needed on top of its result, e.g. a materialised ``[S, B, in]`` dropout
input).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .timing import synchronize


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
        # A call's peak cannot be below the tensors it returns unless the profiler lost its
        # allocation records, which a fresh CI machine showed once on a sub-millisecond call (a
        # whole Adam step with no record at all): measure such a call again, up to twice.
        for _ in range(3):
            peak, out = _cpu_peak_bytes(fn)
            if peak >= _output_bytes(out):
                break
        measure = "cpu_peak_allocated"
    output = _output_bytes(out)
    del out
    return {"bytes": peak, "output_bytes": output, "extra_bytes": max(peak - output, 0), "measure": measure}
