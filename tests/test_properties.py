"""Property-based tests (hypothesis) of every bdlkern op against ``bdlkern.testing.reference``.

Each test draws shapes with 0, 1 and odd sizes, inputs that are contiguous, transposed,
step-sliced or expanded (stride 0), every dtype the op supports, extreme parameters (p near 0 and
1, logits of +-30 with temperatures down to 1e-3, log_sigma2 of +-100 and NaN, zero weights, empty
and all-zero CSR rows) and any rng_state (negative seeds and offsets are unsigned 64-bit words),
and runs the op on the ``cpu`` backend (C++ kernels) and the ``simt`` backend (CUDA sources under
the emulator):

* philox_bits / dropout_mask / uniform exactly, normal to the tolerance of test_rng.py, and the
  counter contract (offset + 1 skips one Philox block, wrapping at 2**64);
* mc_dropout_linear, concrete_dropout, lrt_linear, sparse_vd_kl, sparse_linear (deterministic and
  stochastic): values and gradients (through the ops' autograd registrations, so the backward
  kernels and the layouts autograd hands them are covered) against the float64 reference. The
  allowed error is an explicit bound: (reduction length) x eps x (the same sum over absolute
  values) for the products, a first-order error model for Concrete dropout that also charges the
  reference's own cancellation at extreme logits, the low-precision rule of docs/design.md
  section 6.2 (at most twice PyTorch's own error in that dtype) for bfloat16 / float16 and for
  float32 LRT gradients;
* the public wrappers of bdlkern.ops (cpu) give the raw op's bits, batch dimensions included;
* determinism: the same rng_state gives the same bits, gradients included, with 1 and 2 threads.

Settings come from the ``bdlkern`` hypothesis profile of conftest.py (derandomized, no deadline).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import bdlkern
from bdlkern.testing import reference as ref

BACKENDS = ["cpu", "simt"]
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
EPS = {F32: 2.0**-23, F64: 2.0**-52, BF16: 2.0**-7, F16: 2.0**-10}
STREAMS = bdlkern.ops.STREAMS
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]

# p of the ops that take p in [0, 1) (dropout_mask also takes 1).
P_OPEN = st.one_of(st.sampled_from([0.0, 1e-6, 0.5, 1.0 - 1e-6]), st.floats(0.0, 1.0, exclude_max=True))
TEMPERATURES = st.one_of(st.sampled_from([1e-3, 1e-2, 0.1, 0.25, 0.3, 0.5, 1.0]), st.floats(1e-3, 10.0))


# ---- strategies and helpers -------------------------------------------------------------------------
def _int64(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


@st.composite
def rng_states(draw) -> torch.Tensor:
    """int64 [seed, offset], sometimes a strided view (the ops read it through .contiguous())."""
    word = st.one_of(
        st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2]),
        st.integers(0, 2**64 - 1),
    )
    seed, offset = _int64(draw(word)), _int64(draw(word))
    if draw(st.booleans()):
        return torch.tensor([seed, 3, offset, 5], dtype=torch.int64)[::2]
    return torch.tensor([seed, offset], dtype=torch.int64)


@st.composite
def shapes(draw, min_rank: int, max_rank: int, cap: int, side: int = 70) -> tuple[int, ...]:
    """Sizes in [0, side] (0, 1 and odd ones included) whose nonzero product stays under cap."""
    rank = draw(st.integers(min_rank, max_rank))
    dims, prod = [], 1
    for _ in range(rank):
        d = draw(st.integers(0, max(1, min(side, cap // prod))))
        dims.append(d)
        prod *= max(d, 1)
    return tuple(dims)


class Arg:
    """A test tensor: a contiguous float64 ``base`` and the ``view`` the op receives (transposed,
    step-sliced, expanded or none). ``push`` maps a tensor of the view's shape back to the base's
    shape (the adjoint of the view: stride-0 dimensions are summed), as autograd does for the
    gradient of the base."""

    def __init__(self, base: torch.Tensor, view, layout: str):
        self.base, self.view, self.layout = base, view, layout

    def value(self, dtype, grad: bool = False):
        """(leaf, view of it) in dtype."""
        leaf = self.base.to(dtype).requires_grad_(grad)
        return leaf, self.view(leaf)

    def exact(self, dtype) -> torch.Tensor:
        """The view's values rounded to dtype, in float64, as a fresh leaf requiring grad."""
        return self.view(self.base.to(dtype).double()).detach().requires_grad_()

    def push(self, t: torch.Tensor) -> torch.Tensor:
        leaf = torch.zeros(self.base.shape, dtype=t.dtype, requires_grad=True)
        return torch.autograd.grad(self.view(leaf), leaf, t)[0]

    def __repr__(self) -> str:
        return f"Arg({self.layout}, {tuple(self.view(self.base).shape)})"


