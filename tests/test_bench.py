"""The benchmark harness (bdlkern.bench): the CLI end to end in quick mode, its parts, and its
eager baselines against the test oracle.

Benchmarks are not timed tests: nothing here asserts that bdlkern is fast, only that the harness
measures, records and compares what it claims to.
"""

import json
import math
import statistics
import subprocess
import sys
import time

import pytest
import torch

import bdlkern
from bdlkern import bench
from bdlkern.bench import baselines
from bdlkern.bench.__main__ import main
from bdlkern.testing import reference as ref


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m bdlkern.bench --quick --json FILE --threads 1``: (completed process, report)."""
    path = tmp_path_factory.mktemp("bench") / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bdlkern.bench", "--quick", "--json", str(path), "--threads", "1", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc, json.loads(path.read_text())


def test_cli_quick_prints_table(quick_run):
    proc, report = quick_run
    out = proc.stdout
    assert "machine :" in out and "bdlkern speed-up" in out
    for case in report["cases"]:
        assert case["name"] in out
        for variant in case["variants"]:
            assert variant in out


def test_report_describes_machine_and_settings(quick_run):
    _, report = quick_run
    assert report["schema"] == bench.SCHEMA_VERSION
    machine = report["machine"]
    for key in ("cpu", "cpu_capability", "logical_cpus", "usable_cpus", "platform", "python", "torch"):
        assert machine[key], key
    assert machine["torch"] == torch.__version__
    assert machine["torch_threads"] == 1  # --threads 1 took effect before measuring
    assert machine["bdlkern"]["version"] and "cuda" in machine["bdlkern"]
    assert report["settings"] == {
        "device": "cpu",
        "quick": True,
        "target_s": bench.QUICK_TARGET_S,
        "repeats": bench.QUICK_REPEATS,
    }


def test_report_has_every_case_and_variant(quick_run):
    _, report = quick_run
    on_cpu = [name for name, c in bench.CASES.items() if "cpu" in c.devices]
    assert [c["name"] for c in report["cases"]] == on_cpu
    # The CUDA-only cases are listed as skipped, with the reason.
    assert [s["name"] for s in report["skipped"]] == [n for n in bench.CASES if n not in on_cpu]
    assert "mc_dropout.paths" in [s["name"] for s in report["skipped"]]
    for result in report["cases"]:
        case = bench.CASES[result["name"]]
        assert result["subject"] == case.subject
        assert result["baselines"] == dict(case.baselines)
        assert list(result["variants"]) == case.variant_names
        for name, v in result["variants"].items():
            assert v["kind"] == case.kind(name)
            assert 0 < v["min_s"] <= v["median_s"]
            assert len(v["times_s"]) == v["repeats"] == bench.QUICK_REPEATS and v["number"] >= 1
            mem = v["memory"]
            assert mem["measure"] == "cpu_peak_allocated" and mem["output_bytes"] > 0
            assert mem["bytes"] >= mem["output_bytes"] and mem["extra_bytes"] == mem["bytes"] - mem["output_bytes"]
            if v["work"]["elements"]:
                assert v["throughput"]["Gelem/s"] == pytest.approx(v["work"]["elements"] / v["median_s"] / 1e9)


def test_report_speedups_are_baseline_over_bdlkern(quick_run):
    _, report = quick_run
    for result in report["cases"]:
        variants, subject = result["variants"], result["variants"][result["subject"]]
        assert set(result["speedup"]) == set(result["baselines"]) and result["speedup"]
        for baseline, ratio in result["speedup"].items():
            assert ratio["median"] == pytest.approx(variants[baseline]["median_s"] / subject["median_s"])
            assert ratio["min"] == pytest.approx(variants[baseline]["min_s"] / subject["min_s"])
        # the headline: over the fastest baseline a user could pick instead (never a limit proxy)
        alternatives = [b for b, kind in result["baselines"].items() if kind in bench.ALTERNATIVE_KINDS]
        headline = result["headline"]
        assert alternatives and headline["baseline"] in alternatives, result["name"]
        assert headline["median"] == result["speedup"][headline["baseline"]]["median"]
        assert headline["median"] == min(result["speedup"][b]["median"] for b in alternatives)


def test_rng_quick_sizes_and_output_bytes(quick_run):
    _, report = quick_run
    mask = next(c for c in report["cases"] if c["name"] == "rng.dropout_mask")
    n = mask["params"]["n"]
    assert n == 2**20 and mask["params"]["p"] == 0.5
    out_bytes = {name: v["memory"]["output_bytes"] for name, v in mask["variants"].items()}
    assert out_bytes == {"bdlkern.dropout_mask": n, "torch.bernoulli_": n, "torch.rand": 4 * n, "torch.rand<keep": n}
    # rand<keep makes a float tensor on the way: the peak sees it, the output does not.
    assert 4 * n <= mask["variants"]["torch.rand<keep"]["memory"]["extra_bytes"] < 4 * n + 4096
    assert mask["variants"]["bdlkern.dropout_mask"]["memory"]["extra_bytes"] < 4096


# ---- parts --------------------------------------------------------------------------------------
def test_time_fn_measures_per_call_time():
    nap = 2e-3
    t = bench.time_fn(lambda: time.sleep(nap), target_s=0.02, repeats=3, warmup=1)
    assert nap <= t["min_s"] <= t["median_s"]
    # the inner loop is sized from one call of >= nap seconds to last about target_s
    assert 1 <= t["number"] <= math.ceil(0.02 / nap)
    assert len(t["times_s"]) == 3 and t["median_s"] == statistics.median(t["times_s"])


def test_time_fn_rejects_bad_settings():
    with pytest.raises(ValueError):
        bench.time_fn(lambda: None, repeats=0)


def test_measure_memory_counts_returned_storage_once():
    x = torch.empty(1000, dtype=torch.float32)
    m = bench.measure_memory(lambda: (x, x[:10], {"y": torch.empty(3, dtype=torch.int64)}))
    # x existed before the call: only the new int64 tensor is allocated; outputs count x once.
    assert m == {"bytes": 24, "output_bytes": 4000 + 24, "extra_bytes": 0, "measure": "cpu_peak_allocated"}


def test_measure_memory_sees_cpu_temporaries():
    def f():
        tmp = torch.ones(1 << 18)  # 1 MiB, freed before returning
        return tmp.sum().reshape(1)

    m = bench.measure_memory(f)
    assert m["output_bytes"] == 4 and m["bytes"] >= 4 * (1 << 18) and m["extra_bytes"] >= 4 * (1 << 18) - 4


def test_select_cases_exact_substring_and_unknown():
    assert [c.name for c in bench.select_cases(["rng.uniform"])] == ["rng.uniform"]
    assert [c.name for c in bench.select_cases(["dropout_mask"])] == ["rng.dropout_mask"]
    assert [c.name for c in bench.select_cases(["mask"])] == ["rng.dropout_mask", "mc_dropout.shared_mask"]
    assert bench.select_cases(None) == list(bench.CASES.values())
    assert {c.family for c in bench.select_cases(family="rng")} == {"rng"}
    with pytest.raises(KeyError, match="no benchmark case matches"):
        bench.select_cases(["no-such-case"])


def test_cli_list_and_bad_case(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for case in bench.CASES.values():
        assert case.name in out and all(v in out for v in case.variant_names)
    assert main(["--case", "no-such-case"]) == 2


def _fake_case(**kwargs):
    def setup(device, quick):
        return bench.Workload(variants={"fused": lambda: None, "eager": lambda: None})

    args = dict(name="t.fake", family="t", description="", subject="fused", baselines={"eager": "reference"}, setup=setup)
    return bench.Case(**{**args, **kwargs})


def test_case_validation():
    with pytest.raises(ValueError, match="kind"):
        _fake_case(baselines={"eager": "naive"})
    with pytest.raises(ValueError, match="subject"):
        _fake_case(baselines={"fused": "library"})
    with pytest.raises(RuntimeError, match="declared"):
        _fake_case(baselines={"eager": "reference", "compiled": "compiled"}).build("cpu")
    with pytest.raises(ValueError, match="twice"):
        bench.register_case(bench.CASES["rng.uniform"])


def test_table_handles_any_number_of_baselines():
    kinds = {"reference eager": "reference", "torch.compile(reference)": "compiled", "torch.mm": "limit"}
    times = {"bdlkern.fused": 1e-3, "reference eager": 4e-3, "torch.compile(reference)": 2e-3, "torch.mm": 5e-4}
    variants = {
        name: {
            "kind": kinds.get(name, "bdlkern"),
            "median_s": t,
            "min_s": t,
            "throughput": {"GFLOP/s": 1e-6 / t, "GB/s": 1e-6 / t},
            "memory": {"bytes": 2**20, "output_bytes": 2**19, "extra_bytes": 2**19, "measure": "cpu_peak_allocated"},
        }
        for name, t in times.items()
    }
    speedup = bench.speedups(variants, "bdlkern.fused", kinds)
    assert {b: r["median"] for b, r in speedup.items()} == pytest.approx(
        {"reference eager": 4.0, "torch.compile(reference)": 2.0, "torch.mm": 0.5}
    )
    report = {
        "settings": {"device": "cpu"},
        "cases": [{"name": "x.fused", "subject": "bdlkern.fused", "variants": variants, "speedup": speedup}],
    }
    lines = bench.format_table(report).splitlines()
    assert len(lines) == 2 + 4
    assert lines[2].rstrip().endswith("(subject)")
    assert [line.split()[-1] for line in lines[3:]] == ["4.00x", "2.00x", "0.50x"]
    # The headline is the compiled baseline: the fastest alternative; the faster limit proxy and
    # the slower eager reference are not.
    headline = bench.headline_speedup(variants, "bdlkern.fused", kinds)
    assert headline == {"baseline": "torch.compile(reference)", "kind": "compiled", "median": 2.0, "min": 2.0}
    report["cases"][0]["headline"] = headline
    rows = bench.format_table(report).splitlines()[3:]
    assert [row.split()[-2] == "*" for row in rows] == [False, True, False]
    assert [row.split()[-1] for row in rows] == ["4.00x", "2.00x", "0.50x"]
    assert bench.headline_speedup(variants, "bdlkern.fused", {"torch.mm": "limit"}) is None


def test_shared_mask_flops_follow_the_device():
    """The CPU shared-mask kernel and the fused CUDA forward multiply over the kept features only,
    about (1 - p) of the products; the CUDA materialise path does them all, so on CUDA the count
    follows the cost model's pick."""
    from bdlkern.bench.cases import mc_dropout
    from bdlkern.ops import cost_model as cm

    for dims in (mc_dropout.QUICK, mc_dropout.FULL):
        full = 2 * dims["S"] * dims["B"] * dims["K"] * dims["N"]
        half = round((1 - mc_dropout.P) * full)
        assert mc_dropout._shared_mask_flops(dims, torch.device("cpu")) == half
        for spec in (cm.A100_SXM4_80GB, cm.H100_SXM5_80GB):
            plan = cm.mc_dropout_linear_plan(
                dims["S"], dims["B"], dims["K"], dims["N"], spec=spec, shared_mask=True, p=mc_dropout.P
            )
            expected = half if plan.memory_efficient else full
            assert mc_dropout._shared_mask_flops(dims, torch.device("cuda"), spec) == expected
    # With TF32 allowed, cuBLAS wins the full-size float32 layer on an H100: every product counts.
    dims = mc_dropout.FULL
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        got = mc_dropout._shared_mask_flops(dims, torch.device("cuda"), cm.H100_SXM5_80GB)
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
    assert got == 2 * dims["S"] * dims["B"] * dims["K"] * dims["N"]


