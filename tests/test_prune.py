"""``bdlkern.nn.prune`` (issue 17, item 3): the conversion of sparse-VD layers to their CSR layers and
the structural compaction of ``nn.Sequential`` chains.

References, independent of the compaction code:

* deterministic: the sparse-VD model itself in eval mode and the uncompacted pruned model
  (``prune(compact=False)`` of a deep copy); the compacted model must agree with both to rounding;
* sampling: a pure-PyTorch LRT sampler written from the spec (``mean = x W^T + b``, ``var = x^2 V^T``
  with ``W = theta * mask``, ``V = alpha theta^2 * mask``, noise ``bdlkern.ops.normal(..., stream=
  "sparse_lrt")`` at the row-major index of each layer's full output, the rng_state of MC layer call
  ``k`` of a seeded block being ``[seed, k << 40]``, see :mod:`bdlkern._sampling`). Run as is it must
  give the uncompacted model's samples; with the noise of the *dead* units (rows without a kept
  weight, whose LRT output is ``b_j + sqrt(1e-8) * eps``) switched off it must give the compacted
  model's samples, to rounding. So the compacted and uncompacted samples differ by exactly the
  documented term (the dead units' ``1e-4`` noise), which bounds their difference elementwise.
"""

from __future__ import annotations

import copy
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern import ops
from bdlkern.nn.prune import (
    CompactSparseConv2d,
    CompactSparseLinear,
    FeatureGather,
    PruneReport,
    prune,
)
from bdlkern.nn.sparse_vd import _SparseVDConvNd

VD = (bdlkern.nn.SparseVDLinear, _SparseVDConvNd)


# ---- helpers -----------------------------------------------------------------------------------------
def set_mask(layer: nn.Module, keep: torch.Tensor) -> None:
    """Sets ``log_sigma2`` so that ``layer.mask() == keep`` at the default threshold 3: log_alpha is -2
    on the kept weights (alpha ~ 0.14, visible LRT noise) and 5 on the pruned ones."""
    with torch.no_grad():
        base = torch.log(layer.theta**2 + 1e-8)
        layer.log_sigma2.copy_(base + torch.where(keep, torch.tensor(-2.0), torch.tensor(5.0)))
    assert torch.equal(layer.mask(), keep)


def covered_mask(shape, density: float, gen: torch.Generator) -> torch.Tensor:
    """A random mask over ``[out, in, *kernel]`` in which every output and every input has at least
    one kept weight (so that only what a test constructs is dead or unused)."""
    keep = torch.rand(shape, generator=gen) < density
    out, inp = shape[0], shape[1]
    for j in range(max(out, inp)):
        keep[(j % out, j % inp) + (0,) * (len(shape) - 2)] = True
    return keep


