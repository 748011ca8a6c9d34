"""The benchmark harness (bdlkern.bench): the CLI end to end in quick mode, and its parts.

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

from bdlkern import bench
from bdlkern.bench.__main__ import main


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
    assert [c["name"] for c in report["cases"]] == list(bench.CASES)
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
    """The CPU shared-mask kernel multiplies over the kept features only, about (1 - p) of the
    products; the CUDA kernel does them all."""
    from bdlkern.bench.cases import mc_dropout

    dims = mc_dropout.QUICK
    full = 2 * dims["S"] * dims["B"] * dims["K"] * dims["N"]
    assert mc_dropout._shared_mask_flops(dims, torch.device("cpu")) == round((1 - mc_dropout.P) * full)
    assert mc_dropout._shared_mask_flops(dims, torch.device("cuda")) == full


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
