"""Concrete dropout (issue 4): the fused relaxed-mask kernels against the pure-PyTorch reference with
the same uniforms, gradients for x and p_logit, registration, statistics, determinism, the
regulariser, the modules, learning the rate, and bad input."""

import math

import pytest
import torch
from torch import nn
from torch.library import opcheck

import bdlkern
from bdlkern.testing import reference as ref

CASES = [  # x shape, channel_dim, p_logit shape
    ((1,), None, ()),
    ((5, 7), None, ()),
    ((5, 7), None, (7,)),
    ((3, 4, 9), None, (9,)),
    ((2, 3, 4, 5), 1, ()),
    ((2, 3, 4, 5), 1, (3,)),
    ((4, 6, 33), 1, (6,)),  # spatial with L > 32: several lane strides in the device kernel
    ((70, 130), None, (130,)),  # ragged channel quads, several row tiles
]


def _cd(channel_dim):
    return -1 if channel_dim is None else channel_dim


def _problem(shape, p_shape, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    p_logit = (torch.randn(p_shape, generator=g, dtype=torch.float64) - 1.0).to(dtype).to(device)
    return x, p_logit


def _reference_grads(x, p_logit, t, channel_dim, state, g):
    xr = x.detach().cpu().double().requires_grad_()
    pr = p_logit.detach().cpu().double().requires_grad_()
    y = ref.concrete_dropout(xr, pr, t, channel_dim=channel_dim, rng_state=state.cpu())
    gx, gp = torch.autograd.grad(y, (xr, pr), g.cpu().double())
    return y.detach(), gx, gp


# ---- kernels against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("shape,channel_dim,p_shape", CASES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_forward_backward_match_reference(backend, shape, channel_dim, p_shape, temperature):
    x, p_logit = _problem(shape, p_shape, seed=len(shape) * 7 + shape[-1], device=backend.device)
    state = backend.tensor([4321 + shape[0], 3], dtype=torch.int64)
    g = torch.randn(shape, dtype=torch.float64).to(backend.device)
    y = backend.ops.concrete_dropout(x, p_logit, state, temperature, _cd(channel_dim))
    gx, gp = backend.ops.concrete_dropout_backward(g, x, p_logit, state, temperature, _cd(channel_dim))
    yr, gxr, gpr = _reference_grads(x, p_logit, temperature, channel_dim, state, g)
    torch.testing.assert_close(y.cpu(), yr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gx.cpu(), gxr, rtol=1e-10, atol=1e-12)
    assert gp.shape == p_logit.shape
    torch.testing.assert_close(gp.cpu(), gpr, rtol=1e-9, atol=1e-10)


# The float32 CPU kernel has three routes: integer 1/t fixed at compile time (t = 1, 0.5, 0.1), an
# integer 1/t read at run time (t = 0.25), and its own vectorised log / exp (t = 0.3).
@pytest.mark.parametrize("shape,channel_dim,p_shape", CASES)
@pytest.mark.parametrize("temperature", [0.1, 0.25, 0.3, 1.0])
def test_float32_matches_reference(backend, shape, channel_dim, p_shape, temperature):
    """float32 kernels vs the float64 reference."""
    x, p_logit = _problem(shape, p_shape, seed=5)
    state = torch.tensor([77, 0])
    g = torch.randn(shape, dtype=torch.float64)
    yr, gxr, gpr = _reference_grads(x, p_logit, temperature, channel_dim, state, g)
    dev = backend.device
    xf, pf, gf, sf = x.float().to(dev), p_logit.float().to(dev), g.float().to(dev), state.to(dev)
    y = backend.ops.concrete_dropout(xf, pf, sf, temperature, _cd(channel_dim))
    gx, gp = backend.ops.concrete_dropout_backward(gf, xf, pf, sf, temperature, _cd(channel_dim))
    assert y.dtype == gx.dtype == gp.dtype == torch.float32
    # t = 0.1 amplifies the float32 rounding of the noise tenfold before the sigmoid.
    torch.testing.assert_close(y.cpu().double(), yr, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gx.cpu().double(), gxr, rtol=1e-4, atol=1e-5)
    scale = max(1.0, gpr.abs().max().item())
    torch.testing.assert_close(gp.cpu().double(), gpr, rtol=1e-4, atol=1e-5 * scale * math.sqrt(x.numel()))


def test_functional_api_and_autograd():
    x, p_logit = _problem((6, 10), (), seed=1)
    x.requires_grad_()
    p_logit.requires_grad_()
    state = torch.tensor([9, 9])
    y = bdlkern.ops.concrete_dropout(x, p_logit, 0.2, rng_state=state)
    yr = ref.concrete_dropout(x, p_logit, 0.2, rng_state=state)
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, p_logit), g), torch.autograd.grad(yr, (x, p_logit), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.manual_seed(3)
    a = bdlkern.ops.concrete_dropout(x, p_logit)
    torch.manual_seed(3)
    assert torch.equal(a, bdlkern.ops.concrete_dropout(x, p_logit))


@pytest.mark.parametrize("shape,channel_dim,p_shape", [c for c in CASES if math.prod(c[0]) <= 200])
def test_gradcheck(shape, channel_dim, p_shape):
    x, p_logit = _problem(shape, p_shape, seed=2)
    state = torch.tensor([5, 1])

    def f(x, p_logit):
        return bdlkern.ops.concrete_dropout(x, p_logit, 0.3, channel_dim=channel_dim, rng_state=state)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), p_logit.requires_grad_()))


