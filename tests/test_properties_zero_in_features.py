"""Linear ops with in_features = 0, on every path: the public wrappers and the raw ops of both
namespaces (``torch.ops.bdlkern`` and ``torch.ops.bdlkern_simt``), mc_dropout_linear, lrt_linear,
sparse_linear and sparse_linear_lrt, give the bias. The property tests of those families
(test_properties_mc_dropout.py, test_properties_sparse_vd.py) found the case; it lives here because
it spans them.
"""

from __future__ import annotations

import pytest
import torch

import bdlkern


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
