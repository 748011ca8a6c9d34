"""pytest-benchmark suite for the ``concrete`` case family (``bdlkern/bench/cases/concrete.py``)."""

import pytest

pytestmark = pytest.mark.bench_family("concrete")


def test_concrete(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    assert out is not None
