"""Second derivatives (gradient penalties, Hessian-vector products, meta-learning): every op's
backward is itself differentiable. ``gradgradcheck`` in float64 on every backend, and the cases
the issue found returning a silent zero or an internal error, against the PyTorch reference with
the same random bits."""

import pytest
import torch
from torch.autograd import gradgradcheck

import bdlkern
from bdlkern.testing import reference as ref


@pytest.fixture
def state(backend):
    torch.manual_seed(0)
    return bdlkern.ops.new_rng_state(device=backend.device)


def f64(*shape, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device).requires_grad_()


@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("sample_dim", [False, True])
def test_mc_dropout_linear(backend, state, shared_mask, sample_dim):
    S, d = 2, backend.device
    x, w, b = f64(3, 5, device=d), f64(2, 5, device=d, seed=1), f64(2, device=d, seed=2)

    def f(x, w, b):
        xin = x.unsqueeze(0).expand(S, 3, 5) * torch.arange(1.0, S + 1, dtype=x.dtype, device=d).view(S, 1, 1) if sample_dim else x
        return backend.ops.mc_dropout_linear(xin, w, b, state, 0.3, S, shared_mask)

    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("channel_dim, x_shape, p_shape", [(-1, (3, 4), ()), (-1, (3, 4), (4,)), (1, (2, 3, 2, 2), (3,))])
def test_concrete_dropout(backend, state, channel_dim, x_shape, p_shape):
    x = f64(*x_shape, device=backend.device)
    p_logit = torch.full(p_shape, -0.5, dtype=torch.float64, device=backend.device, requires_grad=True)
    assert gradgradcheck(lambda a, q: backend.ops.concrete_dropout(a, q, state, 0.5, channel_dim), (x, p_logit))


@pytest.mark.parametrize("num_samples, shared_input", [(1, True), (2, True), (2, False)])
def test_lrt_linear(backend, state, num_samples, shared_input):
    d = backend.device
    x = f64(3, 4, device=d) if shared_input else f64(num_samples, 3, 4, device=d)
    theta, log_sigma2, b = f64(2, 4, device=d, seed=1), f64(2, 4, device=d, seed=2), f64(2, device=d, seed=3)
    f = lambda *a: backend.ops.lrt_linear(*a[:3], a[3], state, num_samples)[0]  # noqa: E731
    assert gradgradcheck(f, (x, theta, log_sigma2, b))


def test_sparse_vd_kl(backend):
    theta, log_sigma2 = f64(3, 4, device=backend.device), f64(3, 4, device=backend.device, seed=1, scale=3.0)
    assert gradgradcheck(lambda t, s: backend.ops.sparse_vd_kl(t, s), (theta, log_sigma2))
    assert gradgradcheck(lambda t, s: backend.ops.sparse_vd_kl_with_grad(t, s)[0], (theta, log_sigma2))
    if backend.name != "simt":  # the public function (which picks sparse_vd_kl_with_grad)
        assert gradgradcheck(bdlkern.ops.sparse_vd_kl, (theta, log_sigma2))


def test_ard_kl(backend):
    theta, log_sigma2 = f64(3, 4, device=backend.device), f64(3, 4, device=backend.device, seed=1, scale=3.0)
    assert gradgradcheck(lambda t, s: backend.ops.ard_kl(t, s), (theta, log_sigma2))
    assert gradgradcheck(lambda t, s: backend.ops.ard_kl_with_grad(t, s)[0], (theta, log_sigma2))
    if backend.name != "simt":  # the public function (which picks ard_kl_with_grad)
        assert gradgradcheck(bdlkern.ops.ard_kl, (theta, log_sigma2))


def csr(N, K, device, density=0.3, seed=4):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, K, generator=g) < density
    rows, col = keep.nonzero(as_tuple=True)
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(rows, minlength=N).cumsum(0)])
    theta = torch.randn(int(keep.sum()), generator=g, dtype=torch.float64)
    values = torch.stack([theta, theta.abs() * 0.2], 1)
    return crow.to(device), col.to(device), values.to(device)


def test_sparse_linear(backend, state):
    crow, col, values = csr(4, 6, backend.device, density=0.4)
    x = f64(3, 6, device=backend.device)
    det = lambda x: backend.ops.sparse_linear(x, crow, col, values[:, 0].contiguous(), None, None)  # noqa: E731
    sto = lambda x: backend.ops.sparse_linear_lrt(x, crow, col, values, None, None, state, 2)[0]  # noqa: E731
    assert gradgradcheck(det, (x,))
    assert gradgradcheck(sto, (x,))


# ---- the cases the issue reported, through the public API, against the reference ----------------
def second_derivative(fn, ref_fn, inputs, wrt):
    """d/d(wrt) of sum(dL/dx_0)^2 with L = sum(f(inputs) * c): ours and the reference's."""
    out = []
    for f in (fn, ref_fn):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = f(*leaves)
        c = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        (gx,) = torch.autograd.grad((y * c).sum(), leaves[0], create_graph=True)
        out.append(torch.autograd.grad(gx.square().sum(), [leaves[i] for i in wrt]))
    return out


