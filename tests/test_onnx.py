"""ONNX export (bdlkern.onnx): eval models match PyTorch, MC models sample the same distributions.

Every model is exported by the dynamo exporter with bdlkern's translations and run in onnxruntime.
Eval outputs must equal PyTorch's to float32 rounding. Monte Carlo outputs cannot match bit for bit
(ONNX draws from the runtime's generator, not bdlkern's Philox stream), so their samples are
compared with PyTorch's in mean and variance, per output element, by z-scores whose standard
errors come from the samples themselves; each MC test also checks that the same statistic rejects
a model with a wrong rate or variance, so it can fail. onnxruntime is seeded (``set_seed``) before
each session, so the tests are deterministic.
"""

from __future__ import annotations

import contextlib
import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import bdlkern.onnx  # noqa: E402

S_MC = 4000  # MC samples per comparison: standard errors of 1.6 % of the std for the mean
Z_MAX = 5.0  # |z| bound per output element (about 6e-7 two-sided per element for a normal z)


# ---- helpers -----------------------------------------------------------------------------------------
def _session(model: nn.Module, x: torch.Tensor, num_samples: int | None = None, seed: int | None = 0, **kwargs):
    """Exports ``model`` (in eval; inside ``bdlkern.sampling(num_samples, seed)`` when given) and
    returns (onnxruntime session, the ONNX model proto)."""
    model.eval()
    block = bdlkern.sampling(num_samples, seed=seed) if num_samples else contextlib.nullcontext()
    with block:
        program = bdlkern.onnx.export(model, (x,), verbose=False, **kwargs)
    proto = program.model_proto
    ort.set_seed(1234)
    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]), proto


def _run(session, x: torch.Tensor) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def _op_types(proto) -> set[str]:
    return {node.op_type for node in proto.graph.node}


def _z_scores(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Largest |z| over the output elements for equal means and for equal variances of two sample
    sets ``[S, ...]``: the variance's standard error is sqrt((m4 - s^4) / S) from the sample fourth
    central moment (no normality assumed)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = a.shape[0], b.shape[0]
    ma, mb = a.mean(0), b.mean(0)
    va, vb = a.var(0, ddof=1), b.var(0, ddof=1)
    se_mean = np.sqrt(va / na + vb / nb)
    m4a, m4b = ((a - ma) ** 4).mean(0), ((b - mb) ** 4).mean(0)
    se_var = np.sqrt(np.maximum(m4a - va**2, 0) / na + np.maximum(m4b - vb**2, 0) / nb)
    assert (se_mean > 0).all() and (se_var > 0).all(), "every element must vary (a degenerate comparison)"
    return float(np.abs((ma - mb) / se_mean).max()), float(np.abs((va - vb) / se_var).max())


def _torch_samples(model: nn.Module, x: torch.Tensor, num_samples: int, seed: int = 7) -> np.ndarray:
    with torch.no_grad(), bdlkern.sampling(num_samples, seed=seed):
        return model.eval()(x).numpy()


def _check_mc(model: nn.Module, x: torch.Tensor, wrong: nn.Module, expect_shape: tuple,
              folded: bool = False) -> tuple[np.ndarray, object]:
    """Exports ``model`` inside ``sampling(S_MC)``, runs it once in onnxruntime, and compares its
    samples with PyTorch's; ``wrong`` (a copy with another rate or variance) must be rejected.
    ``folded``: the output is ``[S * N, ...]`` (a conv net), compared per image as ``[S, N, ...]``."""
    session, proto = _session(model, x, num_samples=S_MC)
    onnx_samples = _run(session, x)
    assert onnx_samples.shape == expect_shape
    assert {"RandomUniformLike", "RandomNormalLike"} & _op_types(proto)

    def per_image(samples):
        return samples.reshape(S_MC, x.shape[0], *samples.shape[1:]) if folded else samples

    torch_samples = _torch_samples(model, x, S_MC)
    z_mean, z_var = _z_scores(per_image(onnx_samples), per_image(torch_samples))
    assert z_mean < Z_MAX and z_var < Z_MAX, (z_mean, z_var)
    z_mean_w, z_var_w = _z_scores(per_image(onnx_samples), per_image(_torch_samples(wrong, x, S_MC)))
    assert max(z_mean_w, z_var_w) > 2 * Z_MAX, ("the comparison does not see a wrong model", z_mean_w, z_var_w)
    # A fresh draw on every run of the session.
    assert not np.array_equal(_run(session, x), onnx_samples)
    return onnx_samples, session


def _sparse_layer(in_features: int, out_features: int, density: float, seed: int, variance: bool = False):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g)
    mask = torch.rand(out_features, in_features, generator=g) < density
    mask[0] = False  # an empty row: its LRT samples have the std sqrt(1e-8) alone
    mask[1, :3] = True
    bias = torch.randn(out_features, generator=g)
    var = torch.rand(out_features, in_features, generator=g) * 0.5 if variance else None
    return bdlkern.nn.SparseLinear.from_dense(weight * mask, bias, variance=var, mask=mask)


