"""``bdlkern.nn.MCDropout`` and ``bdlkern.nn.convert`` on any model (issue 17, item 1).

* ``MCDropout`` outside sampling against plain-torch references built from the Philox masks of
  ``bdlkern.ops.dropout_mask`` (element, channel, alpha dropout), eval, the edge rates, errors;
* ``MCDropout`` inside ``sampling(S, seed)``: ``[N, ...] -> [S * N, ...]`` and, followed by a
  ``nn.Linear`` / ``nn.Conv1d/2d``, the same samples as the fused ``MCDropoutLinear`` /
  ``MCDropoutConv1d/2d``;
* ``convert`` on custom modules (dropout modules fused or swapped, functional dropout rewritten
  through ``torch.fx``), nested containers, a VGG-style classifier, a model that does not trace, and
  the report, warnings and errors.

Masks of a seeded pass: the k-th MC layer call of ``sampling(S, seed=s)`` uses ``rng_state = [s, k << 40]``
(``bdlkern/_sampling.py``, ``SamplingState.rng_state``).
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.nn import MCDropout, MCDropoutConv1d, MCDropoutConv2d, MCDropoutLinear

MC_STREAM = "mc_dropout"
# Klambauer et al. 2017: the value SELU saturates to, -scale * alpha.
ALPHA_PRIME = -1.7580993408473766


def seeded_state(seed: int, k: int) -> torch.Tensor:
    """rng_state of the k-th MC layer call of ``sampling(S, seed=seed)``."""
    return torch.tensor([seed, k << 40], dtype=torch.int64)


def keep_flags(shape, p: float, rng_state: torch.Tensor) -> torch.Tensor:
    return bdlkern.ops.dropout_mask(tuple(shape), p, rng_state=rng_state, stream=MC_STREAM)


def state_after_seed(k: int) -> torch.Tensor:
    """The rng_state a layer draws right after ``torch.manual_seed(k)``."""
    torch.manual_seed(k)
    return bdlkern.ops.new_rng_state()


def broadcast(keep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``keep`` (a prefix of ``x``'s shape) with ones appended, as ``x``'s dtype."""
    return keep.reshape(*keep.shape, *([1] * (x.dim() - keep.dim()))).to(x.dtype)


