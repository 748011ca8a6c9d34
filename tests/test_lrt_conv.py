"""The local reparameterisation trick for convolutions (issue 16, second increment):
``bdlkern.ops.lrt_conv`` against a pure-PyTorch reference fed the same Philox noise (forward and the
gradients of x, theta, log_sigma2 and bias, on every backend), gradcheck / gradgradcheck,
registration (opcheck) and torch.compile, the output's mean and variance, bad input, the KL on
conv-shaped weights, the ``SparseVDConv1d`` / ``SparseVDConv2d`` modules (constructor,
``from_conv``, train / eval outside sampling, pruning, KL), a conv net inside
``bdlkern.sampling(S, seed=k)`` against a hand-written reference, serialisation and a short
training run on a bundled data set.

The reference is the spec, written out::

    log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8),   A = exp(log_alpha) theta^2
    mean = conv(xs, theta) + bias,   var = conv(xs^2, A),   y = mean + sqrt(var + 1e-8) * eps

with ``xs = x.repeat(S, 1, ...)`` (sample-major, or x itself with ``input_has_samples``) and eps
element i of the "lrt" stream at the row-major index of ``y [S*N, C_out, *sp_out]``, rebuilt with
``bdlkern.ops.normal(y.shape, rng_state=state, stream="lrt", dtype=x.dtype)``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend
from torch import nn
from torch.library import opcheck

import bdlkern
from bdlkern.testing import reference as ref

LRT_STREAM = "lrt"
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
ERRORS = (ValueError, TypeError, RuntimeError)


# ---- the reference ---------------------------------------------------------------------------------
def log_alpha(theta, log_sigma2):
    return torch.clamp(log_sigma2 - torch.log(theta**2 + 1e-8), -8.0, 8.0)


def variance_weight(theta, log_sigma2):
    """``A = exp(log_alpha) * theta^2``, the weight of the variance convolution."""
    return torch.exp(log_alpha(theta, log_sigma2)) * theta**2


def lrt_eps(shape, state, dtype):
    """The op's noise for an output of ``shape`` (the spec's rebuild)."""
    return bdlkern.ops.normal(tuple(shape), rng_state=state.cpu(), stream=LRT_STREAM, dtype=dtype)


def lrt_moments(x, theta, log_sigma2, bias, *, stride=1, padding=0, dilation=1, groups=1):
    """(mean, var) of the LRT convolution: ``conv(x, theta) + bias`` and ``conv(x^2, A)``."""
    conv = CONV[theta.dim() - 2]
    mean = conv(x, theta, bias, stride, padding, dilation, groups)
    var = conv(x * x, variance_weight(theta, log_sigma2), None, stride, padding, dilation, groups)
    return mean, var


def lrt_reference(x, theta, log_sigma2, bias, S, state, *, input_has_samples=False, eps_dtype=None, abs_eps=False,
                  **conv_kw):
    """``mean + sqrt(var + 1e-8) * eps`` over ``xs`` (x repeated S times sample-major unless it
    already has the samples); eps of ``eps_dtype`` (default x's) from the "lrt" stream."""
    xs = x if input_has_samples else x.repeat(S, *([1] * (x.dim() - 1)))
    mean, var = lrt_moments(xs, theta, log_sigma2, bias, **conv_kw)
    eps = lrt_eps(mean.shape, state, eps_dtype or x.dtype).to(mean.dtype).to(mean.device)
    if abs_eps:
        eps = eps.abs()
    return mean + torch.sqrt(var + 1e-8) * eps


def reference_and_grads(x, theta, log_sigma2, b, g, S, state, eps_dtype, *, abs_eps=False, **kw):
    """[y, grad_x, grad_theta, grad_log_sigma2, (grad_b)] of the reference in float64 on the CPU."""
    leaves = [t.detach().cpu().double().requires_grad_() for t in (x, theta, log_sigma2)]
    br = None if b is None else b.detach().cpu().double().requires_grad_()
    y = lrt_reference(*leaves, br, S, state, eps_dtype=eps_dtype, abs_eps=abs_eps, **kw)
    inputs = leaves + ([br] if br is not None else [])
    grads = torch.autograd.grad(y, inputs, g.detach().cpu().double())
    return [y.detach(), *grads]


def bounds(x, theta, log_sigma2, b, g, S, state, eps_dtype, **kw):
    """The sums of the absolute terms of each output and gradient element: the reference on |x|,
    |theta|, |b|, |g| and |eps| (log_alpha depends on theta^2 only; every factor of every term is
    then >= 0). The rounding tolerance scales with them."""
    return reference_and_grads(x.abs(), theta.abs(), log_sigma2, None if b is None else b.abs(), g.abs(), S, state,
                               eps_dtype, abs_eps=True, **kw)


def assert_matches(actual, expected, bound, dtype, names=("y", "grad_x", "grad_theta", "grad_log_sigma2", "grad_b")):
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert len(actual) == len(expected)
    for name, a, e, m in zip(names, actual, expected, bound):
        assert a is not None, name
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        scale = m.abs().max().item() if m.numel() else 0.0
        torch.testing.assert_close(a.detach().cpu().double(), e, rtol=tol, atol=tol * scale,
                                   msg=lambda s: f"{name}: {s}")


def close64(actual, expected, msg=None):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale,
                               msg=None if msg is None else (lambda s: f"{msg}: {s}"))


def _list(v, d):
    return list(v) if isinstance(v, (tuple, list)) else [v] * d


def no_tf32():
    """cuDNN's TF32 would round float32 convolutions on the cuda backend to 10 bits."""
    if torch.cuda.is_available():
        return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    return contextlib.nullcontext()


def require_simt():
    """A missing SIMT build fails (docs/design.md 6.3), it is never skipped."""
    require_backend("simt")


def log_sigma2_for(theta, la):
    """The log_sigma2 that gives log_alpha ``la`` (before the clamp) for ``theta``."""
    return la + torch.log(theta**2 + 1e-8)


def make_log_sigma2(theta, gen, low=-6.0, high=6.0, clamped=True):
    """log_alpha spread over (low, high), away from the clamp's kinks at -8 and 8; with ``clamped``
    one weight above the clamp (log_alpha 11 -> 8) and one below (-11 -> -8)."""
    la = torch.rand(theta.shape, generator=gen, dtype=torch.float64) * (high - low) + low
    if clamped:
        flat = la.view(-1)
        flat[0], flat[-1] = 11.0, -11.0
    return log_sigma2_for(theta, la)