def test_gradcheck_through_simt_autograd():
    x, p_logit = _problem((3, 4, 5), (4,), seed=8)
    state = torch.tensor([2, 0])
    ops = torch.ops.bdlkern_simt

    def f(x, p_logit):
        return ops.concrete_dropout(x, p_logit, state, 0.3, 1)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), p_logit.requires_grad_()))


def test_opcheck():
    state = torch.tensor([3, 0])
    for shape, cd, p_shape in [((5, 8), -1, ()), ((5, 8), -1, (8,)), ((2, 3, 4, 4), 1, (3,))]:
        x, p_logit = _problem(shape, p_shape, dtype=torch.float32)
        opcheck(torch.ops.bdlkern.concrete_dropout, (x.requires_grad_(), p_logit.requires_grad_(), state, 0.1, cd))
        opcheck(torch.ops.bdlkern.concrete_dropout_backward, (torch.randn(shape), x.detach(), p_logit.detach(), state, 0.1, cd))


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x, p_logit = _problem((8, 16), (16,), dtype=torch.float32)
    state = torch.tensor([11, 0])

    def f(x, p_logit, state):
        return (bdlkern.ops.concrete_dropout(x, p_logit, 0.1, rng_state=state) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    a = [x.clone().requires_grad_(), p_logit.clone().requires_grad_()]
    e = [x.clone().requires_grad_(), p_logit.clone().requires_grad_()]
    out, out_eager = compiled(*a, state), f(*e, state)
    torch.testing.assert_close(out, out_eager)
    out.backward()
    out_eager.backward()
    for t, r in zip(a, e):
        torch.testing.assert_close(t.grad, r.grad)


# ---- statistics, determinism, extremes -------------------------------------------------------------
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_fraction_tends_to_one_minus_p_as_temperature_falls(p):
    n = 200_000
    x = torch.ones(n, dtype=torch.float64)
    p_logit = torch.tensor(math.log(p / (1 - p)), dtype=torch.float64)
    y = bdlkern.ops.concrete_dropout(x, p_logit, 1e-3, rng_state=torch.tensor([1, 0]))
    keep = y * (1 - p)  # the relaxed mask itself, in [0, 1]
    assert keep.min() >= 0 and keep.max() <= 1 + 1e-12
    assert ((keep < 1e-3) | (keep > 1 - 1e-3)).double().mean() > 0.99  # nearly hard at t = 1e-3
    frac = keep.mean().item()
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    # A warm temperature gives a soft mask with the same mean-ish but many interior values.
    soft = bdlkern.ops.concrete_dropout(x, p_logit, 1.0, rng_state=torch.tensor([1, 0])) * (1 - p)
    assert ((soft > 0.05) & (soft < 0.95)).double().mean() > 0.3


def test_spatial_mask_shared_over_positions():
    x = torch.ones(4, 3, 5, 6, dtype=torch.float64)
    p_logit = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    y = bdlkern.ops.concrete_dropout(x, p_logit, 0.1, channel_dim=1, rng_state=torch.tensor([8, 2]))
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
    assert not torch.equal(y[0, 0], y[1, 0])


def test_deterministic_bits_across_runs_and_thread_counts(threads):
    x, p_logit = _problem((300, 257), (257,), dtype=torch.float32, seed=4)
    xs, ps = _problem((64, 40, 9, 9), (), dtype=torch.float32, seed=5)
    state = torch.tensor([12, 34])
    results = []
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        for ns in ("bdlkern", "bdlkern_simt"):
            ops = getattr(torch.ops, ns)
            results.append(
                (
                    ns,
                    ops.concrete_dropout(x, p_logit, state, 0.1, -1),
                    *ops.concrete_dropout_backward(x.cos(), x, p_logit, state, 0.1, -1),
                    *ops.concrete_dropout_backward(xs.sin(), xs, ps, state, 0.1, 1),
                )
            )
    for ns in ("bdlkern", "bdlkern_simt"):
        runs = [r[1:] for r in results if r[0] == ns]
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b), ns  # the p_logit gradient too: same bits