# ---- MCDropout outside sampling ---------------------------------------------------------------------
def test_mcdropout_draws_its_flags_from_the_torch_generator():
    """The layer draws one rng_state from torch's generator per training call (what the
    references below rebuild): the same seed, the same mask; the generator advances."""
    source = inspect.getsource(MCDropout.forward)
    assert "new_rng_state" in source
    x = torch.randn(64, 16)
    layer = MCDropout(0.5)
    torch.manual_seed(4)
    a, b = layer(x), layer(x)
    torch.manual_seed(4)
    assert torch.equal(layer(x), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_mcdropout_element_matches_reference(shape, p, dtype):
    x = torch.randn(shape, dtype=dtype)
    keep = keep_flags(x.shape, p, state_after_seed(11))
    torch.manual_seed(11)
    y = MCDropout(p)(x)
    assert y.shape == x.shape and y.dtype == dtype
    torch.testing.assert_close(y, x * keep.to(dtype) / (1 - p), rtol=1e-6, atol=0)
    assert ((y == 0) == ~keep).all()  # randn has no zeros


def test_mcdropout_element_gradient_is_the_mask():
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    p = 0.3
    keep = keep_flags(x.shape, p, state_after_seed(2))
    torch.manual_seed(2)
    MCDropout(p)(x).sum().backward()
    torch.testing.assert_close(x.grad, keep.double() / (1 - p))


@pytest.mark.parametrize(
    "shape, dims",
    [((4, 6, 9), 1), ((3, 5, 4, 6), 2), ((2, 4, 3, 4, 5), 3), ((3, 5, 4, 6), None), ((6, 9), 1), ((5, 4, 6), 2)],
)
def test_mcdropout_channel_matches_reference(shape, dims):
    """Channel masks: one flag per (n, c) of a batched input (per c of an unbatched one, as
    ``nn.Dropout1d/2d/3d``), broadcast over the spatial positions."""
    p = 0.4
    x = torch.randn(shape, dtype=torch.float64)
    batched = dims is None or x.dim() == dims + 2
    flags = x.shape[:2] if batched else x.shape[:1]
    keep = keep_flags(flags, p, state_after_seed(5))
    torch.manual_seed(5)
    y = MCDropout(p, mask="channel", dims=dims)(x)
    torch.testing.assert_close(y, x * broadcast(keep, x) / (1 - p))
    planes = y.reshape(*flags, -1)
    zero = (planes == 0).all(-1)
    assert torch.equal(zero, ~keep)  # whole planes dropped, the others all kept
    assert 0 < int(zero.sum()) < zero.numel()


def alpha_reference(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    a = ((1 - p) * (1 + p * ALPHA_PRIME**2)) ** -0.5
    b = -a * ALPHA_PRIME * p
    m = broadcast(keep, x)
    return a * (x * m + ALPHA_PRIME * (1 - m)) + b


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
def test_mcdropout_alpha_matches_the_formula(p):
    x = torch.randn(8, 12, dtype=torch.float64)
    keep = keep_flags(x.shape, p, state_after_seed(9))
    torch.manual_seed(9)
    y = MCDropout(p, alpha=True)(x)
    torch.testing.assert_close(y, alpha_reference(x, keep, p))
    # feature alpha dropout: per (n, c) flags
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    keep = keep_flags(x.shape[:2], p, state_after_seed(9))
    torch.manual_seed(9)
    y = MCDropout(p, mask="channel", alpha=True)(x)
    torch.testing.assert_close(y, alpha_reference(x, keep, p))


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_mcdropout_alpha_keeps_mean_and_variance(p):
    torch.manual_seed(0)
    x = torch.randn(400_000, dtype=torch.float64)
    y = MCDropout(p, alpha=True)(x)
    assert abs(float(y.mean())) < 0.01
    assert abs(float(y.std()) - 1.0) < 0.01
    # plain dropout does not keep the variance (a check that the test sees a difference)
    assert float(MCDropout(p)(x).std()) > 1.04


def test_mcdropout_eval_and_edge_rates():
    x = torch.randn(5, 7)
    layer = MCDropout(0.5).eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(MCDropout(0.0)(x), x)  # training, p = 0: the identity
    assert torch.equal(MCDropout(0.0, alpha=True).eval()(x), x)
    y = MCDropout(1.0)(x)
    assert torch.equal(y, torch.zeros_like(x))
    assert torch.equal(MCDropout(1.0, mask="channel", dims=1)(x.reshape(5, 7, 1)), torch.zeros(5, 7, 1))


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        (dict(p=-0.1), "p"),
        (dict(p=1.5), "p"),
        (dict(p="0.5"), "p"),
        (dict(p=True), "p"),
        (dict(p=float("nan")), "p"),
        (dict(p=1.0, alpha=True), "p"),
        (dict(mask="plane"), "mask"),
        (dict(mask=None), "mask"),
        (dict(mask="channel", dims=4), "dims"),
        (dict(mask="channel", dims=0), "dims"),
        (dict(mask="element", dims=2), "dims"),
    ],
)
def test_mcdropout_rejects_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        MCDropout(**kwargs)


