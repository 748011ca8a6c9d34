"""Serialisation of every bdlkern module: state_dict into a fresh module and torch.save/torch.load
of the whole module give the same outputs in eval, in training (same seed) and inside sampling;
files written from CUDA storages load on a machine without CUDA (map_location="cpu") with the same
outputs; torch.export of an MC network with the sample dimension (and its .pt2 round trip) keeps
the randomness a run-time draw or a graph input, bit-identical to eager for the same state."""

import inspect
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import bdlkern


def _mlp_with(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mc_dropout":
        return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), bdlkern.nn.MCDropoutLinear(16, 3, p=0.3))
    if kind == "concrete_linear":
        return nn.Sequential(bdlkern.nn.ConcreteDropoutLinear(6, 16, init_p=0.2, per_feature=True), nn.ReLU(), nn.Linear(16, 3))
    if kind == "concrete_wrapper":
        return nn.Sequential(bdlkern.nn.ConcreteDropout(nn.Linear(6, 16), init_p=0.25), nn.ReLU(), nn.Linear(16, 3))
    if kind in ("sparse_vd", "sparse_vd_ard"):
        prior = "ard" if kind == "sparse_vd_ard" else "log_uniform"
        model = nn.Sequential(
            bdlkern.nn.SparseVDLinear(6, 16, prior=prior), nn.ReLU(), bdlkern.nn.SparseVDLinear(16, 3, prior=prior)
        )
        with torch.no_grad():
            for m in model:
                if isinstance(m, bdlkern.nn.SparseVDLinear):
                    m.log_sigma2.copy_(torch.randn_like(m.log_sigma2) * 4 + torch.log(m.theta**2))
        return model
    if kind == "sparse_linear":
        layer = bdlkern.nn.SparseVDLinear(6, 16)
        with torch.no_grad():
            layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 4 + torch.log(layer.theta**2))
        return nn.Sequential(layer.to_sparse(), nn.ReLU(), nn.Linear(16, 3))
    if kind == "mc_dropout_conv":
        return nn.Sequential(
            nn.Unflatten(1, (1, 2, 3)), bdlkern.nn.MCDropoutConv2d(1, 4, 2, padding=1, p=0.3, mask="channel"),
            nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 4, 3),
        )
    if kind in ("sparse_vd_conv", "sparse_conv"):
        layer = bdlkern.nn.SparseVDConv1d(1, 8, 3, padding=1)
        with torch.no_grad():
            layer.log_sigma2.copy_(torch.randn_like(layer.log_sigma2) * 4 + torch.log(layer.theta**2))
        conv = layer if kind == "sparse_vd_conv" else layer.to_sparse()
        return nn.Sequential(nn.Unflatten(1, (1, 6)), conv, nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 3))
    if kind == "gaussian":
        model = nn.Sequential(
            nn.Linear(6, 16), bdlkern.nn.GaussianDropout(0.3, learn_alpha=True, num_features=16), nn.ReLU(),
            bdlkern.nn.GaussianDropout(0.2), nn.Linear(16, 3),
        )
        with torch.no_grad():
            model[1].log_alpha.copy_(torch.linspace(-3.0, -0.2, 16))
        return model
    raise ValueError(kind)


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    out = [model(x)]
    with bdlkern.sampling(4, seed=7):
        out.append(model(x))
    model.train()
    torch.manual_seed(3)
    out.append(model(x))
    model.eval()
    out.append(bdlkern.nn.kl_divergence(model))  # the sparse-VD layers' prior decides it
    return [o.detach() for o in out]


KINDS = [
    "mc_dropout", "concrete_linear", "concrete_wrapper", "sparse_vd", "sparse_vd_ard", "sparse_linear",
    "mc_dropout_conv", "sparse_vd_conv", "sparse_conv", "gaussian",
]


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip(kind):
    model = _mlp_with(kind)
    x = torch.randn(5, 6)
    expected = _outputs(model, x)
    fresh = _mlp_with(kind)
    with torch.no_grad():  # make sure the fresh module differs before loading
        for p in fresh.parameters():
            p.add_(1.0)
    fresh.load_state_dict(model.state_dict())
    for got, exp in zip(_outputs(fresh, x), expected):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("kind", KINDS)