# ---- forward and backward against the reference, every combination ---------------------------------
# C_in, C_out, kernel, spatial, stride, padding, dilation, groups
CASES = {
    "2d_plain": dict(C_in=4, C_out=6, k=(3, 3), sp=(6, 5), stride=1, padding=0, dilation=1, groups=1),
    "2d_strided_grouped": dict(C_in=4, C_out=6, k=(3, 2), sp=(7, 6), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                               groups=2),
    "2d_depthwise": dict(C_in=4, C_out=8, k=(3, 3), sp=(7, 7), stride=2, padding=1, dilation=2, groups=4),
    "1d_plain": dict(C_in=3, C_out=5, k=(3,), sp=(9,), stride=1, padding=0, dilation=1, groups=1),
    "1d_strided_grouped": dict(C_in=4, C_out=6, k=(2,), sp=(11,), stride=2, padding=3, dilation=3, groups=2),
    "1d_depthwise": dict(C_in=6, C_out=6, k=(5,), sp=(10,), stride=3, padding=2, dilation=1, groups=6),
}


def make_problem(cfg, S, N, *, input_has_samples, bias, dtype, device, seed, la_range=(-6.0, 6.0)):
    g = torch.Generator().manual_seed(seed)
    B = S * N if input_has_samples else N
    x = torch.randn(B, cfg["C_in"], *cfg["sp"], generator=g, dtype=torch.float64)
    fan_in = cfg["C_in"] // cfg["groups"] * math.prod(cfg["k"])
    theta = torch.randn(cfg["C_out"], cfg["C_in"] // cfg["groups"], *cfg["k"], generator=g,
                        dtype=torch.float64) / fan_in**0.5
    log_sigma2 = make_log_sigma2(theta, g, *la_range)
    b = torch.randn(cfg["C_out"], generator=g, dtype=torch.float64) if bias else None
    return tuple(None if t is None else t.to(dtype).to(device) for t in (x, theta, log_sigma2, b))


def conv_kwargs(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


def raw_call(ops, x, theta, log_sigma2, b, state, S, cfg, *, input_has_samples):
    d = theta.dim() - 2
    return ops.lrt_conv(
        x, theta, log_sigma2, b, state, S, not input_has_samples,
        _list(cfg["stride"], d), _list(cfg["padding"], d), _list(cfg["dilation"], d), cfg["groups"],
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("input_has_samples", [False, True], ids=["shared_input", "input_has_samples"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(backend, case, input_has_samples, bias, dtype):
    cfg = CASES[case]
    S, N = 3, 2
    x, theta, log_sigma2, b = make_problem(cfg, S, N, input_has_samples=input_has_samples, bias=bias, dtype=dtype,
                                           device=backend.device, seed=len(case) * 7 + cfg["C_out"])
    state = backend.tensor([500 + cfg["C_in"], 3], dtype=torch.int64)
    leaves = [x, theta, log_sigma2] + ([b] if b is not None else [])
    for t in leaves:
        t.requires_grad_()
    kw = dict(conv_kwargs(cfg), input_has_samples=input_has_samples)
    with no_tf32():
        y, _ = raw_call(backend.ops, x, theta, log_sigma2, b, state, S, cfg, input_has_samples=input_has_samples)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        g = g.to(dtype).to(backend.device)
        grads = torch.autograd.grad(y, leaves, g)
    expected = reference_and_grads(x, theta, log_sigma2, b, g, S, state, dtype, **kw)
    assert y.shape[0] == S * N
    assert_matches([y, *grads], expected, bounds(x, theta, log_sigma2, b, g, S, state, dtype, **kw), dtype)
    # The test sees noise that matters: far above the tolerance.
    xs = x.detach().cpu().double()
    xs = xs if input_has_samples else xs.repeat(S, *([1] * (xs.dim() - 1)))
    mean, _ = lrt_moments(xs, theta.detach().cpu().double(), log_sigma2.detach().cpu().double(),
                          None if b is None else b.detach().cpu().double(), **conv_kwargs(cfg))
    assert (expected[0] - mean).abs().max() > 0.1 * mean.abs().max()


@pytest.mark.parametrize("input_has_samples", [False, True])
def test_medium_problem_matches_reference(input_has_samples):
    """A problem large enough for the CPU kernels' blocked / parallel paths, float32 against the
    float64 reference."""
    cfg = dict(C_in=16, C_out=24, k=(3, 3), sp=(15, 17), stride=1, padding=1, dilation=1, groups=1)
    S, N = 4, 5
    x, theta, log_sigma2, b = make_problem(cfg, S, N, input_has_samples=input_has_samples, bias=True,
                                           dtype=torch.float32, device="cpu", seed=21)
    leaves = [x, theta, log_sigma2, b]
    for t in leaves:
        t.requires_grad_()
    state = torch.tensor([2024, 0])
    y = bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, S, padding=1, input_has_samples=input_has_samples,
                             rng_state=state)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(y, leaves, g)
    kw = dict(padding=1, input_has_samples=input_has_samples)
    expected = reference_and_grads(x, theta, log_sigma2, b, g, S, state, torch.float32, **kw)
    assert_matches([y, *grads], expected, bounds(x, theta, log_sigma2, b, g, S, state, torch.float32, **kw),
                   torch.float32)


def test_functional_argument_forms():
    """The public wrapper: int / tuple / "same" / "valid" arguments, the default S = 1 and no
    bias, a per-sample input (the same noise as the repeated shared input) and a conv3d."""
    gen = torch.Generator().manual_seed(0)
    S, N = 3, 2
    state = torch.tensor([77, 9])
    x = torch.randn(N, 4, 7, 6, generator=gen, dtype=torch.float64)
    theta = torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64) / 4
    log_sigma2 = make_log_sigma2(theta, gen)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    forms = [
        dict(stride=2, padding=1, dilation=1, groups=2),
        dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=2),
        dict(padding="same", groups=2),
        dict(padding="valid", groups=2),
    ]
    for form in forms:
        y = bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, S, **form, rng_state=state)
        expected = lrt_reference(x, theta, log_sigma2, b, S, state, **form)
        assert y.shape == expected.shape, form
        close64(y, expected, str(form))
    assert bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, S, padding="same", groups=2,
                                rng_state=state).shape == (S * N, 6, 7, 6)
    # Defaults: num_samples = 1, bias None, stride 1, padding 0, groups 1.
    theta1 = torch.randn(5, 4, 2, 3, generator=gen, dtype=torch.float64) / 4
    ls1 = make_log_sigma2(theta1, gen)
    y1 = bdlkern.ops.lrt_conv(x, theta1, ls1, rng_state=state)
    assert y1.shape == (N, 5, 6, 4)
    close64(y1, lrt_reference(x, theta1, ls1, None, 1, state))
    # A per-sample input equal to the repeated shared input: the same noise, the same output.
    xs = x.repeat(S, 1, 1, 1)
    y_shared = bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, S, padding=1, groups=2, rng_state=state)
    y_per = bdlkern.ops.lrt_conv(xs, theta, log_sigma2, b, S, padding=1, groups=2, input_has_samples=True,
                                 rng_state=state)
    close64(y_per, y_shared)
    # ... and a different per-sample input.
    xs2 = xs + torch.randn(xs.shape, generator=gen, dtype=torch.float64)
    y_per2 = bdlkern.ops.lrt_conv(xs2, theta, log_sigma2, b, S, padding=1, groups=2, input_has_samples=True,
                                  rng_state=state)
    close64(y_per2, lrt_reference(xs2, theta, log_sigma2, b, S, state, padding=1, groups=2, input_has_samples=True))
    # conv3d by theta's rank.
    x3 = torch.randn(N, 2, 4, 5, 3, generator=gen, dtype=torch.float64)
    t3 = torch.randn(3, 2, 2, 3, 1, generator=gen, dtype=torch.float64) / 3
    ls3 = make_log_sigma2(t3, gen)
    y3 = bdlkern.ops.lrt_conv(x3, t3, ls3, None, S, stride=(1, 2, 1), padding=(1, 0, 1), rng_state=state)
    expected3 = lrt_reference(x3, t3, ls3, None, S, state, stride=(1, 2, 1), padding=(1, 0, 1))
    assert y3.shape == expected3.shape == (S * N, 3, 5, 2, 5)
    close64(y3, expected3)


