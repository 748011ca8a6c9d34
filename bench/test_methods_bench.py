"""pytest-benchmark suite for the ``methods`` case family (``bdlkern/bench/cases/methods.py``)."""

import pytest

import bdlkern.bench.cases.methods  # noqa: F401  (registers the family's cases, also before it is in FAMILIES)

pytestmark = pytest.mark.bench_family("methods")


def test_methods(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    assert out is not None