def test_mcdropout_rejects_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        MCDropout(0.5)(torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        MCDropout(0.5).eval()(torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        MCDropout(0.5)([1.0, 2.0])
    with pytest.raises(ValueError, match="dims=2"):
        MCDropout(0.5, mask="channel", dims=2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="channel"):
        MCDropout(0.5, mask="channel")(torch.randn(4))


@pytest.mark.parametrize(
    "torch_layer, mask, dims, alpha",
    [
        (nn.Dropout(0.3), "element", None, False),
        (nn.Dropout1d(0.2), "channel", 1, False),
        (nn.Dropout2d(0.25), "channel", 2, False),
        (nn.Dropout3d(0.35), "channel", 3, False),
        (nn.AlphaDropout(0.1), "element", None, True),
        (nn.FeatureAlphaDropout(0.15), "channel", None, True),
    ],
)
def test_from_dropout(torch_layer, mask, dims, alpha):
    for training in (True, False):
        layer = MCDropout.from_dropout(torch_layer.train(training))
        assert (layer.p, layer.mask, layer.dims, layer.alpha, layer.training) == (
            torch_layer.p, mask, dims, alpha, training
        )


def test_a_model_holding_mcdropout_casts_and_moves():
    """nn.Module._apply must stay nn.Module's: .double() / .to() of a converted model work."""
    model = nn.Sequential(nn.Linear(3, 4), MCDropout(0.5), nn.Linear(4, 2))
    model.double()
    assert model[0].weight.dtype == torch.float64
    model.to("cpu", torch.float32)
    converted = bdlkern.nn.convert(ResidualNet()).double()
    assert converted(torch.randn(2, 6, dtype=torch.float64)).dtype == torch.float64


def test_from_dropout_rejects_other_modules():
    with pytest.raises(TypeError, match="from_dropout"):
        MCDropout.from_dropout(nn.Linear(2, 2))


# ---- MCDropout inside sampling ---------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_mcdropout_in_sampling_folds_the_samples(train):
    S, N, p, seed = 4, 3, 0.5, 21
    x = torch.randn(N, 5, 6, dtype=torch.float64)
    layer = MCDropout(p).train(train)
    with bdlkern.sampling(S, seed=seed) as state:
        y = layer(x)
        assert state.carries(y) == "folded"
    assert y.shape == (S * N, 5, 6)
    keep = keep_flags((S, N, 5, 6), p, seeded_state(seed, 0))
    expected = (x.expand(S, N, 5, 6) * keep.double() / (1 - p)).reshape(S * N, 5, 6)
    torch.testing.assert_close(y, expected)
    samples = bdlkern.unfold_samples(y, S)
    assert not torch.equal(samples[0], samples[1])
    # channel masks: one flag per (sample, n, c)
    layer = MCDropout(p, mask="channel", dims=1).train(train)
    with bdlkern.sampling(S, seed=seed):
        y = layer(x)
    keep = keep_flags((S, N, 5), p, seeded_state(seed, 0))
    expected = (x.expand(S, N, 5, 6) * keep.double()[..., None] / (1 - p)).reshape(S * N, 5, 6)
    torch.testing.assert_close(y, expected)


def test_mcdropout_in_sampling_on_a_vector_stacks():
    S, p, seed = 3, 0.5, 1
    x = torch.randn(10)
    with bdlkern.sampling(S, seed=seed) as state:
        y = MCDropout(p)(x)
        assert state.carries(y) == "stacked"
    keep = keep_flags((S, 10), p, seeded_state(seed, 0))
    torch.testing.assert_close(y, x.expand(S, 10) * keep.float() / (1 - p))


def run_pair(first: nn.Module, second: nn.Module, x: torch.Tensor, S: int, seed: int) -> torch.Tensor:
    with bdlkern.sampling(S, seed=seed) as state:
        return state.unfold(second(first(x)))


@pytest.mark.parametrize("train", [True, False])
def test_mcdropout_then_linear_equals_the_fused_layer(train):
    torch.manual_seed(0)
    S, N, p, seed = 5, 4, 0.4, 33
    linear = nn.Linear(7, 3).double()
    fused = MCDropoutLinear.from_linear(linear, p).train(train)
    x = torch.randn(N, 7, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed):
        expected = fused(x)
    assert expected.shape == (S, N, 3)
    got = run_pair(MCDropout(p).train(train), linear, x, S, seed)
    assert got.shape == (S, N, 3)
    torch.testing.assert_close(got, expected)
    # the mask that matters: another seed gives other samples
    assert not torch.allclose(run_pair(MCDropout(p), linear, x, S, seed + 1), expected)


@pytest.mark.parametrize(
    "conv_type, fused_type, mask, dims, shape",
    [
        (nn.Conv2d, MCDropoutConv2d, "element", None, (3, 4, 7, 6)),
        (nn.Conv2d, MCDropoutConv2d, "channel", 2, (3, 4, 7, 6)),
        (nn.Conv1d, MCDropoutConv1d, "element", None, (3, 4, 9)),
        (nn.Conv1d, MCDropoutConv1d, "channel", 1, (3, 4, 9)),
    ],
)
def test_mcdropout_then_conv_equals_the_fused_layer(conv_type, fused_type, mask, dims, shape):
    torch.manual_seed(1)
    S, p, seed = 4, 0.3, 8
    conv = conv_type(4, 5, 3, padding=1).double()
    fused = fused_type.from_conv(conv, p, mask=mask)
    x = torch.randn(shape, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed):
        expected = fused(x)
    assert expected.shape[0] == S * shape[0]
    with bdlkern.sampling(S, seed=seed):
        got = conv(MCDropout(p, mask=mask, dims=dims)(x))
    torch.testing.assert_close(got, expected)
    with bdlkern.sampling(S, seed=seed + 1):
        other = conv(MCDropout(p, mask=mask, dims=dims)(x))
    assert not torch.allclose(other, expected)


def test_mcdropout_keeps_the_stacked_layout_of_its_input():
    """After a linear MC layer, ``MCDropout`` masks ``[S, N, d]`` as it is (one flag per element)."""
    torch.manual_seed(2)
    S, N, p, seed = 3, 4, 0.5, 6
    first = MCDropoutLinear(5, 8, p=0.2).double()
    x = torch.randn(N, 5, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = MCDropout(p)(first(x))
        assert y.shape == (S, N, 8) and state.carries(y) == "stacked"
    h = bdlkern.ops.mc_dropout_linear(x, first.weight, first.bias, 0.2, S, rng_state=seeded_state(seed, 0))
    keep = keep_flags((S, N, 8), p, seeded_state(seed, 1))
    torch.testing.assert_close(y, h.detach() * keep.double() / (1 - p))


# ---- convert: dropout modules in a custom forward ----------------------------------------------------
class ResidualNet(nn.Module):
    """Dropout modules used in a custom forward: ``drop1 -> fc2`` adjacent (fuses); ``drop_res``
    on a residual branch and ``drop_out`` after the last layer (swapped)."""

    def __init__(self, p1=0.3, p_res=0.2, p_out=0.5):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.drop1 = nn.Dropout(p1)
        self.fc2 = nn.Linear(16, 16)
        self.drop_res = nn.Dropout(p_res)
        self.fc3 = nn.Linear(16, 4)
        self.drop_out = nn.Dropout(p_out)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = self.fc2(self.drop1(h))
        h = h + self.drop_res(F.relu(h))
        return self.drop_out(self.fc3(h))


def test_convert_fuses_adjacent_and_swaps_the_others():
    torch.manual_seed(0)
    model = ResidualNet().double().eval()
    keys = list(model.state_dict())
    x = torch.randn(5, 6, dtype=torch.float64)
    before = model(x)
    report = bdlkern.nn.convert(model, report=True)
    assert report.model is model and report.traced and report.trace_error is None
    assert report.fused == [("drop1", "fc2", "MCDropoutLinear")]
    assert report.swapped == [("drop_res", "Dropout"), ("drop_out", "Dropout")]
    assert report.rewritten == [] and report.not_converted == []
    assert len(report) == 3
    assert type(model.fc2) is MCDropoutLinear and model.fc2.p == 0.3
    assert type(model.drop1) is nn.Identity
    assert type(model.drop_res) is MCDropout and model.drop_res.p == 0.2
    assert type(model.drop_out) is MCDropout and model.drop_out.p == 0.5
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)  # eval: the same deterministic model


def test_converted_custom_forward_samples_like_the_reference():
    torch.manual_seed(1)
    model = bdlkern.nn.convert(ResidualNet().double().eval())
    S, N, seed = 4, 5, 12
    x = torch.randn(N, 6, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        y = model(x)
        assert state.mc_layer_calls == 3
    assert y.shape == (S, N, 4)
    # by hand: fc2 (call 0, starts the stacked sampling), drop_res (call 1), drop_out (call 2)
    h = F.relu(F.linear(x, model.fc1.weight, model.fc1.bias))
    keep = keep_flags((S, N, 16), 0.3, seeded_state(seed, 0))
    h = F.linear(h.expand(S, N, 16) * keep.double() / 0.7, model.fc2.weight, model.fc2.bias)
    h = h + F.relu(h) * keep_flags((S, N, 16), 0.2, seeded_state(seed, 1)).double() / 0.8
    out = F.linear(h, model.fc3.weight, model.fc3.bias)
    expected = out * keep_flags((S, N, 4), 0.5, seeded_state(seed, 2)).double() / 0.5
    torch.testing.assert_close(y.detach(), expected.detach())


def test_after_convert_training_is_dropout_and_eval_is_the_original():
    torch.manual_seed(2)
    model = ResidualNet(p_out=0.4).double()
    x = torch.randn(3000, 6, dtype=torch.float64)
    with torch.no_grad():
        original = model.eval()(x)
        bdlkern.nn.convert(model)
        model.train()
        a, b = model(x), model(x)
        assert not torch.equal(a, b)
        rate = float((a == 0).double().mean())
        assert abs(rate - 0.4) < 0.02, rate
        model.eval()
        assert torch.equal(model(x), original)
        assert torch.equal(model(x), model(x))


# ---- convert: functional dropout -------------------------------------------------------------------
class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        h = F.relu(self.conv1(x))
        h = F.dropout2d(h, 0.25, training=self.training)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = torch.flatten(h, 1)
        h = F.dropout(h, p=0.4, training=self.training)
        return self.fc(h)


class FunctionalReference(nn.Module):
    """FunctionalNet with explicit ``MCDropout`` layers in the places of its functional calls."""

    def __init__(self, dtype=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, dtype=dtype)
        self.drop2d = MCDropout(0.25, mask="channel", dims=2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1, dtype=dtype)
        self.drop = MCDropout(0.4)
        self.fc = nn.Linear(8 * 4 * 4, 5, dtype=dtype)

    def forward(self, x):
        h = self.drop2d(F.relu(self.conv1(x)))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.fc(self.drop(torch.flatten(h, 1)))


def test_convert_rewrites_functional_dropout():
    torch.manual_seed(3)
    model = FunctionalNet().double().eval()
    keys = list(model.state_dict())
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    before = model(x)
    report = bdlkern.nn.convert(model, report=True)
    converted = report.model
    assert isinstance(converted, torch.fx.GraphModule)
    assert len(report.rewritten) == 2 and len(report) == 2
    assert report.fused == [] and report.swapped == [] and report.not_converted == []
    assert "dropout2d" in report.rewritten[0][0] and "dropout" in report.rewritten[1][0]
    layers = [converted.get_submodule(path) for _, path in report.rewritten]
    assert [(m.p, m.mask, m.dims, m.alpha) for m in layers] == [
        (0.25, "channel", 2, False),
        (0.4, "element", None, False),
    ]
    assert list(converted.state_dict()) == keys
    assert not converted.training and all(not m.training for m in layers)
    assert torch.equal(converted(x), before)
    # the rewritten dropout follows the module's mode (training=self.training)
    converted.train()
    assert all(m.training for m in layers)
    assert not torch.equal(converted(x), converted(x))


@pytest.mark.parametrize("train", [False, True])
def test_rewritten_functional_dropout_samples_like_explicit_mcdropout(train):
    torch.manual_seed(4)
    model = FunctionalNet().double()
    reference = FunctionalReference(dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    converted = bdlkern.nn.convert(model).train(train)
    reference.train(train)
    S, N, seed = 3, 4, 77
    x = torch.randn(N, 3, 8, 8, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        got = state.unfold(converted(x))
    with bdlkern.sampling(S, seed=seed) as state:
        expected = state.unfold(reference(x))
    assert got.shape == (S, N, 5)
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got[0], got[1])
    with bdlkern.sampling(S, seed=seed + 1) as state:
        other = state.unfold(reference(x))
    assert not torch.allclose(other, got)


class MixedFunctional(nn.Module):
    """Functional dropout that torch.fx records with positional arguments (``torch.dropout``) and
    with keywords (``F.alpha_dropout``, ``F.dropout1d``)."""

    def __init__(self, dtype=None):
        super().__init__()
        self.fc = nn.Linear(6, 6, dtype=dtype)
        self.out = nn.Linear(6, 2, dtype=dtype)

    def forward(self, x):
        h = torch.dropout(self.fc(x), 0.3, self.training)
        h = F.alpha_dropout(torch.selu(h), 0.2, self.training)
        h = F.dropout1d(h.unsqueeze(-1), 0.1, self.training).squeeze(-1)
        return self.out(h)


class MixedReference(MixedFunctional):
    def __init__(self, dtype=None):
        super().__init__(dtype)
        self.drops = nn.ModuleList([MCDropout(0.3), MCDropout(0.2, alpha=True), MCDropout(0.1, "channel", dims=1)])

    def forward(self, x):
        h = self.drops[0](self.fc(x))
        h = self.drops[1](torch.selu(h))
        return self.out(self.drops[2](h.unsqueeze(-1)).squeeze(-1))


def test_convert_rewrites_positional_and_alpha_functional_dropout():
    torch.manual_seed(10)
    model = MixedFunctional(dtype=torch.float64)
    reference = MixedReference(dtype=torch.float64)
    reference.load_state_dict(model.state_dict())
    report = bdlkern.nn.convert(model, report=True)
    layers = [report.model.get_submodule(path) for _, path in report.rewritten]
    assert [(m.p, m.mask, m.dims, m.alpha) for m in layers] == [
        (0.3, "element", None, False),
        (0.2, "element", None, True),
        (0.1, "channel", 1, False),
    ]
    S, N, seed = 4, 5, 3
    x = torch.randn(N, 6, dtype=torch.float64)
    with bdlkern.sampling(S, seed=seed) as state:
        got = state.unfold(report.model(x))
    with bdlkern.sampling(S, seed=seed) as state:
        expected = state.unfold(reference(x))
    assert got.shape == (S, N, 2)
    torch.testing.assert_close(got, expected)


def test_convert_lists_a_functional_dropout_with_a_bad_rate():
    class BadRate(nn.Module):
        def forward(self, x):
            return torch.dropout(x, 1.5, True)

    with pytest.warns(UserWarning, match="could not convert"):
        report = bdlkern.nn.convert(BadRate(), report=True)
    assert report.rewritten == [] and len(report.not_converted) == 1
    assert "not a constant in range (1.5)" in report.not_converted[0][2]


# ---- convert: nested containers --------------------------------------------------------------------
class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict(
            {
                "body": nn.ModuleList(
                    [
                        nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Dropout(0.3), nn.Linear(12, 12)),
                        nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 8)),
                    ]
                ),
                "head": nn.ModuleList([nn.Sequential(nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))]),
            }
        )

    def forward(self, x):
        for block in self.blocks["body"]:
            x = block(x)
        return self.blocks["head"][0](x)