def test_same_state_same_noise_and_generators():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    theta = torch.randn(5, 3, 3, 3, generator=gen) / 5
    log_sigma2 = make_log_sigma2(theta.double(), gen).float()
    f = bdlkern.ops.lrt_conv
    state = torch.tensor([21, 0])
    y1 = f(x, theta, log_sigma2, None, 3, rng_state=state)
    assert torch.equal(y1, f(x, theta, log_sigma2, None, 3, rng_state=state.clone()))
    assert not torch.equal(y1, f(x, theta, log_sigma2, None, 3, rng_state=torch.tensor([22, 0])))
    assert not torch.equal(y1, f(x, theta, log_sigma2, None, 3, rng_state=torch.tensor([21, 1])))
    torch.manual_seed(4)
    a = f(x, theta, log_sigma2, None, 3)
    torch.manual_seed(4)
    assert torch.equal(a, f(x, theta, log_sigma2, None, 3))
    a = f(x, theta, log_sigma2, None, 3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, f(x, theta, log_sigma2, None, 3, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(a, f(x, theta, log_sigma2, None, 3, generator=torch.Generator().manual_seed(10)))


def test_non_contiguous_channels_last_and_empty_inputs():
    """Strided views and channels-last tensors give the contiguous result; an empty batch gives an
    empty output and zero parameter gradients."""
    gen = torch.Generator().manual_seed(10)
    S = 3
    base = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    theta = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64) / 6
    log_sigma2 = make_log_sigma2(theta, gen)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    state = torch.tensor([31, 4])
    kw = dict(padding=1, rng_state=state)
    x0 = base.clone().requires_grad_()
    y0 = bdlkern.ops.lrt_conv(x0, theta, log_sigma2, b, S, **kw)
    close64(y0, lrt_reference(base, theta, log_sigma2, b, S, state, padding=1))
    g = torch.randn(y0.shape, generator=gen, dtype=torch.float64)
    (gx0,) = torch.autograd.grad(y0, x0, g)
    big = torch.zeros(2, 4, 7, 12, dtype=torch.float64)
    big[..., ::2] = base
    variants = {
        "transposed": base.transpose(2, 3).contiguous().transpose(2, 3),
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": big[..., ::2],
    }
    for name, x in variants.items():
        assert torch.equal(x, base), name
        x = x.detach().requires_grad_()
        y = bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, S, **kw)
        close64(y, y0, name)
        (gx,) = torch.autograd.grad(y, x, g)
        close64(gx, gx0, f"{name} grad")
    t_cl = theta.contiguous(memory_format=torch.channels_last)
    ls_t = log_sigma2.transpose(2, 3).contiguous().transpose(2, 3)
    close64(bdlkern.ops.lrt_conv(base, t_cl, ls_t, b, S, **kw), y0.detach(), "channels-last theta")
    # An empty batch.
    leaves = [torch.zeros(0, 4, 7, 6, dtype=torch.float64, requires_grad=True),
              theta.clone().requires_grad_(), log_sigma2.clone().requires_grad_(), b.clone().requires_grad_()]
    for has in (False, True):
        y = bdlkern.ops.lrt_conv(*leaves, S, input_has_samples=has, **kw)
        assert y.shape == (0, 5, 7, 6)
        grads = torch.autograd.grad(y.sum(), leaves)
        assert grads[0].shape == (0, 4, 7, 6)
        for grad, leaf in zip(grads[1:], leaves[1:]):
            assert torch.equal(grad, torch.zeros_like(leaf))


# ---- gradcheck, gradgradcheck, opcheck, torch.compile -----------------------------------------------
@pytest.mark.parametrize("input_has_samples", [False, True])
@pytest.mark.parametrize("dims", [1, 2])
def test_gradcheck_and_gradgradcheck(dims, input_has_samples, threads):
    torch.set_num_threads(1)  # tiny problems: threads only cost (and thrash on a loaded machine)
    gen = torch.Generator().manual_seed(3 + dims)
    S, N = 2, 2
    B = S * N if input_has_samples else N
    if dims == 2:
        x = torch.randn(B, 2, 4, 4, generator=gen, dtype=torch.float64)
        theta = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64) / 2
        kw = dict(stride=(1, 2), padding=1, dilation=(2, 1))
    else:
        x = torch.randn(B, 4, 7, generator=gen, dtype=torch.float64)
        theta = torch.randn(4, 2, 3, generator=gen, dtype=torch.float64) / 2
        kw = dict(stride=2, padding=2, dilation=2, groups=2)
    theta = torch.where(theta.abs() < 0.1, theta.sign() * 0.1 + theta, theta)  # away from log(theta^2 + 1e-8)'s bend
    log_sigma2 = make_log_sigma2(theta, gen, -3.0, 3.0)
    b = torch.randn(theta.shape[0], generator=gen, dtype=torch.float64)
    state = torch.tensor([12, 0])

    def f(x, theta, log_sigma2, b):
        return bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, S, input_has_samples=input_has_samples, rng_state=state,
                                    **kw)

    inputs = tuple(t.clone().requires_grad_() for t in (x, theta, log_sigma2, b))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_gradcheck_through_simt_autograd(threads):
    """The SIMT namespace's autograd (the CUDA-source noise kernels in forward and backward). The
    emulator is slow: a tiny conv1d, and gradcheck's fast mode (the full Jacobians of the SIMT
    gradients are compared with the reference in test_forward_backward_match_reference)."""
    require_simt()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 4, generator=gen, dtype=torch.float64)
    theta = torch.randn(2, 2, 2, generator=gen, dtype=torch.float64) / 2 + 0.2
    log_sigma2 = make_log_sigma2(theta, gen, -3.0, 3.0)
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    state = torch.tensor([13, 0])
    ops = torch.ops.bdlkern_simt

    def f(x, theta, log_sigma2, b):
        return ops.lrt_conv(x, theta, log_sigma2, b, state, 2, True, [1], [1], [1], 1)[0]

    inputs = tuple(t.clone().requires_grad_() for t in (x, theta, log_sigma2, b))
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