def _concrete(module, p: float):
    with torch.no_grad():
        module.p_logit.fill_(float(np.log(p) - np.log1p(-p)))
    return module


def _sparse_vd_conv_net(kept: float, log_alpha_kept: float, shift: float = 0.0, seed: int = 0):
    """Two SparseVDConv2d layers (padding, groups and dilation in the first, stride in the second);
    a fraction ``kept`` of the weights has ``log_alpha = log_alpha_kept (+ shift)``, the others are
    pruned (log alpha 5)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        bdlkern.nn.SparseVDConv2d(4, 6, 3, padding=(1, 2), dilation=(1, 2), groups=2), nn.ReLU(),
        bdlkern.nn.SparseVDConv2d(6, 3, 3, stride=2),
    )
    for layer in net[::2]:
        with torch.no_grad():
            keep = torch.rand_like(layer.theta) < kept
            keep.view(layer.theta.shape[0], -1)[:, 0] = True  # no empty filter
            layer.log_sigma2.copy_(torch.log(layer.theta**2) + torch.where(keep, log_alpha_kept + shift, 5.0))
    return net


def _to_sparse(module: nn.Module) -> nn.Module:
    return module.to_sparse() if isinstance(module, bdlkern.nn.SparseVDConv2d) else module


# ---- eval: the deterministic models equal PyTorch ------------------------------------------------------
class _Custom(nn.Module):
    """A model with its own forward: two branches, a residual, a sparse layer and a Concrete layer."""

    def __init__(self):
        super().__init__()
        self.a = bdlkern.nn.MCDropoutLinear(12, 16, p=0.2)
        self.b = bdlkern.nn.SparseVDLinear(12, 16)
        self.sparse = _sparse_layer(16, 16, 0.05, seed=3)
        self.head = bdlkern.nn.ConcreteDropoutLinear(16, 5)

    def forward(self, x):
        h = torch.relu(self.a(x)) + torch.tanh(self.b(x))
        h = h + self.sparse(h)
        return self.head(h).log_softmax(-1)


def _eval_cases():
    torch.manual_seed(0)
    svd = bdlkern.nn.SparseVDLinear(12, 7)
    with torch.no_grad():  # about 15 % of the weights kept (log alpha = -2), the others pruned (5)
        kept = torch.rand(7, 12) < 0.15
        svd.log_sigma2.copy_(torch.log(svd.theta**2) + torch.where(kept, -2.0, 5.0))
    to_sparse = svd.to_sparse()
    sequential = nn.Sequential(
        nn.Linear(12, 20), nn.ReLU(), nn.Dropout(0.5), nn.Linear(20, 24), nn.GELU(),
        bdlkern.nn.ConcreteDropout(nn.Linear(24, 16)), nn.ReLU(), _sparse_layer(16, 10, 0.04, seed=2),
    )
    bdlkern.nn.convert(sequential)  # Dropout -> Linear becomes an MCDropoutLinear
    assert isinstance(sequential[2], bdlkern.nn.MCDropoutLinear)
    svd_conv = _sparse_vd_conv_net(kept=0.15, log_alpha_kept=-2.0)
    return {
        "MCDropoutLinear": (bdlkern.nn.MCDropoutLinear(12, 7, p=0.3, shared_mask=True), (4, 12)),
        "ConcreteDropoutLinear": (bdlkern.nn.ConcreteDropoutLinear(12, 7, per_feature=True), (4, 12)),
        "ConcreteDropout2d": (bdlkern.nn.ConcreteDropout2d(nn.Conv2d(3, 5, 3, padding=1)), (2, 3, 6, 6)),
        "SparseVDLinear": (svd, (4, 12)),
        "SparseLinear-csr": (_sparse_layer(40, 9, 0.05, seed=1), (4, 40)),
        "SparseLinear-csr-variance-3d": (to_sparse, (2, 3, 12)),
        "SparseLinear-dense": (_sparse_layer(40, 9, 0.5, seed=1), (4, 40)),
        "Sequential": (sequential, (2, 3, 12)),
        "custom-forward": (_Custom(), (4, 12)),
        "MCDropoutConv2d": (bdlkern.nn.MCDropoutConv2d(3, 5, 3, stride=2, padding=1, p=0.3, mask="channel"), (2, 3, 7, 7)),
        "SparseVDConv2d-net": (svd_conv, (2, 4, 9, 9)),
        "SparseConv2d-csr-net": (nn.Sequential(*[_to_sparse(m) for m in svd_conv]), (2, 4, 9, 9)),
    }


@pytest.mark.parametrize("name", list(_eval_cases()))
def test_eval_model_equals_pytorch(name):
    model, shape = _eval_cases()[name]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    session, proto = _session(model, x)
    with torch.no_grad():
        expected = model.eval()(x)
    got = torch.from_numpy(_run(session, x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ops = _op_types(proto)
    assert not any(op.startswith("Random") for op in ops), "the eval model must be deterministic"
    if name.startswith("SparseLinear-csr"):
        # The sparse product stayed sparse: no dense weight in the file, a gather/scatter product.
        assert model.density <= model.crossover_density(x.numel() // x.shape[-1])
        assert {"Gather", "ScatterND"} <= ops and not ({"MatMul", "Gemm"} & ops), ops
        sizes = [int(np.prod(init.dims)) for init in proto.graph.initializer]
        assert max(sizes) < model.in_features * model.out_features, sizes
    if name.startswith("SparseConv2d-csr"):
        # The layers run the sparse_conv op (below the crossover); its dense weight is made in the graph.
        for layer in model[::2]:
            assert isinstance(layer, bdlkern.nn.SparseConv2d) and layer.density <= layer.crossover_density
        assert "Conv" in ops, ops
    if name == "SparseLinear-dense":
        assert model.density > model.crossover_density(x.numel() // x.shape[-1])
        assert {"MatMul", "Gemm"} & ops, ops


# ---- MC: the samples have PyTorch's distribution -----------------------------------------------------
def _x(*shape, seed=2):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shared_mask", [False, True])
def test_mc_dropout_linear_samples(shared_mask):
    torch.manual_seed(0)

    def make(p):
        model = nn.Sequential(
            bdlkern.nn.MCDropoutLinear(16, 12, p=p, shared_mask=shared_mask), nn.Tanh(),  # x [B, K], num_samples=S
            bdlkern.nn.MCDropoutLinear(12, 5, p=0.2, shared_mask=shared_mask),  # x [S, B, K]
        )
        torch.manual_seed(0)
        for layer in (model[0], model[2]):
            layer.reset_parameters()
        return model

    x = _x(4, 16)
    x[1] = x[0]  # two equal rows: equal outputs in every sample with shared masks, only then
    samples, _ = _check_mc(make(0.3), x, wrong=make(0.45), expect_shape=(S_MC, 4, 5))
    rows_equal = np.array_equal(samples[:, 0], samples[:, 1])
    assert rows_equal == shared_mask


def test_mc_dropout_p_zero_and_dynamic_batch():
    """p = 0 draws no mask (and has no random node): the samples equal PyTorch's; the batch
    dimension of an MC export can be dynamic; an unseeded sampling block exports too."""
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=2, max=64)
    exact = nn.Sequential(bdlkern.nn.MCDropoutLinear(6, 5, p=0.0), nn.ReLU(), bdlkern.nn.MCDropoutLinear(5, 3, p=0.0))
    session, proto = _session(exact, _x(4, 6), num_samples=8, dynamic_shapes=({0: batch},))
    assert not any(op.startswith("Random") for op in _op_types(proto))
    # Unseeded: the rng_state comes from torch's generator (aten.randint, translated, then dropped).
    mc = bdlkern.nn.MCDropoutLinear(6, 3, p=0.5)
    mc_session, mc_proto = _session(mc, _x(4, 6), num_samples=8, seed=None, dynamic_shapes=({0: batch},))
    assert [n.op_type for n in mc_proto.graph.node if n.op_type.startswith("Random")] == ["RandomUniformLike"]
    for rows in (2, 9):
        x = _x(rows, 6, seed=rows)
        torch.testing.assert_close(torch.from_numpy(_run(session, x)), torch.from_numpy(_torch_samples(exact, x, 8)),
                                   rtol=1e-5, atol=1e-5)
        assert _run(mc_session, x).shape == (8, rows, 3)


def test_lrt_samples_sparse_vd():
    torch.manual_seed(0)

    def make(shift):
        layer = bdlkern.nn.SparseVDLinear(10, 6)
        with torch.no_grad():
            layer.log_sigma2.copy_(torch.log(layer.theta**2) - 1.0 + shift)  # alpha ~ e^-1: strong noise
        return layer

    _check_mc(make(0.0), _x(3, 10), wrong=make(0.5), expect_shape=(S_MC, 3, 6))


def test_lrt_samples_sparse_linear_stochastic():
    """SparseLinear with weight variances samples inside sampling (sparse_linear_lrt), here as the
    second MC layer (input [S, B, K]) after a plain torch layer and an MC-dropout layer."""
    torch.manual_seed(0)

    def make(scale):
        sparse = _sparse_layer(20, 6, 0.3, seed=5, variance=True)
        with torch.no_grad():
            sparse.values[:, 1] *= scale
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 20), bdlkern.nn.MCDropoutLinear(20, 20, p=0.1), nn.ReLU(), sparse)

    model = make(1.0)
    assert model[3].has_variance
    _check_mc(model, _x(3, 8), wrong=make(1.8), expect_shape=(S_MC, 3, 6))


def test_lrt_samples_sparse_linear_first_layer():
    """The stochastic sparse layer as the first MC layer (x [B, K], num_samples=S)."""
    make = lambda scale: _scaled_sparse(scale)  # noqa: E731
    _check_mc(make(1.0), _x(3, 20), wrong=make(1.8), expect_shape=(S_MC, 3, 6))


def _scaled_sparse(scale):
    sparse = _sparse_layer(20, 6, 0.3, seed=6, variance=True)
    with torch.no_grad():
        sparse.values[:, 1] *= scale
    return sparse


@pytest.mark.parametrize("kind", ["linear-one-rate", "wrapper-per-feature", "conv2d"])
def test_concrete_samples(kind):
    """Inside sampling the Concrete modules use hard Bernoulli(1 - p) masks with the learnt rate.
    The one-rate Linear runs the fused MC-dropout kernel in eager PyTorch and the unfused
    uniform-mask path under export: the same distribution, compared here."""
    torch.manual_seed(0)

    def make(p):
        torch.manual_seed(0)
        if kind == "linear-one-rate":
            return _concrete(bdlkern.nn.ConcreteDropoutLinear(16, 5), p)
        if kind == "wrapper-per-feature":
            return _concrete(bdlkern.nn.ConcreteDropout(nn.Linear(16, 5), per_feature=True), p)
        return _concrete(bdlkern.nn.ConcreteDropout2d(nn.Conv2d(3, 2, 3)), p)

    if kind == "conv2d":
        x, shape = _x(2, 3, 4, 4), (S_MC * 2, 2, 2, 2)  # the samples folded into the batch
    else:
        x, shape = _x(3, 16), (S_MC, 3, 5)
    _check_mc(make(0.3), x, wrong=make(0.45), expect_shape=shape)


def test_concrete_relaxed_eval_samples():
    """relaxed_eval keeps the relaxed Concrete masks in eval (the concrete_dropout op): one random
    mask per element, so the rows of a batch of equal inputs are the samples."""
    torch.manual_seed(0)

    def make(p):
        torch.manual_seed(0)
        return _concrete(bdlkern.nn.ConcreteDropoutLinear(8, 4, relaxed_eval=True, temperature=0.5), p)

    x = _x(1, 8).expand(S_MC, 8).contiguous()
    session, proto = _session(make(0.3), x)
    assert "RandomUniformLike" in _op_types(proto)
    got = _run(session, x)
    with torch.no_grad():
        expected, wrong = make(0.3).eval()(x).numpy(), make(0.45).eval()(x).numpy()
    z_mean, z_var = _z_scores(got, expected)
    assert z_mean < Z_MAX and z_var < Z_MAX, (z_mean, z_var)
    assert max(_z_scores(got, wrong)) > 2 * Z_MAX


# ---- MC convolutions: samples folded into the batch, [S * N, ...] -------------------------------------
def _lenet(p: float, shared_mask: bool = False) -> nn.Module:
    """A LeNet-style MC-dropout net: element masks in the first conv (its input [N, C, H, W] shared by
    the samples), channel masks in the second (input [S * N, ...]), then an MC-dropout Linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        bdlkern.nn.MCDropoutConv2d(1, 4, 3, p=p, mask="element", shared_mask=shared_mask), nn.ReLU(),
        nn.MaxPool2d(2),
        bdlkern.nn.MCDropoutConv2d(4, 6, 3, stride=2, padding=1, p=p, mask="channel", shared_mask=shared_mask),
        nn.ReLU(), nn.Flatten(),
        bdlkern.nn.MCDropoutLinear(24, 3, p=p, shared_mask=shared_mask),
    )


