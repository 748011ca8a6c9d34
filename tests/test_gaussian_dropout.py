"""Gaussian dropout (Kingma, Salimans & Welling 2015): the fused multiplicative-noise kernels against
a pure-PyTorch reference with the same noise, gradients for x and log_alpha, registration
(opcheck, torch.compile, double backward), determinism, statistics, NaN propagation, bad input,
the GaussianDropout module in every regime, serialisation and ONNX export.

The independent reference: ``x * (1 + exp(0.5 * log_alpha) * eps)`` in PyTorch, with ``eps`` the
``normal`` op of the same backend on stream ``"gaussian_dropout"`` (element ``i`` of the flattened
noise: the element index, or ``n * C + c`` with ``channel_dim=1``), and the NumPy Philox oracle of
``bdlkern.testing.reference`` for a check that shares no code with the kernels.
"""

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.library import opcheck

import bdlkern
from bdlkern.testing import reference as ref

STREAM = bdlkern.ops.STREAMS["gaussian_dropout"]

CASES = [  # x shape, channel_dim, log_alpha shape
    ((1,), -1, ()),
    ((5, 7), -1, ()),
    ((5, 7), -1, (7,)),
    ((3, 4, 9), -1, (9,)),
    ((2, 3, 4, 5), 1, ()),
    ((2, 3, 4, 5), 1, (3,)),
    ((4, 6, 33), 1, (6,)),  # spatial with L > 32: several lane strides in the device kernel
    ((70, 130), -1, (130,)),  # ragged channel quads, several row tiles
    ((600, 6), -1, ()),  # C % 4 != 0 over many rows: noise blocks straddle rows
    ((0, 5), -1, (5,)),  # empty
    ((3, 0), -1, ()),  # empty, no features
    ((2, 4, 0), 1, (4,)),  # empty spatial
]


def _problem(shape, la_shape, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    log_alpha = (torch.rand(la_shape, generator=g, dtype=torch.float64) * 3 - 2.5).to(dtype).to(device)
    return x, log_alpha


def _noise_shape(shape, channel_dim):
    return tuple(shape) if channel_dim == -1 else tuple(shape[:2]) + (1,) * (len(shape) - 2)


def _eps(backend, state, shape, channel_dim, dtype):
    """The noise from the `normal` op of the same backend, in the op's noise layout."""
    noise = _noise_shape(shape, channel_dim)
    return backend.ops.normal(state, [math.prod(noise)], STREAM, dtype).reshape(noise)


def _reference(x, log_alpha, eps, channel_dim):
    rate = log_alpha.reshape(-1, *([1] * (x.dim() - 2))) if channel_dim == 1 and log_alpha.dim() == 1 else log_alpha
    return x * (1 + torch.exp(0.5 * rate) * eps)


def _reference_grads(x, log_alpha, eps, channel_dim, g):
    xr = x.detach().double().requires_grad_()
    lr = log_alpha.detach().double().requires_grad_()
    y = _reference(xr, lr, eps.double(), channel_dim)
    gx, gl = torch.autograd.grad(y, (xr, lr), g.double(), allow_unused=True)
    return y.detach(), gx, (torch.zeros_like(lr) if gl is None else gl)


# ---- kernels against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,channel_dim,la_shape", CASES)
def test_forward_backward_match_reference(backend, shape, channel_dim, la_shape, dtype):
    x, log_alpha = _problem(shape, la_shape, dtype, seed=len(shape) * 7 + shape[-1], device=backend.device)
    state = backend.tensor([4321 + shape[0], 3], dtype=torch.int64)
    g = torch.randn(shape, dtype=torch.float64).to(dtype).to(backend.device)
    y = backend.ops.gaussian_dropout(x, log_alpha, state, channel_dim)
    gx, gl = backend.ops.gaussian_dropout_backward(g, x, log_alpha, state, channel_dim)
    assert y.shape == gx.shape == x.shape and gl.shape == log_alpha.shape
    assert y.dtype == gx.dtype == gl.dtype == dtype
    eps = _eps(backend, state, shape, channel_dim, dtype)
    # Forward: the formula in PyTorch in the same dtype, with the same eps.
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(y, _reference(x, log_alpha, eps, channel_dim), **tol)
    # Gradients: autograd through the reference (float64) with the same eps.
    yr, gxr, glr = _reference_grads(x.cpu(), log_alpha.cpu(), eps.cpu(), channel_dim, g.cpu())
    if dtype == torch.float64:
        torch.testing.assert_close(gx.cpu(), gxr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gl.cpu(), glr, rtol=1e-10, atol=1e-10)
    else:
        torch.testing.assert_close(gx.cpu().double(), gxr, rtol=1e-5, atol=1e-5)
        scale = max(1.0, glr.abs().max().item())
        torch.testing.assert_close(gl.cpu().double(), glr, rtol=1e-4, atol=1e-5 * scale * math.sqrt(max(x.numel(), 1)))


@pytest.mark.parametrize("shape,channel_dim,la_shape", [c for c in CASES if math.prod(c[0]) > 0])
def test_forward_matches_the_numpy_oracle(backend, shape, channel_dim, la_shape):
    """eps rebuilt from the NumPy Philox (no shared code with the kernels): the kernels draw the
    documented element of the documented stream."""
    x, log_alpha = _problem(shape, la_shape, seed=3, device=backend.device)
    state = torch.tensor([987654321, 17])
    y = backend.ops.gaussian_dropout(x, log_alpha, state.to(backend.device), channel_dim)
    expected = ref.gaussian_dropout(x.cpu(), log_alpha.cpu(), channel_dim=channel_dim, rng_state=state)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-10, atol=1e-12)
    # A different offset is different noise (the check can fail).
    other = ref.gaussian_dropout(x.cpu(), log_alpha.cpu(), channel_dim=channel_dim, rng_state=state + torch.tensor([0, 1]))
    assert not torch.allclose(y.cpu(), other)