def test_opcheck(threads):
    torch.set_num_threads(1)
    op = torch.ops.bdlkern.lrt_conv.default
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    xs = torch.randn(6, 4, 5, 5, generator=gen)
    theta = torch.randn(3, 4, 3, 3, generator=gen) / 6
    log_sigma2 = make_log_sigma2(theta.double(), gen).float()
    b = torch.randn(3, generator=gen)
    x1 = torch.randn(2, 4, 9, generator=gen)
    t1 = torch.randn(6, 2, 3, generator=gen) / 2
    ls1 = make_log_sigma2(t1.double(), gen).float()
    state = torch.tensor([3, 0])

    def rg(t):
        return t.clone().requires_grad_()

    calls = [
        (rg(x), rg(theta), rg(log_sigma2), rg(b), state, 3, True, [1, 1], [1, 1], [1, 1], 1),
        (rg(xs), rg(theta), rg(log_sigma2), None, state, 3, False, [2, 1], [0, 1], [1, 2], 1),
        # conv1d, grouped
        (rg(x1), rg(t1), rg(ls1), torch.randn(6, generator=gen), state, 2, True, [2], [1], [1], 2),
    ]
    for args in calls:
        opcheck(op, args)


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, 6, generator=gen)
    theta = torch.randn(5, 4, 3, 3, generator=gen) / 6
    log_sigma2 = make_log_sigma2(theta.double(), gen, -4.0, 2.0).float()
    b = torch.randn(5, generator=gen)
    theta2 = torch.randn(2, 5, 2, generator=gen) / 3
    log_sigma2_2 = make_log_sigma2(theta2.double(), gen, -4.0, 2.0).float()
    state = torch.tensor([11, 0])

    def f(x, theta, log_sigma2, b, theta2, log_sigma2_2, state):
        y = bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, 4, padding=1, rng_state=state)  # [12, 5, 6, 6]
        z = bdlkern.ops.lrt_conv(y.flatten(2), theta2, log_sigma2_2, None, 4, stride=2, input_has_samples=True,
                                 rng_state=state + 1)  # a conv1d over the flattened samples
        kl = bdlkern.ops.sparse_vd_kl(theta, log_sigma2)
        return y.relu().sum() + z.tanh().sum() + kl

    compiled = torch.compile(f, fullgraph=True)
    names = ("x", "theta", "log_sigma2", "bias", "theta2", "log_sigma2_2")
    leaves = (x, theta, log_sigma2, b, theta2, log_sigma2_2)
    args = [t.clone().requires_grad_() for t in leaves]
    args_eager = [t.clone().requires_grad_() for t in leaves]
    out, out_eager = compiled(*args, state), f(*args_eager, state)
    torch.testing.assert_close(out, out_eager)
    out.backward()
    out_eager.backward()
    for name, a, e in zip(names, args, args_eager):
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad, e.grad, msg=lambda s: f"{name}: {s}")
    # A different state gives a different result under compile too (the state is an input).
    assert not torch.allclose(compiled(*args, torch.tensor([12, 0])), out)