def mlp(sizes, act=nn.ReLU) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(bdlkern.nn.SparseVDLinear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def vd_layers(model):
    return [m for m in model.modules() if isinstance(m, VD)]


def pruned_pair(model):
    """(the compacted report, the uncompacted pruned model) of ``model``, which is left as it is."""
    plain = prune(copy.deepcopy(model), compact=False).model
    return prune(copy.deepcopy(model)), plain


def weights_of(layer):
    """(W, V, bias) of a sparse-VD layer from its parameters, as the spec defines them."""
    keep = layer.mask()
    theta = layer.theta.detach()
    W = theta * keep
    V = torch.exp(layer.log_alpha.detach()) * theta**2 * keep
    return W, V, None if layer.bias is None else layer.bias.detach()


def reference_samples(vd_model: nn.Sequential, x, S: int, seed: int, quiet: dict | None = None):
    """Pure-PyTorch LRT samples of the pruned ``vd_model`` (a flat Sequential) inside
    ``sampling(S, seed=seed)``: stacked ``[S, N, ...]`` when the first layer is linear, folded
    ``[S * N, ...]`` when it is a convolution. ``quiet``: {index of the layer in the Sequential: bool
    [out]} units whose noise is switched off."""
    quiet = quiet or {}
    first = next(m for m in vd_model if isinstance(m, VD))
    h = x.repeat(S, *([1] * (x.dim() - 1))) if isinstance(first, _SparseVDConvNd) else x.expand(S, *x.shape)
    k = 0
    for i, m in enumerate(vd_model):
        if not isinstance(m, VD):
            h = m(h)
            continue
        W, V, b = weights_of(m)
        if isinstance(m, _SparseVDConvNd):
            conv = (F.conv1d, F.conv2d, F.conv3d)[m._dims - 1]
            geo = (m.stride, m.padding, m.dilation, m.groups)
            mean, var = conv(h, W, b, *geo), conv(h * h, V, None, *geo)
        else:
            mean, var = h @ W.T, (h * h) @ V.T
            if b is not None:
                mean = mean + b
        state = torch.tensor([seed, k << 40], dtype=torch.int64)
        # the noise at the row-major index of the layer's output ([rows, out] linear, [S * N, C, ...] conv)
        eps = ops.normal(tuple(mean.shape), rng_state=state, stream="sparse_lrt", dtype=h.dtype)
        std = torch.sqrt(var + 1e-8)
        if i in quiet:
            index = (slice(None), quiet[i]) if isinstance(m, _SparseVDConvNd) else (..., quiet[i])
            std[index] = 0.0
        h = mean + std * eps
        k += 1
    return h


def sample(model, x, S=8, seed=3):
    with torch.no_grad(), bdlkern.sampling(S, seed=seed):
        return model(x)


def assert_close_rel(a, b, rel=1e-5):
    scale = max(b.abs().max().item(), 1e-30)
    err = (a - b).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3e} > {rel} * {scale:.3e}"


# ---- the MLP 64-300-100-10 -------------------------------------------------------------------------------
DEAD0 = list(range(0, 20))  # hidden units of layer 0 without a kept weight (non-zero bias)
UNUSED0 = list(range(20, 40))  # hidden units of layer 0 that layer 2 does not read
UNREAD_IN = list(range(0, 8))  # inputs of layer 0 that no kept weight reads
DEAD2 = list(range(0, 10))  # units of layer 2 without a kept weight
UNUSED2 = list(range(10, 15))  # units of layer 2 that layer 4 does not read