def make_arg(draw, g, shape, *, scale=1.0, shift=0.0, layouts=LAYOUTS, label="") -> Arg:
    shape = tuple(shape)
    n = len(shape)
    layout = draw(st.sampled_from(layouts), label=f"{label} layout")
    if layout == "transposed" and n >= 2:
        base_shape, view = shape[:-2] + (shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    elif layout == "strided" and n >= 1:
        base_shape, view = shape[:-1] + (2 * shape[-1],), lambda t: t[..., ::2]
    elif layout == "expanded" and n >= 1:
        d = draw(st.integers(0, n - 1), label=f"{label} expanded dim")
        base_shape, view = shape[:d] + (1,) + shape[d + 1 :], lambda t: t.expand(shape)
    else:
        layout, base_shape, view = "contiguous", shape, lambda t: t
    base = torch.randn(base_shape, generator=g, dtype=F64) * scale + shift
    return Arg(base, view, layout)


def generator(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="tensor seed"))


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|got - exact| <= bound elementwise; NaN exactly where exact is NaN, infinities equal."""
    got = got.detach().double()
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    nan = exact.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN at {got.isnan().nonzero()[:4].tolist()} vs {nan.nonzero()[:4].tolist()}"
    inf = exact.isinf()
    assert torch.equal(got[inf], exact[inf]), f"{what}: infinities differ"
    fin = ~(nan | inf)
    err = (got[fin] - exact[fin]).abs()
    lim = bound.expand_as(exact)[fin]
    bad = ~(err <= lim)
    if bad.any():
        i = int((err - lim).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements outside the bound; worst: got "
            f"{got[fin][i].item()!r}, exact {exact[fin][i].item()!r}, error {err[i].item():.3g} > {lim[i].item():.3g}"
        )


def assert_design_rule(ours, lowp, exact, what, floor=0.0) -> None:
    """docs/design.md section 6.2: max error of the kernel <= 2 x max error of PyTorch's computation
    in that dtype."""
    exact = exact.detach().double()
    err_ours = (ours.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    err_torch = (lowp.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    assert err_ours <= 2 * err_torch + floor, f"{what}: error {err_ours:.3g} > 2 x {err_torch:.3g} + {floor:.3g}"


def grads(out, inputs, grad_out):
    """autograd.grad that gives zeros for inputs out does not reach (empty shapes)."""
    res = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(i) if r is None else r for i, r in zip(inputs, res)]


def examples(n: int) -> int:
    """Example count of a property: n, divided by BDLKERN_FUZZ_DIVISOR in the sanitizer runs
    (tools/sanitize.sh), where every emulated CUDA thread costs 5-20x more."""
    return max(3, n // int(os.environ.get("BDLKERN_FUZZ_DIVISOR", "1")))


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        a, b = a.detach().contiguous(), b.detach().contiguous()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def at_threads(n: int, fn):
    torch.set_num_threads(n)
    return fn()


# ---- RNG ops ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=examples(30))
@given(data=st.data())
def test_rng_ops_match_reference(name, data):
    ops = require_backend(name).ops
    shape = data.draw(shapes(0, 3, 6000), label="shape")
    state = data.draw(rng_states(), label="rng_state")
    stream = data.draw(st.integers(0, len(STREAMS) - 1), label="stream")
    p = data.draw(st.one_of(st.sampled_from([0.0, 1e-6, 0.5, 1.0 - 1e-6, 1.0]), st.floats(0.0, 1.0)), label="p")
    n = math.prod(shape)
    words = ref.stream_words(state, n, stream)

    bits = ops.philox_bits(state, list(shape), stream)
    assert bits.dtype == torch.int32 and tuple(bits.shape) == shape
    np.testing.assert_array_equal(bits.numpy().reshape(-1).astype(np.uint32), words)
    mask = ops.dropout_mask(state, list(shape), p, stream)
    assert mask.dtype == torch.bool and torch.equal(mask, ref.dropout_mask(state, shape, p, stream))
    for dtype in (F32, F64):
        u = ops.uniform(state, list(shape), stream, dtype)
        assert u.dtype == dtype and torch.equal(u, ref.uniform(state, shape, stream, dtype))
        z = ops.normal(state, list(shape), stream, dtype)
        tol = 1e-5 if dtype == F32 else 1e-12
        torch.testing.assert_close(z, ref.normal(state, shape, stream, dtype), rtol=tol, atol=tol)

    # The counter contract: offset + 1 (mod 2**64) starts one Philox block (4 words) later.
    later = state.clone()
    later[1] = _int64((int(state[1]) + 1) % 2**64)
    if n > 4:
        assert torch.equal(ops.philox_bits(later, [n - 4], stream), bits.reshape(-1)[4:])

    if name == "cpu":  # the public wrappers: same bits, streams by name or tag
        tag = list(STREAMS)[stream]
        assert torch.equal(bdlkern.ops.philox_bits(shape, rng_state=state, stream=tag), bits)
        assert torch.equal(bdlkern.ops.dropout_mask(shape, p, rng_state=state, stream=stream), mask)
        assert torch.equal(bdlkern.ops.uniform(shape, dtype=F64, rng_state=state, stream=stream), u)
        assert torch.equal(bdlkern.ops.normal(shape, dtype=F64, rng_state=state, stream=tag), z)


# ---- MC-dropout linear ---------------------------------------------------------------------------------
@st.composite
def mc_cases(draw, small: bool, big: bool = False, dtypes=(F32, F64)):
    c = dict(
        S=draw(st.integers(1, 4), label="S"),
        B=draw(st.integers(0, 9 if small else (64 if big else 33)), label="B"),
        K=draw(st.integers(0, 70 if small or not big else 300), label="K"),
        N=draw(st.integers(0, 17 if small else (64 if big else 40)), label="N"),
        shared_input=draw(st.booleans(), label="shared_input"),
        shared_mask=draw(st.booleans(), label="shared_mask"),
        p=draw(P_OPEN, label="p"),
        dtype=draw(st.sampled_from(dtypes), label="dtype"),
        state=draw(rng_states(), label="rng_state"),
    )
    g = generator(draw)
    S, B, K, N = c["S"], c["B"], c["K"], c["N"]
    c["x"] = make_arg(draw, g, (B, K) if c["shared_input"] else (S, B, K), label="x")
    c["w"] = make_arg(draw, g, (N, K), scale=1 / math.sqrt(max(K, 1)), label="weight")
    c["b"] = make_arg(draw, g, (N,), label="bias") if draw(st.booleans(), label="has bias") else None
    c["gy"] = torch.randn(S, B, N, generator=g, dtype=F64)
    return c


def _mc_args(c):
    return [c["x"], c["w"]] + ([c["b"]] if c["b"] is not None else [])


def _run_mc(ops, c, dtype=None):
    """The kernel through the op's autograd: (y, grads of the leaves)."""
    dtype = dtype or c["dtype"]
    leaves, views = zip(*(a.value(dtype, grad=True) for a in _mc_args(c)))
    bias = views[2] if c["b"] is not None else None
    y = ops.mc_dropout_linear(views[0], views[1], bias, c["state"], c["p"], c["S"], c["shared_mask"])
    return y, grads(y, leaves, c["gy"].to(dtype))


