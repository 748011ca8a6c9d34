"""Property-based tests of the ``bdlkern.nn`` modules as users combine them.

Each example draws a module (MC dropout, shared-mask MC dropout, Concrete dropout, sparse VD, a
pruned SparseLinear on its CSR path and above its crossover density), a mode (train, eval,
``sampling(S)``), autocast on or off, a batch shape, the input's trailing width (right, or off by
a few), and whether the ``sampling`` block is nested in another. Every example must either raise a
clear error in the module's terms (wrong width: a ``ValueError`` naming the module and the width it
expects; nesting: a ``RuntimeError`` naming both S) or match the float64 reference of
``bdlkern.testing.reference`` with the same random bits, within the error bound of the precision it ran in
(the ``|x| |W|^T`` sum times a few units of that precision's rounding).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import bdlkern
from bdlkern.testing import reference as ref

from _properties import examples

KINDS = ["mc", "mc_shared", "concrete", "sparse_vd", "sparse_csr", "sparse_dense"]
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}


def build(kind: str, k: int, n: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind in ("mc", "mc_shared"):
        return bdlkern.nn.MCDropoutLinear(k, n, p=0.4, shared_mask=kind == "mc_shared")
    if kind == "concrete":
        return bdlkern.nn.ConcreteDropoutLinear(k, n, init_p=0.3)
    layer = bdlkern.nn.SparseVDLinear(k, n)
    with torch.no_grad():
        layer.log_sigma2.uniform_(-6.0, -2.0)
    if kind == "sparse_vd":
        return layer
    density = 0.04 if kind == "sparse_csr" else 0.9
    keep = torch.rand(n, k) < density
    keep[0, 0] = True
    variance = torch.exp(layer.log_alpha) * layer.theta.detach() ** 2
    sparse = bdlkern.nn.SparseLinear.from_dense(layer.theta.detach(), layer.bias.detach(), variance=variance, mask=keep)
    return sparse


def dense_weights(module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(W, bias, weight variance or None) of a module, in float64."""
    if isinstance(module, bdlkern.nn.SparseLinear):
        w, v = ref.csr_to_dense(module.crow, module.col, module.values.double(), module.in_features)
        return w, module.bias.double(), v
    if isinstance(module, bdlkern.nn.SparseVDLinear):
        theta, ls = module.theta.double(), module.log_sigma2.double()
        return theta, module.bias.double(), torch.exp(ref.log_alpha(theta, ls)) * theta**2
    return module.weight.double(), module.bias.double(), None


def reference(module, kind: str, mode: str, x: torch.Tensor, S: int, seed: int, state: torch.Tensor | None):
    """The module's output from bdlkern.testing.reference in float64 with the module's random bits."""
    x = x.double()
    w, b, v = dense_weights(module)
    sampling_state = torch.tensor([seed, 0], dtype=torch.int64)  # call 0 of a seeded block
    if kind in ("mc", "mc_shared", "concrete"):
        p = module.p if kind != "concrete" else torch.sigmoid(module.p_logit.double()).item()
        if mode == "sampling":
            return ref.mc_dropout_linear(x, w, b, p, S, shared_mask=kind == "mc_shared", rng_state=sampling_state)
        if mode == "eval":
            return F.linear(x, w, b)
        if kind == "concrete":
            dropped = ref.concrete_dropout(x, module.p_logit.double(), module.temperature, rng_state=state)
            return F.linear(dropped, w, b)
        return ref.mc_dropout_linear(x, w, b, p, 1, rng_state=state)[0]
    if kind == "sparse_vd":
        if mode == "sampling":
            return ref.lrt_linear(x, module.theta.double(), module.log_sigma2.double(), b, S, rng_state=sampling_state)
        if mode == "train":
            return ref.lrt_linear(x, module.theta.double(), module.log_sigma2.double(), b, 1, rng_state=state)[0]
        return F.linear(x, module.pruned_weight().double(), b)
    if mode == "sampling":
        return ref.sparse_linear(x, module.crow, module.col, module.values.double(), b, S, stochastic=True, rng_state=sampling_state)
    return F.linear(x, w, b)