def test_time_fns_interleaves_and_times_each():
    order = []
    naps = {"a": 0.002, "b": 0.004}

    def make(name):
        def fn():
            order.append(name)
            time.sleep(naps[name])

        return fn

    result = bench.time_fns({n: make(n) for n in naps}, target_s=0.01, repeats=3, warmup=1)
    for name, nap in naps.items():
        assert result[name]["repeats"] == 3 and len(result[name]["times_s"]) == 3
        assert nap <= result[name]["median_s"] < nap + 0.02
    # After warm-up and calibration (a, a, b, b), the measurements alternate a-block / b-block.
    assert order[:4] == ["a", "a", "b", "b"]
    blocks = []
    for name in order[4:]:
        if not blocks or name != blocks[-1]:
            blocks.append(name)
    assert blocks == ["a", "b"] * 3
    with pytest.raises(ValueError, match="repeats >= 1"):
        bench.time_fns({"a": lambda: None}, repeats=0)


# ---- baselines: the eager code the cases time computes what the oracle computes -----------------
# The oracle (bdlkern.testing.reference) is never timed; the baselines (bdlkern.bench.baselines)
# are. Where a baseline takes its random draw as an argument, it gets the oracle's draw from the
# same rng_state and must give the oracle's result (float64, so only summation order differs);
# F.dropout draws inside one op, so that baseline is held to the oracle's distribution instead.
F64 = torch.float64
STREAMS = bdlkern.ops.STREAMS