def build_mlp(act=nn.ReLU, dead=True, seed=0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = mlp([64, 300, 100, 10], act)
    gen = torch.Generator().manual_seed(seed + 1)
    k0, k2, k4 = (covered_mask(m.theta.shape, 0.3, gen) for m in (model[0], model[2], model[4]))
    k0[:, UNREAD_IN] = False
    k2[:, UNUSED0] = False
    k4[:, UNUSED2] = False
    if dead:
        k0[DEAD0] = False
        k2[DEAD2] = False
        with torch.no_grad():  # non-zero biases, both signs (c_j = 0 after a ReLU for the negative ones)
            model[0].bias[DEAD0] = torch.linspace(-0.5, 1.5, len(DEAD0))
            model[2].bias[DEAD2] = torch.linspace(-0.3, 0.9, len(DEAD2))
    for m, k in zip((model[0], model[2], model[4]), (k0, k2, k4)):
        set_mask(m, k)
    return model.eval()


def mlp_quiet():
    q0, q2 = torch.zeros(300, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)
    q0[DEAD0], q2[DEAD2] = True, True
    return {0: q0, 2: q2}


def test_mlp_compaction_eval_and_shapes():
    model = build_mlp()
    report, plain = pruned_pair(model)
    compacted = report.model
    x = torch.randn(32, 64)
    with torch.no_grad():
        y_vd, y_plain, y = model(x), plain(x), compacted(x)
    assert_close_rel(y_plain, y_vd)
    assert_close_rel(y, y_plain)
    # the exact shapes constructed: 300 - 20 dead - 20 unused, 64 - 8 unread, 100 - 10 dead - 5 unused
    gather, first = compacted[0]
    assert isinstance(gather, FeatureGather) and gather.index.tolist() == list(range(8, 64))
    assert isinstance(first, CompactSparseLinear) and (first.out_features, first.in_features) == (260, 56)
    assert first.full_out == 300 and first.out_index.tolist() == list(range(40, 300))
    assert isinstance(compacted[2], CompactSparseLinear)
    assert (compacted[2].out_features, compacted[2].in_features) == (85, 260)
    kept2 = [j for j in range(100) if j not in DEAD2 + UNUSED2]
    assert compacted[2].out_index.tolist() == kept2
    # layer 4 keeps its width but holds the LRT variance of the folded constant inputs
    assert isinstance(compacted[4], CompactSparseLinear) and compacted[4].out_index.tolist() == list(range(10))
    assert compacted[4].var_bias is not None and bool((compacted[4].var_bias > 0).all())
    assert (compacted[4].out_features, compacted[4].in_features) == (10, 85)
    assert [r.shape_after for r in report.layers] == [(260, 56), (85, 260), (10, 85)]
    assert [r.shape_before for r in report.layers] == [(300, 64), (100, 300), (10, 100)]
    # layer 2 stores the kept weights of its kept rows and of the inputs that stayed (the columns of
    # the folded dead units went into its bias)
    mask2 = model[2].mask()
    kept_in0 = [j for j in range(300) if j not in DEAD0 + UNUSED0]
    assert report.layers[1].stored == int(mask2[kept2][:, kept_in0].sum()) == compacted[2].nnz
    assert report.layers[1].kept == int(mask2.sum())
    assert any("folded 20 dead unit(s)" in n for n in report.notes)
    assert any("FeatureGather" in n and "8 of 64 inputs" in n for n in report.notes)


def test_mlp_compaction_sampling():
    """Inside sampling(8, seed=3): the uncompacted model is the reference sampler, the compacted one
    is the reference with the dead units' noise switched off, and the two differ by no more than
    that noise's effect (elementwise)."""
    model = build_mlp()
    report, plain = pruned_pair(model)
    x = torch.randn(16, 64)
    s_plain, s = sample(plain, x), sample(report.model, x)
    assert s.shape == s_plain.shape == (8, 16, 10)
    with torch.no_grad():
        ref = reference_samples(model, x, 8, 3)
        ref_quiet = reference_samples(model, x, 8, 3, mlp_quiet())
    assert_close_rel(s_plain, ref)
    assert_close_rel(s, ref_quiet)
    effect = (ref - ref_quiet).abs()
    assert 0 < effect.max() < 1e-2  # the dead units' 1e-4 noise, through the weights
    assert ((s - s_plain).abs() <= effect + 1e-5 * s_plain.abs().max()).all()
    # the samples really vary (the LRT noise is there) and the compacted layers drew their own rows
    assert s.std(0).mean() > 1e-2


def test_mlp_without_dead_units_samples_equal():
    """Only unused units and unread inputs removed: the compacted samples equal the uncompacted."""
    model = build_mlp(dead=False)
    report, plain = pruned_pair(model)
    assert [r.shape_after for r in report.layers] == [(280, 56), (95, 280), (10, 95)]
    assert not any("folded" in n for n in report.notes)
    x = torch.randn(16, 64)
    s_plain, s = sample(plain, x), sample(report.model, x)
    assert_close_rel(s, s_plain)
    with torch.no_grad():
        assert_close_rel(report.model(x), plain(x))
    # a second seeded pass and a stacked input [S, N, 64] from the caller's side behave the same
    assert_close_rel(sample(report.model, x, S=3, seed=11), sample(plain, x, S=3, seed=11))


@pytest.mark.parametrize("act", [nn.Tanh, nn.Sigmoid])
def test_tanh_sigmoid_fold(act):
    """c_j = act(b_j) != b_j (and act(0) = 0.5 for a sigmoid): the fold uses the activation's value."""
    model = build_mlp(act)
    model[2].bias = None  # a layer without bias gets one from the fold (c_j = act(0) for its dead units)
    report, plain = pruned_pair(model)
    x = torch.randn(32, 64)
    with torch.no_grad():
        assert_close_rel(report.model(x), plain(x))
        assert_close_rel(report.model(x), model(x))
        assert_close_rel(sample(report.model, x), reference_samples(model, x, 8, 3, mlp_quiet()))
    assert report.model[2].bias is not None
    assert report.layers[0].shape_after == (260, 56)


# ---- the conv net ----------------------------------------------------------------------------------------
CONV1_DEAD, CONV2_DEAD, LIN1_DEAD = [1, 4], [2, 7], [0, 1, 2, 3, 4]


def build_convnet(padding2: int = 0, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    spatial = 3 if padding2 == 0 else 5  # 10x10 -> pool 5x5 -> conv 3x3 (padding 0) or 5x5 (padding 1)
    model = nn.Sequential(
        bdlkern.nn.SparseVDConv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        bdlkern.nn.SparseVDConv2d(8, 12, 3, padding=padding2), nn.ReLU(), nn.Flatten(),
        bdlkern.nn.SparseVDLinear(12 * spatial * spatial, 40), nn.ReLU(), bdlkern.nn.SparseVDLinear(40, 6),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    layers = [model[0], model[3], model[6], model[8]]
    keeps = [covered_mask(m.theta.shape, 0.4, gen) for m in layers]
    for keep, dead in zip(keeps, (CONV1_DEAD, CONV2_DEAD, LIN1_DEAD)):
        keep[dead] = False
    with torch.no_grad():
        model[0].bias[CONV1_DEAD] = torch.tensor([0.5, 0.3])
        model[3].bias[CONV2_DEAD] = torch.tensor([0.4, -0.2])
        model[6].bias[LIN1_DEAD] = torch.linspace(0.2, 0.6, len(LIN1_DEAD))
    for m, keep in zip(layers, keeps):
        set_mask(m, keep)
    return model.eval()


def conv_quiet(fold_conv1: bool = True):
    quiet = {}
    for index, size, dead in ((0, 8, CONV1_DEAD), (3, 12, CONV2_DEAD), (6, 40, LIN1_DEAD)):
        if index == 0 and not fold_conv1:
            continue
        q = torch.zeros(size, dtype=torch.bool)
        q[dead] = True
        quiet[index] = q
    return quiet


def test_convnet_compaction():
    model = build_convnet()
    report, plain = pruned_pair(model)
    net = report.model
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        assert_close_rel(plain(x), model(x))
        assert_close_rel(net(x), plain(x))
    assert [r.shape_after for r in report.layers] == [(6, 3), (10, 6), (35, 90), (6, 35)]
    assert isinstance(net[0], CompactSparseConv2d) and net[0].out_index.tolist() == [0, 2, 3, 5, 6, 7]
    assert isinstance(net[3], CompactSparseConv2d) and net[3].var_bias is not None
    assert isinstance(net[6], CompactSparseLinear) and net[6].var_bias is not None
    # sampling, folded [S * N, 6]
    s_plain, s = sample(plain, x), sample(net, x)
    assert s.shape == (8 * 4, 6)
    with torch.no_grad():
        ref = reference_samples(model, x, 8, 3)
        ref_quiet = reference_samples(model, x, 8, 3, conv_quiet())
    assert_close_rel(s_plain, ref)
    assert_close_rel(s, ref_quiet)
    assert ((s - s_plain).abs() <= (ref - ref_quiet).abs() + 1e-5 * s_plain.abs().max()).all()
    assert bdlkern.unfold_samples(s, 8).std(0).mean() > 1e-2


def test_convnet_padded_second_conv_keeps_dead_channels():
    """A conv L2 with padding 1: a constant plane is not constant at its borders, so the dead
    channels of conv 1 stay (reported); everything else still compacts."""
    model = build_convnet(padding2=1)
    report, plain = pruned_pair(model)
    x = torch.randn(4, 3, 10, 10)
    with torch.no_grad():
        assert_close_rel(report.model(x), plain(x))
    assert [r.shape_after for r in report.layers] == [(8, 3), (10, 8), (35, 250), (6, 35)]
    assert any("kept 2 dead unit(s) of 0" in n and "padding" in n for n in report.notes)
    with torch.no_grad():
        ref_quiet = reference_samples(model, x, 8, 3, conv_quiet(fold_conv1=False))
    assert_close_rel(sample(report.model, x), ref_quiet)


# ---- other models and the report ------------------------------------------------------------------------
class TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = bdlkern.nn.SparseVDLinear(8, 16)
        self.b = bdlkern.nn.SparseVDLinear(16, 4)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))) + x[..., :4]


