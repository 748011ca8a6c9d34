"""The sparse (CSR) convolution (issue 16, third increment): ``bdlkern.ops.sparse_conv`` against the
dense convolution of the pruned weight (forward and the gradient of x, every backend, densities 0 to
1, both CPU paths: stride 1 on padded planes and the row path of other strides), the stochastic
mode against a reference fed the same Philox noise, the statistics of many samples, gradcheck /
gradgradcheck, registration (opcheck) and torch.compile, bad input, the ``SparseConv1d/2d/3d``
modules (from_dense / to_dense, the dense fallback above ``crossover_density``, state_dict, seeded
sampling), ``SparseVDConv2d.to_sparse()`` and a pruned LeNet-style net, and a sparse-VD training run
on scikit-learn's digits that prunes >= 95% of the weights.

The reference is the spec, written out. With the pruned dense weight ``W`` (CSR over
``[C_out, (C_in / groups) * prod(kernel)]``, row-major flattening of W's trailing dims) and the
variance ``V`` on the same pattern::

    deterministic:  y = conv(x, W, bias, stride, padding, dilation, groups)
    stochastic:     y = conv(xs, W) + bias + sqrt(conv(xs^2, V) + 1e-8) * eps

with ``xs = x.repeat(S, 1, ...)`` (sample-major, or x itself with ``input_has_samples``) and eps
element i of the "sparse_lrt" stream at the row-major index of ``y [S*N, C_out, *sp_out]``, rebuilt
with ``bdlkern.ops.normal(y.shape, rng_state=state, stream="sparse_lrt", dtype=x.dtype)``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import require_backend
from torch import nn
from torch.library import opcheck

import bdlkern

STREAM = "sparse_lrt"
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
ERRORS = (ValueError, TypeError, RuntimeError)
SPARSE_CONV = {1: bdlkern.nn.SparseConv1d, 2: bdlkern.nn.SparseConv2d, 3: bdlkern.nn.SparseConv3d}


# ---- the reference ---------------------------------------------------------------------------------
def csr_of(W, V=None):
    """(crow, col, values) of the dense ``W`` by the spec's recipe; values ``[nnz, 2]`` with ``V``."""
    W2 = W.reshape(W.shape[0], -1)
    m = W2 != 0
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), m.sum(1).cumsum(0)])
    col = m.nonzero()[:, 1].contiguous()
    values = W2[m]
    if V is not None:
        values = torch.stack([values, V.reshape(W.shape[0], -1)[m]], dim=1)
    return crow, col, values.contiguous()


def pruned_weight(shape, density, gen, *, dtype=torch.float64):
    """(W, V): a random weight with exactly ``round(density * numel)`` kept entries (at least one
    when density > 0) and a non-negative variance on the same pattern."""
    numel = math.prod(shape)
    count = 0 if density == 0 else max(1, round(density * numel))
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[torch.randperm(numel, generator=gen)[:count]] = True
    keep = keep.reshape(shape)
    W = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(max(1, math.prod(shape[1:])) * max(density, 0.05))
    W = torch.where(W.abs() < 1e-3, torch.full_like(W, 0.5), W) * keep  # no accidental zero among the kept
    V = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1) * W.abs() * keep
    return W.to(dtype), V.to(dtype)


def conv_ref(x, W, b, *, stride=1, padding=0, dilation=1, groups=1):
    return CONV[W.dim() - 2](x, W, b, stride, padding, dilation, groups)


def eps_for(shape, state, dtype):
    return bdlkern.ops.normal(tuple(shape), rng_state=state.cpu(), stream=STREAM, dtype=dtype)


def stochastic_ref(x, W, V, b, S, state, *, input_has_samples=False, eps_dtype=None, abs_eps=False, **kw):
    xs = x if input_has_samples else x.repeat(S, *([1] * (x.dim() - 1)))
    mean = conv_ref(xs, W, b, **kw)
    var = conv_ref(xs * xs, V, None, **kw)
    eps = eps_for(mean.shape, state, eps_dtype or x.dtype).to(mean.dtype)
    if abs_eps:
        eps = eps.abs()
    return mean + torch.sqrt(var + 1e-8) * eps


def f64(t):
    return None if t is None else t.detach().cpu().double()


def assert_matches(actual, expected, bound, dtype, names):
    """Each actual tensor equals its float64 expectation to the dtype's tolerance scaled by the sum
    of the absolute terms (``bound``: the reference on absolute values)."""
    tol = {torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for name, a, e, m in zip(names, actual, expected, bound, strict=True):
        assert a is not None, name
        assert a.dtype == dtype, f"{name}: dtype {a.dtype}"
        assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
        scale = m.abs().max().item() if m.numel() else 0.0
        torch.testing.assert_close(f64(a), e, rtol=tol, atol=tol * max(scale, 1e-30), msg=lambda s: f"{name}: {s}")


def close64(actual, expected, msg=None):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10 * scale,
                               msg=None if msg is None else (lambda s: f"{msg}: {s}"))


def _list(v, d):
    return list(v) if isinstance(v, (tuple, list)) else [v] * d


def geometry(cfg):
    return {k: cfg[k] for k in ("stride", "padding", "dilation", "groups")}


def raw_args(cfg):
    d = len(cfg["k"])
    return (list(cfg["k"]), _list(cfg["stride"], d), _list(cfg["padding"], d), _list(cfg["dilation"], d),
            cfg["groups"])


def seeded_state(k: int, j: int) -> torch.Tensor:
    """rng_state of the j-th MC layer call of ``sampling(S, seed=k)`` (bdlkern/_sampling.py)."""
    return torch.tensor([k, j << 40], dtype=torch.int64)


def no_tf32():
    if torch.cuda.is_available():
        return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)
    return contextlib.nullcontext()


# ---- deterministic: the dense conv of the pruned weight ----------------------------------------------
# C_in, C_out, kernel, spatial, stride, padding, dilation, groups. Stride 1 takes the CPU kernel's
# padded-plane path, any other stride the row path.
CASES = {
    "2d_s1_p0": dict(C_in=4, C_out=8, k=(3, 3), sp=(7, 6), stride=1, padding=0, dilation=1, groups=1),
    "2d_s1_p2_d2_g2": dict(C_in=4, C_out=6, k=(3, 2), sp=(6, 7), stride=1, padding=2, dilation=(2, 1), groups=2),
    "2d_s2_p1_depthwise": dict(C_in=4, C_out=8, k=(3, 3), sp=(7, 8), stride=2, padding=1, dilation=1, groups=4),
    "2d_s2_p2_d2": dict(C_in=3, C_out=6, k=(3, 3), sp=(9, 8), stride=(2, 1), padding=(2, 1), dilation=2, groups=1),
    "1d_s1_p1": dict(C_in=5, C_out=7, k=(3,), sp=(11,), stride=1, padding=1, dilation=1, groups=1),
    "1d_s2_p2_d2_g2": dict(C_in=6, C_out=8, k=(4,), sp=(13,), stride=2, padding=2, dilation=2, groups=2),
    "1d_s1_depthwise_d2": dict(C_in=6, C_out=6, k=(5,), sp=(12,), stride=1, padding=2, dilation=2, groups=6),
    "3d_s1_p1": dict(C_in=2, C_out=4, k=(2, 3, 2), sp=(4, 5, 4), stride=1, padding=1, dilation=1, groups=1),
}
DENSITIES = [0.0, 0.01, 0.05, 0.3, 1.0]