def _equal_images(shape) -> torch.Tensor:
    x = _x(*shape)
    x[1] = x[0]
    return x


def test_mc_dropout_conv_lenet_samples():
    x = _equal_images((2, 1, 10, 10))
    samples, _ = _check_mc(_lenet(0.3), x, wrong=_lenet(0.5), expect_shape=(S_MC * 2, 3), folded=True)
    per_image = samples.reshape(S_MC, 2, 3)
    assert not np.array_equal(per_image[:, 0], per_image[:, 1])  # each image has its own masks


def test_mc_dropout_conv_shared_masks():
    """shared_mask: the images of a sample share its masks, so two equal images give equal outputs in
    every sample. The marginal distribution of each output element is that of the unshared net, and
    the samples are compared with the unshared net's in PyTorch (its shared channel-mask path
    convolves each sample on its kept channels, one call per sample: slow for thousands of samples
    of a tiny net)."""
    x = _equal_images((2, 1, 10, 10))
    session, proto = _session(_lenet(0.3, shared_mask=True), x, num_samples=S_MC)
    assert "RandomUniformLike" in _op_types(proto)
    samples = _run(session, x)
    assert samples.shape == (S_MC * 2, 3)
    per_image = samples.reshape(S_MC, 2, 3)
    assert np.array_equal(per_image[:, 0], per_image[:, 1])
    reference = _torch_samples(_lenet(0.3), x, S_MC).reshape(S_MC, 2, 3)
    z_mean, z_var = _z_scores(per_image, reference)
    assert z_mean < Z_MAX and z_var < Z_MAX, (z_mean, z_var)
    # The statistic rejects another rate; PyTorch's own shared masks give the equal images equal outputs
    # too (checked on few samples: that path is the slow one).
    assert max(_z_scores(per_image, _torch_samples(_lenet(0.5), x, S_MC).reshape(S_MC, 2, 3))) > 2 * Z_MAX
    shared = _torch_samples(_lenet(0.3, shared_mask=True), x, 200).reshape(200, 2, 3)
    assert np.array_equal(shared[:, 0], shared[:, 1])