# ---- statistics ---------------------------------------------------------------------------------------
def test_output_mean_and_variance():
    """With many samples of one input, each output element has mean ``conv(x, theta) + b`` and
    variance ``conv(x^2, A) + 1e-8``, and the noise of different output elements is uncorrelated."""
    S = 4000
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(1, 3, 6, 6, generator=gen, dtype=torch.float64)
    theta = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64) / 5
    log_sigma2 = make_log_sigma2(theta, gen, -3.0, 2.0)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    y = bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, S, padding=1, stride=(1, 2), rng_state=torch.tensor([2, 0]))
    assert y.shape == (S, 4, 6, 3)
    mean, var = lrt_moments(x, theta, log_sigma2, b, padding=1, stride=(1, 2))
    var = var + 1e-8
    z = (y.mean(0) - mean[0]) / torch.sqrt(var[0] / S)
    assert z.abs().max() < 5, z.abs().max()
    # sample variance: relative standard error sqrt(2 / (S - 1)) ~ 2.2%
    rel = y.var(0) / var[0] - 1
    assert rel.abs().max() < 5 * math.sqrt(2 / (S - 1)), rel.abs().max()
    # standardised noise: uncorrelated between channels and positions
    e = ((y - mean) / torch.sqrt(var)).reshape(S, -1)
    corr = torch.corrcoef(e.T)
    off = corr - torch.eye(corr.shape[0], dtype=corr.dtype)
    assert off.abs().max() < 5 / math.sqrt(S), off.abs().max()


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x = torch.randn(2, 4, 6, 6)
    theta = torch.randn(6, 4, 3, 3)
    ls = torch.full((6, 4, 3, 3), -4.0)
    b = torch.randn(6)
    st = torch.tensor([1, 1])
    f = bdlkern.ops.lrt_conv
    assert f(x, theta, ls, b, 2, rng_state=st).shape == (4, 6, 4, 4)  # the valid call works
    with pytest.raises(ERRORS, match=r"\bx\b"):
        f(torch.randn(4, 6, 6), theta, ls, b, 2, rng_state=st)  # x without batch
    with pytest.raises(ERRORS, match=r"\bx\b"):
        f(torch.randn(2, 4, 6, 6, 6), theta, ls, b, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"theta"):
        f(x, torch.randn(6, 4), torch.full((6, 4), -4.0), b, 2, rng_state=st)  # no spatial dimension
    with pytest.raises(ERRORS, match=r"channels"):
        f(torch.randn(2, 5, 6, 6), theta, ls, b, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"groups"):
        f(x, theta, ls, b, 2, groups=2, rng_state=st)  # C_in 4 != 4 * 2
    with pytest.raises(ERRORS, match=r"groups"):
        f(torch.randn(2, 6, 6, 6), torch.randn(4, 2, 3, 3), torch.full((4, 2, 3, 3), -4.0), None, 2, groups=3,
          rng_state=st)  # out_channels 4 not divisible by 3
    with pytest.raises(ERRORS, match=r"groups"):
        f(x, theta, ls, b, 2, groups=0, rng_state=st)
    with pytest.raises(ERRORS, match=r"log_sigma2"):
        f(x, theta, torch.full((6, 4, 3, 2), -4.0), b, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"log_sigma2"):
        f(x, theta, torch.full((6, 4, 3), -4.0), b, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"log_sigma2"):
        f(x, theta, -4.0, b, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"num_samples"):
        f(torch.randn(5, 4, 6, 6), theta, ls, b, 2, input_has_samples=True, rng_state=st)
    for S in (0, -1):
        with pytest.raises(ERRORS, match=r"num_samples"):
            f(x, theta, ls, b, S, rng_state=st)
    with pytest.raises(ERRORS, match=r"bias"):
        f(x, theta, ls, torch.randn(5), 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"bias"):
        f(x, theta, ls, torch.randn(6, 1), 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"theta"):
        f(x, theta.double(), ls, b, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"log_sigma2"):
        f(x, theta, ls.double(), b, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"bias"):
        f(x, theta, ls, b.double(), 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"rng_state"):
        f(x, theta, ls, b, 2, rng_state=torch.tensor([1.0, 2.0]))
    op = torch.ops.bdlkern.lrt_conv
    args = (st, 2, True, [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ERRORS, match=r"theta"):  # device mismatch (meta theta)
        op(x, theta.to("meta"), ls, None, *args)
    with pytest.raises(ERRORS, match=r"log_sigma2"):
        op(x, theta, ls.to("meta"), None, *args)


@pytest.mark.parametrize("ns", ["bdlkern", "bdlkern_simt"])
def test_bad_input_raw_op(ns):
    if ns == "bdlkern_simt":
        require_simt()
    x = torch.randn(2, 4, 6, 6)
    theta = torch.randn(6, 4, 3, 3)
    ls = torch.full((6, 4, 3, 3), -4.0)
    st = torch.tensor([1, 1])
    op = getattr(torch.ops, ns).lrt_conv

    def call(x=x, theta=theta, ls=ls, b=None, S=2, shared_input=True, groups=1, stride=(1, 1)):
        return op(x, theta, ls, b, st, S, shared_input, list(stride), [0, 0], [1, 1], groups)

    assert call()[0].shape == (4, 6, 4, 4)
    with pytest.raises(ERRORS, match=r"\bx\b"):
        call(x=torch.randn(4, 6, 6))
    with pytest.raises(ERRORS, match=r"log_sigma2"):
        call(ls=torch.full((6, 4, 3, 2), -4.0))
    with pytest.raises(ERRORS, match=r"groups"):
        call(x=torch.randn(2, 6, 6, 6), theta=torch.randn(4, 2, 3, 3), ls=torch.full((4, 2, 3, 3), -4.0), groups=3)
    with pytest.raises(ERRORS, match=r"bias"):
        call(b=torch.randn(3))
    with pytest.raises(ERRORS, match=r"num_samples"):
        call(x=torch.randn(5, 4, 6, 6), shared_input=False)
    with pytest.raises(ERRORS, match=r"num_samples"):
        call(S=0)
    with pytest.raises(ERRORS, match=r"stride"):
        call(stride=(0, 1))


# ---- the KL on conv-shaped weights --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_sparse_vd_kl_on_conv_theta(dtype):
    gen = torch.Generator().manual_seed(15)
    for shape in ((6, 3, 3, 3), (5, 2, 4), (3, 2, 2, 3, 2)):
        theta = torch.randn(shape, generator=gen, dtype=torch.float64) / 3
        log_sigma2 = make_log_sigma2(theta, gen, -7.0, 7.0)
        t, s = theta.to(dtype).requires_grad_(), log_sigma2.to(dtype).requires_grad_()
        kl = bdlkern.ops.sparse_vd_kl(t, s)
        assert kl.dim() == 0 and kl.dtype == dtype
        tr, sr = t.detach().double().requires_grad_(), s.detach().double().requires_grad_()
        expected = ref.sparse_vd_kl(tr, sr)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kl.detach().double(), expected.detach(), **tol)
        got = torch.autograd.grad(kl, (t, s))
        want = torch.autograd.grad(expected, (tr, sr))
        for name, a, e in zip(("theta", "log_sigma2"), got, want):
            assert a.shape == shape, name
            torch.testing.assert_close(a.double(), e, **tol, msg=lambda m: f"{name}: {m}")
        # The same as the flattened weights: the KL does not depend on the shape.
        flat = bdlkern.ops.sparse_vd_kl(t.detach().reshape(shape[0], -1), s.detach().reshape(shape[0], -1))
        torch.testing.assert_close(flat, kl.detach(), **tol)


# ---- modules --------------------------------------------------------------------------------------------
def SparseVDConv(dims):
    return {1: bdlkern.nn.SparseVDConv1d, 2: bdlkern.nn.SparseVDConv2d}[dims]


def seeded_state(k: int, j: int) -> torch.Tensor:
    """rng_state of the j-th MC layer call of ``sampling(S, seed=k)`` (bdlkern/_sampling.py)."""
    return torch.tensor([k, j << 40], dtype=torch.int64)


def set_log_alpha(layer, la):
    """Hand-set the layer's log_sigma2 so that its log_alpha (before the clamp) is ``la``."""
    with torch.no_grad():
        layer.log_sigma2.copy_(log_sigma2_for(layer.theta, torch.as_tensor(la, dtype=layer.theta.dtype)))


def noisy(layer, gen, low=-3.0, high=1.0):
    """Give the layer log_alpha in (low, high): noise that shows in its output."""
    la = torch.rand(layer.theta.shape, generator=gen, dtype=torch.float64) * (high - low) + low
    set_log_alpha(layer, la.to(layer.theta.dtype))
    return layer


