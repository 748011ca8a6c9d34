"""Branches, skip connections and multiple heads inside ``bdlkern.sampling`` (issue 17, item 4).

The sample rule follows tensors (``bdlkern/_sampling.py``): an MC layer's input carries the samples
iff it was computed from the output of an MC layer of the same block; otherwise the layer starts a
sampling. Each test compares a model against a plain reference rebuilt from the seeded masks: the
k-th MC layer call of ``sampling(S, seed=s)`` uses ``rng_state = [s, k << 40]``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.nn import MCDropout, MCDropoutConv2d, MCDropoutLinear

MC_STREAM = "mc_dropout"


def seeded_state(seed: int, k: int) -> torch.Tensor:
    """rng_state of the k-th MC layer call of ``sampling(S, seed=seed)``."""
    return torch.tensor([seed, k << 40], dtype=torch.int64)


def mc_linear(layer: MCDropoutLinear, x: torch.Tensor, num_samples: int | None, seed: int, k: int) -> torch.Tensor:
    """The fused op with ``layer``'s parameters and the k-th call's masks."""
    return bdlkern.ops.mc_dropout_linear(
        x, layer.weight, layer.bias, layer.p, num_samples, rng_state=seeded_state(seed, k)
    )


# ---- two heads on one trunk (Kendall & Gal heteroscedastic regression) ------------------------------
class TwoHeads(nn.Module):
    """Trunk ``Linear -> ReLU`` (or ``MCDropoutLinear -> ReLU``), then a mean head and a log-variance
    head on the same trunk output."""

    def __init__(self, mc_trunk: bool = False, d_in: int = 5, hidden: int = 16):
        super().__init__()
        self.trunk = MCDropoutLinear(d_in, hidden, p=0.2) if mc_trunk else nn.Linear(d_in, hidden)
        self.mean = MCDropoutLinear(hidden, 1, p=0.3)
        self.logvar = MCDropoutLinear(hidden, 1, p=0.4)

    def forward(self, x):
        h = F.relu(self.trunk(x))
        return self.mean(h), self.logvar(h)


def two_heads_reference(model: TwoHeads, x: torch.Tensor, S: int, seed: int):
    if isinstance(model.trunk, MCDropoutLinear):
        h = F.relu(mc_linear(model.trunk, x, S, seed, 0))
        return mc_linear(model.mean, h, None, seed, 1), mc_linear(model.logvar, h, None, seed, 2)
    h = F.relu(F.linear(x, model.trunk.weight, model.trunk.bias))
    return mc_linear(model.mean, h, S, seed, 0), mc_linear(model.logvar, h, S, seed, 1)


@pytest.mark.parametrize("mc_trunk", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_two_heads_on_one_trunk(mc_trunk, train):
    torch.manual_seed(0)
    model = TwoHeads(mc_trunk).double().train(train)
    S, N, seed = 6, 4, 31
    x = torch.randn(N, 5, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        mean, logvar = model(x)
        assert state.carries(mean) == state.carries(logvar) == "stacked"
    assert mean.shape == logvar.shape == (S, N, 1)
    with torch.no_grad():
        ref_mean, ref_logvar = two_heads_reference(model, x, S, seed)
    torch.testing.assert_close(mean.detach(), ref_mean)
    torch.testing.assert_close(logvar.detach(), ref_logvar)
    assert not torch.allclose(mean[0], mean[1])


# ---- residual blocks -------------------------------------------------------------------------------
class ResidualMLP(nn.Module):
    def __init__(self, d: int = 8, p: float = 0.3):
        super().__init__()
        self.fc1 = MCDropoutLinear(d, d, p=p)
        self.fc2 = nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


def test_residual_mlp_block_broadcasts_the_skip():
    torch.manual_seed(1)
    model = ResidualMLP().double()
    S, N, seed, p = 5, 3, 4, 0.3
    x = torch.randn(N, 8, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = model(x)
        assert state.carries(y) == "stacked"
    assert y.shape == (S, N, 8)
    with torch.no_grad():  # by hand: the flags of (s, n, feature), row-major
        keep = bdlkern.ops.dropout_mask((S, N, 8), p, rng_state=seeded_state(seed, 0), stream=MC_STREAM)
        h = F.linear(x.expand(S, N, 8) * keep.double() / (1 - p), model.fc1.weight, model.fc1.bias)
        expected = x + F.linear(F.relu(h), model.fc2.weight, model.fc2.bias)
    torch.testing.assert_close(y.detach(), expected)


def test_residual_mlp_with_mcdropout_lifts_the_skip():
    """``MCDropout`` on a 2-d input folds ``[S * N, d]``: the skip ``x`` ``[N, d]`` is repeated to it."""
    torch.manual_seed(11)
    fc = nn.Linear(8, 8).double()
    S, N, seed, p = 4, 3, 10, 0.5
    x = torch.randn(N, 8, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = x + fc(MCDropout(p)(x))
        assert state.carries(y) == "folded"
        samples = state.unfold(y)
    assert y.shape == (S * N, 8) and samples.shape == (S, N, 8)
    with torch.no_grad():
        keep = bdlkern.ops.dropout_mask((S, N, 8), p, rng_state=seeded_state(seed, 0), stream=MC_STREAM)
        expected = x + fc(x * keep.double() / (1 - p))
    torch.testing.assert_close(samples.detach(), expected)


def test_a_stacked_join_expands_the_per_input_tensor():
    """Stacked ``[S, N, d]`` joined with ``[N, d]``: the latter is shared by the samples."""
    torch.manual_seed(12)
    layer = MCDropoutLinear(4, 4, p=0.5).double()
    S, N, seed = 3, 2, 8
    x = torch.randn(N, 4, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = layer(x)
        joined = torch.cat([y, x], -1)
        stacked = torch.stack([x, y], 1)
        assert state.carries(joined) == state.carries(stacked) == "stacked"
    with torch.no_grad():
        h = mc_linear(layer, x, S, seed, 0)
        xs = x.expand(S, N, 4)
    torch.testing.assert_close(joined.detach(), torch.cat([h, xs], -1))
    torch.testing.assert_close(stacked.detach(), torch.stack([xs, h], 1))


SKIPS = {
    "add": lambda out, x: out + x,
    "radd": lambda out, x: x + out,
    "sub": lambda out, x: out - x,
    "rsub": lambda out, x: x - out,
    "mul": lambda out, x: out * x,
    "torch.add": lambda out, x: torch.add(x, out, alpha=0.5),
    "maximum": lambda out, x: torch.maximum(x, out),
    "where": lambda out, x: torch.where(out > 0, out, x),
    "cat": lambda out, x: torch.cat([out, x], 1),
    "cat_first": lambda out, x: torch.cat([x, out], 1),
    "stack": lambda out, x: torch.stack([out, x], 1),
}


class WideBlock(nn.Module):
    """A WideResNet-style block with dropout inside: ``conv2(relu(dropout-conv1(relu(x))))`` joined
    with its input by ``skip``."""

    def __init__(self, skip: str = "add", channels: int = 4, p: float = 0.3, mask: str = "element"):
        super().__init__()
        self.conv1 = MCDropoutConv2d(channels, channels, 3, padding=1, p=p, mask=mask)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.skip = SKIPS[skip]

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(F.relu(x))))
        return self.skip(out, x)


def wide_block_branch_reference(block: WideBlock, x: torch.Tensor, S: int, seed: int) -> torch.Tensor:
    """``conv2(relu(conv1(relu(x) * M / (1 - p))))`` on ``[S * N, ...]``, M the flags of the first
    call: one per element ``[S * N, C, H, W]`` or per plane ``[S * N, C]``, row-major."""
    xs = F.relu(x).repeat(S, 1, 1, 1)
    shape = xs.shape if block.conv1.mask == "element" else xs.shape[:2]
    keep = bdlkern.ops.dropout_mask(tuple(shape), block.conv1.p, rng_state=seeded_state(seed, 0), stream=MC_STREAM)
    keep = keep.reshape(*shape, *([1] * (4 - len(shape)))).to(x.dtype)
    h = F.conv2d(xs * keep / (1 - block.conv1.p), block.conv1.weight, block.conv1.bias, padding=1)
    return F.conv2d(F.relu(h), block.conv2.weight, block.conv2.bias, padding=1)


@pytest.mark.parametrize("skip", list(SKIPS))
def test_residual_conv_block_lifts_the_skip(skip):
    torch.manual_seed(2)
    block = WideBlock(skip).double()
    S, N, seed = 3, 2, 9
    x = torch.randn(N, 4, 6, 6, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = block(x)
        assert state.carries(y) == "folded"
    with torch.no_grad():
        expected = SKIPS[skip](wide_block_branch_reference(block, x, S, seed), x.repeat(S, 1, 1, 1))
    assert y.shape == expected.shape and y.shape[0] == S * N
    torch.testing.assert_close(y.detach(), expected)


def test_residual_conv_block_channel_masks_and_a_second_block():
    """Two blocks in a row: the second block's skip already carries the samples (nothing to lift)."""
    torch.manual_seed(3)
    first, second = WideBlock(mask="channel").double(), WideBlock(p=0.2).double()
    S, N, seed = 4, 3, 5
    x = torch.randn(N, 4, 5, 5, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed):
        y = second(first(x))
    assert y.shape == (S * N, 4, 5, 5)
    with torch.no_grad():
        h = wide_block_branch_reference(first, x, S, seed) + x.repeat(S, 1, 1, 1)
        keep = bdlkern.ops.dropout_mask(tuple(h.shape), 0.2, rng_state=seeded_state(seed, 1), stream=MC_STREAM)
        g = F.conv2d(F.relu(h) * keep.double() / 0.8, second.conv1.weight, second.conv1.bias, padding=1)
        expected = F.conv2d(F.relu(g), second.conv2.weight, second.conv2.bias, padding=1) + h
    torch.testing.assert_close(y.detach(), expected)


