"""MC-dropout convolution modules (issue 16) and the folded sample layout of conv nets:
``bdlkern.nn.MCDropoutConv1d`` / ``MCDropoutConv2d`` (constructor, ``from_conv``, train / eval
outside sampling), ``bdlkern.nn.convert`` on conv pairs, whole networks inside
``bdlkern.sampling(S, seed=k)`` against hand-written references that rebuild the same Philox masks,
``mc_predict`` for folded and stacked layouts, the stacked layout (MLPs) unchanged, errors,
serialisation and a training step.

Masks of a seeded pass: the j-th MC layer call of the block uses ``rng_state = [k, j << 40]``;
a conv layer's mask is the op's (``[S*N, C, *sp]`` element, ``[S*N, C]`` channel, ``[S, C, ...]``
shared), a later ``MCDropoutLinear`` in a folded pass masks ``[S*N, in]`` as ``[S, N, in]``.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.nn import MCDropoutLinear
from bdlkern.testing import reference as ref

MCDropoutConv1d = bdlkern.nn.MCDropoutConv1d
MCDropoutConv2d = bdlkern.nn.MCDropoutConv2d

MC_STREAM = "mc_dropout"
CONV = {1: F.conv1d, 2: F.conv2d}
ERRORS = (ValueError, TypeError, RuntimeError)


# ---- references -------------------------------------------------------------------------------------
def seeded_state(k: int, j: int) -> torch.Tensor:
    """rng_state of the j-th MC layer call of ``sampling(S, seed=k)`` (bdlkern/_sampling.py)."""
    return torch.tensor([k, j << 40], dtype=torch.int64)


def keep_mask(S, N, C, spatial, p, state, *, channel, shared):
    """The conv op's keep mask broadcast to ``[S*N, C, *spatial]`` (the spec's layouts)."""
    spatial = tuple(spatial)
    rows = S if shared else S * N
    shape = [rows, C] if channel else [rows, C, *spatial]
    m = bdlkern.ops.dropout_mask(shape, p, rng_state=state, stream=MC_STREAM)
    if channel:
        m = m.reshape(rows, C, *([1] * len(spatial)))
    if shared:
        m = m.unsqueeze(1).expand(S, N, *m.shape[1:]).reshape(S * N, *m.shape[1:])
    return m.expand(S * N, C, *spatial)


def mc_conv_reference(layer, x, S, state, *, input_has_samples):
    """``conv(xs * M / (1 - p))`` with the parameters and options of an MCDropoutConv layer."""
    xs = x if input_has_samples else x.repeat(S, *([1] * (x.dim() - 1)))
    N = xs.shape[0] // S
    m = keep_mask(S, N, x.shape[1], x.shape[2:], layer.p, state, channel=layer.mask == "channel",
                  shared=layer.shared_mask)
    d = x.dim() - 2
    return CONV[d](xs * m / (1.0 - layer.p), layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation,
                   layer.groups)


def mc_linear_folded_reference(layer, h, S, state):
    """A later MCDropoutLinear of a folded pass: ``[S*N, in]`` masked as the linear op's ``[S, N, in]``."""
    N = h.shape[0] // S
    m = bdlkern.ops.dropout_mask([S, N, h.shape[1]], layer.p, rng_state=state, stream=MC_STREAM)
    return F.linear(h * m.reshape(S * N, -1) / (1.0 - layer.p), layer.weight, layer.bias)


def close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * max(1.0, expected.abs().max().item()))