def test_lrt_conv_samples_sparse_vd():
    """SparseVDConv2d layers inside sampling (lrt_conv): the first takes the shared [N, C, H, W], the
    second the folded samples."""
    make = lambda shift: _sparse_vd_conv_net(kept=1.0, log_alpha_kept=-1.0, shift=shift)  # noqa: E731
    _check_mc(make(0.0), _x(2, 4, 6, 6), wrong=make(0.5), expect_shape=(S_MC * 2, 3, 2, 2), folded=True)


def test_sparse_conv_samples():
    """The pruned net (SparseVDConv2d.to_sparse(): CSR weights with variances) samples inside
    sampling (sparse_conv_lrt), first layer on the shared input, second on the folded samples."""

    def make(scale):
        net = nn.Sequential(*[_to_sparse(m) for m in _sparse_vd_conv_net(kept=0.2, log_alpha_kept=-1.0)])
        with torch.no_grad():
            for layer in net[::2]:
                layer.values[:, 1] *= scale
        return net

    model = make(1.0)
    assert all(layer.has_variance for layer in model[::2])
    _check_mc(model, _x(2, 4, 6, 6), wrong=make(1.8), expect_shape=(S_MC * 2, 3, 2, 2), folded=True)


def test_conv1d_samples():
    """1-d: an MC-dropout Conv1d with channel masks (nn.Dropout1d -> Conv1d) and a SparseVDConv1d."""

    def make(p):
        torch.manual_seed(0)
        net = nn.Sequential(
            bdlkern.nn.MCDropoutConv1d(3, 4, 3, padding=1, p=p, mask="channel"), nn.Tanh(),
            bdlkern.nn.SparseVDConv1d(4, 2, 3, stride=2, dilation=2),
        )
        with torch.no_grad():
            net[2].log_sigma2.copy_(torch.log(net[2].theta**2) - 2.0)
        return net

    _check_mc(make(0.3), _x(2, 3, 9), wrong=make(0.5), expect_shape=(S_MC * 2, 2, 3), folded=True)


