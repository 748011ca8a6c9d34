"""pytest-benchmark suite for the ``rng`` case family (cases in ``bdlkern/bench/cases/rng.py``).

Each (case, variant) is one benchmark; each case is one group, so pytest-benchmark's table shows
the bdlkern variant beside its baselines. ``python -m bdlkern.bench --case rng`` prints the same
comparison as speed-up ratios.
"""

import pytest

pytestmark = pytest.mark.bench_family("rng")


def test_rng(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    n = bench_variant.params["n"]
    assert out.numel() == n  # the timed call produced the whole tensor