# ---- modules -------------------------------------------------------------------------------------------
def test_constructor_arguments():
    layer = MCDropoutConv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2, bias=False, p=0.3,
                            mask="channel", shared_mask=True, dtype=torch.float64)
    assert isinstance(layer, nn.Conv2d)
    assert layer.weight.shape == (6, 2, 3, 2) and layer.bias is None and layer.weight.dtype == torch.float64
    assert layer.stride == (2, 2) and layer.padding == (1, 1) and layer.dilation == (1, 2) and layer.groups == 2
    assert layer.p == 0.3 and layer.mask == "channel" and layer.shared_mask is True
    default = MCDropoutConv1d(3, 5, 4)
    assert isinstance(default, nn.Conv1d)
    assert default.weight.shape == (5, 3, 4) and default.bias.shape == (5,)
    assert default.p == 0.5 and default.mask == "element" and default.shared_mask is False
    assert set(default.state_dict()) == set(nn.Conv1d(3, 5, 4).state_dict())
    for bad_p in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"MCDropoutConv2d: p must be in \[0, 1\)"):
            MCDropoutConv2d(2, 2, 3, p=bad_p)
    with pytest.raises(ValueError, match="MCDropoutConv2d: mask must be 'element' or 'channel'"):
        MCDropoutConv2d(2, 2, 3, mask="bogus")
    with pytest.raises(ValueError, match="padding_mode"):
        MCDropoutConv2d(2, 2, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        MCDropoutConv1d(2, 2, 3, padding=1, padding_mode="circular")
    assert MCDropoutConv2d(2, 2, 3, padding=1, padding_mode="zeros").padding_mode == "zeros"


@pytest.mark.parametrize("dims", [1, 2])
def test_from_conv_keeps_parameters_and_state_dict(dims):
    torch.manual_seed(0)
    if dims == 2:
        conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, dtype=torch.float64)
        cls, x = MCDropoutConv2d, torch.randn(3, 4, 9, 8, dtype=torch.float64)
    else:
        conv = nn.Conv1d(6, 3, 3, stride=2, padding=2, dilation=2, groups=3, bias=False, dtype=torch.float64)
        cls, x = MCDropoutConv1d, torch.randn(3, 6, 11, dtype=torch.float64)
    conv.eval()
    layer = cls.from_conv(conv, p=0.2, mask="channel", shared_mask=True)
    assert type(layer) is cls
    assert layer.p == 0.2 and layer.mask == "channel" and layer.shared_mask is True
    assert not layer.training
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
    assert list(layer.state_dict()) == list(conv.state_dict())
    for key, value in conv.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key
    assert layer.weight is not conv.weight  # a copy
    assert layer.weight.dtype == torch.float64
    assert (layer.bias is None) == (conv.bias is None)
    assert torch.equal(layer(x), conv(x))  # eval outside sampling: the conv itself
    layer_train = cls.from_conv(conv.train(), p=0.4)
    assert layer_train.training and layer_train.p == 0.4 and layer_train.mask == "element"
    assert layer_train.shared_mask is False
    with pytest.raises(ValueError, match="padding_mode"):
        cls.from_conv((nn.Conv2d if dims == 2 else nn.Conv1d)(2, 2, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match="from_conv: expected an nn.Conv"):
        cls.from_conv((nn.Conv1d if dims == 2 else nn.Conv2d)(2, 2, 3))
    with pytest.raises(TypeError, match="from_conv: expected an nn.Conv"):
        cls.from_conv(nn.Linear(2, 2))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_eval_outside_sampling_is_the_plain_conv(dims, mask):
    torch.manual_seed(1)
    cls, plain = (MCDropoutConv2d, nn.Conv2d) if dims == 2 else (MCDropoutConv1d, nn.Conv1d)
    layer = cls(3, 4, 3, padding=1, stride=2, p=0.5, mask=mask).eval()
    conv = plain(3, 4, 3, padding=1, stride=2)
    conv.load_state_dict(layer.state_dict())
    x = torch.randn(5, 3, *([8] * dims))
    y = layer(x)
    assert torch.equal(y, conv(x))
    assert torch.equal(layer(x), y)  # deterministic


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_training_outside_sampling_is_dropout_then_conv(dims, mask):
    torch.manual_seed(2)
    cls, plain = (MCDropoutConv2d, nn.Conv2d) if dims == 2 else (MCDropoutConv1d, nn.Conv1d)
    layer = cls(4, 5, 3, padding=1, stride=(2 if dims == 1 else (1, 2)), p=0.4, mask=mask, dtype=torch.float64)
    layer.train()
    x = torch.randn(6, 4, *([10] * dims), dtype=torch.float64, requires_grad=True)
    g_state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(g_state)
    state = bdlkern.ops.new_rng_state()
    expected = mc_conv_reference(layer, x, 1, state, input_has_samples=True)
    conv = plain(4, 5, 3, padding=1, stride=layer.stride, dtype=torch.float64)
    assert y.shape == conv(x).shape == expected.shape
    close64(y, expected)
    # About a 1 - p fraction of the flags is kept (the reference's mask is the layer's; 4 sigma).
    flags = bdlkern.ops.dropout_mask([6, 4] if mask == "channel" else list(x.shape), 0.4, rng_state=state,
                                     stream=MC_STREAM)
    frac = flags.double().mean().item()
    assert abs(frac - 0.6) < 4 * (0.24 / flags.numel()) ** 0.5
    # Gradients flow as through dropout -> conv.
    g = torch.randn_like(y)
    params = [x, layer.weight, layer.bias]
    for a, e in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(expected, params, g)):
        close64(a, e)
    # A second call draws new masks.
    assert not torch.equal(layer(x), y)