def _ref_mc(c, inputs):
    x, w, *b = inputs
    return ref.mc_dropout_linear(
        x, w, b[0] if b else None, c["p"], c["S"] if c["shared_input"] else None,
        shared_mask=c["shared_mask"], rng_state=c["state"],
    )


def _reference_and_bounds(c, fn, args, dtype):
    """fn on the float64 view values, and fn on their absolute values (with |grad_out|): the sums of
    absolute terms that bound the rounding error of a product. Gradients pushed to the bases."""
    exact_in = [a.exact(dtype) for a in args]
    exact = fn(c, exact_in)
    exact_grads = [a.push(t) for a, t in zip(args, grads(exact, exact_in, c["gy"]))]
    abs_in = [t.detach().abs().requires_grad_() for t in exact_in]
    mag = fn(c, abs_in)
    mag_grads = [a.push(t) for a, t in zip(args, grads(mag, abs_in, c["gy"].abs()))]
    return exact.detach(), exact_grads, mag.detach(), mag_grads


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=examples(30))
@given(data=st.data())
def test_mc_dropout_linear_matches_reference(name, data):
    ops = require_backend(name).ops
    c = data.draw(mc_cases(small=name == "simt"), label="case")
    S, B, K, N, dtype = c["S"], c["B"], c["K"], c["N"], c["dtype"]
    y, gs = _run_mc(ops, c)
    assert y.shape == (S, B, N) and y.dtype == dtype
    exact, exact_grads, mag, mag_grads = _reference_and_bounds(c, _ref_mc, _mc_args(c), dtype)
    eps = EPS[dtype]
    assert_within(y, exact, (K + 4) * eps * mag, "y")
    n_grad = S * (B + N) + B + K + N + 4  # longer than any reduction of a gradient
    for what, got, e, m in zip(("grad_x", "grad_weight", "grad_bias"), gs, exact_grads, mag_grads):
        assert_within(got, e, n_grad * eps * m, what)

    # the public wrapper with batch dims [.., 1]: the same bits (K = 0: test_zero_in_features_gives_bias)
    if name == "cpu" and K > 0:
        xv, wv = c["x"].value(dtype)[1], c["w"].value(dtype)[1]
        bv = c["b"].value(dtype)[1] if c["b"] is not None else None
        yp = bdlkern.ops.mc_dropout_linear(
            xv.unsqueeze(-2), wv, bv, c["p"], S if c["shared_input"] else None,
            shared_mask=c["shared_mask"], rng_state=c["state"],
        )
        assert yp.shape == (S, B, 1, N) and equal_bits(yp.squeeze(-2), y)