def test_simt_equals_cpu():
    """The CUDA source (SIMT) and the CPU kernel: float64 to rounding; float32 to the few ulp that
    the CPU's vectorised Box-Muller differs from libm's."""
    for shape, cd, la_shape in CASES:
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
            x, log_alpha = _problem(shape, la_shape, dtype, seed=11)
            g = torch.randn(shape, dtype=torch.float64).to(dtype)
            state = torch.tensor([5, 6])
            outs = [
                (ops.gaussian_dropout(x, log_alpha, state, cd), *ops.gaussian_dropout_backward(g, x, log_alpha, state, cd))
                for ops in (torch.ops.bdlkern, torch.ops.bdlkern_simt)
            ]
            for a, b in zip(*outs):
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * math.sqrt(max(x.numel(), 1)))


def test_non_contiguous_inputs(backend):
    base = torch.randn(9, 12, dtype=torch.float64, device=backend.device)
    x = base.t()  # [12, 9], strided
    log_alpha = torch.randn(18, dtype=torch.float64, device=backend.device)[::2]  # [9], stride 2
    state = backend.tensor([3, 4])
    g = torch.randn(9, 12, dtype=torch.float64, device=backend.device).t()
    assert not x.is_contiguous() and not log_alpha.is_contiguous() and not g.is_contiguous()
    y = backend.ops.gaussian_dropout(x, log_alpha, state, -1)
    torch.testing.assert_close(y, backend.ops.gaussian_dropout(x.contiguous(), log_alpha.contiguous(), state, -1), rtol=0, atol=0)
    for a, b in zip(
        backend.ops.gaussian_dropout_backward(g, x, log_alpha, state, -1),
        backend.ops.gaussian_dropout_backward(g.contiguous(), x.contiguous(), log_alpha.contiguous(), state, -1),
    ):
        assert torch.equal(a, b)
    # channels-last images with per-channel noise
    img = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=backend.device).to(memory_format=torch.channels_last)
    la = torch.randn(3, dtype=torch.float64, device=backend.device)
    assert torch.equal(backend.ops.gaussian_dropout(img, la, state, 1), backend.ops.gaussian_dropout(img.contiguous(), la, state, 1))