def error_bound(module, kind: str, mode: str, x: torch.Tensor, S: int, dtype) -> torch.Tensor:
    """A few units of rounding of ``dtype`` times the sum of absolute products (the standard bound
    of a dot product), plus the LRT noise's scale for the sampling layers."""
    w, b, v = dense_weights(module)
    ax = x.double().abs()
    scale = F.linear(ax, w.abs(), b.abs() if b is not None else None)
    if kind == "concrete" and mode == "train":
        scale = scale * 10.0  # 1/(1 - p) and the relaxed mask's own rounding
    elif kind in ("mc", "mc_shared", "concrete") and mode != "eval":
        scale = scale / 0.6  # the kept inputs are scaled by 1/(1 - p)
    if v is not None and mode != "eval" and not (kind.startswith("sparse_") and mode == "train"):
        scale = scale + 6.0 * torch.sqrt(F.linear(ax * ax, v) + 1e-8)
    eps = EPS[dtype]
    units = 4.0 if dtype == torch.bfloat16 else 4.0 * x.shape[-1]
    return units * eps * scale + 1e-6


@settings(max_examples=examples(200))
@given(data=st.data())
def test_modules_raise_clearly_or_match_the_reference(data):
    kind = data.draw(st.sampled_from(KINDS), label="module")
    mode = data.draw(st.sampled_from(["train", "eval", "sampling"]), label="mode")
    use_autocast = data.draw(st.booleans(), label="autocast")
    k = data.draw(st.integers(1, 40), label="in_features")
    n = data.draw(st.integers(1, 12), label="out_features")
    batch = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=2), label="batch")
    width = k + data.draw(st.sampled_from([0, 0, 0, 0, 1, -1, 3, k]), label="width offset")
    nested = mode == "sampling" and data.draw(st.booleans(), label="nested")
    S = data.draw(st.integers(1, 4), label="S")
    seed = data.draw(st.integers(0, 2**31), label="seed")
    if width < 1:
        width = k + 1
    module = build(kind, k, n, seed)
    module.train(mode == "train")
    x = torch.randn(*batch, width, generator=torch.Generator().manual_seed(seed))

    def call():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
            if mode == "sampling":
                with bdlkern.sampling(S + 1, seed=seed + 1) if nested else contextlib.nullcontext():
                    with bdlkern.sampling(S, seed=seed):
                        return module(x)
            torch.manual_seed(seed)
            return module(x)

    if nested:
        with pytest.raises(RuntimeError, match=rf"sampling\({S}\).*sampling\({S + 1}\)|do not nest"):
            call()
        return
    if width != k:
        with pytest.raises(ValueError, match=rf"{type(module).__name__}\(in_features={k}.*expected {k}"):
            call()
        return
    # The random bits of an unseeded (training) call: the rng_state the module draws first.
    torch.manual_seed(seed)
    state = bdlkern.ops.new_rng_state()
    out = call()
    want = reference(module, kind, mode, x, S, seed, state)
    assert out.shape == want.shape
    # Under autocast the LRT and CSR kernels run in float32; F.linear and the MC-dropout kernel in
    # bfloat16 (the inputs rounded to it).
    sparse = isinstance(module, bdlkern.nn.SparseLinear)
    csr_path = sparse and module.density <= module.crossover_density(math.prod(batch))
    in_float32 = (kind == "sparse_vd" and mode != "eval") or (sparse and (mode == "sampling" or csr_path))
    low = use_autocast and not in_float32
    dtype = torch.bfloat16 if low else torch.float32
    err = (out.double() - want).abs()
    bound = error_bound(module, kind, mode, x, S, dtype)
    worst = (err - bound).max().item() if err.numel() else 0.0
    assert worst <= 0, f"{kind}/{mode}/autocast={use_autocast}: error exceeds the bound by {worst:.3g}"