def make_problem(cfg, B, density, seed, *, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg["C_in"], *cfg["sp"], generator=gen, dtype=torch.float64).to(dtype)
    W, V = pruned_weight((cfg["C_out"], cfg["C_in"] // cfg["groups"], *cfg["k"]), density, gen, dtype=dtype)
    b = torch.randn(cfg["C_out"], generator=gen, dtype=torch.float64).to(dtype)
    return x, W, V, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_equals_dense_conv_of_pruned_weight(backend, case, density, dtype, threads):
    torch.set_num_threads(1)  # tiny problems: threads only cost (and thrash on a loaded machine)
    cfg = CASES[case]
    x, W, _, b = make_problem(cfg, 3, density, seed=len(case) * 31 + int(density * 100), dtype=dtype)
    crow, col, values = csr_of(W)
    numel = W.numel()
    assert col.numel() == (0 if density == 0 else max(1, round(density * numel)))
    if density == 0.01:
        assert (crow.diff() == 0).any()  # empty rows: bias only
    dev = backend.device
    biases = (b, None)
    if backend.name == "simt":  # the emulator is slow: one of the two, alternating over the matrix
        biases = biases[(DENSITIES.index(density) + list(CASES).index(case)) % 2:][:1]
    for bias in biases:
        xd = x.to(dev).requires_grad_()
        bd = None if bias is None else bias.to(dev)
        y = backend.ops.sparse_conv(xd, crow.to(dev), col.to(dev), values.to(dev), bd, *raw_args(cfg))
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        (gx,) = torch.autograd.grad(y, xd, g.to(dtype).to(dev))
        # float64 reference and the sums of the absolute terms, through F.conv and its autograd
        xr = f64(x).requires_grad_()
        with no_tf32():
            yr = conv_ref(xr, f64(W), f64(bias), **geometry(cfg))
            (gxr,) = torch.autograd.grad(yr, xr, g)
            xa = f64(x).abs().requires_grad_()
            ya = conv_ref(xa, f64(W).abs(), None if bias is None else f64(bias).abs(), **geometry(cfg))
            (gxa,) = torch.autograd.grad(ya, xa, g.abs())
        assert_matches([y, gx], [yr.detach(), gxr], [ya.detach(), gxa], dtype, ("y", "grad_x"))
        if density == 0:
            expected = torch.zeros_like(yr) if bias is None else f64(bias).reshape(-1, *[1] * len(cfg["k"])).expand_as(yr)
            assert torch.equal(f64(y), expected)
            assert torch.equal(gx, torch.zeros_like(gx))
        else:
            assert yr.abs().max() > 0.1


def test_medium_problem_both_cpu_paths_float32(threads):
    """Large enough for the blocked / parallel CPU paths, float32 against float64, at 1 and 2
    threads (the same result: the CPU kernels are deterministic)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, 16, 19, 23, generator=gen)
    W, _ = pruned_weight((24, 16, 3, 3), 0.1, gen, dtype=torch.float32)
    b = torch.randn(24, generator=gen)
    crow, col, values = csr_of(W)
    for stride in (1, 2, (1, 3)):
        results = []
        for threads_ in (1, 2):
            torch.set_num_threads(threads_)
            xr = x.clone().requires_grad_()
            y = bdlkern.ops.sparse_conv(xr, crow, col, values, b, kernel_size=3, stride=stride, padding=1)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
            (gx,) = torch.autograd.grad(y, xr, g)
            results.append((y, gx))
        assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), stride
        x64 = f64(x).requires_grad_()
        yr = F.conv2d(x64, f64(W), f64(b), stride, 1)
        (gxr,) = torch.autograd.grad(yr, x64, f64(g))
        xa = f64(x).abs().requires_grad_()
        ya = F.conv2d(xa, f64(W).abs(), f64(b).abs(), stride, 1)
        (gxa,) = torch.autograd.grad(ya, xa, f64(g).abs())
        assert_matches(results[0], [yr.detach(), gxr], [ya.detach(), gxa], torch.float32, ("y", "grad_x"))


def test_functional_argument_forms():
    """The public wrapper: int / tuple arguments, "same" / "valid" padding, kernel_size as an int,
    the defaults, a conv3d with strides (the row path in 3-d), and the raw op's result."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    W, _ = pruned_weight((6, 2, 3, 3), 0.4, gen)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    crow, col, values = csr_of(W)
    forms = [
        dict(stride=2, padding=1, dilation=1, groups=2),
        dict(stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=2),
        dict(padding="same", groups=2),
        dict(padding="valid", groups=2),
    ]
    for form in forms:
        y = bdlkern.ops.sparse_conv(x, crow, col, values, b, kernel_size=3, **form)
        expected = F.conv2d(x, W, b, **form)
        assert y.shape == expected.shape, form
        close64(y, expected, str(form))
    assert bdlkern.ops.sparse_conv(x, crow, col, values, b, kernel_size=(3, 3), padding="same",
                                   groups=2).shape == (2, 6, 7, 6)
    # defaults: no bias, stride 1, padding 0, groups 1
    W1, _ = pruned_weight((5, 4, 2, 3), 0.5, gen)
    c1 = csr_of(W1)
    close64(bdlkern.ops.sparse_conv(x, *c1, kernel_size=(2, 3)), F.conv2d(x, W1))
    # the raw op gives the wrapper's result
    raw = torch.ops.bdlkern.sparse_conv(x, crow, col, values, b, [3, 3], [2, 1], [1, 1], [1, 2], 2)
    close64(raw, F.conv2d(x, W, b, (2, 1), 1, (1, 2), 2))
    # conv3d with a stride (the row path)
    x3 = torch.randn(2, 2, 5, 6, 4, generator=gen, dtype=torch.float64).requires_grad_()
    W3, _ = pruned_weight((3, 2, 2, 3, 1), 0.5, gen)
    y3 = bdlkern.ops.sparse_conv(x3, *csr_of(W3), kernel_size=(2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 1))
    e3 = F.conv3d(x3, W3, None, (1, 2, 1), (1, 0, 1))
    assert y3.shape == e3.shape == (2, 3, 6, 2, 6)
    close64(y3, e3)
    g3 = torch.randn(y3.shape, generator=gen, dtype=torch.float64)
    close64(torch.autograd.grad(y3, x3, g3)[0], torch.autograd.grad(e3, x3, g3)[0], "conv3d grad_x")


def test_non_contiguous_inputs_and_empty_batch():
    gen = torch.Generator().manual_seed(10)
    base = torch.randn(2, 4, 7, 6, generator=gen, dtype=torch.float64)
    W, V = pruned_weight((5, 4, 3, 3), 0.3, gen)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    crow, col, values = csr_of(W, V)
    expected = F.conv2d(base, W, b, padding=1)
    big = torch.zeros(2, 4, 7, 12, dtype=torch.float64)
    big[..., ::2] = base
    for name, x in {"channels_last": base.contiguous(memory_format=torch.channels_last),
                    "sliced": big[..., ::2], "transposed": base.transpose(2, 3).contiguous().transpose(2, 3)}.items():
        assert torch.equal(x, base)
        close64(bdlkern.ops.sparse_conv(x, crow, col, values[:, 0], b, kernel_size=3, padding=1), expected, name)
        state = torch.tensor([3, 1])
        ys = bdlkern.ops.sparse_conv(x, crow, col, values, b, kernel_size=3, padding=1, num_samples=2,
                                     stochastic=True, rng_state=state)
        close64(ys, stochastic_ref(base, W, V, b, 2, state, padding=1), name)
    # an empty batch: empty outputs and an empty gradient
    x0 = torch.zeros(0, 4, 7, 6, dtype=torch.float64, requires_grad=True)
    y0 = bdlkern.ops.sparse_conv(x0, crow, col, values[:, 0], b, kernel_size=3, padding=1)
    assert y0.shape == (0, 5, 7, 6)
    assert torch.autograd.grad(y0.sum(), x0)[0].shape == (0, 4, 7, 6)
    ys0 = bdlkern.ops.sparse_conv(x0, crow, col, values, b, kernel_size=3, padding=1, num_samples=3, stochastic=True,
                                  rng_state=torch.tensor([1, 1]))
    assert ys0.shape == (0, 5, 7, 6)


# ---- stochastic: the reference with the rebuilt noise ------------------------------------------------
STOCHASTIC_DENSITY = {case: (0.05, 0.3, 1.0)[i % 3] for i, case in enumerate(CASES)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("input_has_samples", [False, True], ids=["shared_input", "input_has_samples"])
@pytest.mark.parametrize("case", list(CASES))
def test_stochastic_matches_reference(backend, case, input_has_samples, dtype, threads):
    torch.set_num_threads(1)
    cfg = CASES[case]
    density = STOCHASTIC_DENSITY[case]
    S, N = 3, 2
    B = S * N if input_has_samples else N
    x, W, V, b = make_problem(cfg, B, density, seed=len(case) * 13 + 7, dtype=dtype)
    bias = b if len(case) % 2 else None
    crow, col, values = csr_of(W, V)
    dev = backend.device
    state = backend.tensor([900 + len(case), 5], dtype=torch.int64)
    xd = x.to(dev).requires_grad_()
    y, std = backend.ops.sparse_conv_lrt(xd, crow.to(dev), col.to(dev), values.to(dev),
                                         None if bias is None else bias.to(dev), state, S, not input_has_samples,
                                         *raw_args(cfg))
    assert y.shape[0] == S * N and std.shape[0] == B
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (gx,) = torch.autograd.grad(y, xd, g.to(dtype).to(dev))
    kw = dict(geometry(cfg), input_has_samples=input_has_samples, eps_dtype=dtype)
    xr = f64(x).requires_grad_()
    with no_tf32():
        yr = stochastic_ref(xr, f64(W), f64(V), f64(bias), S, state, **kw)
        (gxr,) = torch.autograd.grad(yr, xr, g)
        xa = f64(x).abs().requires_grad_()
        ya = stochastic_ref(xa, f64(W).abs(), f64(V), None if bias is None else f64(bias).abs(), S, state,
                            abs_eps=True, **kw)
        (gxa,) = torch.autograd.grad(ya, xa, g.abs())
        var = conv_ref(f64(x) ** 2, f64(V), None, **geometry(cfg))
        mean = conv_ref(f64(x), f64(W), f64(bias), **geometry(cfg))
    assert_matches([y, gx, std], [yr.detach(), gxr, torch.sqrt(var + 1e-8)],
                   [ya.detach(), gxa, torch.sqrt(var + 1e-8)], dtype, ("y", "grad_x", "std"))
    # The noise matters: far above the tolerance.
    ms = mean if input_has_samples else mean.repeat(S, *([1] * (mean.dim() - 1)))
    assert (yr.detach() - ms).abs().max() > 0.1 * max(ms.abs().max().item(), 1.0)


def test_stochastic_wrapper_shared_equals_repeated_input_and_states():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 6, 5, generator=gen, dtype=torch.float64)
    W, V = pruned_weight((6, 2, 3, 3), 0.3, gen)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    crow, col, values = csr_of(W, V)
    kw = dict(kernel_size=3, padding=1, groups=2, stride=(1, 2), stochastic=True)
    st = torch.tensor([21, 4])
    S = 4
    y = bdlkern.ops.sparse_conv(x, crow, col, values, b, num_samples=S, rng_state=st, **kw)
    close64(y, stochastic_ref(x, W, V, b, S, st, padding=1, groups=2, stride=(1, 2)))
    assert y.shape == (S * 2, 6, 6, 3)
    # the same input per sample: the same noise at the same (s, n), the same output
    xs = x.repeat(S, 1, 1, 1)
    close64(bdlkern.ops.sparse_conv(xs, crow, col, values, b, num_samples=S, input_has_samples=True, rng_state=st,
                                    **kw), y)
    # rng_state and generator
    assert torch.equal(bdlkern.ops.sparse_conv(x, crow, col, values, b, num_samples=S, rng_state=st.clone(), **kw), y)
    assert not torch.allclose(bdlkern.ops.sparse_conv(x, crow, col, values, b, num_samples=S,
                                                      rng_state=torch.tensor([21, 5]), **kw), y)
    a = bdlkern.ops.sparse_conv(x, crow, col, values, b, num_samples=S, generator=torch.Generator().manual_seed(9), **kw)
    assert torch.equal(a, bdlkern.ops.sparse_conv(x, crow, col, values, b, num_samples=S,
                                                  generator=torch.Generator().manual_seed(9), **kw))
    assert not torch.equal(a, bdlkern.ops.sparse_conv(x, crow, col, values, b, num_samples=S,
                                                      generator=torch.Generator().manual_seed(10), **kw))
    # S = 1 default; a variance-carrying CSR in deterministic mode uses theta only
    close64(bdlkern.ops.sparse_conv(x, crow, col, values, b, rng_state=st, **kw),
            stochastic_ref(x, W, V, b, 1, st, padding=1, groups=2, stride=(1, 2)))
    det = {k: v for k, v in kw.items() if k != "stochastic"}
    close64(bdlkern.ops.sparse_conv(x, crow, col, values, b, **det), F.conv2d(x, W, b, (1, 2), 1, 1, 2))


@pytest.mark.parametrize("stride", [1, 2])
def test_stochastic_output_mean_and_variance(stride):
    """Many samples of one input: each output element has mean conv(x, W) + b and variance
    conv(x^2, V) + 1e-8, and the standardised noise of different elements is uncorrelated."""
    S = 4000
    gen = torch.Generator().manual_seed(14 + stride)
    x = torch.randn(1, 3, 6, 6, generator=gen, dtype=torch.float64)
    W, V = pruned_weight((4, 3, 3, 3), 0.3, gen)
    b = torch.randn(4, generator=gen, dtype=torch.float64)
    y = bdlkern.ops.sparse_conv(x, *csr_of(W, V), b, kernel_size=3, padding=1, stride=stride, num_samples=S,
                                stochastic=True, rng_state=torch.tensor([2, stride]))
    mean = F.conv2d(x, W, b, stride, 1)[0]
    var = F.conv2d(x * x, V, None, stride, 1)[0] + 1e-8
    assert y.shape == (S, *mean.shape)
    assert (var > 1e-4).float().mean() > 0.5  # most elements are noisy
    z = (y.mean(0) - mean) / torch.sqrt(var / S)
    assert z.abs().max() < 5, z.abs().max()
    rel = y.var(0) / var - 1
    assert rel.abs().max() < 5 * math.sqrt(2 / (S - 1)), rel.abs().max()
    e = ((y - mean) / torch.sqrt(var)).reshape(S, -1)
    off = torch.corrcoef(e.T) - torch.eye(e.shape[1], dtype=e.dtype)
    assert off.abs().max() < 5 / math.sqrt(S), off.abs().max()


# ---- gradcheck, gradgradcheck, opcheck, torch.compile -----------------------------------------------
@pytest.mark.parametrize("stochastic", [False, True], ids=["deterministic", "stochastic"])
@pytest.mark.parametrize("dims", [1, 2])
def test_gradcheck_and_gradgradcheck(dims, stochastic, threads):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(3 + dims)
    if dims == 2:
        x = torch.randn(2, 2, 4, 5, generator=gen, dtype=torch.float64)
        W, V = pruned_weight((3, 2, 2, 3), 0.5, gen)
        kw = dict(kernel_size=(2, 3), stride=(1, 2), padding=1, dilation=(2, 1))
    else:
        x = torch.randn(2, 4, 7, generator=gen, dtype=torch.float64)
        W, V = pruned_weight((4, 2, 3), 0.5, gen)
        kw = dict(kernel_size=3, stride=1, padding=2, dilation=2, groups=2)
    crow, col, values = csr_of(W, V)
    b = torch.randn(W.shape[0], generator=gen, dtype=torch.float64)
    state = torch.tensor([12, 0])
    S = 2
    for input_has_samples in ((False, True) if stochastic else (False,)):
        xin = x
        if input_has_samples:  # [S*N, ...]: per-sample inputs
            xin = x.repeat(S, *([1] * (x.dim() - 1)))
            xin = xin + 0.1 * torch.randn(xin.shape, generator=gen, dtype=torch.float64)

        def f(x):
            if not stochastic:
                return bdlkern.ops.sparse_conv(x, crow, col, values[:, 0].contiguous(), b, **kw)
            return bdlkern.ops.sparse_conv(x, crow, col, values, b, num_samples=S, stochastic=True,
                                           input_has_samples=input_has_samples, rng_state=state, **kw)

        inp = (xin.clone().requires_grad_(),)
        assert torch.autograd.gradcheck(f, inp)
        assert torch.autograd.gradgradcheck(f, inp)


def test_gradcheck_through_simt_autograd(threads):
    require_backend("simt")
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 5, generator=gen, dtype=torch.float64)
    W, V = pruned_weight((2, 2, 2), 0.75, gen)
    crow, col, values = csr_of(W, V)
    b = torch.randn(2, generator=gen, dtype=torch.float64)
    ops = torch.ops.bdlkern_simt
    state = torch.tensor([13, 0])

    def det(x):
        return ops.sparse_conv(x, crow, col, values[:, 0].contiguous(), b, [2], [1], [1], [1], 1)

    def sto(x):
        return ops.sparse_conv_lrt(x, crow, col, values, b, state, 2, True, [2], [2], [1], [1], 1)[0]

    for f in (det, sto):
        inp = (x.clone().requires_grad_(),)
        assert torch.autograd.gradcheck(f, inp, fast_mode=True)
        assert torch.autograd.gradgradcheck(f, inp, fast_mode=True)


def test_opcheck(threads):
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 5, 5, generator=gen)
    xs = torch.randn(6, 4, 5, 5, generator=gen)
    W, V = pruned_weight((3, 4, 3, 3), 0.3, gen, dtype=torch.float32)
    crow, col, values = csr_of(W, V)
    b = torch.randn(3, generator=gen)
    x1 = torch.randn(2, 4, 9, generator=gen)
    W1, V1 = pruned_weight((6, 2, 3), 0.5, gen, dtype=torch.float32)
    c1 = csr_of(W1, V1)
    state = torch.tensor([3, 0])

    def rg(t):
        return t.clone().requires_grad_()

    det = torch.ops.bdlkern.sparse_conv.default
    for args in [
        (rg(x), crow, col, values[:, 0].contiguous(), b, [3, 3], [1, 1], [1, 1], [1, 1], 1),
        (rg(x1), c1[0], c1[1], c1[2][:, 0].contiguous(), None, [3], [2], [1], [2], 2),
    ]:
        opcheck(det, args)
    lrt = torch.ops.bdlkern.sparse_conv_lrt.default
    for args in [
        (rg(x), crow, col, values, b, state, 3, True, [3, 3], [1, 1], [1, 1], [1, 1], 1),
        (rg(xs), crow, col, values, None, state, 3, False, [3, 3], [2, 1], [0, 1], [1, 2], 1),
        (rg(x1), c1[0], c1[1], c1[2], torch.randn(6, generator=gen), state, 2, True, [3], [1], [1], [1], 2),
    ]:
        opcheck(lrt, args)


