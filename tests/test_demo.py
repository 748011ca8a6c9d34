"""The demo (``python -m bdlkern.demo``): one quick run end to end, its report and figures, the
command line's errors, and the pieces that make the comparison fair (same network in plain
PyTorch, reproducible training)."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

import bdlkern
from bdlkern import demo

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: What a plain run trains (the others run when named with --methods).
METHOD_NAMES = [m.name for m in demo.METHODS if m.default]
MLP_NAMES = [m.name for m in demo.METHODS if not m.conv and m.default]
CONV_NAMES = [m.name for m in demo.METHODS if m.conv and m.default]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``main(["--quick", "--out", DIR])``: (exit status, printed output, report.json, DIR)."""
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout), torch.random.fork_rng():
        status = demo.main(["--quick", "--out", str(out)])
    report = json.loads((out / "report.json").read_text()) if status == 0 else None
    return status, stdout.getvalue(), report, out


@pytest.fixture(scope="module")
def report(quick_run):
    status, _, report, _ = quick_run
    assert status == 0
    return report


def test_quick_run_exits_0_and_prints_the_table(quick_run):
    status, printed, _, _ = quick_run
    assert status == 0
    assert "AUROC rot90" in printed and "speed-up" in printed
    first_words = [line.split()[0] for line in printed.splitlines() if line.strip()]
    table_rows = [word for word in first_words if word in METHOD_NAMES]
    assert table_rows[-len(METHOD_NAMES):] == METHOD_NAMES


def test_report_has_settings_machine_and_ood_descriptions(report):
    assert report["settings"]["quick"] is True
    assert report["settings"]["samples"] == demo.QUICK["samples"]
    assert report["settings"]["epochs"] == demo.QUICK["epochs"]
    assert report["settings"]["conv_epochs"] == demo.QUICK["conv_epochs"]
    assert report["machine"]["bdlkern"]["version"] == bdlkern.__version__
    assert set(report["ood"]) == {"rot90", "inverted"}
    assert all(len(description) > 20 for description in report["ood"].values())
    assert report["data"]["train"] + report["data"]["test"] == 1797
    assert report["data"]["features"] == 64 and report["data"]["classes"] == 10


#: What the quick run (seed 0, 5 epochs, S = 8) reaches: accuracy, NLL, ECE, Brier of the MC
#: predictive mean and the OOD AUROCs (rot90 / inverted) by mutual information and by predictive
#: entropy. Measured with 1 and 2 threads and with the scalar kernels (BDLKERN_CPU_SIMD=scalar,
#: ATEN_CPU_CAPABILITY=default): the dropout models agree to 4 digits, sparse VD moves by up to
#: 0.004 in NLL and 0.014 in an AUROC (its LRT noise and KL go through the SIMD paths).
QUICK_RESULTS = {
    "plain": dict(accuracy=0.9481, nll=0.2024, ece=0.0660, brier=0.0864, mi=(0.500, 0.500), h=(0.578, 0.825)),
    "mc_dropout": dict(accuracy=0.9481, nll=0.2395, ece=0.0921, brier=0.1007, mi=(0.523, 0.914), h=(0.562, 0.839)),
    "concrete": dict(accuracy=0.9315, nll=0.3043, ece=0.1235, brier=0.1272, mi=(0.454, 0.902), h=(0.554, 0.843)),
    "sparse_vd": dict(accuracy=0.8556, nll=0.5860, ece=0.1909, brier=0.2642, mi=(0.715, 0.959), h=(0.495, 0.743)),
    "ard": dict(accuracy=0.9093, nll=0.4487, ece=0.1861, brier=0.1964, mi=(0.687, 0.953), h=(0.500, 0.774)),
    "variational_dropout": dict(accuracy=0.9296, nll=0.3165, ece=0.1209, brier=0.1370, mi=(0.525, 0.908), h=(0.586, 0.846)),
}
#: Tolerances for other machines (thread counts, BLAS and SIMD paths round differently; training
#: amplifies it): 2 points of accuracy (11 of the 540 test digits), 5% of the NLL, 0.02 of ECE and
#: Brier, 0.04 of an AUROC.
QUICK_TOLERANCE = dict(accuracy=0.02, nll_rel=0.05, ece=0.02, brier=0.02, auroc=0.04)