def test_constructor_arguments():
    layer = bdlkern.nn.SparseVDConv2d(4, 6, (3, 2), stride=2, padding=1, dilation=(1, 2), groups=2, bias=False,
                                      threshold=2.5, log_sigma2_init=-7.0, dtype=torch.float64)
    assert isinstance(layer.theta, nn.Parameter) and isinstance(layer.log_sigma2, nn.Parameter)
    assert layer.theta.shape == layer.log_sigma2.shape == (6, 2, 3, 2)
    assert layer.theta.dtype == layer.log_sigma2.dtype == torch.float64
    assert layer.bias is None
    assert torch.equal(layer.log_sigma2, torch.full((6, 2, 3, 2), -7.0, dtype=torch.float64))
    assert torch.isfinite(layer.theta).all() and (layer.theta != 0).any()
    assert set(layer.state_dict()) == {"theta", "log_sigma2"}
    default = bdlkern.nn.SparseVDConv1d(3, 5, 4)
    assert default.theta.shape == default.log_sigma2.shape == (5, 3, 4)
    assert default.theta.dtype == torch.float32
    assert default.bias.shape == (5,) and isinstance(default.bias, nn.Parameter)
    assert torch.equal(default.log_sigma2, torch.full((5, 3, 4), -10.0))
    assert set(default.state_dict()) == {"theta", "log_sigma2", "bias"}
    assert not torch.equal(default.theta, bdlkern.nn.SparseVDConv1d(3, 5, 4).theta)  # random initialisation
    # The constructor's conv arguments are the ones the layer convolves with (eval: deterministic).
    x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
    layer.eval()
    set_log_alpha(layer, torch.full(layer.theta.shape, -5.0, dtype=torch.float64))  # nothing pruned
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.theta, None, 2, 1, (1, 2), 2), rtol=1e-12, atol=1e-12)
    # The threshold: log_alpha 2.0 kept, 2.8 and 3.2 pruned at 2.5; at the default 3.0 2.8 is kept.
    la = torch.tensor([2.0, 2.8, 3.2], dtype=torch.float64).repeat(24)[: layer.theta.numel()].reshape(6, 2, 3, 2)
    set_log_alpha(layer, la)
    assert torch.equal(layer.mask(), la < 2.5)
    default2d = bdlkern.nn.SparseVDConv2d(4, 6, (3, 2), groups=2, dtype=torch.float64)
    with torch.no_grad():
        default2d.theta.copy_(layer.theta)
    set_log_alpha(default2d, la)
    assert torch.equal(default2d.mask(), la < 3.0)


@pytest.mark.parametrize("dims", [1, 2])
def test_from_conv_keeps_parameters_and_state_dict(dims):
    torch.manual_seed(0)
    if dims == 2:
        conv = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, dtype=torch.float64)
        x = torch.randn(3, 4, 9, 8, dtype=torch.float64)
    else:
        conv = nn.Conv1d(6, 3, 3, stride=2, padding=2, dilation=2, groups=3, bias=False, dtype=torch.float64)
        x = torch.randn(3, 6, 11, dtype=torch.float64)
    cls = SparseVDConv(dims)
    layer = cls.from_conv(conv, threshold=2.0, log_sigma2_init=-6.0)
    assert type(layer) is cls
    assert torch.equal(layer.theta, conv.weight)
    assert layer.theta.dtype == torch.float64
    assert torch.equal(layer.log_sigma2, torch.full_like(conv.weight, -6.0))
    keys = {"theta", "log_sigma2"} | ({"bias"} if conv.bias is not None else set())
    assert set(layer.state_dict()) == keys
    assert (layer.bias is None) == (conv.bias is None)
    if conv.bias is not None:
        assert torch.equal(layer.bias, conv.bias)
    # The conv's hyper-parameters: eval with nothing pruned is the conv itself.
    layer.eval()
    set_log_alpha(layer, torch.full_like(conv.weight, -4.0))
    torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)
    # The threshold and log_sigma2_init given: log_alpha 2.5 is pruned at threshold 2.0.
    set_log_alpha(layer, torch.full_like(conv.weight, 2.5))
    assert not layer.mask().any() and layer.sparsity() == 1.0
    default = cls.from_conv(conv)
    assert torch.equal(default.log_sigma2, torch.full_like(conv.weight, -10.0))
    set_log_alpha(default, torch.full_like(conv.weight, 2.5))
    assert default.mask().all() and default.sparsity() == 0.0


@pytest.mark.parametrize("dims", [1, 2])
def test_training_outside_sampling_is_one_lrt_sample(dims):
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    cls = SparseVDConv(dims)
    stride = 2 if dims == 1 else (1, 2)
    layer = noisy(cls(4, 5, 3, padding=1, stride=stride, dtype=torch.float64), gen)
    layer.train()
    x = torch.randn(6, 4, *([10] * dims), dtype=torch.float64, requires_grad=True)
    g_state = torch.get_rng_state()
    y = layer(x)
    torch.set_rng_state(g_state)
    state = bdlkern.ops.new_rng_state()
    expected = bdlkern.ops.lrt_conv(x, layer.theta, layer.log_sigma2, layer.bias, 1, stride=stride, padding=1,
                                    rng_state=state)
    reference = lrt_reference(x, layer.theta, layer.log_sigma2, layer.bias, 1, state, stride=stride, padding=1)
    assert y.shape == expected.shape == reference.shape == ((6, 5, 5) if dims == 1 else (6, 5, 10, 5))
    close64(y, expected)
    close64(y, reference)
    mean, _ = lrt_moments(x, layer.theta, layer.log_sigma2, layer.bias, stride=stride, padding=1)
    assert not torch.allclose(y, mean, rtol=1e-3, atol=1e-3)  # stochastic
    # Gradients of x, theta, log_sigma2 and bias as through the reference.
    g = torch.randn_like(y)
    params = [x, layer.theta, layer.log_sigma2, layer.bias]
    for name, a, e in zip(("x", "theta", "log_sigma2", "bias"), torch.autograd.grad(y, params, g),
                          torch.autograd.grad(reference, params, g)):
        close64(a, e, name)
    # A second call draws new noise.
    assert not torch.equal(layer(x), y)