def test_torch_compile_fullgraph_equals_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 6, 6, generator=gen)
    W, V = pruned_weight((5, 4, 3, 3), 0.3, gen, dtype=torch.float32)
    crow, col, values = csr_of(W, V)
    b = torch.randn(5, generator=gen)
    W2, V2 = pruned_weight((2, 5, 2), 0.5, gen, dtype=torch.float32)
    c2 = csr_of(W2, V2)
    state = torch.tensor([11, 0])

    def f(x, state):
        y = bdlkern.ops.sparse_conv(x, crow, col, values[:, 0], b, kernel_size=3, padding=1)  # [3, 5, 6, 6]
        z = bdlkern.ops.sparse_conv(y, crow, col, values, b, kernel_size=3, stride=2, num_samples=4,
                                    stochastic=True, rng_state=state)  # [12, 5, 2, 2]
        w = bdlkern.ops.sparse_conv(z.flatten(2), *c2, kernel_size=2, num_samples=4, stochastic=True,
                                    input_has_samples=True, rng_state=state + 1)  # conv1d: [12, 2, 3]
        return y.relu().sum() + z.tanh().sum() + w.sin().sum()

    compiled = torch.compile(f, fullgraph=True)
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_eager = compiled(xc, state), f(xe, state)
    torch.testing.assert_close(out, out_eager)
    out.backward()
    out_eager.backward()
    assert xc.grad is not None and xc.grad.abs().sum() > 0
    torch.testing.assert_close(xc.grad, xe.grad)
    assert not torch.allclose(compiled(xc, torch.tensor([12, 0])), out)  # the state is an input