@pytest.mark.parametrize("name,dtype", [("cpu", BF16), ("simt", BF16), ("simt", F16)])
@settings(max_examples=examples(20))
@given(data=st.data())
def test_mc_dropout_linear_low_precision(name, dtype, data):
    """bfloat16 (and float16 on the CUDA source): error vs float64 <= 2 x PyTorch's own in dtype."""
    ops = require_backend(name).ops
    c = data.draw(mc_cases(small=name == "simt", dtypes=(dtype,)), label="case")
    y, gs = _run_mc(ops, c)
    assert y.dtype == dtype
    args = _mc_args(c)
    exact_in = [a.exact(dtype) for a in args]
    exact = _ref_mc(c, exact_in)
    exact_grads = [a.push(t) for a, t in zip(args, grads(exact, exact_in, c["gy"].to(dtype).double()))]
    low_in = [a.exact(dtype).detach().to(dtype).requires_grad_() for a in args]
    low = _ref_mc(c, low_in)
    low_grads = [a.push(t.double()) for a, t in zip(args, grads(low, low_in, c["gy"].to(dtype)))]
    ulp = EPS[dtype]  # the unavoidable rounding of an output: one unit at its largest magnitude
    assert_design_rule(y, low, exact, "y", ulp * exact.abs().max().item() if exact.numel() else 0.0)
    for what, got, lo, e in zip(("grad_x", "grad_weight", "grad_bias"), gs, low_grads, exact_grads):
        assert got.dtype == dtype
        assert_design_rule(got, lo, e, what, ulp * e.abs().max().item() if e.numel() else 0.0)