def test_convert_nested_containers():
    torch.manual_seed(5)
    model = Nested().double().eval()
    keys = list(model.state_dict())
    x = torch.randn(4, 6, dtype=torch.float64)
    before = model(x)
    report = bdlkern.nn.convert(model, report=True)
    assert report.fused == [
        ("blocks.body.0.2", "blocks.body.0.3", "MCDropoutLinear"),
        ("blocks.body.1.1", "blocks.body.1.2", "MCDropoutLinear"),
        ("blocks.head.0.1", "blocks.head.0.2", "MCDropoutLinear"),
    ]
    assert report.swapped == [] and report.not_converted == []
    assert list(model.state_dict()) == keys
    fused = [model.get_submodule(layer) for _, layer, _ in report.fused]
    assert [type(m) for m in fused] == [MCDropoutLinear] * 3 and [m.p for m in fused] == [0.3, 0.2, 0.1]
    assert not any(isinstance(m, (nn.Dropout, MCDropout)) for m in model.modules())
    assert torch.equal(model(x), before)
    with bdlkern.sampling(5, seed=0) as state:
        y = model(x)
        assert state.mc_layer_calls == 3
    assert y.shape == (5, 4, 3)
    assert not torch.allclose(y[0], y[1])


# ---- convert: a torchvision-style classifier -------------------------------------------------------
class TinyVGG(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(16 * 2 * 2, 32), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(32, 32), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(32, classes),
        )

    def forward(self, x):
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def test_convert_vgg_style_classifier_and_mc_predict():
    torch.manual_seed(6)
    model = TinyVGG().eval()
    keys = list(model.state_dict())
    x = torch.randn(3, 3, 16, 16)
    before = model(x)
    report = bdlkern.nn.convert(model, report=True)
    assert report.fused == [
        ("classifier.2", "classifier.3", "MCDropoutLinear"),
        ("classifier.5", "classifier.6", "MCDropoutLinear"),
    ]
    assert report.swapped == [] and report.rewritten == [] and report.not_converted == []
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), before)

    calls = []
    hook = model.features[0].register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape))
    try:
        S = 6
        prediction = bdlkern.uncertainty.mc_predict(model, x, S, seed=3)
    finally:
        hook.remove()
    assert calls == [x.shape]  # the trunk runs once, on the N inputs
    assert prediction.samples.shape == (S, 3, 10)
    assert not torch.allclose(prediction.samples[0], prediction.samples[1])
    assert bool((prediction.mutual_information > 0).all())
    # the samples are those of the fused layers with the seed's masks (calls 0 and 1)
    with torch.no_grad():
        h = torch.flatten(model.avgpool(model.features(x)), 1)
        first, second, last = (model.classifier.get_submodule(name) for name in ("0", "3", "6"))
        h = F.relu(F.linear(h, first.weight, first.bias))
        h = F.relu(bdlkern.ops.mc_dropout_linear(h, second.weight, second.bias, 0.5, S, rng_state=seeded_state(3, 0)))
        expected = bdlkern.ops.mc_dropout_linear(h, last.weight, last.bias, 0.5, None, rng_state=seeded_state(3, 1))
    torch.testing.assert_close(prediction.samples, expected)


