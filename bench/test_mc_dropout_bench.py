"""pytest-benchmark suite for the ``mc_dropout`` case family (``bdlkern/bench/cases/mc_dropout.py``)."""

import pytest

pytestmark = pytest.mark.bench_family("mc_dropout")


def test_mc_dropout(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    assert out is not None