# ---- Concrete dropout ---------------------------------------------------------------------------------
@st.composite
def concrete_cases(draw, small: bool, big: bool = False):
    cap = 1500 if small else (60000 if big else 4000)
    shape = draw(shapes(1, 4, cap, side=70 if not big else 400), label="x shape")
    rank = len(shape)
    # None, -1 and rank - 1 (the last dim): a mask value per element; 1: per (sample, channel) of
    # [N, C, *] (on [N, C] the public API reads 1 as per-channel: again one value per element)
    channel_dim = draw(st.sampled_from([None, -1, rank - 1] + ([1] if rank >= 2 else [])), label="channel_dim")
    cd = 1 if channel_dim == 1 else -1
    C = shape[cd]
    logit = st.one_of(st.sampled_from([-30.0, -12.0, -3.0, 0.0, 3.0, 12.0, 30.0]), st.floats(-30.0, 30.0))
    c = dict(
        shape=shape,
        channel_dim=channel_dim,
        cd=cd,
        t=draw(TEMPERATURES, label="temperature"),
        dtype=draw(st.sampled_from([F32, F64]), label="dtype"),
        state=draw(rng_states(), label="rng_state"),
        shift=draw(logit, label="logit"),
        spread=draw(st.sampled_from([0.0, 1.0, 5.0]), label="logit spread"),
    )
    g = generator(draw)
    c["x"] = make_arg(draw, g, shape, label="x")
    per_channel = draw(st.booleans(), label="per-channel p")
    p_shape = (C,) if per_channel else ()
    layouts = ["contiguous", "strided", "expanded"] if per_channel else ["contiguous"]
    c["p"] = make_arg(draw, g, p_shape, scale=c["spread"], shift=c["shift"], layouts=layouts, label="p_logit")
    c["p"].base.clamp_(-30.0, 30.0)
    c["gy"] = torch.randn(shape, generator=g, dtype=F64)
    return c


def _run_concrete(ops, c):
    (xl, xv), (pl, pv) = c["x"].value(c["dtype"], grad=True), c["p"].value(c["dtype"], grad=True)
    y = ops.concrete_dropout(xv, pv, c["state"], c["t"], c["cd"])
    return y, grads(y, [xl, pl], c["gy"].to(c["dtype"]))


def _rate_view(c, p: torch.Tensor) -> torch.Tensor:
    """p_logit broadcast to x's shape, as the op reads it."""
    shape = c["shape"]
    if c["cd"] == 1 and p.dim() == 1:
        p = p.reshape(-1, *([1] * (len(shape) - 2)))
    return p.expand(shape)