# ---- the functional API, autograd, registration -------------------------------------------------------
def test_functional_api_and_autograd():
    x, log_alpha = _problem((6, 10), (10,), seed=1)
    x.requires_grad_()
    log_alpha.requires_grad_()
    state = torch.tensor([9, 9])
    y = bdlkern.ops.gaussian_dropout(x, log_alpha, rng_state=state)
    eps = bdlkern.ops.normal((6, 10), dtype=torch.float64, rng_state=state, stream="gaussian_dropout")
    yr = x * (1 + log_alpha.mul(0.5).exp() * eps)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, log_alpha), g), torch.autograd.grad(yr, (x, log_alpha), g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.manual_seed(3)
    a = bdlkern.ops.gaussian_dropout(x, log_alpha)
    torch.manual_seed(3)
    assert torch.equal(a, bdlkern.ops.gaussian_dropout(x, log_alpha))
    assert not torch.equal(a, bdlkern.ops.gaussian_dropout(x, log_alpha))  # a fresh draw
    # channel_dim = x.dim() - 1 means -1; channel_dim=1 is spatial
    torch.testing.assert_close(
        bdlkern.ops.gaussian_dropout(x, log_alpha, channel_dim=1, rng_state=state),
        bdlkern.ops.gaussian_dropout(x, log_alpha, channel_dim=-1, rng_state=state),
    )


def test_only_x_log_alpha_and_rng_state_are_saved():
    x, log_alpha = _problem((64, 32), (), seed=2)
    x.requires_grad_()
    log_alpha.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bdlkern.ops.gaussian_dropout(x, log_alpha, rng_state=torch.tensor([1, 2]))
    assert len(saved) == 3
    assert {tuple(t.shape) for t in saved} == {(64, 32), (), (2,)}


@pytest.mark.parametrize("shape,channel_dim,la_shape", [c for c in CASES if 0 < math.prod(c[0]) <= 200])
def test_gradcheck(shape, channel_dim, la_shape):
    x, log_alpha = _problem(shape, la_shape, seed=2)
    state = torch.tensor([5, 1])

    def f(x, log_alpha):
        return bdlkern.ops.gaussian_dropout(x, log_alpha, channel_dim=channel_dim, rng_state=state)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), log_alpha.requires_grad_()))


def test_gradcheck_and_gradgradcheck_on_the_backends(backend):
    for shape, cd, la_shape in [((3, 4), -1, ()), ((3, 4), -1, (4,)), ((2, 3, 2, 2), 1, (3,))]:
        x, log_alpha = _problem(shape, la_shape, seed=8, device=backend.device)
        state = backend.tensor([2, 0])

        def f(a, q):
            return backend.ops.gaussian_dropout(a, q, state, cd)

        args = (x.requires_grad_(), log_alpha.requires_grad_())
        assert torch.autograd.gradcheck(f, args)
        assert torch.autograd.gradgradcheck(f, args)  # the composite double backward


def test_second_derivative_matches_the_reference():
    """d/dlog_alpha of a function of dL/dx (a gradient penalty): the composite double backward
    against autograd of the reference formula with the same eps."""
    x, log_alpha = _problem((8, 5), (), seed=4)
    state = torch.tensor([7, 7])
    eps = bdlkern.ops.normal((8, 5), dtype=torch.float64, rng_state=state, stream="gaussian_dropout")
    results = []
    for fn in (
        lambda a, q: bdlkern.ops.gaussian_dropout(a, q, rng_state=state),
        lambda a, q: _reference(a, q, eps, -1),
    ):
        a, q = x.clone().requires_grad_(), log_alpha.clone().requires_grad_()
        (gx,) = torch.autograd.grad(fn(a, q).sin().sum(), (a,), create_graph=True)
        results.append(torch.autograd.grad(gx.square().sum(), (q,))[0])
    assert results[1].abs() > 0.1
    torch.testing.assert_close(results[0], results[1])


