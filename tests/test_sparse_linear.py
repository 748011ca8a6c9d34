"""Sparse variational dropout, inference side: the CSR op (``sparse_linear`` and its stochastic
form ``sparse_linear_lrt``) against the dense layer and the reference on every backend, float32
paths, autograd / opcheck / torch.compile, the SparseLinear module (pruning a SparseVDLinear into
it, to_dense, state_dict and torch.save round trips, the dense path above the crossover density,
the CSR path below it, seeded sampling), and the CSR validation errors.

The training side (the LRT layer, the KL, SparseVDLinear) is tested in test_sparse_vd.py."""

import pytest
import torch
from torch import nn
from torch.library import opcheck

import bdlkern
from bdlkern.testing import reference as ref


# ---- pruning and sparse inference ------------------------------------------------------------------------
def random_csr(N, K, density, *, variance=True, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, K, generator=g) < density
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * keep
    v = torch.rand(N, K, generator=g, dtype=torch.float64) * keep
    layer = bdlkern.nn.SparseLinear.from_dense(w.to(dtype), torch.randn(N, generator=g, dtype=torch.float64).to(dtype), variance=v.to(dtype) if variance else None, mask=keep)
    return layer, w.to(dtype), v.to(dtype)


SPARSE_SHAPES = [(1, 1, 1, 1.0), (5, 9, 13, 0.3), (3, 70, 40, 0.1), (2, 64, 200, 0.05), (1, 1, 50, 0.5), (2, 0, 9, 0.5)]


