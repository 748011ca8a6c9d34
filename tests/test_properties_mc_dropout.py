"""Property-based tests (hypothesis) of mc_dropout_linear against ``bdlkern.testing.reference``.

Values and gradients (through the op's autograd registration, so the backward kernels and the
layouts autograd hands them are covered) against the float64 reference, on the ``cpu`` and
``simt`` backends, for S, B, K, N down to 0 and 1, shared or per-sample inputs and masks, p near 0
and 1, and inputs that are contiguous, transposed, step-sliced or expanded. The allowed error is
(reduction length) x eps x (the same product over absolute values); bfloat16 / float16 follow the
low-precision rule of docs/design.md section 6.2 (at most twice PyTorch's own error in that dtype).
The public wrapper gives the raw op's bits with batch dimensions; the same rng_state gives the same
bits with 1 and 2 threads. Strategies and helpers: tests/_properties.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _properties import (
    BACKENDS, BF16, DETERMINISM, EPS, F16, F32, F64, P_OPEN, _deterministic, assert_design_rule, assert_within,
    equal_bits, examples, generator, grads, make_arg, rng_states,
)
from conftest import require_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import bdlkern
from bdlkern.testing import reference as ref


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


# ---- determinism: the same rng_state, 1 or 2 threads, the same bits ----------------------------------
@pytest.mark.parametrize("name", BACKENDS)
@DETERMINISM
@given(data=st.data())
def test_mc_dropout_linear_deterministic_across_threads(name, threads, data):
    ops = require_backend(name).ops
    c = data.draw(mc_cases(small=name == "simt", big=name == "cpu", dtypes=(F32, F64, BF16)), label="case")
    names = ["y", "grad_x", "grad_weight", "grad_bias"][: 3 + (c["b"] is not None)]
    # The CPU kernel's products go to torch's BLAS (the SIMT kernel has its own tiled GEMM).
    _deterministic(lambda: (lambda y, gs: (y, *gs))(*_run_mc(ops, c)), names, blas=names[:3] if name == "cpu" else ())
