"""pytest-benchmark suite for the ``conv`` case family (``bdlkern/bench/cases/conv.py``)."""

import pytest

pytestmark = pytest.mark.bench_family("conv")


def test_conv(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    assert out is not None