# ---- convert: a model that does not trace ----------------------------------------------------------
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        if x.sum() > 0:
            h = F.dropout(h, 0.2, training=self.training)
        return self.fc2(self.drop(h))


def test_convert_lists_what_does_not_trace():
    model = DataDependent()
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="could not convert") as record:
        report = bdlkern.nn.convert(model, report=True)
    lines, first = inspect.getsourcelines(DataDependent.forward)
    line = first + next(i for i, text in enumerate(lines) if "F.dropout" in text)
    assert not report.traced and report.trace_error
    assert len(report.not_converted) == 1
    where, what, why = report.not_converted[0]
    assert where == "" and what == f"DataDependent.forward line {line}: dropout()"
    assert "does not trace" in why
    assert what in str(record[0].message)
    assert report.model is model
    assert report.swapped == [("drop", "Dropout")] and report.fused == []  # no graph: no fusion outside Sequential
    assert type(model.drop) is MCDropout and model.drop.p == 0.3
    assert list(model.state_dict()) == keys
    assert f"NOT converted  (model): {what}" in str(report)


# ---- convert: report, warnings, errors -------------------------------------------------------------
def test_convert_warns_without_dropout():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    with pytest.warns(UserWarning, match="found no dropout"):
        report = bdlkern.nn.convert(model, report=True)
    assert len(report) == 0