def test_torch_save_load_whole_module(kind):
    model = _mlp_with(kind)
    x = torch.randn(5, 6)
    expected = _outputs(model, x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for got, exp in zip(_outputs(loaded, x), expected):
        torch.testing.assert_close(got, exp)
    # and the weights-only format, through state_dict
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _mlp_with(kind)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for got, exp in zip(_outputs(fresh, x), expected):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "gaussian"])  # GaussianDropout came after the flat layout
def test_whole_module_pickled_under_the_flat_layout_loads(kind):
    """bdlkern.nn was one module before it became a package (bdlkern/nn/), and a whole-module pickle
    of that time names every class bdlkern.nn.<Class>: such a pickle still loads, with the same
    outputs. Protocol 2 writes each class as a GLOBAL opcode ("module\\nname\\n" in plain text), so
    the old names are the new pickle with the submodule names cut."""
    model = _mlp_with(kind)
    x = torch.randn(5, 6)
    expected = _outputs(model, x)
    data = pickle.dumps(model, protocol=2)
    flat = data
    for submodule in ("mc_dropout", "concrete", "sparse_vd"):
        flat = flat.replace(f"cbdlkern.nn.{submodule}\n".encode(), b"cbdlkern.nn\n")
    assert flat != data and b"bdlkern.nn." not in flat
    loaded = pickle.loads(flat)
    for got, exp in zip(_outputs(loaded, x), expected):
        torch.testing.assert_close(got, exp)


# ---- torch.export of an MC network with the sample dimension ---------------------------------------
def _mc_network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), bdlkern.nn.MCDropoutLinear(16, 16, p=0.3), nn.ReLU(), bdlkern.nn.MCDropoutLinear(16, 3, p=0.2)
    ).eval()


class _Sampled(nn.Module):
    """``net`` under ``bdlkern.sampling(S[, seed])``: [batch, 6] -> [S, batch, 3]."""

    def __init__(self, net: nn.Module, num_samples: int, seed: int | None = None):
        super().__init__()
        self.net, self.num_samples, self.seed = net, num_samples, seed

    def forward(self, x):
        with bdlkern.sampling(self.num_samples, seed=self.seed):
            return self.net(x)


class _ExplicitState(nn.Module):
    """The MC network of ``_mc_network`` with its randomness as an input: ``forward(x, rng_states)``
    with one int64 ``[seed, offset]`` row per MC layer, through the functional ops (the nn modules
    draw their rng_state inside forward and take none)."""

    def __init__(self, net: nn.Module, num_samples: int):
        super().__init__()
        self.net, self.num_samples = net, num_samples

    def forward(self, x, rng_states):
        first, second = self.net[2], self.net[4]
        h = torch.relu(self.net[0](x))
        h = bdlkern.ops.mc_dropout_linear(h, first.weight, first.bias, first.p, self.num_samples, rng_state=rng_states[0])
        h = torch.relu(h)
        return bdlkern.ops.mc_dropout_linear(h, second.weight, second.bias, second.p, rng_state=rng_states[1])


def _export_round_trip(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def _mc_ops_in(program: torch.export.ExportedProgram) -> int:
    return sum(node.target is torch.ops.bdlkern.mc_dropout_linear.default for node in program.graph.nodes)


def test_export_mc_network_under_sampling():
    """Exported with a dynamic batch, the program keeps the fused op and draws each layer's
    rng_state from torch's generator when it runs (not a constant of the trace): the same
    torch.manual_seed gives eager's output bit for bit, also after torch.export.save / load."""
    model = _Sampled(_mc_network(), num_samples=4)
    program = torch.export.export(
        model, (torch.randn(5, 6),), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}}
    )
    assert _mc_ops_in(program) == 2
    x = torch.randn(9, 6)  # another batch size than the trace
    for exported in (program.module(), _export_round_trip(program).module()):
        torch.manual_seed(123)
        eager = model(x)
        torch.manual_seed(123)
        got = exported(x)
        assert got.shape == (4, 9, 3)
        assert torch.equal(got, eager)
        again = exported(x)  # the generator moved on: new masks
        torch.manual_seed(124)
        other = exported(x)
        assert not torch.equal(again, got) and not torch.equal(other, got)


