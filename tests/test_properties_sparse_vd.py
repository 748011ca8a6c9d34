"""Property-based tests (hypothesis) of the sparse variational dropout ops against
``bdlkern.testing.reference``: lrt_linear, sparse_vd_kl and sparse_linear / sparse_linear_lrt (CSR).

Values and gradients (through the ops' autograd registrations) against the float64 reference, on
the ``cpu`` and ``simt`` backends, with zero weights, log_sigma2 of +-100 and NaN, empty and
all-zero CSR rows, strided CSR arrays and every row order. Products are bounded by (reduction
length) x eps x (the same sum over absolute values), the LRT samples also by the noise's own
rounding; float32 LRT gradients follow the low-precision rule of docs/design.md section 6.2. The
public wrappers give the raw ops' bits; the same rng_state gives the same bits with 1 and 2
threads. Strategies and helpers: tests/_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _properties import (
    BACKENDS, DETERMINISM, EPS, F32, F64, STREAMS, Arg, _deterministic, assert_design_rule, assert_within, equal_bits,
    examples, generator, grads, make_arg, rng_states, shapes,
)
from conftest import require_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import bdlkern
from bdlkern.testing import reference as ref


# ---- LRT linear and the KL term ---------------------------------------------------------------------
@st.composite
def lrt_cases(draw, small: bool, big: bool = False, nan: bool = True):
    shared_input = draw(st.booleans(), label="shared_input")
    c = dict(
        S=draw(st.integers(1, 4), label="S"),
        B=draw(st.integers(0, 9 if small else (64 if big else 24)), label="B"),
        # K = 0 with [S, B, K]: test_zero_in_features_gives_bias
        K=draw(st.integers(0 if shared_input else 1, 70 if not big else 128), label="K"),
        N=draw(st.integers(0, 17 if small else (64 if big else 32)), label="N"),
        shared_input=shared_input,
        dtype=draw(st.sampled_from([F32, F64]), label="dtype"),
        state=draw(rng_states(), label="rng_state"),
    )
    g = generator(draw)
    S, B, K, N = c["S"], c["B"], c["K"], c["N"]
    c["x"] = make_arg(draw, g, (B, K) if c["shared_input"] else (S, B, K), label="x")
    c["theta"], c["ls"] = draw_weights(draw, g, (N, K), nan=nan)
    c["b"] = make_arg(draw, g, (N,), label="bias") if draw(st.booleans(), label="has bias") else None
    c["gy"] = torch.randn(S, B, N, generator=g, dtype=F64)
    return c


def draw_weights(draw, g, shape, nan: bool):
    """theta (some entries 0) and log_sigma2: either log alpha spread over (-10, 10) around theta
    (both clamp ends, same layout as theta), or absolute values up to +-100; NaN in one entry."""
    theta = make_arg(draw, g, shape, scale=1 / math.sqrt(max(shape[-1], 1)) if shape else 1.0, label="theta")
    n = theta.base.numel()
    if n and draw(st.booleans(), label="zero thetas"):
        theta.base.view(-1)[torch.randperm(n, generator=g)[: max(1, n // 4)]] = 0.0
    if draw(st.booleans(), label="log alpha around theta"):
        la = torch.rand(theta.base.shape, generator=g, dtype=F64) * 20 - 10
        ls = Arg(torch.log(theta.base**2 + 1e-8) + la, theta.view, theta.layout)
    else:
        shift = draw(st.one_of(st.sampled_from([-100.0, -20.0, -8.0, 0.0, 8.0, 20.0, 100.0]), st.floats(-100, 100)), label="log_sigma2")
        ls = make_arg(draw, g, shape, scale=draw(st.sampled_from([0.0, 1.0, 10.0]), label="spread"), shift=shift, label="log_sigma2")
    if nan and ls.base.numel() and draw(st.booleans(), label="NaN log_sigma2"):
        ls.base.view(-1)[int(torch.randint(ls.base.numel(), (1,), generator=g))] = float("nan")
    return theta, ls


def _lrt_args(c):
    return [c["x"], c["theta"], c["ls"]] + ([c["b"]] if c["b"] is not None else [])


def _run_lrt(ops, c, dtype=None):
    dtype = dtype or c["dtype"]
    leaves, views = zip(*(a.value(dtype, grad=True) for a in _lrt_args(c)))
    bias = views[3] if c["b"] is not None else None
    y, std = ops.lrt_linear(views[0], views[1], views[2], bias, c["state"], c["S"])
    return y, std, grads(y, leaves, c["gy"].to(dtype))


def _ref_lrt(c, inputs):
    x, theta, ls, *b = inputs
    return ref.lrt_linear(x, theta, ls, b[0] if b else None, c["S"] if c["shared_input"] else None, rng_state=c["state"])


def _noise_bound(c, shape, stream, mu_abs, std, n_red):
    """Bound of an LRT sample y = mu + std * eps against the float64 reference: rounding of the
    products (n_red eps), the float32 noise being made from float32 uniforms (|eps32 - eps64|,
    exact from the reference), and the Box-Muller tolerance of test_rng.py."""
    dtype = c["dtype"]
    e64 = ref.normal(c["state"], shape, stream, F64)
    e_low = ref.normal(c["state"], shape, stream, dtype).double()
    ntol = 1e-5 if dtype == F32 else 1e-12
    return n_red * EPS[dtype] * (mu_abs + std * e64.abs()) + std * ((e_low - e64).abs() + ntol * (1 + e64.abs()))


def _check_lrt_grads(c, args, fn, got_grads):
    """float64: the float64 reference gradients (rtol 1e-9, atol 1e-10 of the largest); float32:
    the low-precision rule (docs/design.md section 6.2) against the reference run in float32."""
    dtype = c["dtype"]
    exact_in = [a.exact(dtype) for a in args]
    exact = fn(c, exact_in)
    exact_grads = [a.push(t) for a, t in zip(args, grads(exact, exact_in, c["gy"].to(dtype).double()))]
    names = ("grad_x", "grad_theta", "grad_log_sigma2", "grad_bias")
    if dtype == F64:
        for what, got, e in zip(names, got_grads, exact_grads):
            top = e.abs().max().item() if e.numel() else 0.0
            assert_within(got, e, 1e-9 * e.abs() + 1e-10 * top + 1e-300, what)
    else:
        low_in = [a.exact(dtype).detach().float().requires_grad_() for a in args]
        low_grads = [a.push(t.double()) for a, t in zip(args, grads(fn(c, low_in), low_in, c["gy"].float()))]
        for what, got, lo, e in zip(names, got_grads, low_grads, exact_grads):
            top = e.abs().max().item() if e.numel() else 0.0
            floor = 1e-5 * top
            if what == "grad_bias":
                # A pure sum of grad_out (over S and B, and over N for a broadcast bias) whose terms
                # may cancel: its rounding scales with the sum of |terms|, not with the result, and
                # differs with the summation order (one unit of float32 at that scale).
                floor = max(floor, EPS[dtype] * c["gy"].abs().sum().item())
            assert_design_rule(got, lo, e, what, floor)


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=examples(30))
@given(data=st.data())
def test_lrt_linear_matches_reference(name, data):
    ops = require_backend(name).ops
    c = data.draw(lrt_cases(small=name == "simt"), label="case")
    S, B, K, N, dtype = c["S"], c["B"], c["K"], c["N"], c["dtype"]
    y, std, gs = _run_lrt(ops, c)
    rows = B if c["shared_input"] else S * B
    assert y.shape == (S, B, N) and std.shape == (rows, N) and y.dtype == std.dtype == dtype

    xe, te, le = (a.exact(dtype).detach() for a in _lrt_args(c)[:3])
    be = c["b"].exact(dtype).detach() if c["b"] is not None else None
    exact = _ref_lrt(c, [xe, te, le] + ([be] if be is not None else []))
    variance = torch.exp(ref.log_alpha(te, le)) * te**2
    var = F.linear(xe * xe, variance)  # [B, N] or [S, B, N]
    exact_std = torch.sqrt(var + 1e-8)
    assert_within(std, exact_std.reshape(rows, N), (K + 40) * EPS[dtype] * exact_std.reshape(rows, N), "std")
    mu_abs = F.linear(xe.abs(), te.abs(), None if be is None else be.abs()).expand(S, B, N)
    bound = _noise_bound(c, (S, B, N), STREAMS["lrt"], mu_abs, exact_std.expand(S, B, N), K + 40)
    assert_within(y, exact, bound, "y")
    if not le.isnan().any():
        _check_lrt_grads(c, _lrt_args(c), _ref_lrt, gs)

    if name == "cpu" and K > 0:  # the public wrapper (K = 0: test_zero_in_features_gives_bias)
        views = [a.value(dtype)[1] for a in _lrt_args(c)]
        yp = bdlkern.ops.lrt_linear(
            views[0].unsqueeze(-2), views[1], views[2], views[3] if c["b"] is not None else None,
            num_samples=S if c["shared_input"] else None, rng_state=c["state"],
        )
        assert yp.shape == (S, B, 1, N) and equal_bits(yp.squeeze(-2), y)


@st.composite
def kl_cases(draw, small: bool, big: bool = False, nan: bool = True):
    shape = draw(shapes(0, 4, 2000 if small else (200_000 if big else 6000), side=70 if not big else 700), label="shape")
    g = generator(draw)
    theta, ls = draw_weights(draw, g, shape, nan=nan)
    return dict(shape=shape, dtype=draw(st.sampled_from([F32, F64]), label="dtype"), theta=theta, ls=ls,
                gy=torch.randn((), generator=g, dtype=F64) * 3)


def _run_kl(ops, c):
    (tl, tv), (ll, lv) = c["theta"].value(c["dtype"], grad=True), c["ls"].value(c["dtype"], grad=True)
    kl = ops.sparse_vd_kl(tv, lv)
    return kl, grads(kl, [tl, ll], c["gy"].to(c["dtype"]))


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=examples(30))
@given(data=st.data())
def test_sparse_vd_kl_matches_reference(name, data):
    ops = require_backend(name).ops
    c = data.draw(kl_cases(small=name == "simt"), label="case")
    dtype, ed = c["dtype"], EPS[c["dtype"]]
    kl, (gt, gl) = _run_kl(ops, c)
    assert kl.shape == () and kl.dtype == dtype
    te, le = c["theta"].exact(dtype), c["ls"].exact(dtype)
    exact = ref.sparse_vd_kl(te, le)
    # Rounding: C eps of the dtype on each term's pieces (k1 sigma, 0.5 log1p(exp(-la)), k1 and
    # log alpha itself), and the float64 sum ("chunk sums in double").
    la = ref.log_alpha(te.detach(), le.detach())
    pieces = 2 * ref.KL_K1 + 0.5 * torch.log1p(torch.exp(-la)) + 0.5 * la.abs()
    n = max(1, te.numel())
    total = pieces.nansum().item()
    assert_within(kl, exact.detach(), torch.tensor(16 * ed * total + 2 * n * EPS[F64] * total + ed * abs(exact.item())), "kl")

    # Gradients per element, where log_sigma2 is a number (NaN: test_kl_gradient_at_nan_log_sigma2).
    g = c["gy"].to(dtype).double()
    exact_gt, exact_gl = grads(exact, [te, le], g)
    ok = ~le.detach().isnan()
    s = torch.sigmoid(ref.KL_K2 + ref.KL_K3 * la)
    dla = ref.KL_K1 * ref.KL_K3 * s * (1 - s) + 0.5 * torch.sigmoid(-la)
    # |d kl / d la| computed from s: absolute error eps (k1 k3 + 0.5) per unit of g, plus relative
    tol_ls = 16 * ed * (ref.KL_K1 * ref.KL_K3 + 0.5 + dla) * g.abs()
    tol_t = tol_ls * 2 * te.detach().abs() / (te.detach() ** 2 + 1e-8) + 16 * ed * exact_gt.abs()
    for what, got, e, tol, arg in (("grad_theta", gt, exact_gt, tol_t, c["theta"]), ("grad_log_sigma2", gl, exact_gl, tol_ls, c["ls"])):
        got_v = arg.view(got) if arg.layout != "expanded" else None
        if got_v is None:  # expanded: compare the summed gradient where every term is a number
            if ok.all():
                assert_within(got, arg.push(e), arg.push(tol), what)
            continue
        assert_within(got_v[ok], e[ok], tol[ok], what)


def test_kl_gradient_at_nan_log_sigma2_follows_clamp():
    """sparse_vd.h: "Derivatives follow the clamp as autograd's torch.clamp does". torch.clamp
    passes no gradient at NaN (its backward mask min <= v <= max is false), so the reference has 0
    gradients for theta and log_sigma2 at a NaN log_sigma2; the forward is NaN for both."""
    theta = torch.tensor([0.5, -0.25, 0.0], dtype=F64)
    ls = torch.tensor([float("nan"), -1.0, 2.0], dtype=F64)
    te, le = theta.clone().requires_grad_(), ls.clone().requires_grad_()
    exact = grads(ref.sparse_vd_kl(te, le), [te, le], torch.tensor(1.0, dtype=F64))
    for name in BACKENDS:
        ops = require_backend(name).ops
        got = ops.sparse_vd_kl_backward(torch.tensor(1.0, dtype=F64), theta, ls)
        assert torch.isnan(ops.sparse_vd_kl(theta, ls))
        for what, a, e in zip(("grad_theta", "grad_log_sigma2"), got, exact):
            torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{name} {what}: {m}")


# ---- sparse (CSR) linear --------------------------------------------------------------------------------
@st.composite
def sparse_cases(draw, small: bool, big: bool = False):
    shared_input = draw(st.booleans(), label="shared_input")
    N = draw(st.integers(0, 17 if small else (300 if big else 40)), label="N")
    K = draw(st.integers(1, 70 if not big else 300), label="K")  # K = 0: test_zero_in_features_gives_bias
    c = dict(
        S=draw(st.integers(1, 4), label="S"),
        B=draw(st.integers(0, 9 if small else (128 if big else 33)), label="B"),
        N=N,
        K=K,
        shared_input=shared_input,
        dtype=draw(st.sampled_from([F32, F64]), label="dtype"),
        state=draw(rng_states(), label="rng_state"),
    )
    density = draw(st.one_of(st.sampled_from([0.0, 0.05, 0.3, 1.0]), st.floats(0.0, 1.0)), label="density")
    g = generator(draw)
    keep = torch.rand(N, K, generator=g) < density
    if N and draw(st.booleans(), label="empty rows"):
        keep[torch.rand(N, generator=g) < 0.3] = False
    w = torch.randn(N, K, generator=g, dtype=F64) * keep
    v = torch.rand(N, K, generator=g, dtype=F64) * keep * draw(st.sampled_from([0.0, 1.0, 100.0]), label="variance scale")
    rows, cols = keep.nonzero(as_tuple=True)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(rows, minlength=N).cumsum(0)])
    values = torch.stack([w[rows, cols], v[rows, cols]], 1)
    if draw(st.booleans(), label="strided CSR arrays"):  # views with strides: the op copies them
        crow = torch.stack([crow, crow], 1)[:, 0]
        cols = torch.stack([cols, cols], 1)[:, 0]
        values = torch.stack([values[:, 0], values[:, 0], values[:, 1], values[:, 1]], 1)[:, ::2]
    c.update(crow=crow, col=cols, values=values)
    order = draw(st.sampled_from(["none", "longest first", "random"]), label="row_order")
    lengths = crow[1:] - crow[:-1]
    c["row_order"] = {
        "none": None,
        "longest first": torch.argsort(lengths, descending=True, stable=True),
        "random": torch.randperm(N, generator=g),
    }[order]
    c["x"] = make_arg(draw, g, (c["B"], K) if c["shared_input"] else (c["S"], c["B"], K), label="x")
    c["b"] = make_arg(draw, g, (N,), label="bias") if draw(st.booleans(), label="has bias") else None
    c["theta_only"] = draw(st.booleans(), label="values [nnz] (deterministic)")
    c["gy"] = torch.randn(c["S"], c["B"], N, generator=g, dtype=F64)
    return c


def _values(c, dtype):
    v = c["values"].to(dtype)
    return v[:, 0] if c["theta_only"] else v


def _run_sparse(ops, c, stochastic: bool):
    dtype = c["dtype"]
    xl, xv = c["x"].value(dtype, grad=True)
    bv = c["b"].value(dtype)[1] if c["b"] is not None else None
    if stochastic:
        y, std = ops.sparse_linear_lrt(xv, c["crow"], c["col"], c["values"].to(dtype), bv, c["row_order"], c["state"], c["S"])
        return y, std, grads(y, [xl], c["gy"].to(dtype))[0]
    x2 = xv if c["shared_input"] else xv.reshape(c["S"] * c["B"], c["K"])
    y = ops.sparse_linear(x2, c["crow"], c["col"], _values(c, dtype), bv, c["row_order"])
    gy = c["gy"][0] if c["shared_input"] else c["gy"].reshape(c["S"] * c["B"], c["N"])
    return y, None, grads(y, [xl], gy.to(dtype))[0]


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=examples(30))
@given(data=st.data())
def test_sparse_linear_matches_reference(name, data):
    ops = require_backend(name).ops
    c = data.draw(sparse_cases(small=name == "simt"), label="case")
    S, B, K, N, dtype, ed = c["S"], c["B"], c["K"], c["N"], c["dtype"], EPS[c["dtype"]]
    x = c["x"]
    xe = x.exact(dtype)
    be = c["b"].exact(dtype).detach() if c["b"] is not None else None
    values = c["values"].to(dtype).double()
    w_abs, v_dense = ref.csr_to_dense(c["crow"], c["col"], values.abs(), K)

    # deterministic: y = x W^T + b, [rows, N]
    y, _, gx = _run_sparse(ops, c, stochastic=False)
    x2 = xe if c["shared_input"] else xe.reshape(S * B, K)
    exact = ref.sparse_linear(x2, c["crow"], c["col"], values[:, 0] if c["theta_only"] else values, be)
    assert y.shape == (x2.shape[0], N) and y.dtype == dtype
    assert_within(y, exact.detach(), (K + 4) * ed * F.linear(x2.detach().abs(), w_abs, None if be is None else be.abs()), "y")
    gy = (c["gy"][0] if c["shared_input"] else c["gy"].reshape(S * B, N)).to(dtype).double()
    (exact_gx,) = grads(exact, [xe], gy)
    assert_within(gx, x.push(exact_gx), x.push((N + 4) * ed * (gy.abs() @ w_abs).reshape(xe.shape)), "grad_x")

    # stochastic: S local-reparameterisation samples, [S, B, N], and std
    y, std, gx = _run_sparse(ops, c, stochastic=True)
    rows = B if c["shared_input"] else S * B
    assert y.shape == (S, B, N) and std.shape == (rows, N)
    xe = x.exact(dtype)
    num = S if c["shared_input"] else None
    exact = ref.sparse_linear(xe, c["crow"], c["col"], values, be, num, stochastic=True, rng_state=c["state"])
    exact_std = torch.sqrt(F.linear(xe.detach() ** 2, v_dense) + 1e-8)
    assert_within(std, exact_std.reshape(rows, N), (K + 4) * ed * exact_std.reshape(rows, N), "std")
    mu_abs = F.linear(xe.detach().abs(), w_abs, None if be is None else be.abs()).expand(S, B, N)
    assert_within(y, exact.detach(), _noise_bound(c, (S, B, N), STREAMS["sparse_lrt"], mu_abs, exact_std.expand(S, B, N), K + 4), "y (stochastic)")

    def fn(c, inputs):
        dt = inputs[0].dtype
        bias = None if be is None else be.to(dt)
        return ref.sparse_linear(inputs[0], c["crow"], c["col"], values.to(dt), bias, num, stochastic=True, rng_state=c["state"])

    _check_lrt_grads(c, [x], fn, [gx])

    if name == "cpu":  # the public wrapper: batch dimensions, both modes
        xv = x.value(dtype)[1]
        bv = c["b"].value(dtype)[1] if c["b"] is not None else None
        det = bdlkern.ops.sparse_linear(xv.unsqueeze(-2), c["crow"], c["col"], _values(c, dtype), bv, row_order=c["row_order"])
        assert equal_bits(det.flatten(0, -2), _run_sparse(ops, c, stochastic=False)[0])
        sto = bdlkern.ops.sparse_linear(
            xv.unsqueeze(-2), c["crow"], c["col"], c["values"].to(dtype), bv, num_samples=num,
            stochastic=True, rng_state=c["state"], row_order=c["row_order"],
        )
        assert sto.shape == (S, B, 1, N) and equal_bits(sto.squeeze(-2), y)


# ---- determinism: the same rng_state, 1 or 2 threads, the same bits ----------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@DETERMINISM
@given(data=st.data())
def test_lrt_and_kl_deterministic_across_threads(name, threads, data):
    ops = require_backend(name).ops
    c = data.draw(lrt_cases(small=name == "simt", big=name == "cpu", nan=False), label="lrt case")
    k = data.draw(kl_cases(small=name == "simt", big=name == "cpu", nan=False), label="kl case")
    names = ["lrt y", "lrt std", "lrt grad_x", "lrt grad_theta", "lrt grad_log_sigma2"] + ["lrt grad_bias"] * (c["b"] is not None)
    _deterministic(
        lambda: (lambda y, std, gs: (y, std, *gs))(*_run_lrt(ops, c)) + (lambda kl, gs: (kl, *gs))(*_run_kl(ops, k)),
        names + ["kl", "kl grad_theta", "kl grad_log_sigma2"],
        # Both backends compute the LRT mean and variance with torch's GEMMs (noise and KL: bdlkern's own).
        blas=names[:5],
    )


@pytest.mark.parametrize("name", BACKENDS)
@DETERMINISM
@given(data=st.data())
def test_sparse_linear_deterministic_across_threads(name, threads, data):
    ops = require_backend(name).ops
    c = data.draw(sparse_cases(small=name == "simt", big=name == "cpu"), label="case")
    _deterministic(
        lambda: _run_sparse(ops, c, stochastic=False)[::2] + _run_sparse(ops, c, stochastic=True),
        ["y", "grad_x", "stochastic y", "std", "stochastic grad_x"],
    )

# ---- found by the properties ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
def test_sparse_linear_row_order_view_is_read_by_value(name):
    """row_order is a permutation whatever its strides: a strided view of one must give the same
    outputs as the contiguous permutation (the binding passes the raw pointer of the view)."""
    ops = require_backend(name).ops
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(6, 5, generator=g) < 0.6
    rows, cols = keep.nonzero(as_tuple=True)
    crow = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(rows, minlength=6).cumsum(0)])
    w = torch.randn(6, 5, generator=g, dtype=F64)
    values = torch.stack([w[rows, cols], w[rows, cols].abs()], 1)
    x = torch.randn(4, 5, generator=g, dtype=F64)
    order = torch.tensor([5, 2, 0, 4, 1, 3])
    strided = torch.stack([order, torch.zeros_like(order)], 1)[:, 0]  # stride 2
    assert not strided.is_contiguous() and torch.equal(strided, order)
    state = torch.tensor([1, 2])
    expected = ops.sparse_linear(x, crow, cols, values[:, 0], None, order)
    assert torch.equal(ops.sparse_linear(x, crow, cols, values[:, 0], None, strided), expected)
    expected = ops.sparse_linear_lrt(x, crow, cols, values, None, order, state, 2)[0]
    assert torch.equal(ops.sparse_linear_lrt(x, crow, cols, values, None, strided, state, 2)[0], expected)