def test_opcheck():
    state = torch.tensor([3, 0])
    for shape, cd, la_shape in [((5, 8), -1, ()), ((5, 8), -1, (8,)), ((2, 3, 4, 4), 1, (3,))]:
        x, log_alpha = _problem(shape, la_shape, dtype=torch.float32)
        opcheck(torch.ops.bdlkern.gaussian_dropout, (x.requires_grad_(), log_alpha.requires_grad_(), state, cd))
        opcheck(torch.ops.bdlkern.gaussian_dropout_backward, (torch.randn(shape), x.detach(), log_alpha.detach(), state, cd))


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x, log_alpha = _problem((8, 16), (16,), dtype=torch.float32)
    state = torch.tensor([11, 0])

    def f(x, log_alpha, state):
        return (bdlkern.ops.gaussian_dropout(x, log_alpha, rng_state=state) ** 2).sum()

    compiled = torch.compile(f, fullgraph=True)
    a = [x.clone().requires_grad_(), log_alpha.clone().requires_grad_()]
    e = [x.clone().requires_grad_(), log_alpha.clone().requires_grad_()]
    out, out_eager = compiled(*a, state), f(*e, state)
    torch.testing.assert_close(out, out_eager)
    out.backward()
    out_eager.backward()
    for t, r in zip(a, e):
        torch.testing.assert_close(t.grad, r.grad)


def test_autocast_runs_in_float32():
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    log_alpha = torch.tensor(-1.0)
    state = torch.tensor([1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.ops.bdlkern.gaussian_dropout(x, log_alpha.bfloat16(), state, -1)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.ops.bdlkern.gaussian_dropout(x.float(), log_alpha, state, -1))


# ---- determinism, statistics, NaN ---------------------------------------------------------------------
def test_deterministic_bits_across_runs_and_thread_counts(threads):
    x, log_alpha = _problem((300, 257), (257,), dtype=torch.float32, seed=4)
    # spatial: several CPU tiles; a smaller problem for the (slow) emulated warp shuffles
    spatial = {"bdlkern": (64, 40, 9, 9), "bdlkern_simt": (8, 24, 3, 3)}
    state = torch.tensor([12, 34])
    results = []
    for n in (1, 2, 1):
        torch.set_num_threads(n)
        for ns in ("bdlkern", "bdlkern_simt"):
            ops = getattr(torch.ops, ns)
            xs, ls = _problem(spatial[ns], (), dtype=torch.float32, seed=5)
            xc, lc = _problem(spatial[ns], (spatial[ns][1],), dtype=torch.float32, seed=6)
            results.append(
                (
                    ns,
                    ops.gaussian_dropout(x, log_alpha, state, -1),
                    *ops.gaussian_dropout_backward(x.cos(), x, log_alpha, state, -1),
                    *ops.gaussian_dropout_backward(x.sin(), x, log_alpha[0], state, -1),
                    *ops.gaussian_dropout_backward(xs.sin(), xs, ls, state, 1),
                    *ops.gaussian_dropout_backward(xc.cos(), xc, lc, state, 1),
                )
            )
    for ns in ("bdlkern", "bdlkern_simt"):
        runs = [r[1:] for r in results if r[0] == ns]
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b), ns  # the log_alpha gradients too: same bits


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_noise_moments(p):
    """y / x - 1 = sqrt(alpha) eps: mean 0 and variance alpha = p / (1 - p) (Bernoulli dropout's)."""
    n = 200_000
    alpha = p / (1 - p)
    y = bdlkern.ops.gaussian_dropout(torch.ones(n, dtype=torch.float64), torch.tensor(math.log(alpha), dtype=torch.float64),
                                     rng_state=torch.tensor([1, 0]))
    z = y - 1
    assert abs(z.mean().item()) < 5 * math.sqrt(alpha / n)
    assert abs(z.var().item() / alpha - 1) < 5 * math.sqrt(2 / n)


def test_spatial_noise_shared_over_positions():
    x = torch.ones(4, 3, 5, 6, dtype=torch.float64)
    y = bdlkern.ops.gaussian_dropout(x, torch.tensor([-2.0, 0.0, 1.0], dtype=torch.float64), channel_dim=1,
                                     rng_state=torch.tensor([8, 2]))
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
    assert not torch.equal(y[0, 0], y[1, 0])