def test_conv_geometry_exact_and_dynamic_batch():
    """Where the samples are (nearly) deterministic the ONNX model equals PyTorch: an MC-dropout
    conv with p = 0 (stride, padding, dilation, groups), one on the folded samples, and a sparse
    conv with zero variances (std sqrt(1e-8)); the batch dimension is dynamic."""
    torch.manual_seed(0)
    weight = torch.randn(5, 6, 2, 3) * (torch.rand(5, 6, 2, 3) < 0.2)
    sparse = bdlkern.nn.SparseConv2d.from_dense(weight, torch.randn(5), variance=torch.zeros_like(weight),
                                               mask=weight != 0, stride=(1, 2), padding=1)
    model = nn.Sequential(
        bdlkern.nn.MCDropoutConv2d(4, 6, 3, stride=2, padding=(1, 2), dilation=(1, 2), groups=2, p=0.0), nn.ReLU(),
        bdlkern.nn.MCDropoutConv2d(6, 6, 1, p=0.0, mask="channel"), nn.ReLU(),
        sparse,
    )
    batch = torch.export.Dim("batch", min=2, max=64)
    session, proto = _session(model, _x(3, 4, 9, 11), num_samples=5, dynamic_shapes=({0: batch},))
    assert [n.op_type for n in proto.graph.node if n.op_type.startswith("Random")] == ["RandomNormalLike"]
    for rows in (2, 7):
        x = _x(rows, 4, 9, 11, seed=rows)
        expected = torch.from_numpy(_torch_samples(model, x, 5))
        got = torch.from_numpy(_run(session, x))
        assert got.shape == expected.shape == (5 * rows, 5, 6, 3)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)  # the noise: 1e-4 * eps