# ---- convert ------------------------------------------------------------------------------------------
def lenet(p_conv=0.25, p1=0.5, p2=0.3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Dropout2d(p_conv), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(p1), nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Dropout(p2), nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


LENET_TYPES = ["Conv2d", "ReLU", "MaxPool2d", "MCDropoutConv2d", "ReLU", "MaxPool2d", "Flatten", "MCDropoutLinear",
               "ReLU", "MCDropoutLinear", "ReLU", "Linear"]


def converted_lenet() -> nn.Sequential:
    model = lenet()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    out = bdlkern.nn.convert(model)
    assert out is model
    assert [type(m).__name__ for m in model] == LENET_TYPES
    assert list(model.state_dict()) == list(keys)
    for k, v in model.state_dict().items():
        assert torch.equal(v, keys[k]), k
    conv, lin1, lin2 = model[3], model[7], model[9]
    assert isinstance(conv, MCDropoutConv2d) and conv.mask == "channel" and conv.p == 0.25
    assert isinstance(lin1, MCDropoutLinear) and lin1.p == 0.5
    assert isinstance(lin2, MCDropoutLinear) and lin2.p == 0.3
    return model


def test_convert_fuses_conv_pairs_and_keeps_keys():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.Dropout1d(0.2), nn.Conv1d(4, 4, 3),
        nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Conv1d(4, 4, 1)),
        nn.Dropout(0.1), nn.Conv1d(4, 2, 1, bias=False),
    )
    model2d = nn.Sequential(nn.Dropout(0.35), nn.Conv2d(2, 3, 3), nn.Dropout2d(0.45), nn.Conv2d(3, 3, 1))
    keys1, keys2 = list(model.state_dict()), list(model2d.state_dict())
    bdlkern.nn.convert(model)
    bdlkern.nn.convert(model2d)
    assert [type(m).__name__ for m in model] == ["Conv1d", "MCDropoutConv1d", "Sequential", "MCDropoutConv1d"]
    assert model[1].mask == "channel" and model[1].p == 0.2
    assert type(model[2][1]) is MCDropoutConv1d and model[2][1].mask == "element" and model[2][1].p == 0.3
    assert model[3].mask == "element" and model[3].p == 0.1 and model[3].bias is None
    assert [type(m).__name__ for m in model2d] == ["MCDropoutConv2d", "MCDropoutConv2d"]
    assert model2d[0].mask == "element" and model2d[0].p == 0.35
    assert model2d[1].mask == "channel" and model2d[1].p == 0.45
    assert list(model.state_dict()) == keys1 and list(model2d.state_dict()) == keys2


# ---- sampling: the folded layout ----------------------------------------------------------------------
def lenet_reference(model: nn.Sequential, x: torch.Tensor, S: int, k: int) -> torch.Tensor:
    """The converted LeNet with the masks of ``sampling(S, seed=k)`` rebuilt, plain torch: [S*N, 10]."""
    m = list(model)
    h = F.max_pool2d(F.relu(F.conv2d(x, m[0].weight, m[0].bias, padding=2)), 2)  # runs once, [N, 6, 14, 14]
    h = mc_conv_reference(m[3], h, S, seeded_state(k, 0), input_has_samples=False)  # [S*N, 16, 10, 10]
    h = F.max_pool2d(F.relu(h), 2).flatten(1)
    h = F.relu(mc_linear_folded_reference(m[7], h, S, seeded_state(k, 1)))
    h = F.relu(mc_linear_folded_reference(m[9], h, S, seeded_state(k, 2)))
    return F.linear(h, m[11].weight, m[11].bias)


