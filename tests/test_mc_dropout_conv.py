"""Fused multi-sample MC-dropout convolution (issue 16): ``bdlkern.ops.mc_dropout_conv`` against a
pure-PyTorch reference fed the same Philox masks (forward and gradients of x, weight and bias, on
every backend), the mask layout with and without a sample dimension, gradcheck / gradgradcheck,
registration (opcheck) and torch.compile, keep-fraction statistics, determinism across thread
counts, bad input, memory layouts, empty batches and the shared-channel path that skips the
dropped channels.

The reference is the spec, written out: ``y = conv(xs * M / (1 - p), weight, bias, ...)`` with
``xs = x.repeat(S, 1, ...)`` (sample-major, or x itself with ``input_has_samples``) and ``M`` the
keep mask rebuilt with ``bdlkern.ops.dropout_mask(shape, p, rng_state=..., stream="mc_dropout")``
over ``[S*N, C, *sp]`` (element), ``[S*N, C]`` (channel), ``[S, C, *sp]`` (element, shared) or
``[S, C]`` (channel, shared), broadcast over what the mask does not index.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend
from torch.library import opcheck

import bdlkern

MC_STREAM = "mc_dropout"
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
ERRORS = (ValueError, TypeError, RuntimeError)


# ---- the reference ---------------------------------------------------------------------------------
def keep_mask(S, N, C, spatial, p, state, *, channel, shared):
    """The op's keep mask (True = kept) broadcast to ``[S*N, C, *spatial]``, rebuilt per the spec."""
    spatial = tuple(spatial)
    rows = S if shared else S * N
    shape = [rows, C] if channel else [rows, C, *spatial]
    m = bdlkern.ops.dropout_mask(shape, p, rng_state=state.cpu(), stream=MC_STREAM)
    if channel:
        m = m.reshape(rows, C, *([1] * len(spatial)))
    if shared:  # sample s's mask for each of its N images (rows s*N .. s*N + N - 1)
        m = m.unsqueeze(1).expand(S, N, *m.shape[1:]).reshape(S * N, *m.shape[1:])
    return m.expand(S * N, C, *spatial)


def reference(x, w, b, p, S, state, *, stride=1, padding=0, dilation=1, groups=1, channel=False, shared=False,
              input_has_samples=False):
    d = w.dim() - 2
    xs = x if input_has_samples else x.repeat(S, *([1] * (x.dim() - 1)))
    N = xs.shape[0] // S
    m = keep_mask(S, N, x.shape[1], x.shape[2:], p, state, channel=channel, shared=shared).to(x.device)
    return CONV[d](xs * m / (1.0 - p), w, b, stride, padding, dilation, groups)


def reference_and_grads(x, w, b, g, p, S, state, **kw):
    """[y, grad_x, grad_w, (grad_b)] of the reference in float64 on the CPU, cotangent ``g``."""
    xr = x.detach().cpu().double().requires_grad_()
    wr = w.detach().cpu().double().requires_grad_()
    br = None if b is None else b.detach().cpu().double().requires_grad_()
    y = reference(xr, wr, br, p, S, state, **kw)
    inputs = [xr, wr] + ([br] if br is not None else [])
    grads = torch.autograd.grad(y, inputs, g.detach().cpu().double())
    return [y.detach(), *grads]


def bounds(x, w, b, g, p, S, state, **kw):
    """Sums of the absolute terms of each output and gradient element: the reference run on |x|,
    |w|, |b|, |g| (the masks are >= 0). The rounding tolerance scales with them."""
    return reference_and_grads(x.abs(), w.abs(), None if b is None else b.abs(), g.abs(), p, S, state, **kw)


def assert_matches(actual, expected, bound, dtype, names=("y", "grad_x", "grad_w", "grad_b")):
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for name, a, e, m in zip(names, actual, expected, bound):
        assert a is not None, name
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        scale = m.abs().max().item() if m.numel() else 0.0
        torch.testing.assert_close(a.detach().cpu().double(), e, rtol=tol, atol=tol * scale, msg=lambda s: f"{name}: {s}")


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