def test_nan_propagates_on_every_backend(backend):
    """No value checks (no host sync on CUDA): a NaN log_alpha makes y and the gradients NaN; a NaN
    in x makes its own element NaN and the log_alpha gradient NaN. Documented in the op's docstring."""
    x = torch.randn(4, 6, dtype=torch.float64, device=backend.device)
    state = backend.tensor([1, 2])
    g = torch.ones_like(x)
    nan_rate = torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0, 0.0], dtype=torch.float64, device=backend.device)
    y = backend.ops.gaussian_dropout(x, nan_rate, state, -1)
    assert y[:, 1].isnan().all() and not y[:, [0, 2, 3, 4, 5]].isnan().any()
    gx, gl = backend.ops.gaussian_dropout_backward(g, x, nan_rate, state, -1)
    assert gx[:, 1].isnan().all() and gl[1].isnan() and not gl[[0, 2, 3, 4, 5]].isnan().any()
    y = backend.ops.gaussian_dropout(x, torch.tensor(float("nan"), dtype=torch.float64, device=backend.device), state, -1)
    assert y.isnan().all()
    xn = x.clone()
    xn[2, 3] = float("nan")
    y = backend.ops.gaussian_dropout(xn, torch.tensor(-1.0, dtype=torch.float64, device=backend.device), state, -1)
    assert y.isnan().sum() == 1 and y[2, 3].isnan()
    gx, gl = backend.ops.gaussian_dropout_backward(g, xn, torch.tensor(-1.0, dtype=torch.float64, device=backend.device), state, -1)
    assert not gx.isnan().any() and gl.isnan()
    # -inf log_alpha: alpha = 0, no noise: the identity
    ninf = torch.tensor(float("-inf"), dtype=torch.float64, device=backend.device)
    assert torch.equal(backend.ops.gaussian_dropout(x, ninf, state, -1), x)


def test_bad_input_messages():
    x = torch.randn(3, 4)
    st = torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="x must be float32 or float64"):
        torch.ops.bdlkern.gaussian_dropout(x.int(), torch.tensor(0), st, -1)
    with pytest.raises(RuntimeError, match="log_alpha must have the dtype of x"):
        torch.ops.bdlkern.gaussian_dropout(x, torch.tensor(0.0, dtype=torch.float64), st, -1)
    with pytest.raises(RuntimeError, match=r"log_alpha must be a scalar .* or have shape \[4\]"):
        bdlkern.ops.gaussian_dropout(x, torch.zeros(3), rng_state=st)
    with pytest.raises(RuntimeError, match=r"log_alpha must be a scalar .* or have shape \[3\] \(one alpha per channel\)"):
        bdlkern.ops.gaussian_dropout(torch.randn(2, 3, 5), torch.zeros(5), channel_dim=1, rng_state=st)
    with pytest.raises(ValueError, match="channel_dim must be"):
        bdlkern.ops.gaussian_dropout(torch.randn(2, 3, 5, 5), torch.tensor(0.0), channel_dim=2, rng_state=st)
    with pytest.raises(RuntimeError, match="channel_dim must be -1"):
        torch.ops.bdlkern.gaussian_dropout(x, torch.tensor(0.0), st, 0)
    with pytest.raises(RuntimeError, match="rng_state must have shape"):
        bdlkern.ops.gaussian_dropout(x, torch.tensor(0.0), rng_state=torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match="x must have at least one dimension"):
        torch.ops.bdlkern.gaussian_dropout(torch.tensor(1.0), torch.tensor(0.0), st, -1)


# ---- the module -----------------------------------------------------------------------------------------
G = bdlkern.nn.GaussianDropout


def test_module_training_is_the_op_with_a_fresh_state():
    layer = G(0.3)
    x = torch.randn(5, 8)
    torch.manual_seed(4)
    y = layer(x)
    torch.manual_seed(4)
    state = bdlkern.ops.new_rng_state()
    eps = bdlkern.ops.normal((5, 8), rng_state=state, stream="gaussian_dropout")
    torch.testing.assert_close(y, x * (1 + math.sqrt(0.3 / 0.7) * eps))
    assert not torch.equal(layer(x), layer(x))  # fresh noise on every call