# ---- bad input -------------------------------------------------------------------------------------
def _valid_problem():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=gen)
    W, V = pruned_weight((6, 4, 3, 3), 0.4, gen, dtype=torch.float32)
    crow, col, values = csr_of(W, V)
    b = torch.randn(6, generator=gen)
    return x, crow, col, values, b


def test_bad_input_names_the_argument():
    x, crow, col, values, b = _valid_problem()
    theta = values[:, 0].contiguous()
    st = torch.tensor([1, 1])
    f = bdlkern.ops.sparse_conv
    kw = dict(kernel_size=3)
    assert f(x, crow, col, theta, b, **kw).shape == (2, 6, 4, 4)  # the valid calls work
    assert f(x, crow, col, values, b, num_samples=2, stochastic=True, rng_state=st, **kw).shape == (4, 6, 4, 4)
    K = 4 * 9
    assert (crow.diff() >= 2).all() and col.max() < K
    # malformed CSR
    bad_crow0 = crow.clone()
    bad_crow0[0] = 1
    decreasing = crow.clone()
    decreasing[1] = crow[-1]
    assert decreasing[1] > decreasing[2]
    out_of_range = col.clone()
    out_of_range[-1] = K
    unsorted = col.clone()
    unsorted[0], unsorted[1] = col[1], col[0]
    negative_col = col.clone()
    negative_col[0] = -1
    cases = [
        ((x, bad_crow0, col, theta, b), r"crow\[0\]"),
        ((x, decreasing, col, theta, b), r"crow"),
        ((x, crow[:-1], col, theta, b[:-1]), r"crow"),  # crow[-1] != nnz
        ((x, crow, out_of_range, theta, b), r"\bcol\b"),
        ((x, crow, negative_col, theta, b), r"\bcol\b"),
        ((x, crow, unsorted, theta, b), r"\bcol\b"),
        ((x, crow, col, theta[:-1], b), r"values"),
        ((x, crow, col[:-1], theta, b), r"values|col|crow"),
        ((x, crow.int(), col, theta, b), r"crow"),
        ((x, crow, col.int(), theta, b), r"\bcol\b"),
        ((x, crow.float(), col, theta, b), r"crow"),
        ((x, crow, col, theta.double(), b), r"values"),
        ((x, crow, col, torch.zeros(theta.numel(), 3), b), r"values"),
        ((x, crow, col, theta, b.double()), r"bias"),
        ((x.double(), crow, col, theta, b), r"values"),
        ((x, crow, col, theta, b[:-1]), r"bias"),  # crow's rows vs bias
        ((x, crow, col, theta, b.reshape(2, 3)), r"bias"),
        ((x, crow, col.reshape(1, -1), theta, b), r"\bcol\b"),
        ((x[:, :3], crow, col, theta, b), r"\bcol\b"),  # col out of range for 3 * 9
        ((x.int(), crow, col, theta, b), r"\bx\b|values"),
        ((torch.randn(2, 4, 6, 6, 6, 6), crow, col, theta, b), r"\bx\b"),
    ]
    for args, message in cases:
        with pytest.raises(ERRORS, match=message):
            f(*args, **kw)
    # x without its batch dimension: for a 2-d kernel it has the wrong rank
    with pytest.raises(ERRORS, match=r"\bx\b|kernel_size"):
        f(torch.randn(4, 6, 6), crow, col, theta, b, kernel_size=(3, 3))
    # the same malformed structures in the stochastic op
    vals_bad = values[:-1]
    for args, message in [
        ((x, bad_crow0, col, values, b), r"crow\[0\]"),
        ((x, crow, unsorted, values, b), r"\bcol\b"),
        ((x, crow, out_of_range, values, b), r"\bcol\b"),
        ((x, crow, col, vals_bad, b), r"values"),
        ((x, crow, col, values, b[:-1]), r"bias"),
        ((x, crow, col, theta, b), r"values"),  # stochastic needs [nnz, 2]
        ((x, crow, col, torch.stack([theta, -theta.abs() - 1], 1), b), r"values"),  # negative variance
    ]:
        with pytest.raises(ERRORS, match=message):
            f(*args, num_samples=2, stochastic=True, rng_state=st, **kw)
    # groups, geometry and sampling arguments
    with pytest.raises(ERRORS, match=r"groups"):
        f(x, crow, col, theta, b, kernel_size=3, groups=3)  # 4 channels, 3 groups
    with pytest.raises(ERRORS, match=r"groups"):
        f(x, crow, col, theta, b, kernel_size=3, groups=0)
    W5, _ = pruned_weight((5, 2, 3, 3), 0.5, torch.Generator().manual_seed(2), dtype=torch.float32)
    c5 = csr_of(W5)
    with pytest.raises(ERRORS, match=r"groups"):
        f(x, *c5, kernel_size=3, groups=2)  # 5 output channels, 2 groups
    with pytest.raises(ERRORS, match=r"kernel_size"):
        f(x, crow, col, theta, b, kernel_size=(3, 3, 3))
    with pytest.raises(ERRORS, match=r"kernel_size"):
        f(x, crow, col, theta, b, kernel_size=0)
    with pytest.raises(ERRORS, match=r"stride"):
        f(x, crow, col, theta, b, kernel_size=3, stride=0)
    with pytest.raises(ERRORS, match=r"padding"):
        f(x, crow, col, theta, b, kernel_size=3, padding=-1)
    with pytest.raises(ERRORS, match=r"dilation"):
        f(x, crow, col, theta, b, kernel_size=3, dilation=(1, 0))
    with pytest.raises(ERRORS, match=r"num_samples"):
        f(x, crow, col, theta, b, kernel_size=3, num_samples=2)  # samples without stochastic
    with pytest.raises(ERRORS, match=r"num_samples"):
        f(torch.randn(5, 4, 6, 6), crow, col, values, b, kernel_size=3, num_samples=2, stochastic=True,
          input_has_samples=True, rng_state=st)
    for S in (0, -1):
        with pytest.raises(ERRORS, match=r"num_samples"):
            f(x, crow, col, values, b, kernel_size=3, num_samples=S, stochastic=True, rng_state=st)
    with pytest.raises(ERRORS, match=r"rng_state"):
        f(x, crow, col, values, b, kernel_size=3, num_samples=2, stochastic=True, rng_state=torch.tensor([1.0, 2.0]))
    with pytest.raises(ERRORS, match=r"rng_state"):
        f(x, crow, col, values, b, kernel_size=3, num_samples=2, stochastic=True, rng_state=torch.tensor([1, 2, 3]))
    with pytest.raises(ERRORS, match=r"\bx\b"):
        f([[1.0]], crow, col, theta, b, kernel_size=3)
    with pytest.raises(ERRORS, match=r"values"):
        f(x, crow, col, 1.0, b, kernel_size=3)
    # device mismatch (meta values)
    with pytest.raises(ERRORS, match=r"values"):
        torch.ops.bdlkern.sparse_conv(x, crow, col, theta.to("meta"), None, [3, 3], [1, 1], [0, 0], [1, 1], 1)