def test_extreme_logits_finite():
    x = torch.randn(64, 32)
    for logit in (-30.0, 30.0):
        for dtype in (torch.float32, torch.float64):
            p_logit = torch.tensor(logit, dtype=dtype, requires_grad=True)
            xd = x.to(dtype).requires_grad_()
            for t in (0.1, 1e-3):
                y = bdlkern.ops.concrete_dropout(xd, p_logit, t, rng_state=torch.tensor([1, 1]))
                gx, gp = torch.autograd.grad(y.sum(), (xd, p_logit))
                assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gp).all()
    # p -> 0 keeps everything unchanged.
    y = bdlkern.ops.concrete_dropout(x, torch.tensor(-30.0), 0.1, rng_state=torch.tensor([1, 1]))
    torch.testing.assert_close(y, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.1, 1e-3])
def test_rate_near_one_drops_everything(dtype, temperature):
    """p -> 1 (p_logit = 30: p = 1 - 9e-14, which rounds to 1 in float32): the relaxed mask drops
    every element, so the output and its gradient in x vanish (below 1e-20 of x), and the p_logit
    gradient stays finite. (Far beyond, the eps of the relaxation caps the drop logit at
    log(1 / eps) while 1 / (1 - p) keeps growing, so the output is not 0 for any logit.)"""
    x = torch.randn(64, 32, dtype=dtype, requires_grad=True)
    p_logit = torch.tensor(30.0, dtype=dtype, requires_grad=True)
    y = bdlkern.ops.concrete_dropout(x, p_logit, temperature, rng_state=torch.tensor([1, 1]))
    g = torch.randn_like(y)
    gx, gp = torch.autograd.grad(y, (x, p_logit), g)
    for t in (y, gx, gp):
        assert torch.isfinite(t).all()
    assert y.abs().max() <= 1e-20 * x.abs().max()
    assert gx.abs().max() <= 1e-20
    # The hard masks of MC inference drop everything too: every sample is the bias alone.
    for per_feature in (False, True):  # the fused MC-dropout kernel / the concrete stream's uniforms
        layer = bdlkern.nn.ConcreteDropoutLinear(32, 5, per_feature=per_feature, dtype=dtype).eval()
        with torch.no_grad():
            layer.p_logit.fill_(30.0)
        with bdlkern.sampling(6, seed=2):
            ys = layer(x.detach())
        assert ys.shape == (6, 64, 5)
        torch.testing.assert_close(ys, layer.bias.detach().expand_as(ys), rtol=0, atol=0)