def test_custom_forward_model_converted_not_compacted():
    torch.manual_seed(0)
    model = TwoBranch().eval()
    gen = torch.Generator().manual_seed(0)
    keep = covered_mask((16, 8), 0.5, gen)
    keep[3] = False  # a dead unit: in a Sequential it would be folded
    set_mask(model.a, keep)
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = model(x)
    report = prune(model)
    assert report.model is model
    assert type(model.a) is bdlkern.nn.SparseLinear and type(model.b) is bdlkern.nn.SparseLinear
    assert [r.shape_after for r in report.layers] == [(16, 8), (4, 16)]
    assert "a: not compacted: not in an nn.Sequential chain" in report.notes
    assert "b: not compacted: not in an nn.Sequential chain" in report.notes
    with torch.no_grad():
        assert_close_rel(model(x), expected)


def test_report_totals_and_text():
    model = build_mlp()
    masks = [int(m.mask().sum()) for m in vd_layers(model)]
    totals = [m.theta.numel() for m in vd_layers(model)]
    report = prune(model)
    assert isinstance(report, PruneReport)
    assert report.kept_weights == sum(masks)
    assert [r.kept for r in report.layers] == masks
    assert report.total_weights == sum(totals) == 64 * 300 + 300 * 100 + 100 * 10
    assert report.stored_weights == sum(m.nnz for m in report.model.modules() if isinstance(m, bdlkern.nn.SparseLinear))
    assert report.stored_weights < report.kept_weights
    assert report.compression_ratio == pytest.approx(report.total_weights / report.stored_weights)
    assert [r.density for r in report.layers] == pytest.approx([k / t for k, t in zip(masks, totals)])
    text = str(report)
    assert f"{report.kept_weights} / {report.total_weights} weights kept" in text
    assert "SparseVDLinear -> CompactSparseLinear" in text and "(300, 64) -> (260, 56)" in text
    assert "compression" in text and "notes:" in text