# ---- coverage of the ops, and the errors -------------------------------------------------------------
class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in ("bdlkern", "bdlkern_simt"):
            self.ops.add(func.name().split("::")[1].split(".")[0])
        return func(*args, **(kwargs or {}))


def _reachable_ops() -> set[str]:
    """The bdlkern ops every bdlkern.nn module calls in eval, in training (forward) and in sampling."""
    torch.manual_seed(0)
    modules = [
        (bdlkern.nn.MCDropoutLinear(8, 4, shared_mask=True), (3, 8)),
        (bdlkern.nn.ConcreteDropoutLinear(8, 4), (3, 8)),
        (bdlkern.nn.ConcreteDropoutLinear(8, 4, per_feature=True), (3, 8)),
        (bdlkern.nn.ConcreteDropoutLinear(8, 4, relaxed_eval=True), (3, 8)),
        (bdlkern.nn.ConcreteDropout(nn.Linear(8, 4)), (3, 8)),
        (bdlkern.nn.ConcreteDropout2d(nn.Conv2d(2, 3, 3)), (2, 2, 5, 5)),
        (bdlkern.nn.ConcreteDropout2d(nn.Conv2d(2, 3, 3), relaxed_eval=True), (2, 2, 5, 5)),
        (bdlkern.nn.SparseVDLinear(8, 4), (3, 8)),
        (_sparse_layer(40, 6, 0.03, seed=1, variance=True), (3, 40)),
        (_sparse_layer(40, 6, 0.6, seed=1), (3, 40)),
        (bdlkern.nn.MCDropoutConv2d(2, 3, 3, mask="channel", shared_mask=True), (2, 2, 5, 5)),
        (bdlkern.nn.SparseVDConv2d(2, 3, 3), (2, 2, 5, 5)),
        (_to_sparse(_sparse_vd_conv_net(kept=0.15, log_alpha_kept=-2.0)[0]), (2, 4, 5, 5)),
        (bdlkern.nn.GaussianDropout(0.3, learn_alpha=True, num_features=8), (3, 8)),
        (bdlkern.nn.GaussianDropout(0.3, channel=True), (2, 2, 5, 5)),
    ]
    recorder = _OpRecorder()
    with torch.no_grad(), recorder:
        for module, shape in modules:
            x = torch.randn(*shape)
            module.train()(x)
            module.eval()(x)
            with bdlkern.sampling(3, seed=0):
                module(x)
    return recorder.ops