@pytest.mark.parametrize("ns", ["bdlkern", "bdlkern_simt"])
def test_bad_input_raw_ops(ns):
    if ns == "bdlkern_simt":
        require_backend("simt")
    x, crow, col, values, b = _valid_problem()
    theta = values[:, 0].contiguous()
    st = torch.tensor([1, 1])
    ops = getattr(torch.ops, ns)

    def det(x=x, crow=crow, col=col, values=theta, b=None, groups=1, stride=(1, 1), kernel=(3, 3)):
        return ops.sparse_conv(x, crow, col, values, b, list(kernel), list(stride), [0, 0], [1, 1], groups)

    def lrt(x=x, crow=crow, col=col, values=values, b=None, S=2, shared=True, groups=1):
        return ops.sparse_conv_lrt(x, crow, col, values, b, st, S, shared, [3, 3], [1, 1], [0, 0], [1, 1], groups)

    assert det().shape == (2, 6, 4, 4) and lrt()[0].shape == (4, 6, 4, 4)
    bad_crow0 = crow.clone()
    bad_crow0[0] = 1
    unsorted = col.clone()
    unsorted[0], unsorted[1] = col[1], col[0]
    out_of_range = col.clone()
    out_of_range[-1] = 36
    for call in (det, lrt):
        with pytest.raises(ERRORS, match=r"crow\[0\]"):
            call(crow=bad_crow0)
        with pytest.raises(ERRORS, match=r"\bcol\b"):
            call(col=unsorted)
        with pytest.raises(ERRORS, match=r"\bcol\b"):
            call(col=out_of_range)
        with pytest.raises(ERRORS, match=r"bias"):
            call(b=b[:4])
        with pytest.raises(ERRORS, match=r"groups"):
            call(groups=3)
        with pytest.raises(ERRORS, match=r"\bx\b|kernel_size"):
            call(x=torch.randn(4, 6, 6))  # no batch dimension: a 1-d input for the 2-d kernel
        with pytest.raises(ERRORS, match=r"\bx\b"):
            call(x=torch.randn(2, 4, 6, 6, 6, 6))
    with pytest.raises(ERRORS, match=r"values"):
        det(values=theta[:-1])
    with pytest.raises(ERRORS, match=r"values"):
        det(values=theta.double())
    with pytest.raises(ERRORS, match=r"stride"):
        det(stride=(0, 1))
    with pytest.raises(ERRORS, match=r"kernel_size"):
        det(kernel=(3,))
    with pytest.raises(ERRORS, match=r"values"):
        lrt(values=theta)
    with pytest.raises(ERRORS, match=r"num_samples"):
        lrt(x=torch.randn(5, 4, 6, 6), shared=False)
    with pytest.raises(ERRORS, match=r"num_samples"):
        lrt(S=0)