def test_threshold_override():
    torch.manual_seed(0)
    model = mlp([12, 10, 4])
    with torch.no_grad():
        for m in vd_layers(model):
            m.log_sigma2.uniform_(-6.0, 4.0)
    la = [m.log_alpha.detach() for m in vd_layers(model)]
    default = prune(copy.deepcopy(model), compact=False)
    assert default.kept_weights == sum(int((a < 3.0).sum()) for a in la)
    report = prune(copy.deepcopy(model), threshold=0.5, compact=False)
    assert report.kept_weights == sum(int((a < 0.5).sum()) for a in la) < default.kept_weights
    assert all(m.threshold == 3.0 for m in vd_layers(model))  # the layers' own thresholds are untouched
    report = prune(copy.deepcopy(model), threshold=0.5)
    assert report.kept_weights == sum(int((a < 0.5).sum()) for a in la)


def test_compact_false_and_single_layer():
    model = build_mlp()
    report = prune(model, compact=False)
    assert [type(m).__name__ for m in report.model] == ["SparseLinear", "ReLU", "SparseLinear", "ReLU", "SparseLinear"]
    assert [r.shape_after for r in report.layers] == [r.shape_before for r in report.layers]
    layer = bdlkern.nn.SparseVDLinear(4, 3)
    report = prune(layer)
    assert type(report.model) is bdlkern.nn.SparseLinear and report.layers[0].path == ""