def _concrete_bounds(c, x, gy, lg, u_kernel, u64):
    """First-order error bounds of y, grad_x and the per-element terms of grad_p_logit (tensors of
    x's shape, float64). The kernel's own rounding (C eps of its dtype on each log / exp / product,
    and the argument a / t it amplifies), the float32 kernel's uniform being u rounded to float32,
    and the reference's cancellations: 1 - p (relative eps64 / q), 1 - z (absolute eps64) and
    log(1 - p + eps)."""
    C, ed, e64, eps, t = 16.0, EPS[c["dtype"]], EPS[F64], ref.CONCRETE_EPS, c["t"]
    p, q = torch.sigmoid(lg), torch.sigmoid(-lg)
    inv_q = 1.0 / q

    def noise(u):
        return torch.log(u + eps) - torch.log(1 - u + eps)

    lp, lq = torch.log(p + eps), torch.log(q + eps)
    a = lp - lq + noise(u_kernel)
    A = lp.abs() + lq.abs() + torch.log(u64 + eps).abs() + torch.log(1 - u64 + eps).abs()
    ds = (C * ed * (A + 1) + C * e64 * (A + p / (q + eps)) + (noise(u_kernel) - noise(u64)).abs()) / t
    keep = torch.sigmoid(-a / t)
    dkeep = torch.minimum(ds / 4, keep * ds * torch.exp(ds.clamp(max=50.0))) + C * (e64 + ed * keep)
    rel_q = C * (ed + e64 * inv_q)
    tol_y = x.abs() * inv_q * (dkeep + keep * rel_q)
    tol_gx = gy.abs() * inv_q * (dkeep + keep * rel_q)
    bm = p / q + p * (1 / (p + eps) + 1 / (q + eps)) / t
    rel_b = rel_q + C * (e64 * p / (q + eps) + ed)
    gx_abs = (gy * x).abs()
    return tol_y, tol_gx, gx_abs * (2 * dkeep * bm + keep * bm * rel_b), gx_abs * keep * bm


@pytest.mark.parametrize("name", BACKENDS)
@settings(max_examples=examples(40))
@given(data=st.data())
def test_concrete_dropout_matches_reference(name, data):
    ops = require_backend(name).ops
    c = data.draw(concrete_cases(small=name == "simt"), label="case")
    dtype, shape = c["dtype"], c["shape"]
    y, (gx, gp) = _run_concrete(ops, c)
    assert y.shape == shape and y.dtype == dtype and gp.shape == c["p"].base.shape

    xe, pe = c["x"].exact(dtype), c["p"].exact(dtype)
    channel_dim = 1 if c["cd"] == 1 else None
    exact = ref.concrete_dropout(xe, pe, c["t"], channel_dim=channel_dim, rng_state=c["state"])
    gy = c["gy"].to(dtype).double()
    exact_gx, exact_gp = grads(exact, [xe, pe], gy)

    mask_shape = shape if c["cd"] == -1 else shape[:2] + (1,) * (len(shape) - 2)
    n_mask = math.prod(mask_shape)
    u64 = ref.uniform(c["state"], (n_mask,), STREAMS["concrete_dropout"], F64).reshape(mask_shape).expand(shape)
    u_k = ref.uniform(c["state"], (n_mask,), STREAMS["concrete_dropout"], dtype).double().reshape(mask_shape).expand(shape)
    lg = _rate_view(c, pe.detach())
    tol_y, tol_gx, tol_c, c_abs = _concrete_bounds(c, xe.detach(), gy, lg, u_k, u64)

    # the p_logit gradient sums its terms: push the bounds through the broadcast, plus the rounding
    # of a sum of numel terms
    def to_p(t):
        leaf = torch.zeros(pe.shape, dtype=F64, requires_grad=True)
        return c["p"].push(torch.autograd.grad(_rate_view(c, leaf), leaf, t)[0])

    tol_gp = to_p(tol_c) + math.prod(shape) * EPS[dtype] * to_p(c_abs)
    assert_within(y, exact.detach(), tol_y, "y")
    assert_within(gx, c["x"].push(exact_gx), c["x"].push(tol_gx), "grad_x")
    assert_within(gp, c["p"].push(exact_gp), tol_gp, "grad_p_logit")
    assert torch.isfinite(y).all() and torch.isfinite(gx).all() and torch.isfinite(gp).all()

    if name == "cpu":  # the public wrapper
        xv, pv = c["x"].value(dtype)[1], c["p"].value(dtype)[1]
        yp = bdlkern.ops.concrete_dropout(xv, pv, c["t"], channel_dim=c["channel_dim"], rng_state=c["state"])
        assert equal_bits(yp, y)


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
            assert_design_rule(got, lo, e, what, 1e-5 * top)


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
def _deterministic(threads_fn, names, blas=()):
    """Runs threads_fn() with 1, 2 and again 1 thread.

    Every output keeps its bits from run to run at one thread count. Across thread counts every
    output keeps its bits too, except those named in ``blas``: outputs of matrix products bdlkern
    hands to torch's BLAS. MKL's float32 GEMM rounds differently with 1 and 2 threads (its blocking
    depends on the thread count; MKL_CBWR narrows but does not remove it), so those only have to
    agree to the GEMM's rounding. bdlkern's own kernels, random streams and reductions have no such
    exception.
    """
    runs = [at_threads(n, threads_fn) for n in (1, 2, 1)]
    for run in runs[1:]:
        assert len(run) == len(names)
    changed = [name for name, a, b in zip(names, runs[0], runs[2]) if not equal_bits(a, b)]
    assert not changed, f"run to run with 1 thread, these outputs changed bits: {changed}"
    differ = [name for name, a, b in zip(names, runs[0], runs[1]) if name not in blas and not equal_bits(a, b)]
    assert not differ, f"with 2 threads instead of 1, these outputs changed bits: {differ}"
    for name, a, b in zip(names, runs[0], runs[1]):
        if name in blas:
            # The GEMM's rounding (well under 1e3 eps of the largest element for these sizes); a
            # different mask or noise draw would move elements by O(the largest element).
            scale = a.detach().abs().max().item() if a.numel() else 0.0
            eps = torch.finfo(a.dtype).eps
            # float32 accumulation for 16-bit inputs, plus the rounding of the output
            rel = 1e3 * torch.finfo(torch.float32).eps + 2 * eps if a.element_size() == 2 else 1e3 * eps
            tol = rel * max(scale, 1e-30)
            torch.testing.assert_close(a, b, rtol=0, atol=tol, equal_nan=True, msg=lambda m: f"{name}: {m}")