def test_concrete_rate_gets_the_second_derivative_of_the_reference():
    """The issue: d/dp_logit of a function of dL/dx returned 0; the reference with the same u gives
    a non-zero value."""
    x = torch.randn(8, 5, dtype=torch.float64)
    p_logit = torch.tensor(-0.3, dtype=torch.float64)
    state = bdlkern.ops.new_rng_state()
    ours, want = second_derivative(
        lambda a, q: bdlkern.ops.concrete_dropout(a, q, 0.1, rng_state=state),
        lambda a, q: ref.concrete_dropout(a, q, 0.1, rng_state=state),
        (x, p_logit),
        wrt=(1,),
    )
    assert want[0].abs() > 0.1
    torch.testing.assert_close(ours[0], want[0])


def test_mc_dropout_linear_gradient_penalty_matches_the_reference():
    x, w, b = (torch.randn(s, dtype=torch.float64) for s in ((6, 9), (4, 9), (4,)))
    state = bdlkern.ops.new_rng_state()
    ours, want = second_derivative(
        lambda a, w_, b_: bdlkern.ops.mc_dropout_linear(a, w_, b_, 0.4, 3, rng_state=state).tanh(),
        lambda a, w_, b_: ref.mc_dropout_linear(a, w_, b_, 0.4, 3, rng_state=state).tanh(),
        (x, w, b),
        wrt=(0, 1, 2),
    )
    for o, r in zip(ours, want):
        torch.testing.assert_close(o, r)


def test_lrt_and_kl_hessian_vector_products_match_the_reference():
    x, theta, ls = (torch.randn(s, dtype=torch.float64) for s in ((6, 9), (4, 9), (4, 9)))
    state = bdlkern.ops.new_rng_state()
    ours, want = second_derivative(
        lambda a, t, s: bdlkern.ops.lrt_linear(a, t, s, num_samples=2, rng_state=state).sin(),
        lambda a, t, s: ref.lrt_linear(a, t, s, num_samples=2, rng_state=state).sin(),
        (x, theta, ls),
        wrt=(0, 1, 2),
    )
    for o, r in zip(ours, want):
        torch.testing.assert_close(o, r)
    # Hessian-vector product of the KL (a Laplace approximation's building block)
    t, s = theta.clone().requires_grad_(), ls.clone().requires_grad_()
    v = torch.randn_like(t)
    hvp = []
    for kl in (bdlkern.ops.sparse_vd_kl, ref.sparse_vd_kl):
        (g,) = torch.autograd.grad(kl(t, s), t, create_graph=True)
        hvp.append(torch.autograd.grad((g * v).sum(), (t, s)))
    for o, r in zip(*hvp):
        torch.testing.assert_close(o, r)


def test_first_backward_is_unchanged_by_the_double_backward_path():
    """create_graph=True and a plain backward give the same first gradients."""
    x, w = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in ((5, 6), (3, 6)))
    state = bdlkern.ops.new_rng_state()
    y = bdlkern.ops.mc_dropout_linear(x, w, None, 0.5, 2, rng_state=state)
    plain = torch.autograd.grad(y.sum(), (x, w), retain_graph=True)
    graph = torch.autograd.grad(y.sum(), (x, w), create_graph=True)
    for a, b in zip(plain, graph):
        torch.testing.assert_close(a, b)
        assert b.requires_grad


def test_double_backward_with_non_contiguous_inputs():
    """Transposed x and weight views through create_graph: the composite path and the first-order
    kernels agree with the contiguous copies."""
    state = bdlkern.ops.new_rng_state()
    xb = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    wb = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    for view in (lambda t: t.t(), lambda t: t.t().contiguous()):
        assert gradgradcheck(
            lambda a, b: bdlkern.ops.mc_dropout_linear(view(a), view(b), None, 0.4, 2, rng_state=state), (xb, wb)
        )
        assert gradgradcheck(
            lambda a, b: bdlkern.ops.lrt_linear(view(a), view(b), view(b) - 3.0, num_samples=2, rng_state=state),
            (xb, wb),
        )


@pytest.mark.parametrize("channel_dim, x_shape, la_shape", [(-1, (3, 4), ()), (-1, (3, 4), (4,)), (1, (2, 3, 2, 2), (3,))])
def test_gaussian_dropout(backend, state, channel_dim, x_shape, la_shape):
    x = f64(*x_shape, device=backend.device)
    log_alpha = torch.full(la_shape, -0.5, dtype=torch.float64, device=backend.device, requires_grad=True)
    assert gradgradcheck(lambda a, q: backend.ops.gaussian_dropout(a, q, state, channel_dim), (x, log_alpha))