@pytest.mark.parametrize("dims", [1, 2])
def test_eval_outside_sampling_is_the_pruned_conv(dims):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    cls = SparseVDConv(dims)
    layer = cls(3, 4, 3, padding=1, stride=2, dtype=torch.float64)
    la = torch.rand(layer.theta.shape, generator=gen, dtype=torch.float64) * 8 - 3  # (-3, 5): some pruned
    set_log_alpha(layer, la)
    keep = la < 3.0
    assert keep.any() and not keep.all()
    layer.eval()
    x = torch.randn(5, 3, *([8] * dims), dtype=torch.float64)
    y = layer(x)
    conv = CONV[dims]
    torch.testing.assert_close(layer.pruned_weight(), layer.theta * keep, rtol=0, atol=0)
    torch.testing.assert_close(y, conv(x, layer.theta * keep, layer.bias, 2, 1), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, conv(x, layer.theta, layer.bias, 2, 1))  # the pruned weights are left out
    assert torch.equal(layer(x), y)  # deterministic


def test_mask_sparsity_log_alpha_and_kl_at_hand_set_log_sigma2():
    layer = bdlkern.nn.SparseVDConv2d(2, 3, 2, dtype=torch.float64)  # 24 weights
    la = torch.tensor([-9.0, -5.0, -1.0, 0.5, 2.0, 2.9, 3.1, 4.0, 6.0, 9.0, -2.0, 1.0] * 2,
                      dtype=torch.float64).reshape(3, 2, 2, 2)
    set_log_alpha(layer, la)
    keep = la < 3.0
    assert torch.equal(layer.mask(), keep)
    assert layer.mask().dtype == torch.bool and layer.mask().shape == (3, 2, 2, 2)
    assert layer.sparsity() == pytest.approx(8 / 24)
    close64(layer.log_alpha.detach(), la.clamp(-8, 8))
    torch.testing.assert_close(layer.pruned_weight().detach(), (layer.theta * keep).detach(), rtol=0, atol=0)
    kl = layer.kl()
    assert kl.dim() == 0
    expected = ref.sparse_vd_kl(layer.theta, layer.log_sigma2)
    close64(kl, expected)
    for name, a, e in zip(("theta", "log_sigma2"), torch.autograd.grad(kl, (layer.theta, layer.log_sigma2)),
                          torch.autograd.grad(expected, (layer.theta, layer.log_sigma2))):
        close64(a, e, name)
    conv1 = bdlkern.nn.SparseVDConv1d(3, 2, 3, dtype=torch.float64)
    set_log_alpha(conv1, torch.full((2, 3, 3), 5.0, dtype=torch.float64))
    assert conv1.sparsity() == 1.0 and not conv1.mask().any()
    close64(conv1.kl(), ref.sparse_vd_kl(conv1.theta, conv1.log_sigma2))


def test_kl_divergence_and_regularization_include_the_conv_layers():
    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = nn.Sequential(
        noisy(bdlkern.nn.SparseVDConv2d(1, 3, 3), gen), nn.ReLU(),
        nn.Sequential(noisy(bdlkern.nn.SparseVDConv1d(3, 2, 2), gen)),
        noisy(bdlkern.nn.SparseVDLinear(4, 2), gen),
        nn.Conv2d(2, 2, 1),
    )
    expected = sum(ref.sparse_vd_kl(m.theta, m.log_sigma2) for m in (model[0], model[2][0], model[3]))
    kl = bdlkern.nn.kl_divergence(model)
    torch.testing.assert_close(kl, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bdlkern.nn.regularization(model), expected, rtol=1e-5, atol=1e-5)
    kl.backward()
    for m in (model[0], model[2][0]):
        assert m.theta.grad is not None and m.log_sigma2.grad is not None
        assert m.log_sigma2.grad.abs().sum() > 0
    # A model of conv layers only.
    only = nn.Sequential(model[2][0])
    single = ref.sparse_vd_kl(model[2][0].theta, model[2][0].log_sigma2)
    assert single.abs() > 1e-3
    torch.testing.assert_close(bdlkern.nn.kl_divergence(only), single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bdlkern.nn.regularization(only), single, rtol=1e-5, atol=1e-5)


# ---- sampling: the folded layout ----------------------------------------------------------------------
def small_net(dtype=torch.float64) -> nn.Sequential:
    """SparseVDConv2d -> ReLU -> MaxPool2d -> SparseVDConv2d -> Flatten -> SparseVDLinear, with noise."""
    torch.manual_seed(12)
    gen = torch.Generator().manual_seed(12)
    model = nn.Sequential(
        bdlkern.nn.SparseVDConv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2),
        bdlkern.nn.SparseVDConv2d(3, 4, 3, padding=1, stride=(1, 2)), nn.Flatten(),
        bdlkern.nn.SparseVDLinear(4 * 4 * 2, 5),
    ).to(dtype)
    for i in (0, 3, 5):
        noisy(model[i], gen)
    return model


def small_net_reference(model: nn.Sequential, x: torch.Tensor, S: int, k: int) -> torch.Tensor:
    """The net with the noise of ``sampling(S, seed=k)`` rebuilt, plain torch: [S*N, 5]."""
    c1, c2, lin = model[0], model[3], model[5]
    h = lrt_reference(x, c1.theta, c1.log_sigma2, c1.bias, S, seeded_state(k, 0))  # [S*N, 3, 8, 8]
    h = F.max_pool2d(F.relu(h), 2)
    h = lrt_reference(h, c2.theta, c2.log_sigma2, c2.bias, S, seeded_state(k, 1), input_has_samples=True, padding=1,
                      stride=(1, 2))
    h = h.flatten(1)  # [S*N, 32]
    N = h.shape[0] // S
    mean = F.linear(h, lin.theta, lin.bias)
    var = F.linear(h * h, variance_weight(lin.theta, lin.log_sigma2))
    eps = bdlkern.ops.normal((S, N, mean.shape[1]), stream=LRT_STREAM, rng_state=seeded_state(k, 2), dtype=h.dtype)
    return mean + torch.sqrt(var + 1e-8) * eps.reshape(S * N, -1)