@pytest.mark.parametrize("name", MLP_NAMES)
def test_every_model_reaches_its_results_on_the_fixed_seed(report, name):
    record = report["models"][name]
    metrics, want, tol = record["metrics"], QUICK_RESULTS[name], QUICK_TOLERANCE
    assert metrics["accuracy"] == pytest.approx(want["accuracy"], abs=tol["accuracy"])
    assert metrics["nll"] == pytest.approx(want["nll"], rel=tol["nll_rel"])
    assert metrics["ece"] == pytest.approx(want["ece"], abs=tol["ece"])
    assert metrics["brier"] == pytest.approx(want["brier"], abs=tol["brier"])
    assert list(metrics["ood"]) == list(report["ood"]) == ["rot90", "inverted"]
    for i, ood in enumerate(metrics["ood"].values()):
        assert ood["auroc_mutual_information"] == pytest.approx(want["mi"][i], abs=tol["auroc"])
        assert ood["auroc_predictive_entropy"] == pytest.approx(want["h"][i], abs=tol["auroc"])
    history = record["history"]
    for series in ("loss", "cross_entropy", "test_accuracy"):
        assert len(history[series]) == demo.QUICK["epochs"]
    assert all(math.isfinite(v) for v in history["loss"])


def test_the_dropout_models_tell_inverted_digits_apart(report):
    """What the demo shows on its fixed seed: the inverted digits get more mutual information than
    the test digits under MC and Concrete dropout (AUROC near 0.9); the rotated ones do not
    (AUROC near 0.5, confident extrapolation); the plain network's entropy does worse on inverted."""
    for name in ("mc_dropout", "concrete"):
        ood = report["models"][name]["metrics"]["ood"]
        assert ood["inverted"]["auroc_mutual_information"] > 0.85
        assert abs(ood["rot90"]["auroc_mutual_information"] - 0.5) < 0.1
        plain = report["models"]["plain"]["metrics"]["ood"]["inverted"]["auroc_predictive_entropy"]
        assert ood["inverted"]["auroc_mutual_information"] > plain + 0.04


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_mc_inference_is_timed_against_eager_pytorch(report, name):
    mc = report["models"][name]["mc_inference"]
    assert mc["samples"] == demo.QUICK["samples"] and mc["rows"] == report["data"]["test"]
    if not report["models"][name]["stochastic"]:
        assert mc["eager_s"] is None and mc["speedup"] is None and mc["eager_baseline"] is None
        return
    # the three plain-PyTorch ways were timed (vmap runs every demo model), and bdlkern is compared with the fastest
    assert mc["eager_vmap_error"] is None
    times = {"loop": mc["eager_loop_s"], "batched": mc["eager_batched_s"], "vmap": mc["eager_vmap_s"]}
    assert None not in times.values() and all(t > 0 for t in times.values())
    fastest = min(times, key=times.__getitem__)
    assert mc["eager_baseline"] == fastest and mc["eager_s"] == mc[f"eager_{fastest}_s"]
    assert mc["speedup"] == pytest.approx(mc["eager_s"] / mc["bdlkern_s"])
    # All sample the same network: the same accuracy up to Monte Carlo noise.
    accuracy = report["models"][name]["metrics"]["accuracy"]
    assert abs(mc["eager_accuracy"] - accuracy) < 0.03
    assert abs(mc["eager_batched_accuracy"] - accuracy) < 0.03
    assert abs(mc["eager_vmap_accuracy"] - accuracy) < 0.03


def test_report_texts_name_the_vmap_baseline(quick_run):
    _, printed, _, out = quick_run
    text = (out / "report.md").read_text()
    for where in (printed, text):
        assert "vmap" in where and "--case models" in where
    assert "vmap could not run" not in text  # it runs every demo model


def _tiny_dropout_mlp() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4)
    ).train()


def _tiny_dropout_convnet() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout2d(0.5), torch.nn.Conv2d(4, 4, 3),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Dropout(0.3), torch.nn.Linear(4 * 4 * 4, 3),
    ).train()