def test_bad_module_arguments():
    x, crow, col, values, b = _valid_problem()
    theta = values[:, 0].contiguous()
    cls = bdlkern.nn.SparseConv2d
    layer = cls(4, 6, 3, crow, col, theta, b)
    assert layer(x).shape == (2, 6, 4, 4)
    bad_crow0 = crow.clone()
    bad_crow0[0] = 1
    unsorted = col.clone()
    unsorted[0], unsorted[1] = col[1], col[0]
    with pytest.raises(ERRORS, match=r"crow"):
        cls(4, 6, 3, bad_crow0, col, theta, b)  # malformed CSR fails at construction
    with pytest.raises(ERRORS, match=r"\bcol\b"):
        cls(4, 6, 3, crow, unsorted, theta, b)
    with pytest.raises(ERRORS, match=r"\bcol\b"):
        cls(2, 6, 3, crow, col, theta, b)  # col out of range for 2 * 9
    with pytest.raises(ERRORS, match=r"crow"):
        cls(4, 5, 3, crow, col, theta, b[:5])  # crow of 7 entries for 5 output channels
    with pytest.raises(ERRORS, match=r"bias"):
        cls(4, 6, 3, crow, col, theta, b[:5])
    with pytest.raises(ERRORS, match=r"groups"):
        cls(4, 6, 3, crow, col, theta, b, groups=4)  # 6 outputs not divisible by 4
    with pytest.raises(ERRORS, match=r"values"):
        cls(4, 6, 3, crow, col, theta[:-1], b)
    with pytest.raises(ERRORS, match=r"values"):
        cls(4, 6, 3, crow, col, theta.half(), b.half())
    with pytest.raises(ERRORS, match=r"kernel_size"):
        cls(4, 6, (3, 3, 3), crow, col, theta, b)
    with pytest.raises(ERRORS, match=r"mask"):
        cls.from_dense(torch.randn(6, 4, 3, 3), mask=torch.ones(6, 4, 3, dtype=torch.bool))
    with pytest.raises(ERRORS, match=r"weight"):
        cls.from_dense(torch.randn(6, 36))
    with pytest.raises(ERRORS, match=r"variance"):
        cls.from_dense(torch.randn(6, 4, 3, 3), variance=torch.rand(6, 4, 3))
    # wrong inputs at call time
    with pytest.raises(ERRORS, match=r"in_channels=4"):
        layer(torch.randn(2, 3, 6, 6))
    with pytest.raises(ERRORS, match=r"in_channels=4"):
        layer(torch.randn(6, 6))
    with pytest.raises(TypeError, match=r"float64"):
        layer(x.double())
    dense_path = cls(4, 6, 3, crow, col, theta, b)
    assert dense_path.density > dense_path.crossover_density
    with pytest.raises(TypeError, match=r"float64"):
        dense_path(x.double())