# ---- a first MC layer that runs twice (siamese) ----------------------------------------------------
class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(MCDropoutLinear(6, 10, p=0.3), nn.ReLU(), MCDropoutLinear(10, 3, p=0.2))

    def forward(self, x1, x2):
        return self.f(x1) - self.f(x2)


def test_siamese_mlp_starts_two_samplings():
    torch.manual_seed(4)
    model = Siamese().double()
    S, N, seed = 4, 5, 13
    x1, x2 = torch.randn(N, 6, dtype=torch.float64), torch.randn(N, 6, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = model(x1, x2)
        assert state.mc_layer_calls == 4
    assert y.shape == (S, N, 3)
    first, last = model.f[0], model.f[2]
    with torch.no_grad():
        a = mc_linear(last, F.relu(mc_linear(first, x1, S, seed, 0)), None, seed, 1)
        b = mc_linear(last, F.relu(mc_linear(first, x2, S, seed, 2)), None, seed, 3)
    torch.testing.assert_close(y.detach(), a - b)


class ConvTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = MCDropoutConv2d(2, 4, 3, padding=1, p=0.3)
        self.head = MCDropoutLinear(4, 3, p=0.25)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def test_conv_first_layer_on_two_batch_sizes():
    torch.manual_seed(5)
    tower = ConvTower().double()
    S, N1, N2, seed = 3, 2, 5, 17
    x1 = torch.randn(N1, 2, 4, 4, dtype=torch.float64)
    x2 = torch.randn(N2, 2, 4, 4, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        a, b = tower(x1), tower(x2)
        assert a.shape == (S * N1, 3) and b.shape == (S * N2, 3)
        a, b = state.unfold(a), state.unfold(b)
    assert a.shape == (S, N1, 3) and b.shape == (S, N2, 3)

    def reference(x, k):
        N = x.shape[0]
        h = bdlkern.ops.mc_dropout_conv(x, tower.conv.weight, tower.conv.bias, 0.3, S, padding=1,
                                        rng_state=seeded_state(seed, k))
        h = F.adaptive_avg_pool2d(F.relu(h), 1).flatten(1).unflatten(0, (S, N))
        return mc_linear(tower.head, h, None, seed, k + 1)

    with torch.no_grad():
        torch.testing.assert_close(a.detach(), reference(x1, 0))
        torch.testing.assert_close(b.detach(), reference(x2, 2))


# ---- the mark follows the tensor -------------------------------------------------------------------
def test_the_samples_survive_views_indexing_activations_and_joins():
    torch.manual_seed(6)
    S, N, seed = 3, 4, 2
    first, later = MCDropoutLinear(5, 6, p=0.3).double(), MCDropoutLinear(12, 2, p=0.3).double()
    x = torch.randn(N, 5, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = first(x)
        z = y.reshape(S, N * 6).view(S, N, 6)[:, 1:].tanh()
        z = F.gelu(torch.cat([z, z.flip(-1)], -1))
        assert z.shape == (S, N - 1, 12) and state.carries(z) == "stacked"
        out = later(z)
        assert out.shape == (S, N - 1, 2)  # not [S, S, N - 1, 2]: the layer saw the samples
    with torch.no_grad():
        h = mc_linear(first, x, S, seed, 0)[:, 1:].tanh()
        expected = mc_linear(later, F.gelu(torch.cat([h, h.flip(-1)], -1)), None, seed, 1)
    torch.testing.assert_close(out.detach(), expected)


def test_a_dropped_sample_dimension_is_an_error():
    S = 3
    first, later = MCDropoutLinear(4, 4), MCDropoutLinear(4, 4)
    with bdlkern.sampling(S) as state:
        y = first(torch.randn(2, 4))
        assert state.carries(y[0]) == "stacked"
        with pytest.raises(ValueError, match=r"carries the samples.*\[S=3, \.\.\., 4\].*\(2, 4\)"):
            later(y[0])
    conv, later_conv = MCDropoutConv2d(2, 2, 1), MCDropoutConv2d(2, 2, 1)
    with bdlkern.sampling(S) as state:
        y = conv(torch.randn(2, 2, 3, 3))
        assert y.shape == (6, 2, 3, 3)
        with pytest.raises(ValueError, match=r"folded into the batch.*S \* N = 3 \* 2.*\(2, 2, 3, 3\)"):
            later_conv(y[:2])
        with pytest.raises(ValueError, match=r"S \* N = 3 \* 2"):
            MCDropoutLinear(2, 2)(y[:3].flatten(2).mean(-1))


def test_tensors_of_an_earlier_block_carry_no_samples():
    torch.manual_seed(7)
    S, N, seed = 3, 2, 3
    first, second = MCDropoutLinear(4, 4, p=0.4).double(), MCDropoutLinear(4, 2, p=0.4).double()
    x = torch.randn(N, 4, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = first(x)
        assert state.carries(y) == "stacked"
    with bdlkern.sampling(S, seed=seed) as state:
        assert state.carries(y) is None and state.carries(y * 2) is None
        z = second(y)  # a new input: the layer starts a sampling of its own
    assert z.shape == (S, S, N, 2)
    with torch.no_grad():
        torch.testing.assert_close(z.detach(), mc_linear(second, y.detach(), S, seed, 0))


# ---- mc_predict --------------------------------------------------------------------------------------
class MeanHead(nn.Module):
    def __init__(self, model: TwoHeads):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)[0]


@pytest.mark.parametrize("mc_trunk", [False, True])
def test_mc_predict_on_the_mean_head(mc_trunk):
    torch.manual_seed(8)
    model = TwoHeads(mc_trunk).double().eval()
    S, N, seed = 7, 5, 40
    x = torch.randn(N, 5, dtype=torch.float64)
    prediction = bdlkern.uncertainty.mc_predict(MeanHead(model), x, S, seed=seed, task="regression")
    with torch.no_grad():
        expected, _ = two_heads_reference(model, x, S, seed)
    assert prediction.samples.shape == (S, N, 1)
    torch.testing.assert_close(prediction.samples, expected)
    torch.testing.assert_close(prediction.mean, expected.mean(0))
    assert bool((prediction.variance > 0).all())


@pytest.mark.parametrize("skip", ["add", "cat"])
def test_mc_predict_on_the_residual_conv_block(skip):
    torch.manual_seed(9)
    block = WideBlock(skip).double().eval()
    S, N, seed = 5, 3, 6
    x = torch.randn(N, 4, 5, 5, dtype=torch.float64)

    def classifier(inputs):
        return block(inputs).mean((2, 3))

    prediction = bdlkern.uncertainty.mc_predict(classifier, x, S, seed=seed)
    with torch.no_grad():
        out = SKIPS[skip](wide_block_branch_reference(block, x, S, seed), x.repeat(S, 1, 1, 1))
        expected = bdlkern.unfold_samples(out.mean((2, 3)), S)
    assert prediction.samples.shape == expected.shape == (S, N, out.shape[1])
    torch.testing.assert_close(prediction.samples, expected)


# ---- torch.compile -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mc_trunk", [False, True])
def test_compiled_two_heads_equal_eager(mc_trunk):
    torch.manual_seed(10)
    torch._dynamo.reset()
    model = TwoHeads(mc_trunk).eval()
    S, N, seed = 4, 6, 21
    x = torch.randn(N, 5)
    with torch.no_grad():
        with bdlkern.sampling(S, seed=seed):
            eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        with bdlkern.sampling(S, seed=seed):
            got = compiled(x)
        with bdlkern.sampling(S, seed=seed + 1):
            other = compiled(x)
    assert [t.shape for t in got] == [(S, N, 1), (S, N, 1)]
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e)
    assert not torch.allclose(other[0], eager[0])


def test_in_place_residual_sum_lifts_the_skip_not_the_target():
    """torchvision's BasicBlock writes ``out += identity``: the sampled ``out`` is written, the
    per-input ``identity`` is lifted to the folded layout; ``x.add_(sampled)`` on a tensor without
    samples stays a shape error (it cannot grow in place)."""
    torch.manual_seed(0)
    drop_conv = bdlkern.nn.MCDropoutConv2d(3, 3, 3, padding=1, p=0.3)
    x = torch.randn(2, 3, 5, 5)
    S = 4
    with bdlkern.sampling(S, seed=1):
        out = drop_conv(x)
        expected = out + x.repeat(S, 1, 1, 1)
        out += x
        assert bdlkern.current_sampling().carries(out) == "folded"
    torch.testing.assert_close(out, expected)
    with bdlkern.sampling(S, seed=1):
        sampled = drop_conv(x)
        target = x.clone()
        with pytest.raises(RuntimeError):
            target.add_(sampled)