def test_module_eval_and_p_zero_are_the_identity():
    x = torch.randn(5, 8)
    assert G(0.4).eval()(x) is x
    assert G(0.4, learn_alpha=True, num_features=8).eval()(x) is x
    assert G(0.0)(x) is x
    with bdlkern.sampling(3, seed=0):
        y = G(0.0)(x)
    assert y.shape == (15, 8) and torch.equal(y, x.repeat(3, 1))


def test_module_channel_noise():
    layer = G(0.2, channel=True, num_features=3)
    x = torch.randn(2, 3, 4, 4)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    state = bdlkern.ops.new_rng_state()
    eps = bdlkern.ops.normal((2, 3, 1, 1), rng_state=state, stream="gaussian_dropout")
    torch.testing.assert_close(y, x * (1 + math.sqrt(0.25) * eps))


@pytest.mark.parametrize("channel", [False, True])
def test_module_sampling_folds_the_samples(channel):
    S, seed = 6, 123
    layer = G(0.3, channel=channel, num_features=3 if channel else None)
    x = torch.randn(4, 3, 5)
    for train in (True, False):
        layer.train(train)
        with bdlkern.sampling(S, seed=seed):
            y = layer(x)
        assert y.shape == (S * 4, 3, 5)
        # seeded call 0 of a block uses rng_state [seed, 0]; the noise index is that of the folded input
        eps = bdlkern.ops.normal(_noise_shape((S * 4, 3, 5), 1 if channel else -1), rng_state=torch.tensor([seed, 0]),
                                 stream="gaussian_dropout")
        torch.testing.assert_close(y, x.repeat(S, 1, 1) * (1 + math.sqrt(0.3 / 0.7) * eps))


def test_module_sampling_keeps_the_layout_of_an_input_with_samples():
    S = 5
    x = torch.randn(4, 6)
    folded = nn.Sequential(G(0.3), nn.Tanh(), G(0.2))
    stacked = nn.Sequential(bdlkern.nn.MCDropoutLinear(6, 7, p=0.2), G(0.2))
    spatial = nn.Sequential(bdlkern.nn.MCDropoutLinear(6, 6, p=0.1), nn.Unflatten(2, (2, 3)), G(0.3, channel=True))
    with bdlkern.sampling(S, seed=1) as block:
        a = folded(x)
        b = stacked(x)
        c = spatial(x)
        assert block.carries(a) == "folded" and block.carries(b) == "stacked" and block.carries(c) == "stacked"
    assert a.shape == (S * 4, 6) and b.shape == (S, 4, 7) and c.shape == (S, 4, 2, 3)
    # the second call of `folded` multiplies the first's output by its own noise (call 1: [1, 2**40])
    with bdlkern.sampling(S, seed=1):
        h = torch.tanh(folded[0](x))
    eps = bdlkern.ops.normal((S * 4, 6), rng_state=torch.tensor([1, 2**40]), stream="gaussian_dropout")
    torch.testing.assert_close(a, h * (1 + math.sqrt(0.25) * eps))
    # the stacked per-channel input [S, N, C, *] takes the channel noise of [S * N, C]
    with bdlkern.sampling(S, seed=1):
        c = spatial(x)  # calls 0 and 1 of a block of its own
    with bdlkern.sampling(S, seed=1):
        h = spatial[:2](x)
    eps = bdlkern.ops.normal((S * 4, 2, 1), rng_state=torch.tensor([1, 2**40]), stream="gaussian_dropout")
    torch.testing.assert_close(c, h * (1 + math.sqrt(0.3 / 0.7) * eps.reshape(S, 4, 2, 1)))
    with bdlkern.sampling(S, seed=1):  # a 1-d input has no batch to fold into: [S, F], stacked
        assert G(0.3)(torch.randn(6)).shape == (S, 6)


