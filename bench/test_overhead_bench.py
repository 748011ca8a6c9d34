"""pytest-benchmark suite for the ``overhead`` case family (``bdlkern/bench/cases/overhead.py``)."""

import pytest

pytestmark = pytest.mark.bench_family("overhead")


def test_overhead(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    assert out is not None
