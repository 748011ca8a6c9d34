"""The ``models`` case family (``bdlkern/bench/cases/models.py``): its quick workloads pass their checks
and have every declared variant, the checks can fail, and the chunked ``mc_predict`` meets its
memory target; plus the pytest-benchmark suite of the family (``test_models``, sizes as the other
suites: ``BDLKERN_BENCH_QUICK=1`` for the quick ones).

    .venv/bin/python -m pytest bench/test_models_bench.py -k "not test_models["   # the checks only
"""

from __future__ import annotations

import copy

import pytest
import torch

import bdlkern
from bdlkern import bench
from bdlkern.bench.cases import models

pytestmark = pytest.mark.bench_family("models")

CASE_NAMES = [c.name for c in bench.select_cases(family="models")]


def test_models(benchmark, bench_variant):
    out = bench_variant.run(benchmark)
    assert out is not None


@pytest.fixture
def one_thread():
    """One torch thread for the test (the checks are not timed; a busy 2-core machine makes two
    threads slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_family_is_registered():
    assert "models" in bench.cases.FAMILIES
    assert CASE_NAMES == [
        "models.mlp_mc",
        "models.lenet_mc",
        "models.vgg_head_mc",
        "models.pruned_mlp_eval",
        "models.pruned_mlp_lrt",
        "models.mc_predict_chunk_memory",
    ]
    for name in CASE_NAMES:
        case = bench.CASES[name]
        # the report needs an alternative a user could pick, to name the fastest one
        assert any(kind in bench.ALTERNATIVE_KINDS for kind in case.baselines.values()), name
    for name, targets in models.TARGETS.items():
        assert set(targets) <= set(bench.CASES[name].baselines) | {"best free baseline"}, name
        assert "targets:" in bench.CASES[name].description
    for name in ("models.mlp_mc", "models.lenet_mc", "models.vgg_head_mc"):
        assert dict(bench.CASES[name].baselines) == models.MC_BASELINES


@pytest.mark.parametrize("name", CASE_NAMES)
def test_quick_case_passes_its_check(name, one_thread):
    case = bench.CASES[name]
    workload = case.build("cpu", quick=True)  # raises unless the variants are exactly the declared ones
    assert list(workload.variants) == case.variant_names
    assert workload.check is not None
    workload.check()
    for variant, fn in workload.variants.items():
        out = fn()
        tensors = out if isinstance(out, tuple) else (out,)
        assert tensors and all(isinstance(t, torch.Tensor) for t in tensors), variant
        assert torch.isfinite(tensors[0]).all(), variant
        work = workload.work(variant)
        assert work["elements"] == tensors[0].numel() and work["flops"] > 0, variant


def test_mc_cases_time_the_sampling_they_claim(one_thread):
    """The subject of the MC cases samples through the converted layers: with one seed the converted
    model repeats its samples, so the samples come from bdlkern's kernels, not torch's dropout."""
    workload = bench.CASES["models.mlp_mc"].build("cpu", quick=True)
    y = workload.variants["bdlkern convert + sampling"]()
    assert y.shape == (models.MLP["quick"]["S"], models.MLP["quick"]["N"], 10)
    torch.manual_seed(0)
    model = models._mlp()
    converted = bdlkern.nn.convert(copy.deepcopy(model).eval())
    assert any(isinstance(m, bdlkern.nn.MCDropoutLinear) for m in converted.modules())
    x = models._digits()[2][:16]
    with torch.no_grad():
        with bdlkern.sampling(4, seed=3):
            a = converted(x)
        with bdlkern.sampling(4, seed=3):
            b = converted(x)
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_distribution_check_catches_a_wrong_rate_or_scaling(one_thread):
    """The statistical check of the MC cases fails for dropout at another rate, without the 1/(1-p)
    scaling, or switched off, and passes for an independent draw of the same model."""
    torch.manual_seed(0)
    model = models._mlp()
    x = models._digits()[2][:32]
    S = models.CHECK_SAMPLES

    def samples(p: float | None, scale: float = 1.0) -> torch.Tensor:
        net = models._dropout_active(copy.deepcopy(model))
        for m in net.modules():
            if isinstance(m, torch.nn.Dropout):
                if p is None:
                    m.eval()
                else:
                    m.p = p
        with torch.no_grad():
            return models._loop(net, x, S) * scale

    ref = samples(models.P)
    models._check_distribution("same model", samples(models.P), ref, "ref")
    for broken in (samples(0.25), samples(None) + 1e-3 * torch.randn(S, 32, 10), samples(models.P, 1 - models.P)):
        with pytest.raises(AssertionError):
            models._check_distribution("broken", broken, ref, "ref")


def test_chunked_mc_predict_meets_its_memory_target(one_thread):
    """Peak memory of the chunked call (the harness's measure) at most 1/8 of the unchunked one, at
    the quick size (the ratio hardly depends on the batch)."""
    case = bench.CASES["models.mc_predict_chunk_memory"]
    workload = case.build("cpu", quick=True)
    peak = {name: bench.measure_memory(fn)["bytes"] for name, fn in workload.variants.items()}
    (baseline, ratio), = models.MEMORY_TARGETS[case.name].items()
    assert peak[case.subject] <= ratio * peak[baseline], peak
    assert peak["eager batch replication"] > peak[baseline]  # replication holds all S passes at once too