def test_training_dropout_stops_chain_eval_dropout_does_not():
    model = build_mlp()
    model.insert(2, nn.Dropout(0.2))
    model.train()  # the sparse layers do not care; the dropout does
    report = prune(copy.deepcopy(model))
    # no compaction across the dropout: layer 0 keeps its rows, layer 2 starts a chain of its own
    assert [r.shape_after for r in report.layers] == [(300, 56), (85, 280), (10, 85)]
    assert any("Dropout is in training mode" in n for n in report.notes)
    model.eval()
    report, plain = pruned_pair(model)
    assert report.layers[0].shape_after == (260, 56)
    assert any("dropout in eval mode" in n for n in report.notes)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert_close_rel(report.model(x), plain(x))


def test_state_dict_round_trip():
    report = prune(build_mlp())
    again = prune(build_mlp()).model
    again.load_state_dict(report.model.state_dict())
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(again(x), report.model(x))
    assert_close_rel(sample(again, x), sample(report.model, x))


def test_bad_input():
    with pytest.raises(ValueError, match="no sparse variational dropout layer"):
        prune(nn.Sequential(nn.Linear(3, 3), nn.ReLU()))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        prune(lambda x: x)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold must be finite"):
            prune(build_mlp(), threshold=bad)
    with pytest.raises(TypeError, match="threshold must be a float"):
        prune(build_mlp(), threshold="3")
    gather = FeatureGather(torch.tensor([0, 2]), -1, 4)
    with pytest.raises(ValueError, match="FeatureGather: expected an input with 4 entries"):
        gather(torch.randn(2, 5))


# ---- a trained network --------------------------------------------------------------------------------------
def test_trained_digits_mlp(threads):
    """MLP 64-300-100-10 of SparseVDLinear trained on sklearn's digits (standardised, KL annealed):
    after prune the compacted model is much smaller and predicts exactly as the uncompacted one
    (about 4 s of training at one thread)."""
    torch.set_num_threads(1)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-3)  # a few pixels are constant
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    torch.manual_seed(0)
    model = mlp([64, 300, 100, 10])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    n, epochs = len(x_tr), 60
    start = time.perf_counter()
    for epoch in range(epochs):
        kl_weight = min(1.0, epoch / 15)
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx]) + kl_weight * bdlkern.nn.kl_divergence(model) / n
            loss.backward()
            opt.step()
    model.eval()
    report, plain = pruned_pair(model)
    with torch.no_grad():
        logits_plain, logits = plain(x_te), report.model(x_te)
    acc_plain = (logits_plain.argmax(-1) == y_te).double().mean().item()
    acc = (logits.argmax(-1) == y_te).double().mean().item()
    print(f"\n{report}\ntrained in {time.perf_counter() - start:.1f} s, accuracy {acc:.4f}")
    assert acc == acc_plain and acc >= 0.93
    assert torch.equal(logits.argmax(-1), logits_plain.argmax(-1))
    assert_close_rel(logits, logits_plain)
    before = [r.shape_before for r in report.layers]
    after = [r.shape_after for r in report.layers]
    assert before == [(300, 64), (100, 300), (10, 100)]
    assert after[0][0] <= 150 and after[1][0] <= 60 and after[2] == (10, after[1][0])
    assert report.kept_weights < 0.05 * report.total_weights


