"""The two ways an op's Autograd kernel runs (csrc/torch/autograd/common.h ``needs_graph``): through
its autograd Function when an input needs a gradient, or straight below autograd when none does
(inference, ``torch.no_grad``, frozen layers), which saves a Function node per call. Both must give
the same bits; the direct path must leave no graph, and a forward-mode tangent must never be
dropped silently (the Functions have no jvp, so it raises)."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import bdlkern

from conftest import require_backend


def _crs(n_out, n_in, seed=0):
    """A small CSR pattern with every row non-empty: crow, col."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_out, n_in, generator=g) < 0.5
    mask[:, 0] = True
    sparse = mask.double().to_sparse_csr()
    return sparse.crow_indices(), sparse.col_indices()


def _calls(ns):
    """(name, fn(requires_grad) -> outputs, the inputs that may carry grads) for every forward op
    whose Autograd kernel has the direct path."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    b = torch.randn(3, generator=g, dtype=torch.float64)
    ls = torch.full((3, 6), -3.0, dtype=torch.float64)
    p_logit = torch.tensor(-1.0, dtype=torch.float64)
    crow, col = _crs(3, 6)
    values = torch.randn(col.numel(), dtype=torch.float64, generator=g)
    values2 = torch.stack([values, values.abs() * 0.1], dim=1)
    state = torch.tensor([5, 1])
    return [
        ("mc_dropout_linear", lambda a: ns.mc_dropout_linear(a(x), a(w), a(b), state, 0.3, 2, False)),
        ("concrete_dropout", lambda a: ns.concrete_dropout(a(x), a(p_logit), state, 0.1, -1)),
        ("lrt_linear", lambda a: ns.lrt_linear(a(x), a(w), a(ls), a(b), state, 2)),
        ("sparse_linear", lambda a: ns.sparse_linear(a(x), crow, col, a(values), a(b), None)),
        ("sparse_linear_lrt", lambda a: ns.sparse_linear_lrt(a(x), crow, col, a(values2), a(b), None, state, 2)),
    ]


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.detach().view(torch.int64), b.detach().view(torch.int64))


@pytest.mark.parametrize("name", ["mc_dropout_linear", "concrete_dropout", "lrt_linear", "sparse_linear", "sparse_linear_lrt"])
@pytest.mark.parametrize("backend_name", ["cpu", "simt"])
def test_direct_and_function_paths_give_the_same_bits(backend_name, name):
    ns = require_backend(backend_name).ops
    fn = dict((n, f) for n, f in _calls(ns))[name]
    tracked = _as_tuple(fn(lambda t: t.clone().requires_grad_()))
    plain = _as_tuple(fn(lambda t: t.clone()))
    with torch.no_grad():
        no_grad = _as_tuple(fn(lambda t: t.clone().requires_grad_()))
    assert tracked[0].grad_fn is not None
    for out in plain + no_grad:
        assert out.grad_fn is None and not out.requires_grad
    for t, p, n in zip(tracked, plain, no_grad):
        assert _bits_equal(t, p) and _bits_equal(t, n), name


@pytest.mark.parametrize("name", ["mc_dropout_linear", "concrete_dropout", "lrt_linear", "sparse_linear", "sparse_linear_lrt"])
def test_a_forward_mode_tangent_raises_instead_of_vanishing(name):
    """Even under no_grad (where the direct path would otherwise run), a dual input reaches the
    Function, which has no jvp and says so: a silently dropped tangent would be a wrong answer."""
    fn = dict((n, f) for n, f in _calls(torch.ops.bdlkern))[name]
    with fwAD.dual_level(), torch.no_grad():
        with pytest.raises(RuntimeError, match="jvp"):
            fn(lambda t: fwAD.make_dual(t.clone(), torch.ones_like(t)))
