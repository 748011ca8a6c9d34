"""pytest-benchmark suite for the ``sparse_vd`` case family (``bdlkern/bench/cases/sparse_vd.py``)."""

import pytest

pytestmark = pytest.mark.bench_family("sparse_vd")


def test_sparse_vd(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    assert out is not None