@pytest.mark.parametrize(
    "build, x_shape", [(_tiny_dropout_mlp, (5, 6)), (_tiny_dropout_convnet, (5, 1, 6, 6))], ids=["mlp", "conv"]
)
def test_eager_vmap_mc_predict_draws_its_own_masks_per_sample(build, x_shape, monkeypatch):
    """vmap over the samples: S different samples of the right shape (each its own masks), whose
    summaries agree with the loop's (the independent reference: S separate passes) up to MC noise."""
    from bdlkern.demo import evaluation

    torch.manual_seed(0)
    model, x = build(), torch.randn(*x_shape)
    seen = []
    summary = evaluation._mc_summary
    monkeypatch.setattr(evaluation, "_mc_summary", lambda probs: seen.append(probs) or summary(probs))
    mean_probs, mutual_information = evaluation.eager_vmap_mc_predict(model, x, 7)
    (probs,) = seen
    classes = model[-1].out_features
    assert probs.shape == (7, 5, classes)
    assert mean_probs.shape == (5, classes) and mutual_information.shape == (5,)
    torch.testing.assert_close(probs.sum(-1), torch.ones(7, 5))
    # every pair of samples differs (p = 0.5 on 16 or 4 features: equal masks are rare), for each input
    distinct = (probs[:, None] - probs[None]).abs().amax(-1) > 1e-6  # [S, S, N]
    assert distinct[~torch.eye(7, dtype=torch.bool)].all()
    assert (mutual_information > 0).all()
    monkeypatch.setattr(evaluation, "_mc_summary", summary)

    S = 2000
    torch.manual_seed(1)
    vmap_mean, vmap_mi = evaluation.eager_vmap_mc_predict(model, x, S)
    loop_mean, loop_mi = demo.eager_mc_predict(model, x, S)
    torch.testing.assert_close(vmap_mean, loop_mean, atol=0.03, rtol=0)
    torch.testing.assert_close(vmap_mi, loop_mi, atol=0.05, rtol=0.2)
    # eval mode: no randomness, so the S samples are the deterministic output and carry no uncertainty
    model.eval()
    det_mean, det_mi = evaluation.eager_vmap_mc_predict(model, x, 3)
    torch.testing.assert_close(det_mean, model(x).softmax(-1))
    assert (det_mi.abs() < 1e-5).all()


def test_eager_vmap_mc_predict_checks_num_samples():
    from bdlkern.demo import evaluation

    with pytest.raises(ValueError, match="num_samples"):
        evaluation.eager_vmap_mc_predict(_tiny_dropout_mlp(), torch.randn(2, 6), 0)


def test_vmap_conv_channel_masks_are_per_sample_and_channel():
    """Under vmap, ``nn.Dropout2d`` keeps drawing one flag per (sample, image, channel): the baseline
    is the same channel-mask network as the loop's, not an element-mask one."""
    torch.manual_seed(0)
    drop = torch.nn.Dropout2d(0.5).train()
    x = torch.ones(3, 4, 5, 5)
    y = torch.func.vmap(lambda _: drop(x), randomness="different")(torch.arange(6))
    assert y.shape == (6, 3, 4, 5, 5)
    assert torch.equal(y, y[..., :1, :1].expand_as(y))  # constant over each channel's pixels
    assert not torch.equal(y[0], y[1])


def test_mc_timing_picks_the_fastest_baseline():
    from bdlkern.demo.evaluation import MCTiming

    timing = MCTiming(samples=8, rows=10, bdlkern_s=1.0, eager_loop_s=4.0, eager_batched_s=3.0, eager_vmap_s=2.0)
    assert (timing.eager_baseline, timing.eager_s, timing.speedup) == ("vmap", 2.0, 2.0)
    timing.eager_vmap_s = 5.0
    assert (timing.eager_baseline, timing.eager_s) == ("batched", 3.0)
    timing.eager_loop_s = 2.5
    assert (timing.eager_baseline, timing.eager_s) == ("loop", 2.5)
    timing.eager_vmap_s, timing.eager_vmap_error = None, "RuntimeError: no batching rule"
    assert (timing.eager_baseline, timing.eager_s) == ("loop", 2.5)  # vmap could not run: loop or batched
    record = timing.to_json()
    assert record["eager_vmap_s"] is None and record["eager_vmap_error"] == "RuntimeError: no batching rule"
    assert record["eager_baseline"] == "loop" and record["speedup"] == 2.5
    deterministic = MCTiming(samples=8, rows=10, bdlkern_s=1.0)
    assert (deterministic.eager_baseline, deterministic.eager_s, deterministic.speedup) == (None, None, None)