# Determinism examples run each op three times at larger sizes: no shrinking (a failure prints the
# example as drawn, and its blob reproduces it).
DETERMINISM = settings(max_examples=examples(10), phases=[Phase.explicit, Phase.reuse, Phase.generate])


@pytest.mark.parametrize("name", BACKENDS)
@DETERMINISM
@given(data=st.data())
def test_rng_ops_deterministic_across_threads(name, threads, data):
    ops = require_backend(name).ops
    shape = list(data.draw(shapes(1, 2, 6000 if name == "simt" else 400_000, side=70 if name == "simt" else 700), label="shape"))
    state = data.draw(rng_states(), label="rng_state")
    p = data.draw(P_OPEN, label="p")
    _deterministic(
        lambda: (ops.philox_bits(state, shape, 3), ops.dropout_mask(state, shape, p, 1), ops.uniform(state, shape, 2, F32),
                 ops.normal(state, shape, 4, F32), ops.normal(state, shape, 0, F64)),
        ["philox_bits", "dropout_mask", "uniform", "normal float32", "normal float64"],
    )


@pytest.mark.parametrize("name", BACKENDS)
@DETERMINISM
@given(data=st.data())
def test_mc_dropout_linear_deterministic_across_threads(name, threads, data):
    ops = require_backend(name).ops
    c = data.draw(mc_cases(small=name == "simt", big=name == "cpu", dtypes=(F32, F64, BF16)), label="case")
    names = ["y", "grad_x", "grad_weight", "grad_bias"][: 3 + (c["b"] is not None)]
    # The CPU kernel's products go to torch's BLAS (the SIMT kernel has its own tiled GEMM).
    _deterministic(lambda: (lambda y, gs: (y, *gs))(*_run_mc(ops, c)), names, blas=names[:3] if name == "cpu" else ())