def test_saves_only_x_and_constants_for_backward():
    """Saved activations: x itself plus O(1) (p_logit, rng_state), never a mask or noise tensor."""
    x = torch.randn(64, 256, requires_grad=True)
    p_logit = torch.tensor(-1.0, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = bdlkern.ops.concrete_dropout(x, p_logit, 0.1)
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr())
    assert any(t.data_ptr() == x.data_ptr() for t in saved)
    assert extra <= 64, f"saved {extra} bytes besides x"
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        ref.concrete_dropout(x, p_logit, 0.1)
    assert sum(t.numel() * t.element_size() for t in saved) > 4 * x.numel() * 4  # the reference keeps much more
    y.sum().backward()


def test_empty_input():
    x = torch.randn(0, 5, requires_grad=True)
    p_logit = torch.tensor(0.0, requires_grad=True)
    y = bdlkern.ops.concrete_dropout(x, p_logit)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert x.grad.shape == (0, 5) and p_logit.grad.item() == 0.0


def test_non_contiguous_input():
    base = torch.randn(9, 12, dtype=torch.float64)
    x = base.t()
    p_logit = torch.tensor(-1.0, dtype=torch.float64)
    state = torch.tensor([3, 3])
    torch.testing.assert_close(
        bdlkern.ops.concrete_dropout(x, p_logit, 0.1, rng_state=state),
        ref.concrete_dropout(x, p_logit, 0.1, rng_state=state),
        rtol=1e-10,
        atol=1e-12,
    )


# ---- the regulariser ----------------------------------------------------------------------------------
def test_regularizer_against_formula():
    w = torch.randn(7, 5, dtype=torch.float64)
    for logit in (-3.0, 0.0, 2.0):
        p_logit = torch.tensor(logit, dtype=torch.float64)
        got = bdlkern.ops.concrete_dropout_regularizer(w, p_logit, 5, 1e-2, 1e-1)
        p = 1 / (1 + math.exp(-logit))
        expected = 1e-2 * (w**2).sum().item() / (1 - p) + 1e-1 * 5 * (p * math.log(p) + (1 - p) * math.log(1 - p))
        assert got.item() == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(got, ref.concrete_dropout_regularizer(w, p_logit, 5, 1e-2, 1e-1))
    # One rate per feature: equal rates reproduce the scalar formula; gradients flow to both.
    per = torch.full((5,), 0.7, dtype=torch.float64, requires_grad=True)
    wg = w.clone().requires_grad_()
    r = bdlkern.ops.concrete_dropout_regularizer(wg, per, 5, 1e-2, 1e-1)
    torch.testing.assert_close(r, bdlkern.ops.concrete_dropout_regularizer(w, torch.tensor(0.7, dtype=torch.float64), 5, 1e-2, 1e-1))
    r.backward()
    assert per.grad.abs().sum() > 0 and wg.grad.abs().sum() > 0
    # Extreme logits: finite (0 log 0 = 0).
    assert torch.isfinite(bdlkern.ops.concrete_dropout_regularizer(w, torch.tensor(-60.0, dtype=torch.float64), 5, 1.0, 1.0))