@pytest.mark.parametrize("bad", [None, nn.Linear, lambda x: x, torch.randn(2)])
def test_convert_rejects_a_non_module(bad):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        bdlkern.nn.convert(bad)


def test_convert_verbose_prints_the_report(capsys):
    model = ResidualNet()
    returned = bdlkern.nn.convert(model, verbose=True)
    assert returned is model
    printed = capsys.readouterr().out
    assert "bdlkern.nn.convert: 3 dropout(s) converted" in printed
    assert "torch.fx: traced" in printed
    assert "fused      drop1 -> fc2  into MCDropoutLinear" in printed
    assert "swapped    drop_res (Dropout)  into MCDropout" in printed
    assert "swapped    drop_out (Dropout)  into MCDropout" in printed
    # quiet by default
    bdlkern.nn.convert(ResidualNet())
    assert capsys.readouterr().out == ""


def test_convert_without_fx_swaps_only():
    model = ResidualNet()
    report = bdlkern.nn.convert(model, fx=False, report=True)
    assert report.fused == [] and not report.traced
    assert [path for path, _ in report.swapped] == ["drop1", "drop_res", "drop_out"]
    assert "did not trace (not tried)" in str(report)
    # a converted model samples the same with or without fusion (same Philox flags, same order)
    torch.manual_seed(7)
    fused = bdlkern.nn.convert(ResidualNet().double())
    swapped = ResidualNet().double()
    swapped.load_state_dict(fused.state_dict())
    bdlkern.nn.convert(swapped, fx=False)
    x = torch.randn(3, 6, dtype=torch.float64)
    with bdlkern.sampling(4, seed=2) as state:
        a = state.unfold(fused(x))
    with bdlkern.sampling(4, seed=2) as state:
        b = state.unfold(swapped(x))
    torch.testing.assert_close(a, b)


