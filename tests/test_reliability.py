"""Issue 14: no silently wrong or empty answers.

* every module checks its input's width (and dtype) in its own terms, on every path (training,
  eval, inside ``sampling``; for ``SparseLinear`` the CSR and the dense path);
* a dtype a module's kernels cannot take fails at forward with the module's name and the fix;
* ``mc_predict`` warns (or, ``strict``, raises) when no bdlkern stochastic layer ran, and a seed
  makes torch's own random ops repeat too;
* ``sampling`` blocks do not nest;
* ``torch.jit.script`` says it is not supported;
* the benchmark CLI prints only its own output.
"""

import os
import re
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern import bench
from bdlkern import uncertainty as U
from bdlkern.nn import (
    ConcreteDropout,
    ConcreteDropout2d,
    ConcreteDropoutLinear,
    MCDropoutLinear,
    SparseLinear,
    SparseVDLinear,
)

IN, OUT, BATCH = 64, 10, 8


def sparse_layer(density: float, variance: bool = False) -> SparseLinear:
    """A SparseLinear [OUT, IN] keeping about ``density`` of the weights."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(OUT, IN, generator=gen)
    keep = torch.rand(OUT, IN, generator=gen) < density
    var = torch.rand(OUT, IN, generator=gen) * 0.1 if variance else None
    return SparseLinear.from_dense(w, torch.randn(OUT, generator=gen), variance=var, mask=keep)


def linear_modules() -> dict[str, nn.Module]:
    """One module of each kind that takes [*, IN]; its label in error messages is the key."""
    torch.manual_seed(0)
    return {
        f"MCDropoutLinear(in_features={IN}, out_features={OUT})": MCDropoutLinear(IN, OUT, p=0.3),
        f"ConcreteDropoutLinear(in_features={IN}, out_features={OUT})": ConcreteDropoutLinear(IN, OUT),
        f"ConcreteDropout(Linear(in_features={IN}, out_features={OUT}))": ConcreteDropout(nn.Linear(IN, OUT)),
        f"SparseVDLinear(in_features={IN}, out_features={OUT})": SparseVDLinear(IN, OUT),
        f"SparseLinear(in_features={IN}, out_features={OUT})": sparse_layer(0.05, variance=True),
    }


def run(module: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """``module(x)`` in ``mode``: "train", "eval" or "sampling" (eval inside sampling(3))."""
    module.train(mode == "train")
    if mode == "sampling":
        with bdlkern.sampling(3, seed=0):
            return module(x)
    return module(x)


# ---- 1. input width ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval", "sampling"])
@pytest.mark.parametrize("width", [1000, 20, IN + 1])
def test_every_linear_module_checks_the_input_width(mode, width):
    x = torch.randn(BATCH, width)
    for label, module in linear_modules().items():
        expected = re.escape(f"{label}: input has {width} features in its last dimension, expected {IN}")
        with pytest.raises(ValueError, match=expected):
            run(module, x, mode)
        out = run(module, torch.randn(BATCH, IN), mode)  # the right width still works
        assert out.shape == ((3, BATCH, OUT) if mode == "sampling" else (BATCH, OUT)), label


def test_scalar_input_is_rejected():
    with pytest.raises(ValueError, match=r"MCDropoutLinear\(in_features=64, out_features=10\): input is a 0-dim"):
        MCDropoutLinear(IN, OUT)(torch.tensor(1.0))


@pytest.mark.parametrize("density, path", [(0.07, "csr"), (0.03, "csr"), (0.6, "dense")])
def test_sparse_linear_width_on_both_paths(density, path):
    layer = sparse_layer(density)
    assert (layer.density <= layer.crossover_density(BATCH)) == (path == "csr")
    x = torch.randn(BATCH, IN)
    torch.testing.assert_close(layer(x), F.linear(x, layer.to_dense(), layer.bias))
    # The case of the issue: 1000 features used to give a wrong [8, 10] on the CSR path.
    for width in (1000, 20):
        with pytest.raises(ValueError, match=f"input has {width} features in its last dimension, expected {IN}"):
            layer(torch.randn(BATCH, width))
    # A layer without variances is deterministic inside sampling, and checked there too.
    with bdlkern.sampling(4), pytest.raises(ValueError, match="expected 64"):
        layer(torch.randn(BATCH, 1000))


def test_later_layer_in_sampling_checks_width_with_sample_dim():
    first, second = MCDropoutLinear(IN, 32), SparseVDLinear(32, OUT).eval()
    with bdlkern.sampling(3):
        h = first(torch.randn(BATCH, IN))
        assert h.shape == (3, BATCH, 32)
        with pytest.raises(ValueError, match=r"SparseVDLinear\(in_features=32, out_features=10\): input has 31"):
            second(h[..., :31])


@pytest.mark.parametrize("mode", ["train", "eval", "sampling"])
def test_concrete_dropout2d_checks_channels(mode):
    torch.manual_seed(0)
    module = ConcreteDropout2d(nn.Conv2d(3, 8, 3))
    label = re.escape("ConcreteDropout2d(Conv2d(in_channels=3, out_channels=8))")
    with pytest.raises(ValueError, match=label + ": input has 5 channels in dimension 1, expected 3"):
        run(module, torch.randn(2, 5, 8, 8), mode)
    with pytest.raises(ValueError, match=label + r": expected .*\[B, 3, \*, \*\].* got shape \(3, 8, 8\)"):
        run(module, torch.randn(3, 8, 8), mode)  # unbatched: the spatial mask would drop rows
    out = run(module, torch.randn(2, 3, 8, 8), mode)
    # inside sampling the samples are folded into the batch, sample-major: [S * N, ...]
    assert out.shape == ((3 * 2, 8, 6, 6) if mode == "sampling" else (2, 8, 6, 6))


def test_concrete_dropout2d_channels_after_the_first_mc_layer():
    """A later conv MC layer of a folded pass checks the channels of [S * N, C, ...] (dimension 1)
    and the folded batch."""
    torch.manual_seed(0)
    first, second = ConcreteDropout2d(nn.Conv2d(3, 8, 3)), ConcreteDropout2d(nn.Conv2d(8, 4, 3))
    with bdlkern.sampling(3, seed=1):
        h = first(torch.randn(2, 3, 8, 8))
        assert second(h).shape == (3 * 2, 4, 4, 4)
        first(torch.randn(2, 3, 8, 8))  # a new pass
        h = first(torch.randn(2, 3, 8, 8))
        with pytest.raises(ValueError, match="input has 7 channels in dimension 1, expected 8"):
            second(h[:, :7])
        first(torch.randn(2, 3, 8, 8))  # a new pass
        h = first(torch.randn(2, 3, 8, 8))
        with pytest.raises(ValueError, match=r"\[S \* N = 3 \* 2, C, \.\.\.\], got shape \(4, 8, 6, 6\)"):
            second(h[:4])


def test_concrete_dropout_on_linear_and_unknown_layers():
    with pytest.raises(ValueError, match=r"ConcreteDropout\(Linear\(in_features=6, out_features=2\)\): input has 5"):
        ConcreteDropout(nn.Linear(6, 2)).eval()(torch.randn(4, 5))

    class Scale(nn.Module):  # no weight: the layer itself decides what it takes
        def forward(self, x):
            return 2 * x

    module = ConcreteDropout(Scale(), input_dim=3).eval()
    assert module(torch.randn(4, 7)).shape == (4, 7)
    assert module(torch.randn(4, 7, dtype=torch.float64)).dtype == torch.float64


# ---- 2. dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval", "sampling"])
def test_dtype_mismatch_names_the_module_and_the_fix(mode):
    x = torch.randn(BATCH, IN, dtype=torch.float64)
    for label, module in linear_modules().items():
        name = label.split("(")[0]
        expected = re.escape(
            f"{name}: input is torch.float64 but the parameters are torch.float32; convert one of them "
            "(module.to(torch.float64) or x.to(torch.float32))"
        )
        with pytest.raises(TypeError, match=expected):
            run(module, x, mode)
        out = run(module.double(), x, mode)  # converted: fine
        assert out.dtype == torch.float64, label


def test_dtype_checks_are_skipped_under_autocast():
    # Eval paths only (F.linear, which autocast casts): no bdlkern op runs under autocast here.
    x = torch.randn(BATCH, IN, dtype=torch.bfloat16)
    for module in (MCDropoutLinear(IN, OUT), ConcreteDropoutLinear(IN, OUT), SparseVDLinear(IN, OUT)):
        module.eval()
        with pytest.raises(TypeError, match="input is torch.bfloat16 but the parameters are torch.float32"):
            module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module(x).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "make, modes, kernel",
    [
        (lambda: ConcreteDropoutLinear(IN, OUT, per_feature=True), ["train", "sampling"], "Concrete-dropout"),
        (lambda: ConcreteDropout(nn.Linear(IN, OUT)), ["train"], "Concrete-dropout"),
        (lambda: SparseVDLinear(IN, OUT), ["train", "sampling"], "LRT"),
    ],
)
def test_unsupported_parameter_dtype_fails_at_forward(make, modes, kernel):
    module = make().to(torch.bfloat16)
    x = torch.randn(BATCH, IN, dtype=torch.bfloat16)
    name = type(module).__name__
    for mode in modes:
        with pytest.raises(
            TypeError,
            match=rf"{name}: parameters of dtype torch.bfloat16 are not supported by the {kernel} kernel .*"
            r"keep the parameters in torch.float32 and run the model under torch.autocast",
        ):
            run(module, x, mode)
    assert run(module, x, "eval").dtype == torch.bfloat16  # eval is F.linear: no bdlkern kernel


def test_kernel_dtypes_that_work():
    x = torch.randn(BATCH, IN, dtype=torch.bfloat16)
    mc = MCDropoutLinear(IN, OUT).to(torch.bfloat16)  # the MC-dropout kernel takes bfloat16
    assert run(mc, x, "train").dtype == torch.bfloat16
    assert run(mc, x, "sampling").shape == (3, BATCH, OUT)
    concrete = ConcreteDropoutLinear(IN, OUT).to(torch.bfloat16)  # one rate: the fused MC kernel
    assert run(concrete, x, "sampling").dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"MCDropoutLinear: parameters of dtype torch.float16 .*float16 \(CUDA only\)"):
        run(MCDropoutLinear(IN, OUT).half(), x.half(), "train")


def test_sparse_dtypes():
    with pytest.raises(TypeError, match=r"SparseLinear: values of dtype torch.bfloat16 are not supported"):
        SparseLinear.from_dense(torch.eye(4, dtype=torch.bfloat16))
    layer = sparse_layer(0.05).to(torch.bfloat16)  # converted after construction
    with pytest.raises(TypeError, match=r"SparseLinear: parameters of dtype torch.bfloat16 .* sparse kernel"):
        layer(torch.randn(BATCH, IN, dtype=torch.bfloat16))
    vd = SparseVDLinear(IN, OUT).to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"SparseVDLinear: parameters of dtype torch.bfloat16 .* KL kernel"):
        vd.kl()


# ---- 3. mc_predict on a model where nothing samples ----------------------------------------------------
def test_warning_is_public():
    assert issubclass(bdlkern.NoStochasticLayerWarning, UserWarning)
    assert U.NoStochasticLayerWarning is bdlkern.NoStochasticLayerWarning
    assert "NoStochasticLayerWarning" in bdlkern.__all__


def test_mc_predict_warns_and_names_unconverted_dropout():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Dropout2d(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.AlphaDropout(0.1),
        nn.Linear(8, 3),
    ).eval()
    x = torch.randn(5, 1, 6, 6)
    expected = r"no bdlkern stochastic layer ran inside sampling\(4\)"
    with pytest.warns(bdlkern.NoStochasticLayerWarning, match=expected) as rec:
        pred = U.mc_predict(model, x, 4)
    message = str(rec[0].message)
    assert "1 (Dropout2d), 4 (AlphaDropout)" in message
    assert "F.dropout" in message and "bdlkern.nn.convert" in message
    assert torch.equal(pred.mutual_information, torch.zeros(5))  # still the deterministic answer
    with pytest.raises(RuntimeError, match=r"no bdlkern stochastic layer ran.*1 \(Dropout2d\).*strict=True"):
        U.mc_predict(model, x, 4, strict=True)
    with pytest.warns(bdlkern.NoStochasticLayerWarning) as rec:
        U.mc_predict(model, x, 4, batch_size=2)  # three chunks, one warning
    assert len(rec) == 1
    with pytest.raises(ValueError, match="task='regression'"):  # a malformed output: its own error first
        U.mc_predict(lambda x: model(x).sum(), x, 4, task="regression", strict=True)


def test_mc_predict_warns_for_functional_dropout_and_plain_callables():
    lin = nn.Linear(4, 3)
    with pytest.warns(bdlkern.NoStochasticLayerWarning, match="F.dropout") as rec:
        U.mc_predict(lambda x: lin(F.dropout(x, 0.5)), torch.randn(6, 4), 8, task="classification")
    assert "torch dropout modules" not in str(rec[0].message)  # none to name in a lambda
    with pytest.raises(TypeError, match="strict must be a bool"):
        U.mc_predict(lin, torch.randn(6, 4), 8, strict=1)


def test_mc_predict_is_silent_when_a_bdlkern_layer_samples():
    model = bdlkern.nn.convert(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 3))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", bdlkern.NoStochasticLayerWarning)
        pred = U.mc_predict(model, torch.randn(6, 4), 8, seed=0, strict=True)
    assert (pred.mutual_information > 0).any()


def test_mc_predict_seed_repeats_torch_random_ops():
    class Functional(nn.Module):  # torch's RNG (F.dropout) in front of a bdlkern layer
        def __init__(self):
            super().__init__()
            self.mc = MCDropoutLinear(4, 3, p=0.2)

        def forward(self, x):
            return self.mc(F.dropout(x, 0.5, training=True))

    torch.manual_seed(0)
    model, x = Functional().eval(), torch.randn(6, 4)
    before = torch.get_rng_state()
    a = U.mc_predict(model, x, 8, seed=0).samples
    b = U.mc_predict(model, x, 8, seed=0).samples
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, U.mc_predict(model, x, 8, seed=1).samples)
    assert torch.equal(torch.get_rng_state(), before)  # torch's stream is left where it was
    # Only torch's RNG in the model (a warning), still reproducible.
    train_dropout = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 3)).train()
    with pytest.warns(bdlkern.NoStochasticLayerWarning, match=r"0 \(Dropout\)"):
        c = U.mc_predict(train_dropout, x, 4, seed=3).samples
        d = U.mc_predict(train_dropout, x, 4, seed=3).samples
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def test_sampling_seed_forks_and_seeds_torch_generator():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with bdlkern.sampling(2, seed=7):
        a = torch.rand(5)
    assert torch.equal(torch.get_rng_state(), before)
    with bdlkern.sampling(2, seed=7):
        b = torch.rand(5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with bdlkern.sampling(2):  # no seed: nothing forked, the generator advances
        torch.rand(5)
    assert not torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ZeroDivisionError), bdlkern.sampling(2, seed=7):  # restored on an error too
        after_error = torch.get_rng_state()
        torch.rand(3)
        1 / 0
    assert not torch.equal(torch.get_rng_state(), after_error)


# ---- 4. nested sampling blocks ------------------------------------------------------------------------
def test_nested_sampling_raises():
    layer = MCDropoutLinear(4, 3).eval()
    with bdlkern.sampling(3) as outer:
        nested = r"bdlkern.sampling\(5\) was entered inside an active bdlkern.sampling\(3\)"
        with pytest.raises(RuntimeError, match=nested):
            with bdlkern.sampling(5):
                pass
        assert bdlkern.current_sampling() is outer  # the outer block is untouched
        assert layer(torch.randn(2, 4)).shape == (3, 2, 3)
        inside = r"mc_predict\(num_samples=4\) was called inside an active bdlkern.sampling\(3\)"
        with pytest.raises(RuntimeError, match=inside):
            U.mc_predict(layer, torch.randn(2, 4), 4)
    assert bdlkern.current_sampling() is None
    with bdlkern.sampling(5):  # one after the other is fine
        assert layer(torch.randn(2, 4)).shape == (5, 2, 3)


def test_sampling_blocks_are_per_thread():
    seen = {}

    def worker():
        with bdlkern.sampling(7) as state:
            seen["inner"] = bdlkern.current_sampling() is state

    with bdlkern.sampling(3):
        t = threading.Thread(target=worker)
        t.start()
        t.join()
        assert bdlkern.current_sampling().num_samples == 3
    assert seen == {"inner": True}


# ---- 5. TorchScript -----------------------------------------------------------------------------------
def test_torch_jit_script_says_it_is_not_supported():
    modules = list(linear_modules().values()) + [ConcreteDropout2d(nn.Conv2d(3, 8, 3))]
    for module in modules:
        name = type(module).__name__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
            with pytest.raises(
                RuntimeError,
                match=rf"bdlkern.nn.{name}: TorchScript \(torch.jit.script\) is not supported; "
                "use torch.compile or torch.export",
            ):
                torch.jit.script(nn.Sequential(nn.Identity(), module))


# ---- 6. benchmark harness output ------------------------------------------------------------------------
def test_bench_cli_prints_only_its_own_output():
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    proc = subprocess.run(
        [sys.executable, "-m", "bdlkern.bench", "--quick", "--case", "rng.uniform", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    for line in (proc.stdout + proc.stderr).splitlines():
        assert not line.startswith(("USDT", "ERROR:")), line
    # stderr (not a terminal here) holds one progress line per case and nothing else.
    assert proc.stderr.splitlines() == ["[1/1] rng.uniform: 2 variants"]
    assert "rng.uniform" in proc.stdout and "bdlkern speed-up" in proc.stdout


def test_measure_memory_drops_only_profiler_log_lines(capfd):
    def fn():
        os.write(2, b"USDT:2026-01-01 00:00:00 1:1 SyncActivityProfilerHandler.cpp:39] profiler_start\n")
        os.write(2, b"a message of the code under test\n")
        return torch.ones(1024)

    mem = bench.measure_memory(fn)
    assert mem["output_bytes"] == 4096 and mem["bytes"] >= 4096
    err = capfd.readouterr().err
    assert "a message of the code under test" in err
    assert "USDT" not in err and "ERROR:" not in err
