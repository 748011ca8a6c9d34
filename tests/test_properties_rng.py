"""Property-based tests (hypothesis) of the RNG ops against ``bdlkern.testing.reference``.

philox_bits / dropout_mask / uniform exactly, normal to the tolerance of test_rng.py, and the
counter contract (offset + 1 skips one Philox block, wrapping at 2**64), for any shape (0, 1 and
odd sizes), p in [0, 1], stream and rng_state, on the ``cpu`` and ``simt`` backends; the public
wrappers of bdlkern.ops give the raw ops' bits; the same rng_state gives the same bits with 1 and 2
threads. Strategies and helpers: tests/_properties.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _properties import (
    BACKENDS, DETERMINISM, F32, F64, P_OPEN, STREAMS, _deterministic, _int64, examples, rng_states, shapes,
)
from conftest import require_backend
from hypothesis import given, settings
from hypothesis import strategies as st

import bdlkern
from bdlkern.testing import reference as ref


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


# ---- determinism: the same rng_state, 1 or 2 threads, the same bits ----------------------------------
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