@pytest.mark.parametrize("channel", [False, True])
def test_module_chunked_sampling_equals_unchunked(channel):
    model = nn.Sequential(G(0.3, channel=channel), nn.Conv2d(3, 4, 3, padding=1), G(0.2, learn_alpha=True, channel=channel))
    x = torch.randn(3, 3, 5, 5)
    with torch.no_grad():
        with bdlkern.sampling(12, seed=9):
            whole = bdlkern.unfold_samples(model(x), 12)
        with bdlkern.sampling(12, seed=9, chunk=4) as block:
            parts = torch.cat([block.unfold(model(x)) for _ in block.chunks()])
    assert whole.shape == (12, 3, 4, 5, 5)
    assert torch.equal(parts, whole)


def test_module_learn_alpha_gradient_and_kl():
    torch.manual_seed(0)
    layer = G(0.2, learn_alpha=True, num_features=8)
    assert isinstance(layer.log_alpha, nn.Parameter) and layer.log_alpha.shape == (8,)
    torch.testing.assert_close(layer.log_alpha.detach(), torch.full((8,), math.log(0.25)))
    model = nn.Sequential(nn.Linear(4, 8), layer, nn.Linear(8, 2))
    x = torch.randn(16, 4)
    model(x).square().sum().backward()
    assert layer.log_alpha.grad is not None and (layer.log_alpha.grad != 0).all()
    # kl(): the variational helper's formula, summed over log_alpha's entries; collected by kl_divergence
    la = layer.log_alpha.detach()
    expected = bdlkern.nn.variational_dropout_kl(la).sum()
    torch.testing.assert_close(layer.kl(), expected)
    torch.testing.assert_close(bdlkern.nn.kl_divergence(model), expected)
    torch.testing.assert_close(bdlkern.nn.regularization(model), expected)
    (g,) = torch.autograd.grad(layer.kl(), layer.log_alpha)
    assert (g != 0).all()
    # A fixed alpha is not collected
    fixed = nn.Sequential(nn.Linear(4, 8), G(0.2))
    assert bdlkern.nn.kl_divergence(fixed) == 0
    assert not isinstance(fixed[1].log_alpha, nn.Parameter)


def test_module_clamps_learnt_log_alpha_to_zero():
    layer = G(0.5, learn_alpha=True)
    with torch.no_grad():
        layer.log_alpha.fill_(1.5)  # an optimiser step above the bound
    x = torch.ones(100_000)
    torch.manual_seed(0)
    y = layer(x)
    assert abs((y - 1).var().item() - 1.0) < 0.03  # alpha = exp(0) = 1, not exp(1.5)
    y.sum().backward()
    assert layer.log_alpha.grad == 0  # the clamp's gradient above the bound
    assert layer.kl().item() == pytest.approx(bdlkern.nn.variational_dropout_kl(torch.tensor(0.0)).item())


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(p=1.0), ValueError, r"p must be a number in \[0, 1\)"),
        (dict(p=-0.1), ValueError, r"p must be a number in \[0, 1\)"),
        (dict(p=float("nan")), ValueError, r"p must be a number in \[0, 1\)"),
        (dict(p=True), ValueError, r"p must be a number"),
        (dict(p="0.5"), ValueError, r"p must be a number"),
        (dict(p=0.0, learn_alpha=True), ValueError, r"with learn_alpha, p must be in \(0, 0.5\]"),
        (dict(p=0.7, learn_alpha=True), ValueError, r"with learn_alpha, p must be in \(0, 0.5\]"),
        (dict(num_features=0), ValueError, "num_features must be None or an int >= 1"),
        (dict(num_features=2.0), ValueError, "num_features must be None or an int >= 1"),
    ],
)
def test_module_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        G(**kwargs)


def test_module_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"num_features=8\): the input has 5 features"):
        G(0.3, num_features=8)(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"num_features=3\): the input has 4 channels"):
        G(0.3, num_features=3, channel=True)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r"channel=True\): expected an input \[N, C, \*\]"):
        G(0.3, channel=True)(torch.randn(5))
    with pytest.raises(TypeError, match="must be float32 or float64"):
        G(0.3)(torch.randn(2, 5).half())
    with pytest.raises(TypeError, match="floating-point tensor"):
        G(0.3)(torch.arange(4))
    with bdlkern.sampling(2), pytest.raises(ValueError, match="num_features=8"):
        G(0.3, num_features=8)(torch.randn(2, 5))


