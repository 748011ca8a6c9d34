"""pytest-benchmark suites over the cases of :mod:`bdlkern.bench` (no second copy of any case).

Run them by naming this folder (the repo's ``testpaths`` is ``tests/`` only)::

    .venv/bin/python -m pytest bench/ --benchmark-only
    BDLKERN_BENCH_QUICK=1 .venv/bin/python -m pytest bench/ --benchmark-only   # 1M-element sizes
    BDLKERN_BENCH_DEVICE=cuda .venv/bin/python -m pytest bench/ --benchmark-only

A suite file marks itself ``pytest.mark.bench_family("<family>")`` and takes the ``bench_variant``
fixture; :func:`pytest_generate_tests` parametrises it over every (case, variant) of the family.
Each case is one pytest-benchmark group, so the group table compares a case's variants.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from bdlkern import bench

#: ``BDLKERN_BENCH_QUICK=1``: the cases' small (``--quick``) sizes.
QUICK = os.environ.get("BDLKERN_BENCH_QUICK", "0").lower() not in ("", "0", "false", "no")
#: ``BDLKERN_BENCH_DEVICE``: ``cpu`` (default) or ``cuda``.
DEVICE = torch.device(os.environ.get("BDLKERN_BENCH_DEVICE", "cpu"))


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_family(name): parametrise bench_variant over a case family")


def pytest_generate_tests(metafunc):
    if "bench_variant" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("bench_family")
    if marker is None:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: bench_variant needs pytest.mark.bench_family(name)")
    family = marker.args[0]
    cases = bench.select_cases(family=family)
    if not cases:
        raise pytest.UsageError(f"no benchmark cases registered for family {family!r}")
    metafunc.parametrize(
        "bench_variant",
        [(c.name, v) for c in cases for v in c.variant_names],
        ids=[f"{c.name}:{v}" for c in cases for v in c.variant_names],
        indirect=True,
    )


class _WorkloadCache:
    """Holds the workload of one case at a time: built (and checked) when its first variant runs,
    dropped when the next case starts, so the inputs of only one case are alive."""

    def __init__(self):
        self.name: str | None = None
        self.workload: bench.Workload | None = None

    def get(self, case: bench.Case) -> bench.Workload:
        if self.name != case.name:
            self.name, self.workload = None, None
            workload = case.build(DEVICE, QUICK)
            if workload.check is not None:
                workload.check()
            self.name, self.workload = case.name, workload
        return self.workload


@pytest.fixture(scope="session")
def _workloads() -> _WorkloadCache:
    return _WorkloadCache()


@dataclass
class BenchVariant:
    """One variant of one case, ready for ``benchmark(variant.fn)``."""

    case: bench.Case
    name: str
    fn: Callable[[], Any]
    work: dict[str, int | None]
    params: dict[str, Any]

    def run(self, benchmark) -> Any:
        """Benchmark ``fn`` in the case's group and record what it is and its throughput."""
        benchmark.group = self.case.name
        benchmark.extra_info.update(
            case=self.case.name,
            variant=self.name,
            kind=self.case.kind(self.name),
            device=str(DEVICE),
            quick=QUICK,
            params=self.params,
            **{k: v for k, v in self.work.items() if v is not None},
        )
        result = benchmark(self.fn)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None and stats.median > 0:
            for metric, unit in (("elements", "Gelem/s"), ("bytes", "GB/s"), ("flops", "GFLOP/s")):
                if self.work.get(metric):
                    benchmark.extra_info[unit] = self.work[metric] / stats.median / 1e9
        return result


@pytest.fixture
def bench_variant(request, _workloads) -> BenchVariant:
    """The (case, variant) this test is parametrised with, its inputs built on ``DEVICE``."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    case_name, variant = request.param
    case = bench.CASES[case_name]
    if DEVICE.type not in case.devices:
        pytest.skip(f"{case_name} does not run on {DEVICE.type}")
    workload = _workloads.get(case)
    raw = workload.variants[variant]

    def fn():
        out = raw()
        bench.synchronize(DEVICE)
        return out

    fn()  # warm-up (compilation, allocator) outside pytest-benchmark's rounds
    return BenchVariant(case, variant, fn, workload.work(variant), workload.params)