def test_unit_fed_only_by_a_folded_constant_keeps_its_noise():
    """Unit 1 of the middle layer reads only the dead unit 0 of the first layer. After the fold its
    row is empty, but its LRT variance c_0^2 V[1, 0] is not: it is not a constant, so it stays (in
    eval it would fold exactly; in sampling that would drop its noise)."""
    torch.manual_seed(0)
    model = mlp([6, 5, 4, 3]).eval()
    gen = torch.Generator().manual_seed(1)
    k0, k2, k4 = (covered_mask(m.theta.shape, 0.5, gen) for m in (model[0], model[2], model[4]))
    k0[0] = False
    k2[1] = False
    k2[1, 0] = True
    k2[0, 0] = k2[2, 0] = k2[3, 0] = False
    for m, k in zip((model[0], model[2], model[4]), (k0, k2, k4)):
        set_mask(m, k)
    with torch.no_grad():
        model[0].bias[0] = 1.0
    report, plain = pruned_pair(model)
    assert [r.shape_after for r in report.layers] == [(4, 6), (4, 4), (3, 4)]
    net = report.model
    assert net[2].var_bias is not None and net[2].var_bias[1] > 0 and net[2].var_bias[[0, 2, 3]].eq(0).all()
    x = torch.randn(16, 6)
    with torch.no_grad():
        assert_close_rel(net(x), plain(x))
        quiet = torch.zeros(5, dtype=torch.bool)
        quiet[0] = True
        assert_close_rel(sample(net, x), reference_samples(model, x, 8, 3, {0: quiet}))


def test_compact_conv_in_a_stacked_pass():
    """A convolution chain after a linear MC layer (samples stacked [S, N, C, H, W]): conv 0 loses
    the channels conv 1 does not read (a CompactSparseConv2d drawing the noise of their original
    positions) and, with no dead unit, the samples equal the uncompacted model's."""
    torch.manual_seed(0)
    model = nn.Sequential(
        bdlkern.nn.SparseVDLinear(5, 3 * 8 * 8), nn.Unflatten(-1, (3, 8, 8)),
        bdlkern.nn.SparseVDConv2d(3, 6, 3), nn.Tanh(), bdlkern.nn.SparseVDConv2d(6, 4, 3),
    ).eval()
    gen = torch.Generator().manual_seed(2)
    k1, k2 = covered_mask(model[2].theta.shape, 0.5, gen), covered_mask(model[4].theta.shape, 0.5, gen)
    k2[:, [1, 4]] = False
    set_mask(model[2], k1)
    set_mask(model[4], k2)
    set_mask(model[0], torch.ones(192, 5, dtype=torch.bool))
    report, plain = pruned_pair(model)
    conv = report.model[2]
    assert isinstance(conv, CompactSparseConv2d) and conv.out_index.tolist() == [0, 2, 3, 5] and conv.full_out == 6
    assert [r.shape_after for r in report.layers] == [(192, 5), (4, 3), (4, 4)]
    x = torch.randn(3, 5)
    s_plain, s = sample(plain, x, S=4), sample(report.model, x, S=4)
    assert s.shape == (4, 3, 4, 4, 4)
    assert_close_rel(s, s_plain)
    with torch.no_grad():
        assert_close_rel(report.model(x), plain(x))


def test_compacted_models_take_non_contiguous_inputs_and_compile():
    """A transposed (non-contiguous) input gives the contiguous input's outputs, in eval and in
    sampling; torch.compile of the compacted MLP gives eager's eval output."""
    for model, x in ((build_mlp(dead=False), torch.randn(64, 16).t()), (build_convnet(), torch.randn(4, 3, 10, 10).transpose(-1, -2))):
        report, _ = pruned_pair(model)
        net = report.model
        assert not x.is_contiguous()
        with torch.no_grad():
            assert_close_rel(net(x), net(x.contiguous()))
        assert_close_rel(sample(net, x), sample(net, x.contiguous()))
    net = pruned_pair(build_mlp(dead=False))[0].model
    x = torch.randn(16, 64)
    with torch.no_grad():
        assert_close_rel(torch.compile(net)(x), net(x))