def test_export_mc_network_with_rng_state_input():
    """The randomness as a graph input: the exported program equals eager for the same rng_states
    and differs for other ones (in either layer), so no mask was frozen into the program."""
    model = _ExplicitState(_mc_network(), num_samples=4)
    states = torch.tensor([[11, 0], [12, 5]])
    program = torch.export.export(model, (torch.randn(5, 6), states))
    assert _mc_ops_in(program) == 2
    x = torch.randn(5, 6)
    eager = model(x, states)
    for exported in (program.module(), _export_round_trip(program).module()):
        assert torch.equal(exported(x, states), eager)
        assert torch.equal(exported(x, states.clone()), eager)  # deterministic in its inputs
        for changed in (torch.tensor([[13, 0], [12, 5]]), torch.tensor([[11, 0], [12, 6]])):
            out = exported(x, changed)
            assert torch.equal(out, model(x, changed)) and not torch.equal(out, eager)


def test_export_seeded_sampling_is_reproducible():
    """``sampling(S, seed=...)`` promises the same samples for the same seed, whatever ran before:
    an exported forward that samples with a seed must return eager's samples on every call."""
    model = _Sampled(_mc_network(), num_samples=4, seed=7)
    x = torch.randn(5, 6)
    program = torch.export.export(model, (x,))
    eager = model(x)
    assert torch.equal(model(x), eager)  # eager: reproducible from the seed
    exported = program.module()
    for call in range(3):
        same = torch.equal(exported(x), eager)
        assert same, f"exported call {call} drew other samples than eager sampling(4, seed=7)"


# ---- a model saved by a CUDA device, loaded on a machine without one -----------------------------------
# Two fresh interpreters. The saver builds every KINDS model on the CPU and writes torch.save(model)
# and torch.save(model.state_dict()) with every storage tagged "cuda:0" (a location tagger that runs
# before torch's own, as torch.serialization.register_package allows): the pickle then holds what a
# CUDA device writes (torch.save copies CUDA storages to the host and records their location; the
# tensors' bytes and everything else are the same). It also records the CPU outputs. The loader
# runs with CUDA_VISIBLE_DEVICES="" and map_location="cpu". It is this interpreter with this
# bdlkern unless BDLKERN_TEST_LOADER_PYTHON (an interpreter) and / or
# BDLKERN_TEST_LOADER_PYTHONPATH (prepended to PYTHONPATH, e.g. a CPU-only build of bdlkern) say
# otherwise.
_SCRIPT_HEAD = """
import sys
import torch
from torch import nn
import bdlkern

KINDS = {kinds!r}

{helpers}
"""

_SAVER = """
out = sys.argv[1]
tag_as_cuda = False


def cuda_tag(storage):
    return "cuda:0" if tag_as_cuda and storage.device.type == "cpu" else None


torch.serialization.register_package(0, cuda_tag, lambda storage, location: None)
x = torch.randn(5, 6, generator=torch.Generator().manual_seed(11))
expected = {}
for kind in KINDS:
    model = _mlp_with(kind)
    tag_as_cuda = True
    torch.save(model, f"{out}/{kind}.module.pt")
    torch.save(model.state_dict(), f"{out}/{kind}.state_dict.pt")
    tag_as_cuda = False
    expected[kind] = _outputs(model, x)
torch.save({"x": x, "expected": expected}, f"{out}/expected.pt")
"""