@pytest.mark.parametrize("name", BACKENDS)
@DETERMINISM
@given(data=st.data())
def test_concrete_dropout_deterministic_across_threads(name, threads, data):
    ops = require_backend(name).ops
    c = data.draw(concrete_cases(small=name == "simt", big=name == "cpu"), label="case")
    _deterministic(lambda: (lambda y, gs: (y, *gs))(*_run_concrete(ops, c)), ["y", "grad_x", "grad_p_logit"])


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
ZERO_BIAS = torch.tensor([0.5, -1.0, 2.0])


def _zero_feature_calls():
    bias, state = ZERO_BIAS, torch.tensor([1, 2])
    w, crow, col = torch.randn(3, 0), torch.zeros(4, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    shared, per_sample = torch.randn(2, 0), torch.randn(4, 2, 0)
    calls = {
        "ops.mc_dropout_linear": lambda: bdlkern.ops.mc_dropout_linear(shared, w, bias, 0.5, 4, rng_state=state),
        "ops.lrt_linear": lambda: bdlkern.ops.lrt_linear(shared, w, w, bias, num_samples=4, rng_state=state),
        "ops.sparse_linear": lambda: bdlkern.ops.sparse_linear(shared, crow, col, torch.zeros(0), bias).expand(4, 2, 3),
        "ops.sparse_linear stochastic": lambda: bdlkern.ops.sparse_linear(
            shared, crow, col, torch.zeros(0, 2), bias, num_samples=4, stochastic=True, rng_state=state
        ),
    }
    for ns in ("bdlkern", "bdlkern_simt"):
        ops = getattr(torch.ops, ns)
        calls[f"{ns}.mc_dropout_linear [S, B, 0]"] = lambda ops=ops: ops.mc_dropout_linear(per_sample, w, bias, state, 0.5, 4, False)
        calls[f"{ns}.lrt_linear [B, 0]"] = lambda ops=ops: ops.lrt_linear(shared, w, w, bias, state, 4)[0]
        calls[f"{ns}.sparse_linear [B, 0]"] = lambda ops=ops: ops.sparse_linear(shared, crow, col, torch.zeros(0), bias, None).expand(4, 2, 3)
        calls[f"{ns}.sparse_linear_lrt [B, 0]"] = lambda ops=ops: ops.sparse_linear_lrt(
            shared, crow, col, torch.zeros(0, 2), bias, None, state, 4
        )[0]
        calls[f"{ns}.lrt_linear [S, B, 0]"] = lambda ops=ops: ops.lrt_linear(per_sample, w, w, bias, state, 4)[0]
        calls[f"{ns}.sparse_linear_lrt [S, B, 0]"] = lambda ops=ops: ops.sparse_linear_lrt(
            per_sample, crow, col, torch.zeros(0, 2), bias, None, state, 4
        )[0]
    return calls


@pytest.mark.parametrize("call", list(_zero_feature_calls()))
def test_zero_in_features_gives_bias(call):
    """A layer with in_features = 0 gives the bias (plus 1e-4 eps in the LRT samples: variance 0),
    as F.linear and the mc_dropout_linear kernels do. Found by the properties: x.reshape(-1, 0) of
    an empty x is an ambiguous-reshape error, in the Python wrappers and in the C++ bindings of the
    LRT ops; the property strategies keep K >= 1 on those paths until this passes."""
    y = _zero_feature_calls()[call]()
    assert y.shape == (4, 2, 3)
    stochastic = "lrt" in call or "stochastic" in call
    torch.testing.assert_close(y, ZERO_BIAS.expand(4, 2, 3), rtol=0, atol=1e-3 if stochastic else 0)


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