def test_convert_and_mc_predict_regression_with_a_swapped_dropout_only():
    """A model whose only dropout is on a residual sum samples after convert (nothing fused)."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 5)
            self.drop = nn.Dropout(0.5)
            self.out = nn.Linear(5, 2)

        def forward(self, x):
            return self.out(self.drop(x + F.relu(self.fc(x))) * 2.0)

    torch.manual_seed(8)
    model = Block().eval()
    report = bdlkern.nn.convert(model, report=True)
    assert report.fused == [] and report.swapped == [("drop", "Dropout")]
    x = torch.randn(7, 5)
    prediction = bdlkern.uncertainty.mc_predict(model, x, 8, seed=1, task="regression")
    assert prediction.samples.shape == (8, 7, 2)
    assert bool((prediction.variance > 0).all())
    assert math.isfinite(float(prediction.mean.sum()))


class _FunctionalCNN(nn.Module):
    """F.dropout and a Dropout2d inside a residual block (folded layout, lifted skip)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.drop = nn.Dropout2d(0.3)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = x + self.conv2(self.drop(x))
        x = F.adaptive_avg_pool2d(F.relu(x), 2).flatten(1)
        return self.fc(F.dropout(x, 0.4, training=self.training))


@pytest.mark.parametrize("build", [ResidualNet, _FunctionalCNN])
def test_converted_model_exports_and_compiles_under_seeded_sampling(build):
    """A converted custom model inside sampling(S, seed): torch.export and torch.compile give
    eager's samples bit for bit (the marks that route the samples are traced)."""
    torch.manual_seed(2)
    model = bdlkern.nn.convert(build()).eval()
    x = torch.randn(3, 6) if build is ResidualNet else torch.randn(3, 1, 8, 8)
    with bdlkern.sampling(5, seed=9):
        eager = model(x)
    with bdlkern.sampling(5, seed=9):
        program = torch.export.export(model, (x,))
    with bdlkern.sampling(5, seed=9):
        exported = program.module()(x)
    torch.testing.assert_close(exported, eager, rtol=0, atol=0)
    compiled = torch.compile(model, fullgraph=True)
    with bdlkern.sampling(5, seed=9):
        got = compiled(x)
    torch.testing.assert_close(got, eager, rtol=1e-6, atol=1e-6)
    assert eager.shape[0] in (5, 15)  # stacked [5, 3, 4] or folded [15, 3]


@pytest.mark.parametrize("mask,dims,shape", [("element", None, (3, 5)), ("channel", 2, (2, 3, 4, 4))])
def test_mcdropout_non_contiguous_input_and_autocast(mask, dims, shape):
    """A transposed (non-contiguous) input gives the contiguous input's samples; under CPU
    autocast a bfloat16 input keeps its dtype and the same flags (x * keep / (1 - p))."""
    layer = MCDropout(0.4, mask=mask, dims=dims)
    x = torch.randn(*shape)
    strided = x.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, other strides
    assert not strided.is_contiguous()
    with bdlkern.sampling(3, seed=5):
        want = layer(x)
    with bdlkern.sampling(3, seed=5):
        got = layer(strided)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16), bdlkern.sampling(3, seed=5):
        low = layer(x.bfloat16())
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), want, rtol=1e-2, atol=1e-2)
    assert torch.equal(low == 0, want == 0)  # the same flags