def test_every_reachable_op_has_a_translation():
    table = bdlkern.onnx.translation_table()
    translated = {op.name().split("::")[1].split(".")[0] for op in table if op.namespace == "bdlkern"}
    reachable = _reachable_ops()
    assert {"mc_dropout_linear", "concrete_dropout", "uniform", "lrt_linear", "sparse_linear", "sparse_linear_lrt"} <= reachable
    assert {"mc_dropout_conv", "lrt_conv", "sparse_conv", "sparse_conv_lrt"} <= reachable
    assert "gaussian_dropout" in reachable
    assert reachable <= translated, reachable - translated
    # Every op of the library is translated or listed as not exportable, with its reason.
    defined = {n.split("::")[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("bdlkern::")}
    assert defined == translated | set(bdlkern.onnx.NOT_EXPORTABLE), defined ^ (translated | set(bdlkern.onnx.NOT_EXPORTABLE))
    assert not translated & set(bdlkern.onnx.NOT_EXPORTABLE)
    assert all(table[op].__module__ == "bdlkern._onnx_ops" for op in table)
    assert table is not bdlkern.onnx.translation_table()  # a fresh dict: callers may change theirs


def test_untranslated_op_is_a_clear_error():
    class WithKL(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = bdlkern.nn.SparseVDLinear(6, 3)

        def forward(self, x):
            return self.layer(x).sum() + self.layer.kl()

    with pytest.raises(bdlkern.onnx.UnsupportedOpError, match=r"torch\.ops\.bdlkern\.sparse_vd_kl\w*: the KL term") as info:
        bdlkern.onnx.export(WithKL().eval(), (torch.randn(2, 6),), verbose=False)
    assert "mc_dropout_linear" in str(info.value)  # lists what is translated
    assert info.value.__cause__ is not None  # the exporter's own error is chained
    with pytest.raises(ValueError, match="dynamo=False"):
        bdlkern.onnx.export(nn.Linear(2, 2), (torch.randn(1, 2),), dynamo=False)


def test_onnx_packages_are_imported_lazily(monkeypatch):
    code = (
        "import sys, bdlkern, bdlkern.onnx\n"
        "assert 'onnxscript' not in sys.modules and 'onnx' not in sys.modules, 'imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # Without onnxscript, asking for a translation says what to install.
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.delitem(sys.modules, "bdlkern._onnx_ops", raising=False)
    with pytest.raises(ImportError, match="pip install onnx onnxscript"):
        bdlkern.onnx.translation_table()


class _CustomCNN(nn.Module):
    """A model bdlkern did not write: F.dropout in forward, Dropout2d inside a residual block,
    a channel-dropout the graph cannot fuse (after the block)."""

    def __init__(self, p_block: float = 0.3, p_head: float = 0.4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout2d(p_block)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)
        self.p_head = p_head

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = x + self.conv2(self.drop(x))
        x = F.adaptive_avg_pool2d(F.relu(x), 2).flatten(1)
        return self.fc(F.dropout(x, self.p_head, training=self.training))


def test_converted_custom_model_samples():
    """bdlkern.nn.convert of a custom model (a dropout fused inside a residual block, F.dropout
    rewritten into MCDropout) exports inside sampling and samples like PyTorch."""
    torch.manual_seed(4)
    base = _CustomCNN()
    wrong = copy.deepcopy(base)
    wrong.p_head = 0.05
    model = bdlkern.nn.convert(base).eval()
    wrong = bdlkern.nn.convert(wrong).eval()
    assert isinstance(model, torch.fx.GraphModule)
    x = torch.randn(2, 1, 8, 8)
    _check_mc(model, x, wrong, (S_MC * 2, 3), folded=True)


def test_variance_layers_sample():
    """A variance network (VarianceConv2d -> VarianceLinear: variance_conv on the shared input,
    variance_linear on the folded samples) inside sampling: zero-mean LRT samples around the biases."""

    def make(shift: float):
        torch.manual_seed(0)
        model = nn.Sequential(
            bdlkern.nn.VarianceConv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), bdlkern.nn.VarianceLinear(48, 3)
        )
        with torch.no_grad():
            model[3].log_sigma2.add_(shift)
        return model

    _check_mc(make(0.0), _x(2, 2, 4, 4), wrong=make(0.5), expect_shape=(S_MC * 2, 3), folded=True)