def test_module_float64_and_autocast():
    layer = G(0.3, learn_alpha=True)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert layer.log_alpha.grad.dtype == torch.float32 and x.grad.dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(4, 5, dtype=torch.bfloat16)).dtype == torch.float32


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 8), G(0.3, learn_alpha=True, num_features=8), nn.Linear(8, 2))
    x = torch.randn(4, 6)
    compiled = torch.compile(model, fullgraph=True)
    torch.manual_seed(0)
    out = compiled(x)
    torch.manual_seed(0)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert model[1].log_alpha.grad is not None


def test_module_state_dict_round_trip():
    def make():
        return nn.Sequential(nn.Linear(6, 8), G(0.3, learn_alpha=True, num_features=8), G(0.1, channel=False))

    torch.manual_seed(0)
    model = make()
    with torch.no_grad():
        model[1].log_alpha.copy_(torch.linspace(-3, -0.5, 8))
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.log_alpha", "2.log_alpha"}
    fresh = make()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(3, 6)
    for m in (model, fresh):
        m.train()
    torch.manual_seed(5)
    a = model(x)
    torch.manual_seed(5)
    torch.testing.assert_close(fresh(x), a)
    with bdlkern.sampling(4, seed=2):
        a = model(x)
    with bdlkern.sampling(4, seed=2):
        torch.testing.assert_close(fresh(x), a)
    assert "p=0.3, learn_alpha=True, num_features=8, channel=False" in repr(model)


# ---- ONNX ---------------------------------------------------------------------------------------------
def _onnx():
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import bdlkern.onnx

    return ort, bdlkern.onnx


def test_onnx_eval_is_deterministic_and_equal():
    ort, bonnx = _onnx()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), G(0.3, learn_alpha=True, num_features=8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(4, 6)
    proto = bonnx.export(model, (x,), verbose=False).model_proto
    assert not any(n.op_type.startswith("Random") for n in proto.graph.node)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channel", [False, True])
def test_onnx_sampling_has_the_distribution_of_the_op(channel):
    """The exported samples (RandomNormalLike noise) against PyTorch's: equal means and variances
    per output element (z-tests), and a model with another alpha is told apart."""
    ort, bonnx = _onnx()
    S = 4000

    def make(p):
        torch.manual_seed(0)
        if channel:
            return nn.Sequential(nn.Conv2d(2, 3, 1), G(p, channel=True, learn_alpha=True, num_features=3)).eval()
        return nn.Sequential(nn.Linear(6, 5), G(p, learn_alpha=True, num_features=5)).eval()

    x = torch.randn(2, 2, 2, 2) if channel else torch.randn(3, 6)
    model = make(0.3)
    with bdlkern.sampling(S, seed=0):
        proto = bonnx.export(model, (x,), verbose=False).model_proto
    assert "RandomNormalLike" in {n.op_type for n in proto.graph.node}
    ort.set_seed(1234)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_samples = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert onnx_samples.shape == (S * x.shape[0], *model(x).shape[1:])

    def torch_samples(m):
        with torch.no_grad(), bdlkern.sampling(S, seed=7):
            return m(x).numpy()

    def z(a, b):
        a, b = torch.from_numpy(a).double().unflatten(0, (S, -1)), torch.from_numpy(b).double().unflatten(0, (S, -1))
        se_mean = (a.var(0) / S + b.var(0) / S).sqrt()
        se_var = (((a - a.mean(0)) ** 4).mean(0) - a.var(0) ** 2 + ((b - b.mean(0)) ** 4).mean(0) - b.var(0) ** 2).clamp(min=0).div(S).sqrt()
        return ((a.mean(0) - b.mean(0)).abs() / se_mean).max().item(), ((a.var(0) - b.var(0)).abs() / se_var).max().item()

    z_mean, z_var = z(onnx_samples, torch_samples(model))
    assert z_mean < 5 and z_var < 5, (z_mean, z_var)
    assert max(z(onnx_samples, torch_samples(make(0.5)))) > 10