def _rand(g, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_()


def _grads(y, leaves, seed=0):
    """Gradients of ``<y, g>`` for a fixed random ``g``: every output element weighs in."""
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    return torch.autograd.grad(y, leaves, g)


def _assert_same(got, want, leaves):
    """Equal values, and equal gradients with respect to each of ``leaves``."""
    torch.testing.assert_close(got, want)
    for i, (a, b) in enumerate(zip(_grads(got, leaves), _grads(want, leaves))):
        torch.testing.assert_close(a, b, msg=lambda m, i=i: f"gradient of input {i}: {m}")


def test_baseline_mc_dropout_shared_mask_matches_oracle():
    g = torch.Generator().manual_seed(0)
    S, B, K, N, p = 3, 5, 7, 4, 0.3
    x, w, b = _rand(g, B, K), _rand(g, N, K), _rand(g, N)
    state = (12345, 6)
    mask = ref.dropout_mask(state, (S, K), p, stream=STREAMS["mc_dropout"])
    got = baselines.mc_dropout_linear_shared(x, w, b, p, S, mask=mask)
    want = ref.mc_dropout_linear(x, w, b, p, S, shared_mask=True, rng_state=state)
    assert got.shape == (S, B, N)
    _assert_same(got, want, (x, w, b))
    # The draw the cases time: through an identity weight the dropped input shows, and every row
    # of a sample keeps the same features, each scaled by 1 / (1 - p).
    torch.manual_seed(0)
    y = baselines.mc_dropout_linear_shared(x.detach(), torch.eye(K, dtype=F64), None, p, 4000)
    kept = y != 0
    assert (kept == kept[:, :1]).all()
    torch.testing.assert_close(y[kept], (x.detach() / (1 - p)).expand_as(y)[kept])
    assert abs(kept[:, 0].double().mean().item() - (1 - p)) < 0.02  # 28000 draws: sd 0.003


def test_baseline_mc_dropout_matches_oracle_in_distribution():
    """Per-element masks: the baseline's samples and the oracle's have the exact mean
    ``x W^T + b`` and variance ``p / (1 - p) * x^2 (W^2)^T``, and each dropped input element is 0
    or ``x / (1 - p)``."""
    g = torch.Generator().manual_seed(1)
    S, B, K, N, p = 20000, 2, 6, 3, 0.3
    x, w, b = (t.detach() for t in (_rand(g, B, K), _rand(g, N, K), _rand(g, N)))
    torch.manual_seed(0)
    ye = baselines.mc_dropout_linear(x, torch.eye(K, dtype=F64), None, p, 2000)
    kept = ye != 0
    torch.testing.assert_close(ye[kept], (x / (1 - p)).expand_as(ye)[kept])
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01  # 24000 draws: sd 0.003

    mean = torch.nn.functional.linear(x, w, b)
    var = p / (1 - p) * torch.nn.functional.linear(x * x, w * w)
    torch.manual_seed(1)
    samples = {
        "baseline": baselines.mc_dropout_linear(x, w, b, p, S),
        "oracle": ref.mc_dropout_linear(x, w, b, p, S, rng_state=(77, 0)),
    }
    for name, y in samples.items():
        assert y.shape == (S, B, N), name
        # the sample mean within 5 standard errors; the sample variance within 10 %
        assert ((y.mean(0) - mean).abs() <= 5 * (var / S).sqrt()).all(), name
        torch.testing.assert_close(y.var(0), var, rtol=0.1, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_baseline_concrete_dropout_matches_oracle():
    g = torch.Generator().manual_seed(2)
    x = _rand(g, 6, 5)
    p_logit = torch.tensor(-1.0, dtype=F64, requires_grad=True)
    state = (99, 3)
    u = ref.uniform(state, x.shape, stream=STREAMS["concrete_dropout"], dtype=F64)
    got = baselines.concrete_dropout(x, p_logit, 0.1, u=u)
    _assert_same(got, ref.concrete_dropout(x, p_logit, 0.1, rng_state=state), (x, p_logit))
    # the timed call draws u with torch.rand_like
    torch.manual_seed(3)
    drawn = baselines.concrete_dropout(x, p_logit, 0.1)
    torch.manual_seed(3)
    torch.testing.assert_close(drawn, baselines.concrete_dropout(x, p_logit, 0.1, u=torch.rand_like(x)))

    w = _rand(g, 4, 5)
    for args in ((w, p_logit, 5, 1e-6, 1e-5), (w, p_logit, 3, 0.5, 2.0)):
        got = baselines.concrete_dropout_regularizer(*args)
        _assert_same(got, ref.concrete_dropout_regularizer(*args), (w, p_logit))


def test_baseline_eager_concrete_layer():
    """The overhead case's eager Concrete layer: the baseline formula, then its linear layer; the
    oracle's regulariser with the layer's coefficients."""
    torch.manual_seed(0)
    layer = baselines.EagerConcreteLinear(5, 3, init_p=0.2, weight_regularizer=1e-3, dropout_regularizer=1e-2).double()
    assert torch.sigmoid(layer.p_logit).item() == pytest.approx(0.2)
    x = torch.randn(4, 5, dtype=F64)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    u = torch.rand_like(x)
    want = layer.linear(baselines.concrete_dropout(x, layer.p_logit, layer.temperature, u=u))
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(
        layer.regularization(), ref.concrete_dropout_regularizer(layer.linear.weight, layer.p_logit, 5, 1e-3, 1e-2)
    )


def _sparse_vd_params(g, n, k):
    theta = _rand(g, n, k, scale=0.5)
    # log alpha over (-12, 12): both clamps of [-8, 8] are hit
    log_alpha = torch.rand(n, k, generator=g, dtype=F64) * 24 - 12
    log_sigma2 = (log_alpha + torch.log(theta.detach() ** 2 + 1e-8)).requires_grad_()
    return theta, log_sigma2


def test_baseline_lrt_and_kl_match_oracle():
    g = torch.Generator().manual_seed(4)
    S, B, K, N = 3, 4, 5, 6
    theta, log_sigma2 = _sparse_vd_params(g, N, K)
    x, bias = _rand(g, B, K), _rand(g, N)
    leaves = (x, theta, log_sigma2, bias)
    state = (5, 1)
    for samples in (S, None):
        shape = (B, N) if samples is None else (samples, B, N)
        eps = ref.normal(state, shape, stream=STREAMS["lrt"], dtype=F64)
        got = baselines.lrt_linear(*leaves, samples, eps=eps)
        _assert_same(got, ref.lrt_linear(*leaves, samples, rng_state=state), leaves)
    torch.manual_seed(5)
    drawn = baselines.lrt_linear(*leaves, S)
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, baselines.lrt_linear(*leaves, S, eps=torch.randn(S, B, N, dtype=F64)))

    got = baselines.sparse_vd_kl(theta, log_sigma2)
    _assert_same(got, ref.sparse_vd_kl(theta, log_sigma2), (theta, log_sigma2))
    # float32, as the cases time it, against the float64 oracle
    t32, s32 = theta.detach().float(), log_sigma2.detach().float()
    kl32 = baselines.sparse_vd_kl(t32, s32).item()
    assert kl32 == pytest.approx(ref.sparse_vd_kl(t32.double(), s32.double()).item(), rel=1e-5)


def test_baseline_eager_lrt_layer():
    """The overhead case's eager LRT layer: one LRT sample per input and the oracle's KL."""
    torch.manual_seed(0)
    layer = baselines.EagerLRTLinear(5, 3).double()
    x = torch.randn(4, 5, dtype=F64)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    eps = torch.randn(4, 3, dtype=F64)
    torch.testing.assert_close(y, baselines.lrt_linear(x, layer.theta, layer.log_sigma2, layer.bias, eps=eps))
    torch.testing.assert_close(layer.kl(), ref.sparse_vd_kl(layer.theta, layer.log_sigma2))


def test_baseline_torch_sparse_layers_match_oracle():
    g = torch.Generator().manual_seed(6)
    S, B, K, N = 3, 4, 9, 7
    keep = torch.rand(N, K, generator=g) < 0.3
    w = torch.randn(N, K, generator=g, dtype=F64) * keep
    v = (torch.rand(N, K, generator=g, dtype=F64) + 0.1) * keep  # nonzero wherever w is kept
    bias = torch.randn(N, generator=g, dtype=F64)
    x = torch.randn(B, K, generator=g, dtype=F64)
    w_csr, v_csr = baselines.to_csr(w), baselines.to_csr(v)
    assert torch.equal(w_csr.col_indices(), v_csr.col_indices())
    crow, col = w_csr.crow_indices(), w_csr.col_indices()

    for b in (bias, None):
        torch.testing.assert_close(baselines.CsrLinear(w, b)(x), ref.sparse_linear(x, crow, col, w_csr.values(), b))

    values = torch.stack([w_csr.values(), v_csr.values()], dim=1)
    state = (31, 2)
    eps = ref.normal(state, (S, B, N), stream=STREAMS["sparse_lrt"], dtype=F64)
    want = ref.sparse_linear(x, crow, col, values, bias, S, stochastic=True, rng_state=state)
    torch.testing.assert_close(baselines.CsrLinear(w, bias, variance=v).sample(x, S, eps=eps), want)
    torch.testing.assert_close(baselines.lrt_sample(x, w, v, bias, S, eps=eps), want)
    with pytest.raises(ValueError, match="variance"):
        baselines.CsrLinear(w, bias).moments(x)


def test_cases_time_baselines_not_the_oracle():
    """Importing the harness (every case module) leaves the test oracle unloaded: what the cases
    time comes from bdlkern.bench.baselines; only their checks import the oracle, when they run."""
    code = "import sys, bdlkern.bench; sys.exit('bdlkern.testing.reference' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