@pytest.mark.parametrize("train", [False, True])
def test_lenet_folded_sampling_matches_reference(train):
    model = converted_lenet().double().train(train)
    S, N, k = 4, 3, 17
    x = torch.randn(N, 1, 28, 28, dtype=torch.float64)
    with bdlkern.sampling(S, seed=k):
        out = model(x)
    assert out.shape == (S * N, 10)
    folded = bdlkern.unfold_samples(out, S)
    assert folded.shape == (S, N, 10)
    assert torch.equal(folded, out.reshape(S, N, 10))
    with torch.no_grad():
        expected = lenet_reference(model, x, S, k)
    close64(out.detach(), expected)
    assert not torch.allclose(folded[0], folded[1])  # samples differ
    # mc_predict knows the layout: the same samples.
    pred = bdlkern.uncertainty.mc_predict(model, x, num_samples=S, seed=k)
    assert pred.samples.shape == (S, N, 10)
    assert torch.equal(pred.samples, folded.detach())
    assert model.training == train  # mc_predict restores the flags
    # Outside the block: the deterministic network in eval.
    model.eval()
    assert model(x).shape == (N, 10)


class VGGish(nn.Module):
    """A VGG-style block with its own forward: the MC layers are attributes, not a Sequential."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.mc_conv1 = MCDropoutConv2d(8, 12, 3, padding=1, p=0.3, mask="channel")
        self.bn2 = nn.BatchNorm2d(12)
        self.mc_conv2 = MCDropoutConv2d(12, 12, 3, padding=1, p=0.2, mask="element", shared_mask=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = MCDropoutLinear(12, 5, p=0.25)

    def forward(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn2(self.mc_conv1(x)))
        x = F.relu(self.mc_conv2(x))
        return self.fc(self.flatten(self.gap(x)))


def vggish() -> VGGish:
    torch.manual_seed(4)
    model = VGGish().double()
    with torch.no_grad():  # non-trivial running statistics
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.randn_like(bn.running_mean) * 0.1)
            bn.running_var.copy_(torch.rand_like(bn.running_var) + 0.5)
            bn.weight.copy_(torch.rand_like(bn.weight) + 0.5)
            bn.bias.copy_(torch.randn_like(bn.bias) * 0.1)
    return model.eval()


def vggish_reference(model: VGGish, x, S, k):
    h = model.pool(F.relu(model.bn1(model.conv1(x))))
    h = F.relu(model.bn2(mc_conv_reference(model.mc_conv1, h, S, seeded_state(k, 0), input_has_samples=False)))
    h = F.relu(mc_conv_reference(model.mc_conv2, h, S, seeded_state(k, 1), input_has_samples=True))
    return mc_linear_folded_reference(model.fc, model.flatten(model.gap(h)), S, seeded_state(k, 2))


def test_vgg_block_mc_predict_runs_prefix_once():
    model = vggish()
    S, N, k = 5, 4, 23
    x = torch.randn(N, 3, 8, 8, dtype=torch.float64)
    batches = []
    handle = model.conv1.register_forward_hook(lambda mod, inp, out: batches.append(inp[0].shape[0]))
    try:
        pred = bdlkern.uncertainty.mc_predict(model, x, num_samples=S, seed=k)
    finally:
        handle.remove()
    assert batches == [N]  # the layers before the first MC layer ran once, on N images
    assert pred.samples.shape == (S, N, 5)
    with torch.no_grad():
        expected = vggish_reference(model, x, S, k).reshape(S, N, 5)
    close64(pred.samples, expected)
    assert not torch.allclose(pred.samples[0], pred.samples[1])
    assert pred.mean_probs.shape == (N, 5) and (pred.mutual_information > 0).any()
    assert not model.training


def test_conv1d_sequence_model_sampled():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv1d(4, 8, 3, padding=1), nn.ReLU(),
        MCDropoutConv1d(8, 8, 3, p=0.3, mask="channel"), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(8, 3),
    ).double().eval()
    S, N, k = 6, 5, 31
    x = torch.randn(N, 4, 20, dtype=torch.float64)
    with bdlkern.sampling(S, seed=k):
        out = model(x)
    assert out.shape == (S * N, 3)
    samples = bdlkern.unfold_samples(out, S)
    assert samples.shape == (S, N, 3)
    with torch.no_grad():
        h = F.relu(model[0](x))
        h = F.relu(mc_conv_reference(model[2], h, S, seeded_state(k, 0), input_has_samples=False))
        expected = model[6](model[5](model[4](h))).reshape(S, N, 3)
    close64(samples.detach(), expected)
    pred = bdlkern.uncertainty.mc_predict(model, x, num_samples=S, seed=k)
    assert torch.equal(pred.samples, samples.detach())
    # Chunked mc_predict: chunk i uses seed + i; one chunk equals no chunking.
    chunked = bdlkern.uncertainty.mc_predict(model, x, num_samples=S, seed=k, batch_size=N)
    assert torch.equal(chunked.samples, pred.samples)
    two = bdlkern.uncertainty.mc_predict(model, x, num_samples=S, seed=k, batch_size=3)
    assert two.samples.shape == (S, N, 3)
    assert torch.equal(two.samples[:, :3], bdlkern.uncertainty.mc_predict(model, x[:3], num_samples=S, seed=k).samples)
    assert torch.equal(two.samples[:, 3:], bdlkern.uncertainty.mc_predict(model, x[3:], num_samples=S, seed=k + 1).samples)


def test_mlp_keeps_the_stacked_layout():
    torch.manual_seed(6)
    model = nn.Sequential(MCDropoutLinear(5, 8, p=0.3), nn.ReLU(), MCDropoutLinear(8, 3, p=0.4)).double().eval()
    S, N, k = 4, 6, 3
    x = torch.randn(N, 5, dtype=torch.float64)
    with bdlkern.sampling(S, seed=k):
        out = model(x)
    assert out.shape == (S, N, 3)
    with torch.no_grad():
        h = F.relu(ref.mc_dropout_linear(x, model[0].weight, model[0].bias, 0.3, S, rng_state=seeded_state(k, 0)))
        expected = ref.mc_dropout_linear(h, model[2].weight, model[2].bias, 0.4, None, rng_state=seeded_state(k, 1))
    close64(out.detach(), expected)
    pred = bdlkern.uncertainty.mc_predict(model, x, num_samples=S, seed=k)
    assert torch.equal(pred.samples, out.detach())


def test_conv_in_a_stacked_pass_takes_and_returns_samples():
    """A linear first MC layer sets the stacked layout; a conv after it takes [S, N, C, H, W]."""
    torch.manual_seed(7)
    first = MCDropoutLinear(6, 2 * 4 * 4, p=0.3).double()
    conv = MCDropoutConv2d(2, 3, 3, padding=1, stride=(1, 2), p=0.4, mask="element").double()
    S, N, k = 3, 2, 9
    x = torch.randn(N, 6, dtype=torch.float64)
    with bdlkern.sampling(S, seed=k):
        h = first(x)
        assert h.shape == (S, N, 32)
        y = conv(h.reshape(S, N, 2, 4, 4))
    assert y.shape == (S, N, 3, 4, 2)
    with torch.no_grad():
        h_ref = ref.mc_dropout_linear(x, first.weight, first.bias, 0.3, S, rng_state=seeded_state(k, 0))
        expected = mc_conv_reference(conv, h_ref.reshape(S * N, 2, 4, 4), S, seeded_state(k, 1), input_has_samples=True)
    close64(y.detach(), expected.reshape(S, N, 3, 4, 2))


def test_later_mc_layer_with_wrong_batch_raises():
    torch.manual_seed(8)
    first = MCDropoutConv2d(2, 4, 3, p=0.3)
    later_conv = MCDropoutConv2d(4, 4, 3, p=0.3)
    later_linear = MCDropoutLinear(4 * 6 * 6, 2, p=0.3)
    x = torch.randn(2, 2, 8, 8)
    with bdlkern.sampling(3, seed=0):
        h = first(x)
        assert h.shape == (6, 4, 6, 6)
        assert later_linear(h.flatten(1)).shape == (6, 2)  # the right batch works
    wrong = r"S \* N = 3 \* 2"
    for rows in (5, 3):  # not a multiple of S, and a multiple of S but not S * N
        with bdlkern.sampling(3, seed=0):
            h = first(x)
            with pytest.raises(ValueError, match="MCDropoutConv2d: .*" + wrong):
                later_conv(h[:rows])
        with bdlkern.sampling(3, seed=0):
            h = first(x)
            with pytest.raises(ValueError, match="MCDropoutLinear: .*" + wrong):
                later_linear(h.flatten(1)[:rows])


def test_unfold_samples():
    y = torch.randn(6, 2, 3)
    u = bdlkern.unfold_samples(y, 3)
    assert u.shape == (3, 2, 2, 3)
    assert torch.equal(u[1, 0], y[2]) and torch.equal(u[2, 1], y[5])  # row s * N + n
    with pytest.raises(ValueError, match="unfold_samples"):
        bdlkern.unfold_samples(torch.randn(5, 2), 2)


@pytest.mark.parametrize("kind", ["SparseVDLinear", "ConcreteDropoutLinear"])
def test_other_mc_linear_layers_in_a_folded_pass(kind):
    torch.manual_seed(11)
    last = getattr(bdlkern.nn, kind)(3 * 4 * 4, 5)
    model = nn.Sequential(MCDropoutConv2d(2, 3, 3, p=0.3), nn.Flatten(), last).eval()
    x = torch.randn(2, 2, 6, 6)
    with bdlkern.sampling(4, seed=1):
        out = model(x)
    assert out.shape == (8, 5)
    pred = bdlkern.uncertainty.mc_predict(model, x, num_samples=4, seed=1)
    assert torch.equal(pred.samples, bdlkern.unfold_samples(out, 4).detach())
    with bdlkern.sampling(4, seed=1):
        h = model[1](model[0](x))
        with pytest.raises(ValueError, match=r"S \* N = 4 \* 2"):
            last(h[:6])


def test_eval_and_train_flags_do_not_change_sampling_shapes():
    layer = MCDropoutConv2d(3, 4, 3, p=0.5)
    x = torch.randn(2, 3, 5, 5)
    for train in (False, True):
        layer.train(train)
        with bdlkern.sampling(7, seed=1):
            y = layer(x)
        assert y.shape == (14, 4, 3, 3)
        assert layer(x).shape == (2, 4, 3, 3)


# ---- serialisation ------------------------------------------------------------------------------------
def small_conv_net() -> nn.Sequential:
    torch.manual_seed(9)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(),
        MCDropoutConv2d(4, 4, 3, p=0.3, mask="channel", shared_mask=True), nn.ReLU(),
        nn.Flatten(), MCDropoutLinear(4 * 4 * 4, 3, p=0.2),
    )


def _outputs(model, x):
    model.eval()
    outs = [model(x)]
    with bdlkern.sampling(4, seed=7):
        outs.append(model(x))
    model.train()
    torch.manual_seed(3)
    outs.append(model(x))
    model.eval()
    return [o.detach() for o in outs]


def test_serialization_round_trips():
    model = small_conv_net()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
    x = torch.randn(3, 1, 8, 8)
    expected = _outputs(model, x)
    assert expected[1].shape == (12, 3)
    # state_dict into a fresh model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = small_conv_net()
    assert not torch.equal(fresh[2].weight, model[2].weight)
    fresh.load_state_dict(torch.load(buf))
    for a, e in zip(_outputs(fresh, x), expected):
        assert torch.equal(a, e)
    # the whole module
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    layer = loaded[2]
    assert type(layer) is MCDropoutConv2d and layer.p == 0.3 and layer.mask == "channel" and layer.shared_mask
    for a, e in zip(_outputs(loaded, x), expected):
        assert torch.equal(a, e)
    # deepcopy too
    for a, e in zip(_outputs(copy.deepcopy(model), x), expected):
        assert torch.equal(a, e)


# ---- training -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("inside_sampling", [False, True])
def test_training_step_lenet(inside_sampling):
    model = converted_lenet().train()
    torch.manual_seed(10)
    x = torch.randn(8, 1, 28, 28)
    target = torch.randint(0, 10, (8,))
    before = {n: p_.detach().clone() for n, p_ in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    if inside_sampling:
        S = 3
        with bdlkern.sampling(S, seed=1):
            out = model(x)
        assert out.shape == (S * 8, 10)
        loss = F.cross_entropy(out, target.repeat(S))
    else:
        out = model(x)
        assert out.shape == (8, 10)
        loss = F.cross_entropy(out, target)
    loss.backward()
    for name, prm in model.named_parameters():
        assert prm.grad is not None, name
        assert torch.isfinite(prm.grad).all(), name
        assert prm.grad.abs().sum() > 0, name
    opt.step()
    for name, prm in model.named_parameters():
        assert not torch.equal(prm.detach(), before[name]), name