def _offset(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values in a contiguous view that starts one element into its storage: a data pointer
    off the 16-byte grid (the CUDA CSR kernel's vector path must fall back, not misread)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


@pytest.mark.parametrize("S,B,K,density", SPARSE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_linear_matches_dense_reference(backend, S, B, K, density, dtype):
    """Every backend's CSR kernels (the CUDA sources under SIMT) against the dense float64 reference.
    float32 takes the CUDA kernel's 16-byte vector path (V = 4) at batches divisible by 4 (B = 64 here)
    and its scalar path elsewhere; the LRT inputs of the non-shared case start off the 16-byte grid."""
    N = 17
    layer, w, v = random_csr(N, K, density, seed=B + K, dtype=dtype)
    w, v = w.double(), v.double()
    dev = backend.device
    crow, col, values, bias = (t.to(dev) for t in (layer.crow, layer.col, layer.values, layer.bias))
    order = layer.row_order.to(dev)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    lrt_tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    x = torch.randn(B, K, dtype=torch.float64).to(dtype)
    y = backend.ops.sparse_linear(x.to(dev), crow, col, values, bias, order)
    torch.testing.assert_close(y.cpu().double(), nn.functional.linear(x.double(), w, layer.bias.double()), **tol)
    g = torch.randn(B, N, dtype=torch.float64).to(dtype)
    gx = backend.ops.sparse_linear_backward(g.to(dev), crow, col, values, K)
    torch.testing.assert_close(gx.cpu().double(), g.double() @ w, **tol)
    state = backend.tensor([3 + K, 1], dtype=torch.int64)
    ref_args = (layer.crow, layer.col, layer.values.double(), layer.bias.double())
    for shared in (True, False):
        xs = x if shared else torch.randn(S, B, K, dtype=torch.float64).to(dtype)
        x_dev = xs.to(dev) if shared else _offset(xs.to(dev))
        y, std = backend.ops.sparse_linear_lrt(x_dev, crow, col, values, bias, order, state, S)
        xd = xs.double()
        yr = ref.sparse_linear(xd, *ref_args, S if shared else None, stochastic=True, rng_state=state.cpu())
        torch.testing.assert_close(y.cpu().double(), yr, **lrt_tol)
        # the stochastic layer is the dense LRT layer with the same weight moments
        var = nn.functional.linear(xd * xd, v)
        torch.testing.assert_close(std.cpu().double().reshape(var.shape[-2:] if shared else var.shape),
                                   torch.sqrt(var + 1e-8), **lrt_tol)
        gy = torch.randn(S, B, N, dtype=torch.float64).to(dtype)
        gx = backend.ops.sparse_linear_lrt_backward(_offset(gy.to(dev)), x_dev, crow, col, values, std, state)
        xr = xd.clone().requires_grad_()
        (gxr,) = torch.autograd.grad(
            ref.sparse_linear(xr, *ref_args, S if shared else None, stochastic=True, rng_state=state.cpu()),
            xr,
            gy.double(),
        )
        torch.testing.assert_close(gx.cpu().double(), gxr, **lrt_tol)


def test_sparse_linear_float32_batches_and_vector_paths():
    """float32 at batch sizes that take every CPU path: 64-wide register tiles, 8-wide tiles, the
    scalar tail, a batch of one."""
    layer, w, _ = random_csr(33, 100, 0.1, dtype=torch.float32, seed=4)
    for B in (1, 3, 8, 64, 77, 200):
        x = torch.randn(B, 100)
        y = bdlkern.ops.sparse_linear(x, layer.crow, layer.col, layer.values, layer.bias)
        torch.testing.assert_close(y, nn.functional.linear(x, w, layer.bias), rtol=1e-5, atol=1e-5)
        ys = torch.ops.bdlkern_simt.sparse_linear(x, layer.crow, layer.col, layer.values, layer.bias, layer.row_order)
        torch.testing.assert_close(ys, y, rtol=1e-5, atol=1e-5)


def test_sparse_linear_autograd_gradcheck_opcheck_compile():
    layer, w, _ = random_csr(6, 8, 0.4, seed=5)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    state = torch.tensor([2, 2])

    def det(x):
        return bdlkern.ops.sparse_linear(x, layer.crow, layer.col, layer.values, layer.bias)

    def sto(x):
        return bdlkern.ops.sparse_linear(x, layer.crow, layer.col, layer.values, layer.bias, num_samples=3, stochastic=True, rng_state=state)

    assert torch.autograd.gradcheck(det, (x,))
    assert torch.autograd.gradcheck(sto, (x,))
    # batch dims and no gradient for the values
    xb = torch.randn(2, 3, 8, dtype=torch.float64)
    assert det(xb).shape == (2, 3, 6) and sto(xb).shape == (3, 2, 3, 6)
    xf = x.detach().float()
    lf, _, _ = random_csr(6, 8, 0.4, seed=5, dtype=torch.float32)
    ops = torch.ops.bdlkern
    opcheck(ops.sparse_linear, (xf.requires_grad_(), lf.crow, lf.col, lf.values, lf.bias, lf.row_order))
    opcheck(ops.sparse_linear_lrt, (xf, lf.crow, lf.col, lf.values, lf.bias, None, state, 2))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: det(x).tanh().sum() + sto(x).sum(), fullgraph=True)
    xc = x.detach().clone().requires_grad_()
    out = compiled(xc)
    out.backward()
    xe = x.detach().clone().requires_grad_()
    (det(xe).tanh().sum() + sto(xe).sum()).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_pruning_equivalence_and_round_trips(tmp_path):
    torch.manual_seed(0)
    layer = bdlkern.nn.SparseVDLinear(40, 12)
    with torch.no_grad():
        layer.log_sigma2.copy_(torch.randn(12, 40) * 6 + torch.log(layer.theta**2))  # half pruned
    layer.eval()
    sparse = layer.to_sparse()
    assert sparse.nnz == int(layer.mask().sum()) and 0.2 < sparse.density < 0.8
    x = torch.randn(9, 40)
    torch.testing.assert_close(sparse(x), layer(x), rtol=1e-5, atol=1e-5)  # sparse eval == dense masked eval
    torch.testing.assert_close(sparse.to_dense(), layer.pruned_weight().detach())
    # stochastic samples use the kept weights' variances
    with bdlkern.sampling(5, seed=3):
        ys = sparse(x)
    assert ys.shape == (5, 9, 12) and not torch.equal(ys[0], ys[1])
    # state_dict into a layer of another nnz, and torch.save of the module
    other = bdlkern.nn.SparseLinear.from_dense(torch.eye(12, 40), None)
    other.load_state_dict(sparse.state_dict())
    torch.testing.assert_close(other(x), sparse(x))
    path = tmp_path / "sparse.pt"
    torch.save(sparse, path)
    loaded = torch.load(path, weights_only=False)
    torch.testing.assert_close(loaded(x), sparse(x))
    # the dense path above the crossover gives the same values
    dense_layer = bdlkern.nn.SparseLinear.from_dense(torch.randn(12, 40), torch.randn(12))
    assert dense_layer.density > dense_layer.crossover_density(x.shape[0])
    assert sparse.crossover_density(1) <= sparse.crossover_density(64)
    torch.testing.assert_close(dense_layer(x), nn.functional.linear(x, dense_layer.to_dense(), dense_layer.bias))


@pytest.mark.parametrize("density", [0.01, 0.03, 0.05])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_module_on_the_csr_path(tmp_path, density, dtype):
    """SparseLinear at the densities pruning leaves (1-5%), below the crossover, where the module runs
    the CSR kernel (not F.linear): forward and input gradient against the dense weight, stochastic
    samples inside a seeded sampling block against the reference with the call's rng_state, and
    state_dict / torch.save round trips that keep both."""
    N, K = 48, 160
    layer, w, _ = random_csr(N, K, density, seed=int(density * 1000), dtype=dtype)
    assert layer.has_variance and layer.nnz > 0
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    x = torch.randn(9, K, dtype=dtype, requires_grad=True)
    xb = torch.randn(2, 3, K, dtype=dtype)  # batch dims: 6 rows

    def on_csr_path(module, rows):
        # the density rule picks the CSR kernel, and the dense weight was never made for the GEMM path
        return module.density <= module.crossover_density(rows) and module._dense is None

    y = layer(x)
    torch.testing.assert_close(y, nn.functional.linear(x, w, layer.bias), **tol)
    torch.testing.assert_close(layer(xb), nn.functional.linear(xb, w, layer.bias), **tol)
    assert on_csr_path(layer, 9) and on_csr_path(layer, 6)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(gx, g @ w, **tol)

    # Seeded sampling: call k of the block draws from rng_state [seed, k << 40]; a second call of
    # the same layer is a new pass (k = 1).
    x = x.detach()
    seed, S = 11, 5
    with bdlkern.sampling(S, seed=seed):
        first, second = layer(x), layer(x)
    for k, ys in enumerate((first, second)):
        expected = ref.sparse_linear(
            x, layer.crow, layer.col, layer.values, layer.bias, S, stochastic=True, rng_state=torch.tensor([seed, k << 40])
        )
        torch.testing.assert_close(ys, expected, **tol)
    assert not torch.equal(first, second)
    deterministic = layer(x)

    # state_dict into a dense layer whose GEMM path already ran (its dense weight is cached), and
    # torch.save of the whole module: the loaded layers are the sparse one, on the CSR path.
    other = bdlkern.nn.SparseLinear.from_dense(torch.randn(N, K, dtype=dtype), torch.randn(N, dtype=dtype))
    other(x)
    assert other._dense is not None
    other.load_state_dict(layer.state_dict())
    path = tmp_path / "sparse.pt"
    torch.save(layer, path)
    loaded = torch.load(path, weights_only=False)
    for module in (other, loaded):
        assert module.nnz == layer.nnz and module.density == layer.density
        torch.testing.assert_close(module(x), deterministic, rtol=0, atol=0)
        assert on_csr_path(module, 9)
        with bdlkern.sampling(S, seed=seed):
            torch.testing.assert_close(module(x), first, rtol=0, atol=0)


def test_csr_validation_errors():
    layer, _, _ = random_csr(4, 6, 0.5, seed=7)
    crow, col, values = layer.crow, layer.col, layer.values
    x = torch.randn(2, 6, dtype=torch.float64)
    f = torch.ops.bdlkern.sparse_linear
    assert crow[-1] >= 3, "the test needs a few entries"
    cases = [
        ((x, crow.int(), col, values, None, None), "crow must be an int64"),
        ((x, crow, col.int(), values, None, None), "col must be an int64"),
        ((x, crow[:-1], col, values, None, None), r"crow\[-1\] must equal nnz"),
        ((x, crow, col, values[:-1], None, None), "values has .* entries but col has nnz"),
        ((x, torch.cat([crow[:1] + 1, crow[1:]]), col, values, None, None), r"crow\[0\] must be 0"),
        ((x[:, :3], crow, col, values, None, None), "out of range for in_features = 3"),
        ((x, crow, col.flip(0), values, None, None), "strictly increasing within each row|out of range"),
        ((x, crow, col, values.float(), None, None), "values must have x's dtype"),
        ((x, crow, col, values, torch.zeros(3, dtype=torch.float64), None), r"bias must be \[out_features\]"),
    ]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            f(*args)
    # non-monotone crow with the right ends
    nm = crow.clone()
    nm[1] = crow[-1]
    assert nm[1] > nm[2], "the test needs entries after the second row, so that crow decreases"
    with pytest.raises(RuntimeError, match="crow must be non-decreasing"):
        f(x, nm, col, values, None, None)
    unsorted = col.clone()
    row = int((crow[1:] - crow[:-1]).argmax())
    j0 = int(crow[row])
    unsorted[j0], unsorted[j0 + 1] = col[j0 + 1], col[j0]
    with pytest.raises(RuntimeError, match="strictly increasing within each row"):
        f(x, crow, unsorted, values, None, None)
    with pytest.raises(RuntimeError, match=r"stochastic samples need values \[nnz, 2\]"):
        torch.ops.bdlkern.sparse_linear_lrt(x, crow, col, values[:, 0].contiguous(), None, None, torch.tensor([1, 1]), 2)
    with pytest.raises(ValueError, match="num_samples needs stochastic=True"):
        bdlkern.ops.sparse_linear(x, crow, col, values, num_samples=2)
    with pytest.raises(ValueError, match="mask must have the weight's shape"):
        bdlkern.nn.SparseLinear.from_dense(torch.ones(2, 3), mask=torch.ones(3, 2))
