"""Property-based tests (hypothesis) of concrete_dropout against ``bdlkern.testing.reference``.

Values and the gradients of x and p_logit (through the op's autograd registration) against the
float64 reference, on the ``cpu`` and ``simt`` backends, for ranks 1 to 4 with 0, 1 and odd
sizes, a rate per element or per (sample, channel), a scalar or per-channel p_logit (strided or
expanded too), logits of +-30 and temperatures down to 1e-3. The allowed error is a first-order
error model of the kernel's rounding that also charges the reference's own cancellation at extreme
logits. The public wrapper gives the raw op's bits; the same rng_state gives the same bits with 1
and 2 threads. Strategies and helpers: tests/_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _properties import (
    BACKENDS, DETERMINISM, EPS, F32, F64, STREAMS, TEMPERATURES, _deterministic, assert_within, equal_bits, examples,
    generator, grads, make_arg, rng_states, shapes,
)
from conftest import require_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import bdlkern
from bdlkern.testing import reference as ref


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


# ---- determinism: the same rng_state, 1 or 2 threads, the same bits ----------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@DETERMINISM
@given(data=st.data())
def test_concrete_dropout_deterministic_across_threads(name, threads, data):
    ops = require_backend(name).ops
    c = data.draw(concrete_cases(small=name == "simt", big=name == "cpu"), label="case")
    _deterministic(lambda: (lambda y, gs: (y, *gs))(*_run_concrete(ops, c)), ["y", "grad_x", "grad_p_logit"])