# ---- modules -----------------------------------------------------------------------------------------
def test_linear_module_training_eval_and_regularization():
    torch.manual_seed(0)
    layer = bdlkern.nn.ConcreteDropoutLinear(6, 4, init_p=0.2, temperature=0.1, weight_regularizer=1e-3, dropout_regularizer=1e-2)
    assert layer.p.item() == pytest.approx(0.2)
    assert set(layer.state_dict()) == {"weight", "bias", "p_logit"}
    x = torch.randn(5, 6)
    torch.manual_seed(7)
    y = layer.train()(x)
    torch.manual_seed(7)
    state = bdlkern.ops.new_rng_state()
    expected = torch.nn.functional.linear(ref.concrete_dropout(x, layer.p_logit, 0.1, rng_state=state), layer.weight, layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    reg = layer.regularization()
    p = layer.p
    expected_reg = 1e-3 * (layer.weight**2).sum() / (1 - p) + 1e-2 * 6 * (p * p.log() + (1 - p) * (1 - p).log()) + 1e-3 * (layer.bias**2).sum()
    torch.testing.assert_close(reg, expected_reg)
    assert "p=0.2" in repr(layer)


def test_sampling_uses_hard_masks_through_the_mc_kernel():
    layer = bdlkern.nn.ConcreteDropoutLinear(8, 3, init_p=0.3).eval()
    x = torch.randn(4, 8)
    with bdlkern.sampling(6, seed=5):
        y = layer(x)
    assert y.shape == (6, 4, 3)
    state = torch.tensor([5, 0])  # the first seeded call of the block (bdlkern._sampling)
    p = layer.p.item()
    expected = ref.mc_dropout_linear(x, layer.weight, layer.bias, p, 6, rng_state=state)
    torch.testing.assert_close(y, expected.detach())
    # relaxed_eval reproduces the notebooks: relaxed masks, also outside sampling.
    relaxed = bdlkern.nn.ConcreteDropoutLinear(8, 3, init_p=0.3, relaxed_eval=True).eval()
    assert not torch.equal(relaxed(x), relaxed(x))
    with bdlkern.sampling(6, seed=5):
        assert relaxed(x).shape == (6, 4, 3)


def _hard_reference(x, p_logit, rng_state, channel_dim=None):
    """The hard MC masks of the Concrete modules rebuilt from ``rng_state``: the uniforms of the
    concrete stream (``bdlkern.testing.reference.uniform``, one per mask element: per element of x, or per
    (row, channel) with a spatial mask), an element kept iff u >= p and scaled by 1 / (1 - p)."""
    p = torch.sigmoid(p_logit.detach())
    if channel_dim == 1:
        mask_shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
        p = p.reshape(-1, *([1] * (x.dim() - 2))) if p.dim() == 1 else p
    else:
        mask_shape = tuple(x.shape)
    u = ref.uniform(rng_state, mask_shape, stream=bdlkern.ops.STREAMS["concrete_dropout"], dtype=x.dtype)
    keep = u >= p
    assert 0.2 < keep.double().mean() < 0.95, "the rates must drop some elements and keep others"
    return torch.where(keep, x / (1 - p), torch.zeros((), dtype=x.dtype))


def _spread_rates(*modules):
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in modules:
            m.p_logit.copy_(torch.rand(m.p_logit.shape, generator=g) * 2.0 - 2.0)  # p in (0.12, 0.5)


def test_hard_masks_of_per_feature_rates_match_the_reference():
    """Inside sampling, per-feature rates (no fused kernel) draw hard masks from the concrete
    stream: the first layer of the pass with rng_state [seed, 0], the next with [seed, 1 << 40]."""
    torch.manual_seed(3)
    first = bdlkern.nn.ConcreteDropoutLinear(8, 6, per_feature=True)
    second = bdlkern.nn.ConcreteDropout(nn.Linear(6, 3), per_feature=True)
    _spread_rates(first, second)
    model = nn.Sequential(first, nn.ReLU(), second).eval()
    x = torch.randn(7, 8)
    S, seed = 5, 9
    with bdlkern.sampling(S, seed=seed):
        y = model(x)
    h = nn.functional.linear(_hard_reference(x.expand(S, 7, 8), first.p_logit, torch.tensor([seed, 0])), first.weight, first.bias)
    dropped = _hard_reference(h.relu(), second.p_logit, torch.tensor([seed, 1 << 40]))
    expected = second.layer(dropped)
    assert y.shape == (S, 7, 3)
    torch.testing.assert_close(y, expected.detach())


def _mc_conv_reference(x, p_logit, rng_state, S, has_samples):
    """The fused path of a ConcreteDropout2d with one rate inside sampling: the MC-dropout conv
    op's channel masks (stream "mc_dropout", one flag per (row, channel) of the folded input, kept
    iff the word is below the integer threshold of keep = 1 - p) on the input repeated S times."""
    p = float(torch.sigmoid(p_logit.detach()))
    xs = x if has_samples else x.repeat(S, *([1] * (x.dim() - 1)))
    keep = bdlkern.ops.dropout_mask(list(xs.shape[:2]), p, rng_state=rng_state, stream="mc_dropout")
    assert 0.2 < keep.double().mean() < 0.95, "the rates must drop some channels and keep others"
    return xs * keep.reshape(*keep.shape, *([1] * (xs.dim() - 2))).to(xs.dtype) / (1 - p)


@pytest.mark.parametrize("per_feature", [False, True])
def test_hard_spatial_masks_of_conv_rates_match_the_reference(per_feature):
    """ConcreteDropout2d inside sampling: one hard mask value per (sample, image, channel) with one
    rate or one per channel, for the first layer of the pass and a later one; the samples are
    folded into the batch, sample-major (the conv layout of bdlkern._sampling). One rate runs the
    fused MC-dropout conv op (its mask stream); rates per channel mask the repeated input with the
    concrete stream's uniforms."""
    torch.manual_seed(5)
    first = bdlkern.nn.ConcreteDropout2d(nn.Conv2d(3, 4, 3, padding=1), per_feature=per_feature)
    second = bdlkern.nn.ConcreteDropout2d(nn.Conv2d(4, 2, 3), per_feature=per_feature)
    _spread_rates(first, second)
    model = nn.Sequential(first, nn.ReLU(), second).eval()
    img = torch.randn(6, 3, 7, 7)
    S, seed = 4, 21
    with bdlkern.sampling(S, seed=seed):
        y = model(img)
    states = torch.tensor([seed, 0]), torch.tensor([seed, 1 << 40])
    if per_feature:
        flat = img.expand(S, *img.shape).reshape(S * 6, 3, 7, 7)  # samples folded into the batch
        h = first.layer(_hard_reference(flat, first.p_logit, states[0], channel_dim=1)).relu()
        expected = second.layer(_hard_reference(h, second.p_logit, states[1], channel_dim=1))
    else:
        h = first.layer(_mc_conv_reference(img, first.p_logit, states[0], S, False)).relu()
        expected = second.layer(_mc_conv_reference(h, second.p_logit, states[1], S, True))
    assert y.shape == (S * 6, 2, 5, 5)
    torch.testing.assert_close(y, expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bdlkern.unfold_samples(y, S), expected.reshape(S, 6, 2, 5, 5).detach(), rtol=1e-5, atol=1e-5)


def test_wrapper_on_linear_and_conv2d():
    torch.manual_seed(1)
    lin = nn.Linear(5, 3)
    wrapped = bdlkern.nn.ConcreteDropout(lin, init_p=0.25, per_feature=True)
    assert wrapped.p.shape == (5,) and wrapped.input_dim == 5
    x = torch.randn(7, 5)
    y = wrapped.train()(x)
    assert y.shape == (7, 3)
    y.sum().backward()
    assert wrapped.p_logit.grad.shape == (5,) and lin.weight.grad is not None

    conv = nn.Conv2d(3, 4, 3, padding=1)
    spatial = bdlkern.nn.ConcreteDropout2d(conv, init_p=0.4)
    assert spatial.channel_dim == 1 and spatial.input_dim == 3
    img = torch.randn(2, 3, 6, 6)
    torch.manual_seed(2)
    out = spatial.train()(img)
    torch.manual_seed(2)
    state = bdlkern.ops.new_rng_state()
    expected = conv(ref.concrete_dropout(img, spatial.p_logit, 0.1, channel_dim=1, rng_state=state))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with bdlkern.sampling(4, seed=0):
        mc = spatial.eval()(img)
    assert mc.shape == (4 * 2, 4, 6, 6)  # the samples folded into the batch
    # regularization(model) sums every term of a model.
    model = nn.Sequential(wrapped, nn.ReLU())
    total = bdlkern.nn.regularization(nn.ModuleList([model, spatial]))
    torch.testing.assert_close(total, wrapped.regularization() + spatial.regularization())
    with pytest.raises(TypeError, match="expected an nn.Conv2d"):
        bdlkern.nn.ConcreteDropout2d(lin)


def test_learned_rate_rises_for_noisy_input_and_falls_for_clean_one():
    """Two inputs feed one regression target: the useful one's rate falls, the noise's rises."""
    torch.manual_seed(0)
    n = 512
    signal = torch.randn(n, 4)
    noise = torch.randn(n, 4)
    target = signal @ torch.tensor([1.0, -2.0, 0.5, 1.5])
    clean = bdlkern.nn.ConcreteDropoutLinear(4, 1, init_p=0.2, weight_regularizer=1e-4, dropout_regularizer=2.0)
    noisy = bdlkern.nn.ConcreteDropoutLinear(4, 1, init_p=0.2, weight_regularizer=1e-4, dropout_regularizer=2.0)
    params = list(clean.parameters()) + list(noisy.parameters())
    opt = torch.optim.Adam(params, lr=3e-2)
    for _ in range(300):
        opt.zero_grad()
        pred = clean(signal) + noisy(noise)
        loss = ((pred.squeeze(-1) - target) ** 2).mean() + (clean.regularization() + noisy.regularization()) / n
        loss.backward()
        opt.step()
    assert clean.p.item() < 0.1 < 0.2 < noisy.p.item()


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_messages():
    x = torch.randn(4, 6)
    st = torch.tensor([1, 1])
    f = bdlkern.ops.concrete_dropout
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        f(x, torch.tensor(0.0), 0.0, rng_state=st)
    with pytest.raises(RuntimeError, match="temperature must be a finite number > 0"):
        torch.ops.bdlkern.concrete_dropout(x, torch.tensor(0.0), st, -1.0, -1)
    with pytest.raises(RuntimeError, match=r"p_logit must be a scalar .* or have shape \[6\]"):
        f(x, torch.zeros(4), rng_state=st)
    with pytest.raises(RuntimeError, match="p_logit must have the dtype of x"):
        f(x, torch.tensor(0.0, dtype=torch.float64), rng_state=st)
    with pytest.raises(RuntimeError, match="p_logit must be on x's device"):
        torch.ops.bdlkern.concrete_dropout(x, torch.tensor(0.0, device="meta"), st, 0.1, -1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="p_logit must be finite"):
            f(x, torch.tensor(bad), rng_state=st)
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        f(x.bfloat16(), torch.tensor(0.0, dtype=torch.bfloat16), rng_state=st)
    with pytest.raises(ValueError, match="channel_dim must be"):
        f(torch.randn(2, 3, 4, 5), torch.tensor(0.0), channel_dim=2, rng_state=st)
    with pytest.raises(RuntimeError, match=r"p_logit must be a scalar .* or have shape \[3\]"):
        f(torch.randn(2, 3, 4), torch.zeros(4), channel_dim=1, rng_state=st)
    with pytest.raises(RuntimeError, match="rng_state must be an int64"):
        f(x, torch.tensor(0.0), rng_state=torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="grad_out must have x's shape"):
        torch.ops.bdlkern.concrete_dropout_backward(torch.randn(3, 6), x, torch.tensor(0.0), st, 0.1, -1)
    with pytest.raises(ValueError, match=r"init_p must be in \(0, 1\)"):
        bdlkern.nn.ConcreteDropoutLinear(3, 3, init_p=1.0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        bdlkern.nn.ConcreteDropoutLinear(3, 3, temperature=0.0)
    with pytest.raises(TypeError, match="cannot tell the input dimension"):
        bdlkern.nn.ConcreteDropout(nn.ReLU())
    with pytest.raises(ValueError, match="input_dim must be an int >= 1"):
        bdlkern.ops.concrete_dropout_regularizer(torch.randn(3, 3), torch.tensor(0.0), 0, 1.0, 1.0)