@pytest.mark.parametrize("train", [False, True])
def test_small_net_folded_sampling_matches_reference(train):
    model = small_net().train(train)
    S, N, k = 4, 3, 17
    x = torch.randn(N, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with bdlkern.sampling(S, seed=k):
        out = model(x)
    assert out.shape == (S * N, 5)
    expected = small_net_reference(model, x, S, k)
    close64(out, expected)
    folded = bdlkern.unfold_samples(out, S)
    assert folded.shape == (S, N, 5)
    assert not torch.allclose(folded[0], folded[1])  # samples differ
    # Gradients through the folded pass equal those through the reference.
    params = [p for p in model.parameters()]
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    got = torch.autograd.grad(out, params, g)
    want = torch.autograd.grad(expected, params, g)
    for (name, _), a, e in zip(model.named_parameters(), got, want):
        close64(a, e, name)
    # mc_predict knows the layout: the same samples.
    pred = bdlkern.uncertainty.mc_predict(model, x, num_samples=S, seed=k)
    assert pred.samples.shape == (S, N, 5)
    close64(pred.samples, folded.detach())
    assert model.training == train  # mc_predict restores the flags
    # Outside the block: one sample per input (train) or the pruned deterministic net (eval).
    assert model(x).shape == (N, 5)


def test_small_net_linear_noise_is_lrt_linear_of_the_unfolded_input():
    """The SparseVDLinear later in a folded pass draws the noise of the reference lrt_linear on its
    input viewed as [S, N, in] (num_samples=None)."""
    model = small_net().eval()
    S, N, k = 3, 2, 5
    x = torch.randn(N, 1, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    captured = []
    handle = model[5].register_forward_hook(lambda mod, inp, out: captured.append((inp[0].detach(), out.detach())))
    try:
        with bdlkern.sampling(S, seed=k):
            out = model(x)
    finally:
        handle.remove()
    (h, y), = captured
    assert h.shape == (S * N, 32) and y.shape == (S * N, 5)
    lin = model[5]
    expected = ref.lrt_linear(h.reshape(S, N, 32), lin.theta.detach(), lin.log_sigma2.detach(), lin.bias.detach(),
                              None, rng_state=seeded_state(k, 2))
    close64(y, expected.reshape(S * N, 5))
    close64(out.detach(), y)


def test_conv1d_net_folded_sampling_and_wrong_batch():
    gen = torch.Generator().manual_seed(13)
    torch.manual_seed(13)
    c1 = noisy(bdlkern.nn.SparseVDConv1d(2, 3, 3, padding=1, dtype=torch.float64), gen)
    c2 = noisy(bdlkern.nn.SparseVDConv1d(3, 2, 2, stride=2, bias=False, dtype=torch.float64), gen)
    model = nn.Sequential(c1, nn.Tanh(), c2).eval()
    S, N, k = 5, 2, 8
    x = torch.randn(N, 2, 9, dtype=torch.float64, generator=gen)
    with bdlkern.sampling(S, seed=k):
        out = model(x)
    assert out.shape == (S * N, 2, 4)
    h = torch.tanh(lrt_reference(x, c1.theta, c1.log_sigma2, c1.bias, S, seeded_state(k, 0), padding=1))
    expected = lrt_reference(h, c2.theta, c2.log_sigma2, None, S, seeded_state(k, 1), input_has_samples=True, stride=2)
    close64(out, expected)
    # A later MC layer of the pass whose input lacks the pass's S * N rows.
    with bdlkern.sampling(S, seed=k):
        h = model[1](c1(x))
        assert h.shape == (S * N, 3, 9)
        with pytest.raises(ValueError, match=r"SparseVDConv1d"):
            c2(h[: S * N - 1])


def test_seeded_sampling_reproducible_and_seed_dependent():
    model = small_net().eval()
    x = torch.randn(2, 1, 10, 10, dtype=torch.float64)
    with bdlkern.sampling(3, seed=1):
        a = model(x)
    with bdlkern.sampling(3, seed=1):
        b = model(x)
    with bdlkern.sampling(3, seed=2):
        c = model(x)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


# ---- serialisation ------------------------------------------------------------------------------------
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
    model = small_net(torch.float32)
    x = torch.randn(3, 1, 10, 10)
    expected = _outputs(model, x)
    assert expected[1].shape == (12, 5) and expected[2].shape == (3, 5)
    assert set(model.state_dict()) == {f"{i}.{n}" for i in (0, 3, 5) for n in ("theta", "log_sigma2", "bias")}
    # state_dict into a fresh model
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)
    fresh = nn.Sequential(
        bdlkern.nn.SparseVDConv2d(1, 3, 3), nn.ReLU(), nn.MaxPool2d(2),
        bdlkern.nn.SparseVDConv2d(3, 4, 3, padding=1, stride=(1, 2)), nn.Flatten(),
        bdlkern.nn.SparseVDLinear(4 * 4 * 2, 5),
    )
    assert not torch.equal(fresh[0].theta, model[0].theta)
    fresh.load_state_dict(torch.load(buf))
    for a, e in zip(_outputs(fresh, x), expected):
        assert torch.equal(a, e)
    # the whole module
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded[0]) is bdlkern.nn.SparseVDConv2d and type(loaded[3]) is bdlkern.nn.SparseVDConv2d
    for a, e in zip(_outputs(loaded, x), expected):
        assert torch.equal(a, e)
    for a, e in zip(_outputs(copy.deepcopy(model), x), expected):
        assert torch.equal(a, e)
    # a SparseVDConv1d, threshold included
    c1 = bdlkern.nn.SparseVDConv1d(2, 3, 3, threshold=1.5)
    noisy(c1, torch.Generator().manual_seed(1), -1.0, 3.0)
    buf = io.BytesIO()
    torch.save(c1, buf)
    buf.seek(0)
    c1b = torch.load(buf, weights_only=False)
    assert type(c1b) is bdlkern.nn.SparseVDConv1d
    assert torch.equal(c1b.mask(), c1.mask()) and not c1.mask().all()
    xs = torch.randn(2, 2, 7)
    assert torch.equal(c1b.eval()(xs), c1.eval()(xs))


# ---- training -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_run_prunes_and_learns_digits(threads):
    """A tiny sparse-VD conv net on scikit-learn's 8x8 digits, Adam, the KL scaled down: the loss
    falls, the net fits the data and weights get pruned."""
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)  # a small net: one thread is as fast, and steady on a loaded machine
    digits = load_digits()
    X = torch.tensor(digits.data[:384], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    Y = torch.tensor(digits.target[:384])
    assert X.shape == (384, 1, 8, 8) and X.max() == 1.0 and len(Y.unique()) == 10  # real data was read
    torch.manual_seed(0)
    model = nn.Sequential(
        bdlkern.nn.SparseVDConv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        bdlkern.nn.SparseVDLinear(8 * 4 * 4, 10),
    ).train()
    conv = model[0]
    sparsity_before = conv.sparsity(), model[4].sparsity()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(250):
        loss = F.cross_entropy(model(X), Y) + 0.1 * bdlkern.nn.kl_divergence(model) / len(X)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.5 * first, (first, last)
    model.eval()
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == Y).float().mean().item()
    assert accuracy > 0.9, accuracy
    assert conv.sparsity() > sparsity_before[0], (sparsity_before, conv.sparsity())
    assert conv.sparsity() > 0.0 and model[4].sparsity() > sparsity_before[1] + 0.2