class _ItemScale(torch.nn.Module):
    """Scales by a Python float read with ``.item()``: fine eagerly, impossible under vmap once
    the input carries the sample axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / (1.0 + x.abs().max().item())


def test_time_mc_inference_records_why_vmap_cannot_run_a_model():
    """A model vmap cannot run keeps None for vmap with the reason, and the report says so."""
    from types import SimpleNamespace

    from bdlkern.demo import evaluation, report

    method = next(m for m in demo.METHODS if m.name == "mc_dropout")
    torch.manual_seed(0)
    model = method.build((64, 16, 16, 10)).eval()
    eager = torch.nn.Sequential(method.eager_reference(model), _ItemScale()).train()
    data = SimpleNamespace(x_test=torch.rand(20, 64), y_test=torch.randint(0, 10, (20,)))
    settings = demo.Settings(samples=4, timing_target_s=0.001, timing_repeats=1)
    timing = evaluation.time_mc_inference(model, eager, data, settings)
    assert timing.eager_vmap_s is None and timing.eager_vmap_accuracy is None
    assert timing.eager_vmap_error is not None and timing.eager_vmap_error.startswith("RuntimeError: ")
    assert timing.eager_baseline in ("loop", "batched") and None not in (timing.eager_loop_s, timing.eager_batched_s)
    fake = {"models": {"mc_dropout": {"stochastic": True, "mc_inference": timing.to_json()},
                       "plain": {"stochastic": False, "mc_inference": {"eager_vmap_error": None}}}}
    (note,) = report._vmap_notes(fake)
    assert "mc_dropout" in note and timing.eager_vmap_error in note

    works = evaluation.time_mc_inference(model, method.eager_reference(model), data, settings)
    assert works.eager_vmap_error is None and works.eager_vmap_s is not None and works.eager_vmap_s > 0
    assert 0.0 <= works.eager_vmap_accuracy <= 1.0


def test_conv_section_runs_three_bayesian_conv_nets(report):
    assert CONV_NAMES == ["conv_mc_dropout", "conv_concrete", "conv_sparse_vd"]
    assert list(report["models"])[-3:] == CONV_NAMES  # after the MLPs, in METHODS order
    conv = report["settings"]["conv"]
    assert conv["input"] == "[N, 1, 8, 8]" and conv["channels"] == list(demo.CONV_CHANNELS)
    assert conv["epochs"] == demo.QUICK["conv_epochs"]
    layers = {
        "conv_mc_dropout": ("MCDropoutConv2d", "MCDropoutLinear"),
        "conv_concrete": ("ConcreteDropout2d", "ConcreteDropout("),
        "conv_sparse_vd": ("SparseVDConv2d", "SparseLinear"),
    }
    for name in CONV_NAMES:
        record = report["models"][name]
        assert record["stochastic"] is True
        assert all(layer in record["architecture"] for layer in layers[name]), name
        assert "MaxPool2d" in record["architecture"] and "Flatten" in record["architecture"]


@pytest.mark.parametrize("name", CONV_NAMES)
def test_conv_models_have_sane_metrics(report, name):
    """The short conv training (``QUICK["conv_epochs"]`` epochs) gives a working classifier with
    epistemic uncertainty: far above chance (0.1), NLL and Brier score well below the uniform
    guess's (log 10 and 0.9). The quick run measured accuracy 0.86-0.90, NLL 0.40-0.77, ECE
    0.14-0.33 (under-trained nets are under-confident), Brier 0.18-0.34."""
    record = report["models"][name]
    metrics = record["metrics"]
    assert metrics["accuracy"] > 0.7
    assert 0.0 < metrics["nll"] < 0.5 * math.log(10)
    assert 0.0 <= metrics["ece"] < 0.45 and 0.0 <= metrics["brier"] < 0.5
    assert metrics["mean_mutual_information"] > 0.0  # it samples
    assert list(metrics["ood"]) == ["rot90", "inverted"]
    for ood in metrics["ood"].values():
        assert 0.0 <= ood["auroc_mutual_information"] <= 1.0
        assert 0.0 <= ood["auroc_predictive_entropy"] <= 1.0
    # inverted digits are far from anything seen: every conv net flags them by mutual information
    assert metrics["ood"]["inverted"]["auroc_mutual_information"] > 0.7
    history = record["history"]
    for series in ("loss", "cross_entropy", "test_accuracy"):
        assert len(history[series]) == demo.QUICK["conv_epochs"]
    assert all(math.isfinite(v) for v in history["loss"])
    assert history["cross_entropy"][-1] < history["cross_entropy"][0]  # it learnt


def test_conv_layer_stats(report):
    fixed = report["models"]["conv_mc_dropout"]["layers"]
    assert fixed["learnt"] is False
    assert fixed["values"] == pytest.approx({"conv2": demo.MC_DROPOUT_P, "fc": demo.MC_DROPOUT_P})

    concrete = report["models"]["conv_concrete"]
    rates = concrete["layers"]["values"]
    assert concrete["layers"]["learnt"] is True and list(rates) == ["conv2", "fc"]
    assert all(0.0 < p < 0.5 for p in rates.values())
    trace = concrete["history"]["layers"]
    assert set(trace) == set(rates)
    for name, values in trace.items():
        assert len(values) == demo.QUICK["conv_epochs"] + 1
        assert values[0] == pytest.approx(demo.CONCRETE_INIT_P, rel=1e-5)
        assert values[-1] == pytest.approx(rates[name])
    assert any(abs(values[-1] - values[0]) > 1e-3 for values in trace.values())  # the rates moved


def test_conv_sparse_vd_is_pruned(report):
    record = report["models"]["conv_sparse_vd"]
    post = record["post_train"]
    assert list(post["layers"]) == ["conv1", "conv2", "fc"]
    c1, c2 = demo.CONV_CHANNELS
    shapes = {"conv1": [c1, 1, 3, 3], "conv2": [c2, c1, 3, 3], "fc": [10, c2 * 2 * 2]}
    for name, layer in post["layers"].items():
        assert layer["shape"] == shapes[name]
        assert layer["storage"] == ("csr" if name == "fc" else "dense")
        assert sum(layer["log_alpha_histogram"]) == math.prod(layer["shape"])
        assert layer["nnz"] == round((1 - layer["sparsity"]) * math.prod(layer["shape"]))
        assert record["layers"]["values"][name] == pytest.approx(layer["sparsity"])  # the reported per-layer column
    assert post["weights_total"] == sum(math.prod(shape) for shape in shapes.values())
    assert post["weights_kept"] == sum(layer["nnz"] for layer in post["layers"].values())
    assert 0.0 < post["sparsity"] < 1.0
    assert post["layers"]["conv2"]["sparsity"] > 0.2  # the KL term prunes even in a short run
    trace = record["history"]["layers"]
    assert list(trace) == ["conv1", "conv2", "fc"] and trace["conv2"][-1] > trace["conv2"][0]


def test_deterministic_model_has_no_epistemic_uncertainty(report):
    metrics = report["models"]["plain"]["metrics"]
    assert metrics["mean_mutual_information"] == 0.0  # a deterministic model: exactly zero


def test_dropout_rates_per_layer(report):
    fixed = report["models"]["mc_dropout"]["layers"]
    assert fixed["learnt"] is False
    assert list(fixed["values"]) == ["fc2", "fc3"]  # convert() kept the Linear layers' names
    assert all(p == pytest.approx(demo.MC_DROPOUT_P) for p in fixed["values"].values())

    concrete = report["models"]["concrete"]
    assert concrete["layers"]["learnt"] is True
    rates = concrete["layers"]["values"]
    assert list(rates) == ["fc1", "fc2", "fc3"]
    # the learnt rates of the quick run: the input's falls from 0.1, the hidden layers' rise
    assert list(rates.values()) == pytest.approx([0.067, 0.220, 0.225], abs=0.01)
    trace = concrete["history"]["layers"]
    assert set(trace) == set(rates)
    for name, values in trace.items():
        assert len(values) == demo.QUICK["epochs"] + 1  # the initial rate, then one per epoch
        assert values[0] == pytest.approx(demo.CONCRETE_INIT_P, rel=1e-5)
        assert values[-1] == pytest.approx(rates[name])
    assert any(abs(values[-1] - values[0]) > 1e-3 for values in trace.values())  # the rates moved


def test_sparse_vd_is_pruned_to_csr(report, quick_run):
    record = report["models"]["sparse_vd"]
    post = record["post_train"]
    # the 5-epoch quick run prunes 92.8% of the weights (fc1 87%, fc2 96%, fc3 50%), on 1 and 2
    # threads and with the scalar kernels alike (to 0.02 of a layer)
    assert post["sparsity"] == pytest.approx(0.928, abs=0.01)
    assert [layer["sparsity"] for layer in post["layers"].values()] == pytest.approx([0.872, 0.959, 0.50], abs=0.03)
    assert post["weights_kept"] == sum(layer["nnz"] for layer in post["layers"].values())
    assert post["weights_total"] == 64 * 256 + 256 * 256 + 256 * 10
    for name, layer in post["layers"].items():
        assert sum(layer["log_alpha_histogram"]) == layer["shape"][0] * layer["shape"][1]
        assert record["layers"]["values"][name] == pytest.approx(layer["sparsity"])
    assert "SparseLinear" in record["architecture"] and "SparseVDLinear" not in record["architecture"]
    trace = record["history"]["layers"]
    assert all(values[-1] > values[0] for values in trace.values())  # pruning grew in training


def test_figures_are_listed_and_valid_pngs(report, quick_run):
    out = quick_run[3]
    assert list(report["figures"]) == [spec.file for spec in demo.FIGURES]
    assert {"conv_filters.png", "conv_concrete_rates.png"} <= set(report["figures"])
    for file in report["figures"]:
        data = (out / file).read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_SIGNATURE, file


def test_conv_figures_draw_what_they_say(quick_run):
    """The filter grid has one panel per sparse-VD convolution, the rate chart one bar per
    Concrete layer of the conv net."""
    import matplotlib.image

    out = quick_run[3]
    image = matplotlib.image.imread(out / "conv_filters.png")
    assert image.shape[1] > image.shape[0]  # two panels side by side
    assert image.std() > 0.05  # not blank
    results = _fake_results()
    fig = demo.draw_conv_filters(results, None)
    assert [ax.get_title().split(":")[0] for ax in fig.axes if ax.get_images()] == [
        "conv_sparse_vd.conv1", "conv_sparse_vd.conv2",
    ]
    fig = demo.draw_concrete_rates(results, None)
    (ax,) = [ax for ax in fig.axes if ax.patches]
    assert [tick.get_text() for tick in ax.get_xticklabels()] == ["conv2", "fc"]
    assert [bar.get_height() for bar in ax.patches] == pytest.approx([0.1, 0.1])


def _fake_results():
    """Untrained conv models wrapped as the figures read them (method, model)."""
    from types import SimpleNamespace

    results = []
    for name in ("conv_concrete", "conv_sparse_vd"):
        method = next(m for m in demo.METHODS if m.name == name)
        torch.manual_seed(0)
        results.append(SimpleNamespace(method=method, model=method.build((1, *demo.CONV_CHANNELS, 10))))
    return results


def test_markdown_report_names_every_model_and_figure(report, quick_run):
    text = (quick_run[3] / "report.md").read_text()
    for name in METHOD_NAMES:
        assert f"| {name} |" in text and f"**{name}**" in text
    for file in report["figures"]:
        assert f"]({file})" in text
    for ood in report["ood"]:
        assert f"`{ood}`" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["--samples", "0"],
        ["--epochs", "0"],
        ["--threads", "0"],
        ["--conv-epochs", "0"],
        ["--seed", "-1"],
        ["--samples", "many"],
        ["--device", "tpu"],
        ["--methods", "bayes"],
        ["--methods"],
    ],
)
def test_bad_arguments_exit_2(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert not (tmp_path / "report.json").exists()


def test_methods_picks_a_subset_in_report_order(tmp_path, capsys):
    """``--methods`` runs any subset, non-default methods included, in METHODS order: here the
    variance network (Neklyudov et al. 2018), whose deterministic accuracy (the weights at their
    means, zero) is chance in every epoch, and MC dropout."""
    out = tmp_path / "subset"
    with torch.random.fork_rng():
        assert demo.main(["--quick", "--out", str(out), "--methods", "variance", "mc_dropout"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["mc_dropout", "variance"]
    variance = report["models"]["variance"]
    assert variance["stochastic"] and variance["mc_inference"]["speedup"] > 0
    assert all(acc < 0.2 for acc in variance["history"]["test_accuracy"])
    assert not any(m.default for m in demo.METHODS if m.name == "variance")
    assert [m.name for m in demo.selected_methods(["all"])] == [m.name for m in demo.METHODS]
    assert [m.name for m in demo.selected_methods(None)] == METHOD_NAMES


def test_cuda_without_a_gpu_exits_2(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert demo.main(["--device", "cuda", "--quick", "--out", str(tmp_path / "out")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_exits_2(tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("")
    assert demo.main(["--quick", "--out", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_settings_from_args_quick_then_explicit_values():
    args = demo.parse_args(["--quick", "--samples", "3", "--seed", "7"])
    settings = demo.settings_from_args(args)
    assert (settings.samples, settings.epochs, settings.seed, settings.quick) == (3, demo.QUICK["epochs"], 7, True)
    assert settings.conv_epochs == demo.QUICK["conv_epochs"]
    assert demo.settings_from_args(demo.parse_args(["--quick", "--conv-epochs", "2"])).conv_epochs == 2
    assert demo.settings_from_args(demo.parse_args([])) == demo.Settings()


@pytest.mark.parametrize("name", ["mc_dropout", "concrete"])
def test_eager_equivalent_is_the_same_network(name):
    method = next(m for m in demo.METHODS if m.name == name)
    torch.manual_seed(0)
    model = method.build((64, 32, 32, 10)).eval()
    eager = method.eager_reference(model)
    assert eager.training
    assert sum(isinstance(m, torch.nn.Dropout) for m in eager.modules()) == len(demo.dropout_rates(model))
    assert [m.p for m in eager.modules() if isinstance(m, torch.nn.Dropout)] == pytest.approx(
        list(demo.dropout_rates(model).values())
    )
    x = torch.rand(16, 64)
    torch.testing.assert_close(eager.eval()(x), model(x))  # the same weights, dropout off


@pytest.mark.parametrize("name", ["conv_mc_dropout", "conv_concrete"])
def test_conv_eager_equivalent_is_the_same_network(name):
    method = next(m for m in demo.METHODS if m.name == name)
    torch.manual_seed(0)
    model = method.build((1, *demo.CONV_CHANNELS, 10)).eval()
    eager = method.eager_reference(model)
    assert eager.training
    dropouts = [m for m in eager.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]
    assert [type(m) for m in dropouts] == [torch.nn.Dropout2d, torch.nn.Dropout]  # channel masks, then elements
    assert [m.p for m in dropouts] == pytest.approx(list(demo.dropout_rates(model).values()))
    assert not any(isinstance(m, bdlkern.nn.ConcreteDropout) for m in eager.modules())
    x = torch.rand(16, 1, 8, 8)
    torch.testing.assert_close(eager.eval()(x), model(x))  # the same weights, dropout off


def test_conv_models_start_from_the_same_weights():
    """The conv variants wrap or replace the layers of one plain net built from the same seed."""
    def built(name):
        torch.manual_seed(0)
        return next(m for m in demo.METHODS if m.name == name).build((1, *demo.CONV_CHANNELS, 10))

    mc, concrete, svd = built("conv_mc_dropout"), built("conv_concrete"), built("conv_sparse_vd")
    torch.testing.assert_close(mc.conv2.weight, concrete.conv2.layer.weight)
    torch.testing.assert_close(mc.conv2.weight, svd.conv2.theta)
    torch.testing.assert_close(mc.fc.weight, concrete.fc.layer.weight)
    torch.testing.assert_close(mc.fc.weight, svd.fc.theta)


def test_conv_mc_samples_are_folded_and_unfolded():
    method = next(m for m in demo.METHODS if m.name == "conv_mc_dropout")
    torch.manual_seed(0)
    model = method.build((1, *demo.CONV_CHANNELS, 10)).eval()
    x = torch.rand(5, 1, 8, 8)
    pred = bdlkern.uncertainty.mc_predict(model, x, 3, seed=0)
    assert pred.samples.shape == (3, 5, 10) and pred.mean_probs.shape == (5, 10)
    eager = method.eager_reference(model)
    mean_probs, mutual_information = demo.eager_batched_mc_predict(eager, x, 3)
    assert mean_probs.shape == (5, 10) and mutual_information.shape == (5,)
    torch.testing.assert_close(mean_probs.sum(-1), torch.ones(5))


def test_conv_sparse_vd_pruning_keeps_the_network():
    """Pruning zeroes the pruned conv weights and their variance in place (same mask, same eval
    output), turns fc into CSR, and the eager baseline is the same pruned network."""
    method = next(m for m in demo.METHODS if m.name == "conv_sparse_vd")
    torch.manual_seed(0)
    model = method.build((1, *demo.CONV_CHANNELS, 10)).eval()
    with torch.no_grad():  # prune about half of every layer
        for layer in (model.conv1, model.conv2, model.fc):
            layer.log_sigma2.copy_(torch.where(torch.rand_like(layer.theta) < 0.5, 5.0, -10.0))
    masks = {name: getattr(model, name).mask().clone() for name in ("conv1", "conv2")}
    x = torch.rand(7, 1, 8, 8)
    before = model(x)
    post = demo.prune_to_sparse(model)
    assert isinstance(model.fc, bdlkern.nn.SparseLinear) and isinstance(model.conv2, bdlkern.nn.SparseVDConv2d)
    for name, mask in masks.items():
        layer = getattr(model, name)
        assert torch.equal(layer.mask(), mask)
        assert (layer.theta[~mask] == 0).all()
        assert post["layers"][name]["nnz"] == int(mask.sum())
    torch.testing.assert_close(model(x), before)
    eager = demo.eager_sparse_vd(model)
    assert isinstance(eager.conv1, demo.DenseLRTConv) and isinstance(eager.fc, demo.DenseLRTLinear)
    assert (eager.conv2.variance[~masks["conv2"]] == 0).all()
    torch.manual_seed(0)
    draws = torch.stack([eager(x) for _ in range(200)])
    torch.testing.assert_close(draws.mean(0), before, atol=0.1, rtol=0.1)  # the LRT noise has mean 0


def test_training_is_reproducible_from_the_seed():
    data = demo.load_data()
    settings = demo.Settings(epochs=1, batch_size=256)
    method = next(m for m in demo.METHODS if m.name == "concrete")

    def trained():
        torch.manual_seed(settings.seed)
        model = method.build((64, 32, 32, 10))
        history = demo.train(method, model, data, settings)
        return model.state_dict(), history

    (state_a, history_a), (state_b, history_b) = trained(), trained()
    assert history_a.loss == history_b.loss and history_a.layers == history_b.layers
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=0, atol=0)


def test_ood_transforms():
    images = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 8, 8).numpy() / 127.0
    rot90, inverted = (t.apply(images) for t in demo.OOD_TRANSFORMS)
    assert rot90.shape == images.shape and (rot90[1][::-1].T == images[1]).all()  # rotated back
    assert ((inverted + images) == 1.0).all()