_LOADER = """
out = sys.argv[1]
x = torch.load(f"{out}/expected.pt", weights_only=True)["x"]
result = {
    "bdlkern": bdlkern.__file__,
    "cuda_build": bdlkern.build_info()["cuda"],
    "cuda_available": torch.cuda.is_available(),
    "cases": {},
}
for kind in KINDS:
    for what in ("module", "state_dict"):
        path, weights_only = f"{out}/{kind}.{what}.pt", what == "state_dict"
        case = result["cases"][f"{kind}.{what}"] = {}
        try:  # without map_location: the recorded CUDA location must be refused here
            torch.load(path, weights_only=weights_only)
            case["error"] = None
        except RuntimeError as e:
            case["error"] = str(e)
        locations = []
        torch.load(path, weights_only=weights_only, map_location=lambda storage, loc: locations.append(loc) or storage)
        case["locations"] = locations
        loaded = torch.load(path, weights_only=weights_only, map_location="cpu")
        if what == "module":
            model = loaded
        else:
            model = _mlp_with(kind)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1.0)
            model.load_state_dict(loaded)
        tensors = list(model.parameters()) + [b for b in model.buffers() if b is not None]
        case["devices"] = sorted({t.device.type for t in tensors})
        case["storages"] = len({t.untyped_storage().data_ptr() for t in tensors})
        case["outputs"] = _outputs(model, x)
torch.save(result, f"{out}/loaded.pt")
"""


def _run_script(tmp_path, name: str, body: str, python: str = sys.executable, env: dict | None = None) -> None:
    helpers = "\n\n".join(inspect.getsource(f) for f in (_mlp_with, _outputs))
    script = tmp_path / f"{name}.py"  # run from tmp_path: no checkout on sys.path[0] shadows the build
    script.write_text(_SCRIPT_HEAD.format(kinds=KINDS, helpers=helpers) + body)
    proc = subprocess.run(
        [python, str(script), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def test_cuda_saved_models_load_on_a_cpu_only_machine(tmp_path):
    _run_script(tmp_path, "saver", _SAVER)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    other_build = os.environ.get("BDLKERN_TEST_LOADER_PYTHONPATH")
    if other_build:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [other_build, env.get("PYTHONPATH")]))
    _run_script(tmp_path, "loader", _LOADER, python=os.environ.get("BDLKERN_TEST_LOADER_PYTHON", sys.executable), env=env)

    saved = torch.load(tmp_path / "expected.pt", weights_only=True)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert not loaded["cuda_available"]
    if other_build:
        # normpath, not realpath: a staged build may link its Python sources to the checkout's.
        assert os.path.normpath(loaded["bdlkern"]).startswith(os.path.normpath(other_build) + os.sep), (
            f"the loader imported {loaded['bdlkern']}, not the build in BDLKERN_TEST_LOADER_PYTHONPATH={other_build}"
        )
        assert not loaded["cuda_build"], f"the loader's bdlkern ({loaded['bdlkern']}) has CUDA kernels"
    for kind in KINDS:
        for what in ("module", "state_dict"):
            case = loaded["cases"][f"{kind}.{what}"]
            # The files really record CUDA storages: one "cuda:0" location per storage, and a plain
            # torch.load refuses them on this machine.
            assert case["locations"] and set(case["locations"]) == {"cuda:0"}, (kind, what, case["locations"])
            assert len(case["locations"]) == case["storages"], (kind, what)
            assert case["error"] is not None and "torch.cuda.is_available() is False" in case["error"], case["error"]
            assert case["devices"] == ["cpu"]
            assert len(case["outputs"]) == len(saved["expected"][kind]) == 4
            for regime, got, exp in zip(("eval", "sampling(4, seed=7)", "train, seed 3", "kl"), case["outputs"], saved["expected"][kind]):
                if other_build:  # another build may round differently; masks and noise are still the same
                    torch.testing.assert_close(got, exp, msg=f"{kind}.{what}, {regime}")
                else:
                    assert torch.equal(got, exp), f"{kind}.{what}, {regime}: max diff {(got - exp).abs().max().item():.3g}"