# ---- forward and backward against the reference, every combination ---------------------------------
# C_in, C_out, kernel, spatial, stride, padding, dilation, groups, bias, p
CASES = {
    "2d_plain": dict(C_in=4, C_out=6, k=(3, 3), sp=(6, 5), stride=1, padding=0, dilation=1, groups=1, bias=True, p=0.4),
    "2d_strided_grouped": dict(C_in=4, C_out=6, k=(3, 2), sp=(7, 6), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                               groups=2, bias=False, p=0.25),
    "2d_depthwise": dict(C_in=4, C_out=8, k=(3, 3), sp=(7, 7), stride=2, padding=1, dilation=2, groups=4, bias=True, p=0.6),
    "1d_plain": dict(C_in=3, C_out=5, k=(3,), sp=(9,), stride=1, padding=0, dilation=1, groups=1, bias=True, p=0.4),
    "1d_strided_grouped": dict(C_in=4, C_out=6, k=(2,), sp=(11,), stride=2, padding=3, dilation=3, groups=2, bias=True,
                               p=0.3),
    "1d_depthwise": dict(C_in=6, C_out=6, k=(5,), sp=(10,), stride=3, padding=2, dilation=1, groups=6, bias=False, p=0.5),
}


def make_problem(cfg, S, N, *, input_has_samples, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    B = S * N if input_has_samples else N
    x = torch.randn(B, cfg["C_in"], *cfg["sp"], generator=g, dtype=torch.float64)
    fan_in = cfg["C_in"] // cfg["groups"] * math.prod(cfg["k"])
    w = torch.randn(cfg["C_out"], cfg["C_in"] // cfg["groups"], *cfg["k"], generator=g, dtype=torch.float64) / fan_in**0.5
    b = torch.randn(cfg["C_out"], generator=g, dtype=torch.float64) if cfg["bias"] else None
    return tuple(None if t is None else t.to(dtype).to(device) for t in (x, w, b))


def conv_kwargs(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


def raw_call(ops, x, w, b, state, p, S, cfg, *, channel, shared, input_has_samples):
    d = w.dim() - 2
    return ops.mc_dropout_conv(
        x, w, b, state, p, S, not input_has_samples,
        _list(cfg["stride"], d), _list(cfg["padding"], d), _list(cfg["dilation"], d), cfg["groups"], channel, shared,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("input_has_samples", [False, True], ids=["shared_input", "input_has_samples"])
@pytest.mark.parametrize("shared_mask", [False, True], ids=["own_mask", "shared_mask"])
@pytest.mark.parametrize("mask", ["element", "channel"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_backward_match_reference(backend, case, mask, shared_mask, input_has_samples, dtype):
    cfg = CASES[case]
    S, N = 2, 3
    x, w, b = make_problem(cfg, S, N, input_has_samples=input_has_samples, dtype=dtype, device=backend.device,
                           seed=len(case) * 7 + cfg["C_out"])
    state = backend.tensor([1000 + cfg["C_in"], 3], dtype=torch.int64)
    p, channel = cfg["p"], mask == "channel"
    kw = dict(conv_kwargs(cfg), channel=channel, shared=shared_mask, input_has_samples=input_has_samples)
    x.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    with no_tf32():
        y = raw_call(backend.ops, x, w, b, state, p, S, cfg, channel=channel, shared=shared_mask,
                     input_has_samples=input_has_samples)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(backend.device)
        inputs = [x, w] + ([b] if b is not None else [])
        grads = torch.autograd.grad(y, inputs, g)
    expected = reference_and_grads(x, w, b, g, p, S, state, **kw)
    assert y.shape[0] == S * N
    assert_matches([y, *grads], expected, bounds(x, w, b, g, p, S, state, **kw), dtype)
    # The test sees masks that drop something and keep something.
    keep = keep_mask(S, N, cfg["C_in"], cfg["sp"], p, state, channel=channel, shared=shared_mask)
    assert keep.any() and not keep.all()


@pytest.mark.parametrize("mask", ["element", "channel"])
@pytest.mark.parametrize("shared_mask", [False, True])
def test_functional_argument_forms(mask, shared_mask):
    """The public wrapper: int / tuple / "same" / "valid" arguments, per-sample input, and a conv3d."""
    torch.manual_seed(0)
    S, N = 3, 2
    state = torch.tensor([77, 9])
    common = dict(mask=mask, shared_mask=shared_mask, rng_state=state)
    ref_kw = dict(channel=mask == "channel", shared=shared_mask)
    x = torch.randn(N, 4, 7, 6, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    forms = [
        dict(stride=2, padding=1, dilation=1, groups=2),
        dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=2),
        dict(padding="same", groups=2),
        dict(padding="valid", groups=2),
    ]
    for form in forms:
        y = bdlkern.ops.mc_dropout_conv(x, w, b, 0.3, S, **form, **common)
        expected = reference(x, w, b, 0.3, S, state, **form, **ref_kw)
        assert y.shape == expected.shape, form
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12, msg=lambda s: f"{form}: {s}")
    # "same" keeps the spatial size.
    assert bdlkern.ops.mc_dropout_conv(x, w, b, 0.3, S, padding="same", groups=2, **common).shape == (S * N, 6, 7, 6)
    # A per-sample input: the same masks as the repeated shared input.
    xs = x.repeat(S, 1, 1, 1) + torch.randn(S * N, 4, 7, 6, dtype=torch.float64)
    y = bdlkern.ops.mc_dropout_conv(xs, w, b, 0.3, S, padding=1, groups=2, input_has_samples=True, **common)
    torch.testing.assert_close(
        y, reference(xs, w, b, 0.3, S, state, padding=1, groups=2, input_has_samples=True, **ref_kw), rtol=1e-12, atol=1e-12
    )
    # conv3d by the weight's rank.
    x3 = torch.randn(N, 2, 4, 5, 3, dtype=torch.float64)
    w3 = torch.randn(3, 2, 2, 3, 1, dtype=torch.float64)
    y3 = bdlkern.ops.mc_dropout_conv(x3, w3, None, 0.45, S, stride=(1, 2, 1), padding=(1, 0, 1), **common)
    expected3 = reference(x3, w3, None, 0.45, S, state, stride=(1, 2, 1), padding=(1, 0, 1), **ref_kw)
    assert y3.shape == expected3.shape == (S * N, 3, 5, 2, 5)
    torch.testing.assert_close(y3, expected3, rtol=1e-12, atol=1e-12)


def test_functional_default_num_samples_and_p_zero():
    torch.manual_seed(1)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64)
    state = torch.tensor([5, 0])
    y = bdlkern.ops.mc_dropout_conv(x, w, b, rng_state=state)  # p = 0.5, num_samples = 1
    torch.testing.assert_close(y, reference(x, w, b, 0.5, 1, state), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, F.conv2d(x, w, b))
    # p = 0 is the plain convolution of every sample.
    y0 = bdlkern.ops.mc_dropout_conv(x, w, b, 0.0, 2, mask="channel", rng_state=state)
    torch.testing.assert_close(y0, F.conv2d(x, w, b).repeat(2, 1, 1, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("input_has_samples", [False, True])
@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_medium_problem_matches_reference(mask, shared_mask, input_has_samples):
    """A problem large enough for the CPU kernels' blocked / parallel paths (the tiny cases above
    may take a one-pass path), float32 against the float64 reference."""
    cfg = dict(C_in=16, C_out=24, k=(3, 3), sp=(15, 17), stride=1, padding=1, dilation=1, groups=1, bias=True, p=0.5)
    S, N = 4, 6
    x, w, b = make_problem(cfg, S, N, input_has_samples=input_has_samples, dtype=torch.float32, device="cpu", seed=21)
    for t in (x, w, b):
        t.requires_grad_()
    state = torch.tensor([2024, 0])
    channel = mask == "channel"
    y = bdlkern.ops.mc_dropout_conv(x, w, b, 0.5, S, padding=1, mask=mask, shared_mask=shared_mask,
                                    input_has_samples=input_has_samples, rng_state=state)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    grads = torch.autograd.grad(y, (x, w, b), g)
    kw = dict(padding=1, channel=channel, shared=shared_mask, input_has_samples=input_has_samples)
    expected = reference_and_grads(x, w, b, g, 0.5, S, state, **kw)
    assert_matches([y, *grads], expected, bounds(x, w, b, g, 0.5, S, state, **kw), torch.float32)


# ---- the mask does not depend on where the sample dimension comes from ------------------------------
def identity_weight(C, d, dtype=torch.float64):
    return torch.eye(C, dtype=dtype).reshape(C, C, *([1] * d))


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_mask_same_with_and_without_sample_dimension(backend, mask, shared_mask, dims):
    """A 1x1 identity conv makes the output exactly the masked, scaled input: the mask of a given
    (s, n, c, spatial) is the same whether the op repeats x or x already has the samples."""
    S, N, C = 3, 4, 5
    sp = (7,) if dims == 1 else (4, 6)
    x = (torch.rand(N, C, *sp, dtype=torch.float64) + 0.5).to(backend.device)  # no zeros
    w = identity_weight(C, dims).to(backend.device)
    state = backend.tensor([42, 5], dtype=torch.int64)
    ones, zeros = [1] * dims, [0] * dims
    channel = mask == "channel"
    y_shared = backend.ops.mc_dropout_conv(x, w, None, state, 0.5, S, True, ones, zeros, ones, 1, channel, shared_mask)
    xs = x.repeat(S, *([1] * (dims + 1)))
    y_per = backend.ops.mc_dropout_conv(xs, w, None, state, 0.5, S, False, ones, zeros, ones, 1, channel, shared_mask)
    expected = keep_mask(S, N, C, sp, 0.5, state, channel=channel, shared=shared_mask)
    assert torch.equal((y_shared != 0).cpu(), expected)
    assert torch.equal((y_per != 0).cpu(), expected)
    assert torch.equal(y_shared, y_per)
    torch.testing.assert_close(y_shared, xs * expected.to(xs.device) * 2.0, rtol=0, atol=0)


# ---- gradcheck, gradgradcheck, opcheck, torch.compile -----------------------------------------------
@pytest.mark.parametrize("input_has_samples", [False, True])
@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_gradcheck_gradgradcheck(mask, shared_mask, input_has_samples):
    S, N = 2, 2
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(S * N if input_has_samples else N, 4, 4, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 2, 2, 2, generator=gen, dtype=torch.float64)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    state = torch.tensor([11, 2])
    inputs = tuple(t.requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        return bdlkern.ops.mc_dropout_conv(
            x, w, b, 0.35, S, stride=(1, 2), padding=1, groups=2, mask=mask, shared_mask=shared_mask,
            input_has_samples=input_has_samples, rng_state=state,
        )

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


@pytest.mark.parametrize("mask", ["element", "channel"])
def test_gradcheck_gradgradcheck_conv1d_no_bias(mask):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    state = torch.tensor([12, 0])

    def f(x, w):
        return bdlkern.ops.mc_dropout_conv(x, w, None, 0.5, 2, stride=2, dilation=2, padding=2, mask=mask,
                                           rng_state=state)

    assert torch.autograd.gradcheck(f, (x, w))
    assert torch.autograd.gradgradcheck(f, (x, w))


@pytest.mark.parametrize("channel,shared_mask", [(False, False), (True, True)])
def test_gradcheck_through_simt_autograd(channel, shared_mask):
    """The SIMT namespace's autograd (the CUDA-source mask kernels in forward and backward). The
    emulator costs ~15 ms a call: tiny shapes, and gradgradcheck on the per-element masks only."""
    require_simt()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)
    state = torch.tensor([13, 0])
    ops = torch.ops.bdlkern_simt

    def f(x, w, b):
        return ops.mc_dropout_conv(x, w, b, state, 0.4, 2, True, [1, 1], [0, 0], [1, 1], 1, channel, shared_mask)

    assert torch.autograd.gradcheck(f, (x, w, b))
    if not channel:
        assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_opcheck():
    op = torch.ops.bdlkern.mc_dropout_conv.default
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    xs = torch.randn(6, 4, 5, 5, generator=gen)
    w = torch.randn(3, 4, 3, 3, generator=gen)
    b = torch.randn(3, generator=gen)
    state = torch.tensor([3, 0])
    calls = [
        (x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_(), state, 0.25, 3, True,
         [1, 1], [1, 1], [1, 1], 1, False, False),
        (xs.clone().requires_grad_(), w.clone().requires_grad_(), None, state, 0.25, 3, False,
         [2, 1], [0, 1], [1, 2], 1, True, False),
        (x, w, b, state, 0.5, 3, True, [1, 1], [1, 1], [1, 1], 1, False, True),
        (xs.clone().requires_grad_(), w.clone().requires_grad_(), b, state, 0.5, 3, False,
         [1, 1], [1, 1], [1, 1], 1, True, True),
        # conv1d, grouped
        (torch.randn(2, 4, 9, generator=gen, requires_grad=True), torch.randn(6, 2, 3, generator=gen, requires_grad=True),
         torch.randn(6, generator=gen), state, 0.3, 2, True, [2], [1], [1], 2, True, False),
    ]
    for args in calls:
        opcheck(op, args)


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, 6, generator=gen)
    w = torch.randn(5, 4, 3, 3, generator=gen)
    b = torch.randn(5, generator=gen)
    state = torch.tensor([11, 0])

    def f(x, w, b, state):
        y = bdlkern.ops.mc_dropout_conv(x, w, b, 0.5, 4, padding=1, mask="channel", rng_state=state)
        z = bdlkern.ops.mc_dropout_conv(x, w, b, 0.3, 4, stride=2, mask="element", shared_mask=True, rng_state=state)
        return y.relu().sum() + z.tanh().sum()

    compiled = torch.compile(f, fullgraph=True)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    args_eager = [t.clone().requires_grad_() for t in (x, w, b)]
    out, out_eager = compiled(*args, state), f(*args_eager, state)
    torch.testing.assert_close(out, out_eager)
    out.backward()
    out_eager.backward()
    for a, e in zip(args, args_eager):
        torch.testing.assert_close(a.grad, e.grad)
    # A different state gives a different result under compile too (the state is an input).
    assert not torch.allclose(compiled(*args, torch.tensor([12, 0])), out)


# ---- statistics and determinism ---------------------------------------------------------------------
def masked_identity(S, N, C, sp, p, state, *, mask="element", shared_mask=False, dtype=torch.float32):
    """The op's keep mask (output != 0) through a 1x1 identity conv of a positive input."""
    x = torch.rand(N, C, *sp, dtype=dtype) + 0.5
    y = bdlkern.ops.mc_dropout_conv(x, identity_weight(C, len(sp), dtype), None, p, S, mask=mask,
                                    shared_mask=shared_mask, rng_state=state)
    return y, x


def _assert_fraction(keep: torch.Tensor, p: float):
    n = keep.numel()
    frac = keep.double().mean().item()
    assert abs(frac - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n), f"kept {frac} of {n}, expected {1 - p}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_fraction_element(p):
    S, N, C, sp = 4, 8, 16, (12, 12)
    state = torch.tensor([1, 0])
    y, x = masked_identity(S, N, C, sp, p, state, mask="element")
    keep = y != 0
    _assert_fraction(keep, p)
    torch.testing.assert_close(y[keep], (x.repeat(S, 1, 1, 1) / (1 - p))[keep])
    # Shared element masks: one flag per (s, c, h, w), the same for every image of a sample.
    ys, _ = masked_identity(S, N, C, sp, p, state, mask="element", shared_mask=True)
    ks = (ys != 0).reshape(S, N, C, *sp)
    assert torch.equal(ks, ks[:, :1].expand_as(ks))
    _assert_fraction(ks[:, 0], p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_fraction_channel(p):
    S, N, C, sp = 8, 32, 64, (2, 3)
    state = torch.tensor([2, 0])
    y, _ = masked_identity(S, N, C, sp, p, state, mask="channel")
    keep = y != 0
    assert torch.equal(keep, keep[..., :1, :1].expand_as(keep))  # one flag per (sample, image, channel)
    _assert_fraction(keep[..., 0, 0], p)
    # Shared channel masks: one flag per (s, c).
    S2 = 64
    ys, _ = masked_identity(S2, 3, C, (2, 2), p, state, mask="channel", shared_mask=True)
    ks = (ys != 0).reshape(S2, 3, C, 2, 2)
    assert torch.equal(ks, ks[:, :1, :, :1, :1].expand_as(ks))
    _assert_fraction(ks[:, 0, :, 0, 0], p)


def test_same_state_same_bits_and_generators():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    w = torch.randn(5, 3, 3, 3, generator=gen)
    state = torch.tensor([21, 0])
    f = bdlkern.ops.mc_dropout_conv
    for mask in ("element", "channel"):
        y1 = f(x, w, None, 0.5, 3, mask=mask, rng_state=state)
        y2 = f(x, w, None, 0.5, 3, mask=mask, rng_state=state.clone())
        assert torch.equal(y1, y2)
        assert not torch.equal(y1, f(x, w, None, 0.5, 3, mask=mask, rng_state=torch.tensor([22, 0])))
        assert not torch.equal(y1, f(x, w, None, 0.5, 3, mask=mask, rng_state=torch.tensor([21, 1])))
    torch.manual_seed(4)
    a = f(x, w, None, 0.5, 3)
    torch.manual_seed(4)
    assert torch.equal(a, f(x, w, None, 0.5, 3))
    a = f(x, w, None, 0.5, 3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, f(x, w, None, 0.5, 3, generator=torch.Generator().manual_seed(9)))
    assert not torch.equal(a, f(x, w, None, 0.5, 3, generator=torch.Generator().manual_seed(10)))


def test_deterministic_across_thread_counts(threads):
    S, N, C, sp = 4, 8, 16, (16, 16)
    state = torch.tensor([8, 8])
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(N, C, *sp, generator=gen)
    w = torch.randn(8, C, 3, 3, generator=gen) / 12
    b = torch.randn(8, generator=gen)
    g = torch.randn(S * N, 8, 16, 16, generator=gen)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        run = []
        for mask in ("element", "channel"):
            for shared in (False, True):
                run.append(masked_identity(S, N, C, sp, 0.3, state, mask=mask, shared_mask=shared)[0] != 0)
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = bdlkern.ops.mc_dropout_conv(xr, wr, b, 0.3, S, padding=1, rng_state=state)
        run += [y.detach(), *torch.autograd.grad(y, (xr, wr), g)]
        results.append(run)
    one, two = results
    for i in range(4):
        assert torch.equal(one[i], two[i]), f"mask {i}"  # masks: bit for bit
    for a, e in zip(one[4:], two[4:]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item())


# ---- bad input -------------------------------------------------------------------------------------
def test_bad_input_names_the_argument():
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(6, 4, 3, 3)
    b = torch.randn(6)
    st = torch.tensor([1, 1])
    f = bdlkern.ops.mc_dropout_conv
    assert f(x, w, b, 0.5, 2, rng_state=st).shape == (4, 6, 4, 4)  # the valid call works
    rank_x = r"x must be \[batch, channels, \*spatial\] with 2 spatial dimension"
    with pytest.raises(ERRORS, match=rank_x):
        f(torch.randn(4, 6, 6), w, b, 0.5, 2, rng_state=st)
    with pytest.raises(ERRORS, match=rank_x):
        f(torch.randn(2, 4, 6), w, b, 0.5, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"weight must be \[out_channels, in_channels / groups, \*kernel\]"):
        f(x, torch.randn(6, 4), b, 0.5, 2, rng_state=st)  # no spatial dimension
    with pytest.raises(ERRORS, match=r"x has 5 channels but weight expects in_channels = 4"):
        f(torch.randn(2, 5, 6, 6), w, b, 0.5, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"x has 4 channels but weight expects in_channels = 4 \* groups \(2\) = 8"):
        f(x, w, b, 0.5, 2, groups=2, rng_state=st)
    with pytest.raises(ERRORS, match=r"out_channels \(4\) must be divisible by groups \(3\)"):
        f(torch.randn(2, 6, 6, 6), torch.randn(4, 2, 3, 3), None, 0.5, 2, groups=3, rng_state=st)
    with pytest.raises(ERRORS, match=r"groups must be an int >= 1"):
        f(x, w, b, 0.5, 2, groups=0, rng_state=st)
    for p in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ERRORS, match=r"p must be in \[0, 1\)"):
            f(x, w, b, p, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"mask must be 'element' or 'channel', got 'bogus'"):
        f(x, w, b, 0.5, 2, mask="bogus", rng_state=st)
    with pytest.raises(ERRORS, match=r"x has 5 rows, not a multiple of num_samples = 2"):
        f(torch.randn(5, 4, 6, 6), w, b, 0.5, 2, input_has_samples=True, rng_state=st)
    with pytest.raises(ERRORS, match=r"num_samples must be an int >= 1"):
        f(x, w, b, 0.5, 0, rng_state=st)
    with pytest.raises(ERRORS, match=r"bias must be \[out_channels\] = \[6\]"):
        f(x, w, torch.randn(5), 0.5, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"bias must be \[out_channels\] = \[6\]"):
        f(x, w, torch.randn(6, 1), 0.5, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"weight must have the dtype of x"):
        f(x, w.double(), b, 0.5, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"bias must have the dtype of x"):
        f(x, w, b.double(), 0.5, 2, rng_state=st)
    with pytest.raises(ERRORS, match=r"rng_state must be an int64"):
        f(x, w, b, 0.5, 2, rng_state=torch.tensor([1.0, 2.0]))
    with pytest.raises(ERRORS, match=r"weight must be on x's device"):  # device mismatch (meta weight)
        torch.ops.bdlkern.mc_dropout_conv(x, w.to("meta"), None, st, 0.5, 2, True, [1, 1], [0, 0], [1, 1], 1, False, False)


@pytest.mark.parametrize("ns", ["bdlkern", "bdlkern_simt"])
def test_bad_input_raw_op(ns):
    if ns == "bdlkern_simt":
        require_simt()
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(6, 4, 3, 3)
    st = torch.tensor([1, 1])
    op = getattr(torch.ops, ns).mc_dropout_conv
    args = dict(stride=[1, 1], padding=[0, 0], dilation=[1, 1])

    def call(x=x, w=w, b=None, p=0.5, S=2, shared_input=True, groups=1, **over):
        a = {**args, **over}
        return op(x, w, b, st, p, S, shared_input, a["stride"], a["padding"], a["dilation"], groups, False, False)

    assert call().shape == (4, 6, 4, 4)
    with pytest.raises(ERRORS, match=r"weight must be .* for x of shape \[4, 6, 6\]"):
        call(x=torch.randn(4, 6, 6))
    with pytest.raises(ERRORS, match=r"p must be in \[0, 1\)"):
        call(p=1.0)
    with pytest.raises(ERRORS, match=r"out_channels \(4\) must be divisible by groups \(3\)"):
        call(x=torch.randn(2, 6, 6, 6), w=torch.randn(4, 2, 3, 3), groups=3)
    with pytest.raises(ERRORS, match=r"bias must be \[out_channels\]"):
        call(b=torch.randn(3))
    with pytest.raises(ERRORS, match=r"x has 5 rows, not a multiple of num_samples = 2"):
        call(x=torch.randn(5, 4, 6, 6), shared_input=False)
    with pytest.raises(ERRORS, match=r"stride must be >= 1"):
        call(stride=[0, 1])


# ---- memory layouts and empty batches ---------------------------------------------------------------
def _strided_copy(t):
    """A view equal to ``t`` with a step-2 last dimension."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    big[..., ::2] = t
    return big[..., ::2]


@pytest.mark.parametrize("mask", ["element", "channel"])
@pytest.mark.parametrize("shared_mask", [False, True])
def test_non_contiguous_and_channels_last_inputs(mask, shared_mask):
    gen = torch.Generator().manual_seed(10)
    S = 3
    base = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    state = torch.tensor([31, 4])
    kw = dict(padding=1, mask=mask, shared_mask=shared_mask, rng_state=state)
    variants = {
        "transposed": base.transpose(2, 3).contiguous().transpose(2, 3),  # same values, strides swapped
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "sliced": _strided_copy(base),
        "batch_stride": torch.stack([base, base], dim=1)[:, 0],
    }
    x0 = base.clone().requires_grad_()
    y0 = bdlkern.ops.mc_dropout_conv(x0, w, b, 0.4, S, **kw)
    torch.testing.assert_close(
        y0, reference(base, w, b, 0.4, S, state, padding=1, channel=mask == "channel", shared=shared_mask),
        rtol=1e-12, atol=1e-12,
    )
    g = torch.randn_like(y0)
    (gx0,) = torch.autograd.grad(y0, x0, g)
    for name, x in variants.items():
        assert torch.equal(x, base), name
        if name != "channels_last":
            assert not x.is_contiguous(), name
        x = x.detach().requires_grad_()
        y = bdlkern.ops.mc_dropout_conv(x, w, b, 0.4, S, **kw)
        torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12, msg=lambda s: f"{name}: {s}")
        (gx,) = torch.autograd.grad(y, x, g)
        torch.testing.assert_close(gx, gx0, rtol=1e-12, atol=1e-12, msg=lambda s: f"{name} grad: {s}")
    # Channels-last weight and per-sample channels-last input too.
    xs = base.repeat(S, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    y = bdlkern.ops.mc_dropout_conv(xs, w.contiguous(memory_format=torch.channels_last), b, 0.4, S,
                                    input_has_samples=True, **kw)
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("input_has_samples", [False, True])
@pytest.mark.parametrize("mask", ["element", "channel"])
@pytest.mark.parametrize("shared_mask", [False, True])
def test_empty_batch(mask, shared_mask, input_has_samples):
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    x = torch.randn(0, 3, 6, 5, requires_grad=True)
    y = bdlkern.ops.mc_dropout_conv(x, w, b, 0.5, 3, mask=mask, shared_mask=shared_mask,
                                    input_has_samples=input_has_samples, rng_state=torch.tensor([1, 0]))
    assert y.shape == (0, 4, 4, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 3, 6, 5)
    assert torch.equal(w.grad, torch.zeros(4, 3, 3, 3)) and torch.equal(b.grad, torch.zeros(4))


# ---- shared channel masks: the path that convolves the kept channels only ----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("C_in,S", [(1, 8), (3, 6), (16, 4)])
@pytest.mark.parametrize("input_has_samples", [False, True])
def test_shared_channel_mask_groups_one_skips_dropped_channels(backend, C_in, S, input_has_samples, dtype):
    N = 3
    cfg = dict(C_in=C_in, C_out=5, k=(3, 3), sp=(6, 7), stride=1, padding=1, dilation=1, groups=1, bias=True, p=0.5)
    x, w, b = make_problem(cfg, S, N, input_has_samples=input_has_samples, dtype=dtype, device=backend.device, seed=C_in)
    for t in (x, w, b):
        t.requires_grad_()
    state = backend.tensor([4, 0], dtype=torch.int64)
    kw = dict(conv_kwargs(cfg), channel=True, shared=True, input_has_samples=input_has_samples)
    with no_tf32():
        y = raw_call(backend.ops, x, w, b, state, 0.5, S, cfg, channel=True, shared=True,
                     input_has_samples=input_has_samples)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(backend.device)
        grads = torch.autograd.grad(y, (x, w, b), g)
    expected = reference_and_grads(x, w, b, g, 0.5, S, state, **kw)
    assert_matches([y, *grads], expected, bounds(x, w, b, g, 0.5, S, state, **kw), dtype)
    keep = bdlkern.ops.dropout_mask([S, C_in], 0.5, rng_state=state.cpu(), stream=MC_STREAM)
    if C_in == 1:  # a sample that drops every channel: its outputs are the bias
        assert (~keep.any(1)).any(), "the test needs a sample with every channel dropped"
        s = int((~keep.any(1)).nonzero()[0])
        rows = y[s * N:(s + 1) * N].detach().cpu().double()
        torch.testing.assert_close(rows, b.detach().cpu().double().reshape(1, -1, 1, 1).expand_as(rows), rtol=0, atol=0)
    else:
        assert keep.any() and not keep.all()


# ---- low precision -----------------------------------------------------------------------------------
@pytest.mark.parametrize("mask", ["element", "channel"])
def test_bfloat16_error_within_twice_pytorch(mask):
    """Low-precision rule (docs/design.md 6.2): error vs float64 <= 2x PyTorch's in bfloat16."""
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(4, 8, 8, 8, generator=gen, dtype=torch.float64).bfloat16().double()
    w = (torch.randn(6, 8, 3, 3, generator=gen, dtype=torch.float64) / 8).bfloat16().double()
    b = torch.randn(6, generator=gen, dtype=torch.float64).bfloat16().double()
    state = torch.tensor([6, 6])
    kw = dict(padding=1, channel=mask == "channel")
    exact = reference(x, w, b, 0.3, 3, state, **kw)
    torch_bf16 = reference(x.bfloat16(), w.bfloat16(), b.bfloat16(), 0.3, 3, state, **kw)
    ours = bdlkern.ops.mc_dropout_conv(x.bfloat16(), w.bfloat16(), b.bfloat16(), 0.3, 3, padding=1, mask=mask,
                                       rng_state=state)
    assert ours.dtype == torch.bfloat16 and ours.shape == exact.shape
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (torch_bf16.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, f"{err_ours} > 2 x {err_torch}"