# ---- modules ---------------------------------------------------------------------------------------
def make_layer(cls, density, *, C_in=4, C_out=6, k=3, groups=1, variance=True, bias=True, seed=0,
               dtype=torch.float64, **geom):
    dims = cls._dims
    gen = torch.Generator().manual_seed(seed)
    kernel = (k,) * dims if isinstance(k, int) else k
    W, V = pruned_weight((C_out, C_in // groups, *kernel), density, gen, dtype=dtype)
    b = torch.randn(C_out, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    layer = cls.from_dense(W, b, variance=V if variance else None, groups=groups, **geom)
    return layer, W, V, b


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_from_dense_to_dense_round_trip_density_and_nnz(dims):
    cls = SPARSE_CONV[dims]
    gen = torch.Generator().manual_seed(dims)
    k = (3, 2, 2)[:dims]
    W, V = pruned_weight((6, 2, *k), 0.3, gen)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    geom = dict(stride=2, padding=1, dilation=1, groups=2)
    layer = cls.from_dense(W, b, variance=V, **geom)
    assert type(layer) is cls
    crow, col, values = csr_of(W, V)
    assert torch.equal(layer.crow, crow) and torch.equal(layer.col, col) and torch.equal(layer.values, values)
    assert layer.crow.dtype == layer.col.dtype == torch.int64
    assert torch.equal(layer.to_dense(), W)
    assert layer.to_dense().shape == W.shape and layer.to_dense().dtype == torch.float64
    assert layer.nnz == int((W != 0).sum()) == col.numel()
    assert layer.density == pytest.approx(layer.nnz / W.numel())
    assert 0.25 <= layer.density <= 0.35
    assert layer.has_variance and layer.values.shape == (layer.nnz, 2)
    assert torch.equal(layer.bias, b) and layer.bias is not b  # a copy
    assert set(layer.state_dict()) == {"crow", "col", "values", "bias"}
    assert (layer.in_channels, layer.out_channels, layer.groups) == (4, 6, 2)
    # without variance; with an explicit mask (a kept weight of value 0 is stored)
    plain = cls.from_dense(W, **geom)
    assert not plain.has_variance and plain.values.shape == (plain.nnz,) and plain.bias is None
    assert torch.equal(plain.to_dense(), W)
    mask = W != 0
    flat_mask = mask.reshape(-1).clone()
    flat_mask[(~mask).reshape(-1).nonzero()[0]] = True  # one extra kept (zero) weight
    masked = cls.from_dense(W, mask=flat_mask.reshape(W.shape), **geom)
    assert masked.nnz == layer.nnz + 1
    assert torch.equal(masked.to_dense(), W)
    dense_all = cls.from_dense(W, mask=torch.ones_like(W, dtype=torch.bool), **geom)
    assert dense_all.nnz == W.numel() and dense_all.density == 1.0
    # the constructor from CSR buffers, and outputs against F.conv (deterministic, outside sampling)
    direct = cls(4, 6, k, crow, col, values, b, **geom)
    x = torch.randn(3, 4, *([7] * dims), generator=gen, dtype=torch.float64)
    for m in (layer, plain, masked, direct):
        close64(m(x), CONV[dims](x, W, m.bias, 2, 1, 1, 2))
    assert torch.equal(direct.to_dense(), W)


def _path_spy(monkeypatch):
    calls = []
    real = bdlkern.ops.sparse_conv

    def spy(*args, **kwargs):
        calls.append(kwargs.get("stochastic", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(bdlkern.ops, "sparse_conv", spy)
    return calls


@pytest.mark.parametrize("density", [0.05, 0.6])
def test_dense_fallback_equals_sparse_path(monkeypatch, density):
    class AlwaysDense(bdlkern.nn.SparseConv2d):
        crossover_density = -1.0

    class NeverDense(bdlkern.nn.SparseConv2d):
        crossover_density = 2.0

    gen = torch.Generator().manual_seed(4)
    W, V = pruned_weight((6, 2, 3, 2), density, gen)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    geom = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    dense_layer = AlwaysDense.from_dense(W, b, variance=V, **geom)
    sparse_layer = NeverDense.from_dense(W, b, variance=V, **geom)
    default = bdlkern.nn.SparseConv2d.from_dense(W, b, **geom)
    assert type(dense_layer) is AlwaysDense and type(sparse_layer) is NeverDense
    calls = _path_spy(monkeypatch)
    x = torch.randn(3, 4, 9, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = F.conv2d(x, W, b, **geom)
    y_dense = dense_layer(x)
    assert calls == []  # the dense conv, no sparse kernel
    y_sparse = sparse_layer(x)
    assert calls == [False]
    close64(y_dense, expected)
    close64(y_sparse, expected)
    close64(y_sparse, y_dense)
    g = torch.randn(expected.shape, generator=gen, dtype=torch.float64)
    gx = torch.autograd.grad(expected, x, g)[0]
    close64(torch.autograd.grad(y_dense, x, g)[0], gx, "dense path grad_x")
    close64(torch.autograd.grad(y_sparse, x, g)[0], gx, "sparse path grad_x")
    # the default class picks by density
    calls.clear()
    close64(default(x), expected)
    assert calls == ([] if density > bdlkern.nn.SparseConv2d.crossover_density else [False])
    # monkeypatching the class attribute of the default class flips the path
    monkeypatch.setattr(bdlkern.nn.SparseConv2d, "crossover_density", 2.0 if density > 0.25 else -1.0)
    calls.clear()
    close64(default(x), expected)
    assert calls == ([False] if density > 0.25 else [])
    # unbatched input on both paths
    xu = x[0].detach()
    for m in (dense_layer, sparse_layer):
        yu = m(xu)
        assert yu.shape == expected.shape[1:]
        close64(yu, expected[0].detach())


def test_unbatched_input_1d_and_3d():
    for dims in (1, 3):
        layer, W, _, b = make_layer(SPARSE_CONV[dims], 0.2, k=2, seed=dims, padding=1)
        x = torch.randn(4, *([5] * dims), dtype=torch.float64)
        y = layer(x)
        assert y.shape == (6, *([6] * dims))
        close64(y, CONV[dims](x.unsqueeze(0), W, b, 1, 1)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_state_dict_round_trip_into_another_nnz(tmp_path, dtype):
    src, W, V, b = make_layer(bdlkern.nn.SparseConv2d, 0.1, seed=1, dtype=dtype, stride=2, padding=1)
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    y = src(x)
    with bdlkern.sampling(3, seed=5):
        ys = src(x)
    assert ys.shape == (6, 6, 4, 4)
    tol = dict(rtol=0, atol=0)
    targets = []
    # a layer of another nnz, no variance, no bias
    other, _, _, _ = make_layer(bdlkern.nn.SparseConv2d, 0.5, seed=2, dtype=dtype, variance=False, bias=False,
                                stride=2, padding=1)
    targets.append(other)
    # a dense layer whose dense path already ran (its cached dense weight must not survive the load)
    dense, _, _, _ = make_layer(bdlkern.nn.SparseConv2d, 1.0, seed=3, dtype=dtype, stride=2, padding=1)
    dense(x)
    targets.append(dense)
    for t in targets:
        assert t.nnz != src.nnz
        t.load_state_dict(src.state_dict())
        assert t.nnz == src.nnz and t.density == src.density and t.has_variance
        assert torch.equal(t.to_dense(), W) and torch.equal(t.bias, b)
        torch.testing.assert_close(t(x), y, **tol)
        with bdlkern.sampling(3, seed=5):
            torch.testing.assert_close(t(x), ys, **tol)
    # a high-density state into the dense layer: the dense path with the new weight
    hi, W_hi, _, b_hi = make_layer(bdlkern.nn.SparseConv2d, 0.6, seed=4, dtype=dtype, stride=2, padding=1)
    dense.load_state_dict(hi.state_dict())
    assert dense.density > dense.crossover_density
    torch.testing.assert_close(dense(x), F.conv2d(x, W_hi, b_hi, 2, 1), rtol=1e-5, atol=1e-5)
    # torch.save of the module
    path = tmp_path / "sparse_conv.pt"
    torch.save(src, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is bdlkern.nn.SparseConv2d
    torch.testing.assert_close(loaded(x), y, **tol)
    torch.testing.assert_close(copy.deepcopy(src)(x), y, **tol)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    other2, _, _, _ = make_layer(bdlkern.nn.SparseConv2d, 0.02, seed=6, dtype=dtype, stride=2, padding=1)
    other2.load_state_dict(torch.load(buf))
    torch.testing.assert_close(other2(x), y, **tol)


def test_seeded_sampling_matches_reference_rng_states():
    """Inside ``sampling(S, seed=k)`` a SparseConv2d with variances draws S folded LRT samples with
    rng_state [k, 0]; a later one of the pass [k, 1 << 40] on [S*N, ...]; a second pass goes on
    counting; outside the block the layer is deterministic again."""
    l1, W1, V1, b1 = make_layer(bdlkern.nn.SparseConv2d, 0.3, C_in=2, C_out=4, seed=7, padding=1)
    l2, W2, V2, b2 = make_layer(bdlkern.nn.SparseConv2d, 0.05, C_in=4, C_out=5, seed=8, stride=2)
    S, N, k = 4, 3, 17
    x = torch.randn(N, 2, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with bdlkern.sampling(S, seed=k):
        y1 = l1(x)
    assert y1.shape == (S * N, 4, 7, 7)
    close64(y1, stochastic_ref(x, W1, V1, b1, S, seeded_state(k, 0), padding=1))
    assert not torch.allclose(y1[:N], y1[N:2 * N])  # the samples differ
    model = nn.Sequential(l1, nn.ReLU(), l2)
    with bdlkern.sampling(S, seed=k):
        out = model(x)
        out2 = model(x)  # a new pass: calls 2 and 3 of the block
    h = F.relu(stochastic_ref(x, W1, V1, b1, S, seeded_state(k, 0), padding=1))
    expected = stochastic_ref(h, W2, V2, b2, S, seeded_state(k, 1), input_has_samples=True, stride=2)
    assert out.shape == (S * N, 5, 3, 3)
    close64(out, expected)
    h2 = F.relu(stochastic_ref(x, W1, V1, b1, S, seeded_state(k, 2), padding=1))
    close64(out2, stochastic_ref(h2, W2, V2, b2, S, seeded_state(k, 3), input_has_samples=True, stride=2))
    pred = bdlkern.uncertainty.mc_predict(lambda x: model(x).flatten(1), x, num_samples=S, seed=k)
    assert pred.samples.shape == (S, N, 45)
    close64(pred.samples, bdlkern.unfold_samples(out, S).flatten(2))
    # a layer without variances is deterministic inside the block too (on the folded [S*N, ...])
    plain = bdlkern.nn.SparseConv2d.from_dense(W2, b2, stride=2)
    with bdlkern.sampling(S, seed=k):
        h1 = l1(x)
        close64(plain(F.relu(h1)), F.conv2d(F.relu(h1), W2, b2, 2))
    # outside: the deterministic conv of theta
    close64(model(x), F.conv2d(F.relu(F.conv2d(x, W1, b1, 1, 1)), W2, b2, 2))
    # the layer's own input gradient inside the block, as through the reference
    xg = x.clone().requires_grad_()
    with bdlkern.sampling(S, seed=k):
        yg = l1(xg)
    g = torch.randn(yg.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xr = x.clone().requires_grad_()
    close64(torch.autograd.grad(yg, xg, g)[0],
            torch.autograd.grad(stochastic_ref(xr, W1, V1, b1, S, seeded_state(k, 0), padding=1), xr, g)[0])


def set_log_alpha(layer, la):
    with torch.no_grad():
        layer.log_sigma2.copy_(la + torch.log(layer.theta**2 + 1e-8))


def noisy(layer, gen, low=-3.0, high=6.0):
    la = torch.rand(layer.theta.shape, generator=gen, dtype=torch.float64) * (high - low) + low
    set_log_alpha(layer, la.to(layer.theta.dtype))
    return layer


@pytest.mark.parametrize("dims", [1, 2])
def test_sparse_vd_conv_to_sparse_equals_eval(dims, monkeypatch):
    gen = torch.Generator().manual_seed(20 + dims)
    torch.manual_seed(20 + dims)
    cls = {1: bdlkern.nn.SparseVDConv1d, 2: bdlkern.nn.SparseVDConv2d}[dims]
    vd = noisy(cls(4, 6, 3, stride=2, padding=1, dilation=(2 if dims == 1 else (1, 2)), groups=2,
                   dtype=torch.float64), gen)
    vd.eval()
    keep = vd.mask()
    assert keep.any() and not keep.all()
    sp = vd.to_sparse()
    assert type(sp) is SPARSE_CONV[dims]
    assert sp.nnz == int(keep.sum()) and sp.has_variance
    assert sp.density == pytest.approx(keep.double().mean().item())
    close64(sp.to_dense(), vd.pruned_weight().detach())
    variance = (torch.exp(vd.log_alpha) * vd.theta**2).detach()
    _, _, values = csr_of(vd.pruned_weight().detach() + 0.0, variance)
    close64(sp.values, values)
    assert torch.equal(sp.bias, vd.bias.detach())
    x = torch.randn(3, 4, *([9] * dims), dtype=torch.float64, generator=gen)
    expected = vd(x)
    close64(sp(x), expected)
    # on both paths
    monkeypatch.setattr(SPARSE_CONV[dims], "crossover_density", 2.0)
    close64(sp(x), expected, "sparse path")
    monkeypatch.setattr(SPARSE_CONV[dims], "crossover_density", -1.0)
    close64(sp(x), expected, "dense path")
    assert not torch.allclose(expected, CONV[dims](x, vd.theta, vd.bias, vd.stride, vd.padding, vd.dilation, 2))


def lenet(dtype=torch.float64):
    return nn.Sequential(
        bdlkern.nn.SparseVDConv2d(1, 6, 3, padding=1, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
        bdlkern.nn.SparseVDConv2d(6, 8, 3, padding=1, groups=2, dtype=dtype), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), bdlkern.nn.SparseVDLinear(8 * 2 * 2, 16, dtype=dtype), nn.ReLU(),
        bdlkern.nn.SparseVDLinear(16, 10, dtype=dtype),
    )


def to_sparse_model(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[m.to_sparse() if hasattr(m, "to_sparse") else m for m in model])


@pytest.mark.parametrize("path", ["default", "csr", "dense"])
def test_pruned_lenet_equals_dense_masked_model(path, monkeypatch):
    torch.manual_seed(30)
    gen = torch.Generator().manual_seed(30)
    model = lenet()
    for m in model:
        if hasattr(m, "log_sigma2"):
            noisy(m, gen, -3.0, 8.0)  # ~ half pruned
    model.eval()
    sparse = to_sparse_model(model)
    kinds = [type(m).__name__ for m in sparse if hasattr(m, "crow")]
    assert kinds == ["SparseConv2d", "SparseConv2d", "SparseLinear", "SparseLinear"]
    for m in sparse:
        if hasattr(m, "crow"):
            assert 0 < m.density < 1
    if path == "csr":
        monkeypatch.setattr(bdlkern.nn.SparseConv2d, "crossover_density", 2.0)
        monkeypatch.setattr(bdlkern.nn.SparseLinear, "crossover_table", ((math.inf, 2.0),))
    elif path == "dense":
        monkeypatch.setattr(bdlkern.nn.SparseConv2d, "crossover_density", -1.0)
        monkeypatch.setattr(bdlkern.nn.SparseLinear, "crossover_table", ((math.inf, -1.0),))
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=gen)
    expected = model(x)
    out = sparse(x)
    assert out.shape == (5, 10)
    close64(out, expected.detach())
    # the unpruned net differs: pruning mattered
    with torch.no_grad():
        unpruned = copy.deepcopy(model)
        for m in unpruned:
            if hasattr(m, "log_sigma2"):
                m.log_sigma2.fill_(-30.0)
        assert not torch.allclose(unpruned(x), expected)
    # the pruned net samples in a folded pass
    with bdlkern.sampling(4, seed=3):
        ys = sparse(x)
    assert ys.shape == (20, 10) and torch.isfinite(ys).all()
    assert not torch.allclose(ys[:5], ys[5:10])


# ---- training on scikit-learn's digits ----------------------------------------------------------------
@pytest.mark.slow
def test_training_prunes_95_percent_of_digits_lenet(threads):
    """A LeNet-style sparse-VD conv net on scikit-learn's 8x8 digits: Adam, the KL scaled by
    1 / N_train with a linear KL-weight warm-up (Molchanov et al. 2017), a linearly decaying learning
    rate. Targets: >= 95% of all weights pruned (log_alpha >= 3) and >= 95% held-out accuracy; the
    pruned CSR model gives the dense masked model's predictions."""
    from sklearn.datasets import load_digits

    torch.set_num_threads(1)
    start = time.perf_counter()
    digits = load_digits()
    X = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    Y = torch.tensor(digits.target)
    assert X.shape == (1797, 1, 8, 8) and len(Y.unique()) == 10  # real data was read
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(X), generator=gen)
    train, test = perm[:1400], perm[1400:]
    mu, sd = X[train].mean(), X[train].std()
    X = (X - mu) / sd
    Xtr, Ytr, Xte, Yte = X[train], Y[train], X[test], Y[test]
    torch.manual_seed(0)
    model = nn.Sequential(
        bdlkern.nn.SparseVDConv2d(1, 16, 3, padding=1, log_sigma2_init=-6.0), nn.ReLU(), nn.MaxPool2d(2),
        bdlkern.nn.SparseVDConv2d(16, 32, 3, padding=1, log_sigma2_init=-6.0), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        bdlkern.nn.SparseVDLinear(128, 100, log_sigma2_init=-6.0), nn.ReLU(),
        bdlkern.nn.SparseVDLinear(100, 10, log_sigma2_init=-6.0),
    )
    layers = [(i, m) for i, m in enumerate(model) if hasattr(m, "log_alpha")]
    epochs, warm_up, batch, N = 90, 12, 100, len(Xtr)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 - e / epochs)
    first_losses, last_losses = [], []
    model.train()
    for epoch in range(epochs):
        kl_weight = min(1.0, epoch / warm_up)
        order = torch.randperm(N, generator=gen)
        for i in range(0, N, batch):
            idx = order[i:i + batch]
            nll = F.cross_entropy(model(Xtr[idx]), Ytr[idx])
            loss = nll + kl_weight * bdlkern.nn.kl_divergence(model) / N
            opt.zero_grad()
            loss.backward()
            opt.step()
            if epoch == 0:
                first_losses.append(nll.item())
            elif epoch == epochs - 1:
                last_losses.append(nll.item())
        sched.step()
    train_time = time.perf_counter() - start
    model.eval()
    kept = {i: int(m.mask().sum()) for i, m in layers}
    total = {i: m.theta.numel() for i, m in layers}
    sparsity = 1 - sum(kept.values()) / sum(total.values())
    with torch.no_grad():
        logits = model(Xte)
        accuracy = (logits.argmax(1) == Yte).float().mean().item()
        sparse = to_sparse_model(model)
        sparse_logits = sparse(Xte)
    print()
    print(f"{'layer':<28}{'kept/total':>14}{'sparsity':>10}")
    for i, m in layers:
        print(f"{i:>2} {type(m).__name__:<25}{kept[i]:>7}/{total[i]:<6}{1 - kept[i] / total[i]:>10.4f}")
    print(f"{'all':<28}{sum(kept.values()):>7}/{sum(total.values()):<6}{sparsity:>10.4f}")
    print(f"test accuracy {accuracy:.4f} on {len(Yte)} held-out digits; {epochs} epochs in {train_time:.1f} s")
    assert sum(last_losses) / len(last_losses) < 0.25 * sum(first_losses) / len(first_losses)
    assert sparsity >= 0.95, sparsity
    assert accuracy >= 0.95, accuracy
    # the pruned CSR model: the same predictions (and logits) as the dense masked eval model
    for (i, m), s in zip(layers, [sparse[i] for i, _ in layers]):
        assert s.nnz == kept[i]
    assert torch.equal(sparse_logits.argmax(1), logits.argmax(1))
    torch.testing.assert_close(sparse_logits, logits, rtol=1e-4, atol=1e-4)
