"""Mixed precision: every op and every module, forward and backward, under ``torch.autocast``.

The policy (csrc/torch/autocast.h): MC dropout runs in the autocast dtype where its kernel has a
native path (bf16 on the CPU, fp16/bf16 on CUDA and under the SIMT emulator), every other op casts
16-bit inputs to float32; ATen calls inside an op never see autocast. Values are checked with the
low-precision rule of docs/design.md section 6.2: the error against a float64 run of the same op
with the same ``rng_state`` is at most twice the error of the same computation written in PyTorch
(the reference) under the same autocast, plus a little slack for the float32 rounding both share.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.testing import reference as ref

from conftest import require_backend

AUTOCAST = {"cpu": torch.bfloat16, "simt": torch.bfloat16, "cuda": torch.float16}


def autocast(backend, dtype=None):
    return torch.autocast(backend.device.type, dtype=dtype or AUTOCAST[backend.name])


def rel_err(got, want):
    got, want = got.double().cpu(), want.double().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def assert_low_precision(ours, torch_ref, exact, what, dtype=torch.float32):
    """Ours within 2x PyTorch's own error at the same autocast (both against float64), plus the
    floor of docs/design.md section 6.2: one rounding unit of the compute ``dtype`` at the largest
    value. Ours and PyTorch round at different points (the scale before or after the bf16 cast),
    so for a 16-bit output one of them can land a full unit away where the other lands half a
    unit away. For float32 ops the floor is 1e-5 of the largest value: their reductions (the
    gradient of a scalar rate sums the whole tensor) round in another order than PyTorch's."""
    e_ours, e_ref = rel_err(ours, exact), rel_err(torch_ref, exact)
    floor = max(torch.finfo(dtype).eps, 1e-5)
    assert e_ours <= 2 * e_ref + floor, f"{what}: error {e_ours:.3g} vs PyTorch's {e_ref:.3g}"


def fixed_state(device, seed=0):
    """A reproducible ``rng_state``: a failure shows up on every run, not one run in fifty."""
    g = torch.Generator().manual_seed(seed)
    return bdlkern.ops.new_rng_state(generator=g).to(device)


def leaves(*tensors, dtype=torch.float32, device="cpu"):
    return [t.to(device=device, dtype=dtype).detach().requires_grad_() for t in tensors]


def cotangent(out, grad_seed=1):
    """A fixed random cotangent for ``out``."""
    g = torch.Generator().manual_seed(grad_seed)
    return torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)


def run(fn, inputs):
    """(output, gradients of inputs) for the fixed cotangent."""
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, cotangent(out), allow_unused=True)


def compare(backend, fn, ref_fn, inputs, out_dtype, *, backward_inside=True):
    """fn under autocast vs fn in float64 vs ref_fn under autocast: output and input gradients.
    ``backward_inside=False``: our backward runs after the autocast block, as most training loops
    do."""
    exact_out, exact_grads = run(fn, leaves(*inputs, dtype=torch.float64, device=backend.device))
    ours_in = leaves(*inputs, device=backend.device)
    ref_in = leaves(*inputs, device=backend.device)
    with autocast(backend):
        ref_out, ref_grads = run(ref_fn, ref_in)
        ours_out = fn(*ours_in)
        if backward_inside:
            ours_grads = torch.autograd.grad(ours_out, ours_in, cotangent(ours_out))
    if not backward_inside:
        ours_grads = torch.autograd.grad(ours_out, ours_in, cotangent(ours_out))
    assert ours_out.dtype == out_dtype
    assert_low_precision(ours_out, ref_out, exact_out, "output", out_dtype)
    for i, (o, r, e) in enumerate(zip(ours_grads, ref_grads, exact_grads)):
        assert o.dtype == torch.float32, f"gradient {i} reached a float32 leaf as {o.dtype}"
        assert_low_precision(o, r, e, f"gradient {i}", out_dtype)


@pytest.fixture(params=["cpu", "simt", "cuda"])
def backend(request):
    return require_backend(request.param)


def problem(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("backward_inside", [True, False])
def test_mc_dropout_linear(backend, shared_mask, backward_inside):
    S, B, K, N = 3, 9, 40, 17
    x, w, b = problem((B, K), (N, K), (N,))
    w /= math.sqrt(K)
    state = fixed_state(backend.device)
    ns = backend.ops

    def fn(x, w, b):
        return ns.mc_dropout_linear(x, w, b, state, 0.3, S, shared_mask)

    def ref_fn(x, w, b):
        return ref.mc_dropout_linear(x, w, b, 0.3, S, shared_mask=shared_mask, rng_state=state.cpu())

    compare(backend, fn, ref_fn, [x, w, b], AUTOCAST[backend.name], backward_inside=backward_inside)


def test_mc_dropout_linear_float16_autocast_on_cpu_runs_in_float32():
    """The CPU kernel has no float16 path: CPU float16 autocast runs it in float32."""
    x, w = leaves(*problem((4, 8), (5, 8)))
    state = fixed_state("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        y = torch.ops.bdlkern.mc_dropout_linear(x, w, None, state, 0.5, 2, False)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.ops.bdlkern.mc_dropout_linear(x, w, None, state, 0.5, 2, False))


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_concrete_dropout(backend, channel_dim):
    shape = (6, 5) if channel_dim == -1 else (3, 4, 5, 5)
    (x,) = problem(shape)
    p_logit = torch.tensor(-1.0, dtype=torch.float64)
    state = fixed_state(backend.device)

    def fn(x, p):
        return backend.ops.concrete_dropout(x, p, state, 0.1, channel_dim)

    def ref_fn(x, p):
        return ref.concrete_dropout(x, p, 0.1, channel_dim=channel_dim, rng_state=state.cpu())

    compare(backend, fn, ref_fn, [x, p_logit], torch.float32)


def test_concrete_dropout_takes_a_16bit_input(backend):
    """A bf16 activation (from an autocast matmul) and a float32 rate: float32 out, no error."""
    x = torch.randn(8, 6, device=backend.device).to(AUTOCAST[backend.name])
    p = torch.tensor(0.0, device=backend.device, requires_grad=True)
    state = fixed_state(backend.device)
    with autocast(backend):
        y = backend.ops.concrete_dropout(x, p, state, 0.1, -1)
        y.sum().backward()
    assert y.dtype == torch.float32 and p.grad.dtype == torch.float32
    torch.testing.assert_close(y, backend.ops.concrete_dropout(x.float(), p.detach(), state, 0.1, -1))


@pytest.mark.parametrize("shared_input", [True, False])
def test_lrt_linear(backend, shared_input):
    S, B, K, N = 2, 7, 30, 11
    x, theta, log_sigma2, b = problem((B, K) if shared_input else (S, B, K), (N, K), (N, K), (N,))
    log_sigma2 -= 3.0
    state = fixed_state(backend.device)

    def fn(x, th, ls, b):
        return backend.ops.lrt_linear(x, th, ls, b, state, S)[0]

    def ref_fn(x, th, ls, b):
        return ref.lrt_linear(x, th, ls, b, S if shared_input else None, rng_state=state.cpu())

    compare(backend, fn, ref_fn, [x, theta, log_sigma2, b], torch.float32)


def test_sparse_vd_kl(backend):
    theta, log_sigma2 = problem((13, 9), (13, 9))
    compare(
        backend,
        lambda t, s: backend.ops.sparse_vd_kl(t, s),
        ref.sparse_vd_kl,
        [theta, log_sigma2],
        torch.float32,
    )
    compare(
        backend,
        lambda t, s: backend.ops.sparse_vd_kl_with_grad(t, s)[0],
        ref.sparse_vd_kl,
        [theta, log_sigma2],
        torch.float32,
    )


def test_ard_kl(backend):
    theta, log_sigma2 = problem((13, 9), (13, 9))
    compare(backend, lambda t, s: backend.ops.ard_kl(t, s), ref.ard_kl, [theta, log_sigma2], torch.float32)
    compare(backend, lambda t, s: backend.ops.ard_kl_with_grad(t, s)[0], ref.ard_kl, [theta, log_sigma2], torch.float32)


def test_ard_kl_of_16bit_parameters_is_computed_in_float32(backend):
    theta, log_sigma2 = (t.to(backend.device, torch.bfloat16) for t in problem((13, 9), (13, 9)))
    with autocast(backend):
        kl = backend.ops.ard_kl(theta, log_sigma2)
        kl_with_grad = backend.ops.ard_kl_with_grad(theta, log_sigma2)[0]
    assert kl.dtype == torch.float32 and kl_with_grad.dtype == torch.float32
    torch.testing.assert_close(kl, backend.ops.ard_kl(theta.float(), log_sigma2.float()))
    torch.testing.assert_close(kl_with_grad, kl)


def test_sparse_vd_kl_of_16bit_parameters_is_computed_in_float32(backend):
    theta, log_sigma2 = (t.to(backend.device, torch.bfloat16) for t in problem((13, 9), (13, 9)))
    with autocast(backend):
        kl = backend.ops.sparse_vd_kl(theta, log_sigma2)
    assert kl.dtype == torch.float32
    torch.testing.assert_close(kl, backend.ops.sparse_vd_kl(theta.float(), log_sigma2.float()))


def csr_weight(N, K, density, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(N, K, generator=g) < density
    keep[0, 0] = True
    w = torch.randn(N, K, generator=g, dtype=torch.float64) * keep
    v = torch.rand(N, K, generator=g, dtype=torch.float64) * 0.1 * keep
    rows, col = keep.nonzero(as_tuple=True)  # row-major: columns ascend within each row
    crow = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(rows, minlength=N).cumsum(0)])
    crow, col = crow.to(device), col.to(device)
    values = torch.stack([w[keep], v[keep]], 1)
    return crow, col, values


@pytest.mark.parametrize("stochastic", [False, True])
def test_sparse_linear(backend, stochastic):
    S, B, K, N = 3, 6, 50, 20
    crow, col, values = csr_weight(N, K, 0.05, device=backend.device)
    (x,) = problem((B, K))
    state = fixed_state(backend.device)
    v = values.to(backend.device)

    def fn(x):
        vals = v.to(x.dtype) if x.dtype == torch.float64 else v.float()
        if stochastic:
            return backend.ops.sparse_linear_lrt(x, crow, col, vals, None, None, state, S)[0]
        return backend.ops.sparse_linear(x, crow, col, vals[:, 0].contiguous(), None, None)

    def ref_fn(x):
        vals = values.to(x.device, torch.float32)
        return ref.sparse_linear(
            x, crow, col, vals if stochastic else vals[:, 0], None, S if stochastic else None,
            stochastic=stochastic, rng_state=state.cpu(),
        )

    compare(backend, fn, ref_fn, [x], torch.float32)


@pytest.mark.parametrize("mask,shared_mask", [("element", False), ("channel", False), ("channel", True)])
def test_mc_dropout_conv(backend, mask, shared_mask):
    """The conv op runs in the autocast dtype (its mask pass and ATen's conv take it), like
    F.conv2d; the shared-channel path convolves the kept channels in it too."""
    S, N, C, Co = 2, 3, 4, 5
    x, w, b = problem((N, C, 6, 6), (Co, C, 3, 3), (Co,))
    state = fixed_state(backend.device)
    p = 0.3
    rows = S if shared_mask else S * N
    keep_shape = [rows, C] if mask == "channel" else [rows, C, 6, 6]
    keep = bdlkern.ops.dropout_mask(keep_shape, p, rng_state=state.cpu(), stream="mc_dropout").to(backend.device)
    keep = keep.reshape(S, rows // S, C, *([1, 1] if mask == "channel" else [6, 6]))

    def fn(x, w, b):
        return backend.ops.mc_dropout_conv(x, w, b, state, p, S, True, [1, 1], [1, 1], [1, 1], 1, mask == "channel", shared_mask)

    def ref_fn(x, w, b):
        xs = (x.unsqueeze(0) * keep.to(x.dtype) / (1 - p)).reshape(S * N, C, 6, 6)
        return F.conv2d(xs, w, b, padding=1)

    compare(backend, fn, ref_fn, [x, w, b], AUTOCAST[backend.name])


@pytest.mark.parametrize("shared_input", [True, False])
def test_lrt_conv(backend, shared_input):
    S, N, C, Co = 2, 3, 4, 5
    x, theta, log_sigma2, b = problem((N if shared_input else S * N, C, 6, 6), (Co, C, 3, 3), (Co, C, 3, 3), (Co,))
    log_sigma2 -= 3.0
    state = fixed_state(backend.device)
    eps = bdlkern.ops.normal((S * N, Co, 6, 6), rng_state=state.cpu(), stream="lrt", dtype=torch.float64).to(backend.device)

    def fn(x, th, ls, b):
        return backend.ops.lrt_conv(x, th, ls, b, state, S, shared_input, [1, 1], [1, 1], [1, 1], 1)[0]

    def ref_fn(x, th, ls, b):
        var_w = torch.exp(ref.log_alpha(th, ls)) * th**2
        mean, var = F.conv2d(x, th, b, padding=1), F.conv2d(x * x, var_w, padding=1)
        if shared_input:
            mean, var = mean.repeat(S, 1, 1, 1), var.repeat(S, 1, 1, 1)
        return mean + torch.sqrt(var + 1e-8) * eps.to(mean.dtype)

    compare(backend, fn, ref_fn, [x, theta, log_sigma2, b], torch.float32)


@pytest.mark.parametrize("stochastic", [False, True])
def test_sparse_conv(backend, stochastic):
    S, N, C, Co = 2, 3, 4, 5
    crow, col, values = csr_weight(Co, C * 9, 0.2, device=backend.device)
    (x,) = problem((N, C, 6, 6))
    state = fixed_state(backend.device)
    v = values.to(backend.device)
    w, var = (torch.zeros(Co, C * 9, dtype=torch.float64) for _ in range(2))
    rows = torch.repeat_interleave(torch.arange(Co), crow.cpu().diff())
    w[rows, col.cpu()], var[rows, col.cpu()] = values[:, 0], values[:, 1]
    w, var = w.reshape(Co, C, 3, 3).to(backend.device), var.reshape(Co, C, 3, 3).to(backend.device)
    eps = bdlkern.ops.normal((S * N, Co, 6, 6), rng_state=state.cpu(), stream="sparse_lrt", dtype=torch.float64).to(backend.device)

    def fn(x):
        vals = v.to(x.dtype) if x.dtype == torch.float64 else v.float()
        if stochastic:
            return backend.ops.sparse_conv_lrt(x, crow, col, vals, None, state, S, True, [3, 3], [1, 1], [1, 1], [1, 1], 1)[0]
        return backend.ops.sparse_conv(x, crow, col, vals[:, 0].contiguous(), None, [3, 3], [1, 1], [1, 1], [1, 1], 1)

    def ref_fn(x):
        mean = F.conv2d(x, w.float(), padding=1)
        if not stochastic:
            return mean
        var_out = F.conv2d(x * x, var.float(), padding=1)
        return mean.repeat(S, 1, 1, 1) + torch.sqrt(var_out.repeat(S, 1, 1, 1) + 1e-8) * eps.to(mean.dtype)

    compare(backend, fn, ref_fn, [x], torch.float32)


def test_rng_ops_are_untouched_by_autocast(backend):
    state = fixed_state(backend.device)
    outside = [
        backend.ops.philox_bits(state, [37], 0),
        backend.ops.dropout_mask(state, [37], 0.3, 1),
        backend.ops.uniform(state, [37], 2, None),
        backend.ops.normal(state, [37], 3, None),
    ]
    with autocast(backend):
        inside = [
            backend.ops.philox_bits(state, [37], 0),
            backend.ops.dropout_mask(state, [37], 0.3, 1),
            backend.ops.uniform(state, [37], 2, None),
            backend.ops.normal(state, [37], 3, None),
        ]
    for a, b in zip(outside, inside):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_an_autocast_excluded_call_cannot_corrupt_the_lrt_buffers():
    """The crash of the issue: the LRT GEMMs inside the op used to be autocast to bf16 and read as
    float32. The binding now excludes autocast itself, so even a call that skips the autocast kernel
    (redispatch below it) computes in float32."""
    x, theta, ls = (t.float() for t in problem((5, 8), (4, 8), (4, 8)))
    state = fixed_state("cpu")
    want = torch.ops.bdlkern.lrt_linear(x, theta, ls, None, state, 2)[0]
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = torch.ops.bdlkern.lrt_linear.default.redispatch(keys, x, theta, ls, None, state, 2)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


# ---- modules ---------------------------------------------------------------------------------------
def modules(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    sparse_vd = bdlkern.nn.SparseVDLinear(24, 10)
    with torch.no_grad():  # a layer most of whose weights are pruned, so the CSR kernel runs
        sparse_vd.log_sigma2.copy_(torch.where(torch.rand(10, 24) < 0.96, 8.0, -8.0))
    csr = sparse_vd.to_sparse()
    assert csr.density <= 0.1
    vd_conv = bdlkern.nn.SparseVDConv2d(3, 8, 3, padding=1)
    with torch.no_grad():  # most weights pruned, so the CSR convolution runs
        vd_conv.log_sigma2.copy_(torch.where(torch.rand(vd_conv.theta.shape) < 0.9, 8.0, -8.0))
    csr_conv = vd_conv.to_sparse()
    assert csr_conv.density < csr_conv.crossover_density
    return {
        "MCDropoutConv2d": (bdlkern.nn.MCDropoutConv2d(3, 4, 3, padding=1, p=0.3, mask="channel"), (2, 3, 5, 5)),
        "SparseVDConv2d": (bdlkern.nn.SparseVDConv2d(3, 4, 3, padding=1), (2, 3, 5, 5)),
        "SparseConv2d": (csr_conv, (2, 3, 5, 5)),
        "MCDropoutLinear": (bdlkern.nn.MCDropoutLinear(24, 10, p=0.3), (6, 24)),
        "MCDropoutLinear-shared": (bdlkern.nn.MCDropoutLinear(24, 10, p=0.3, shared_mask=True), (6, 24)),
        "ConcreteDropoutLinear": (bdlkern.nn.ConcreteDropoutLinear(24, 10), (6, 24)),
        "ConcreteDropout": (bdlkern.nn.ConcreteDropout(nn.Linear(24, 10)), (6, 24)),
        "ConcreteDropout2d": (bdlkern.nn.ConcreteDropout2d(conv), (2, 3, 5, 5)),
        "SparseVDLinear": (bdlkern.nn.SparseVDLinear(24, 10), (6, 24)),
        "SparseLinear": (csr, (6, 24)),
    }


MODULES = ["MCDropoutConv2d", "SparseVDConv2d", "SparseConv2d", "MCDropoutLinear", "MCDropoutLinear-shared", "ConcreteDropoutLinear", "ConcreteDropout", "ConcreteDropout2d", "SparseVDLinear", "SparseLinear"]


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("mode", ["train", "eval", "sampling"])
def test_modules_under_cpu_autocast(name, mode):
    """Forward and backward of every module, train / eval / sampling(S), under CPU bf16 autocast:
    the output is finite, close to the float32 run, and every float32 parameter gets a float32
    gradient."""
    module, shape = modules("cpu")[name]
    module.train(mode == "train")
    x = torch.randn(shape)
    params = [p for p in module.parameters() if p.requires_grad]

    def forward(seed):
        torch.manual_seed(seed)
        if mode == "sampling":
            with bdlkern.sampling(4, seed=seed):
                return module(x)
        return module(x)

    want = forward(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = forward(1)
        loss = got.float().square().mean()
    assert got.shape == want.shape and torch.isfinite(got).all()
    # bf16 rounding of the inputs of a 24-wide product: a few percent of the output's scale at most
    assert rel_err(got, want) < 0.05, f"{name}: {rel_err(got, want):.3g}"
    if params and torch.is_grad_enabled() and got.requires_grad:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None:
                assert g.dtype == p.dtype and torch.isfinite(g).all()


def test_training_step_of_each_module_under_autocast_matches_float32():
    """One optimiser step under autocast changes the parameters as a float32 step does, within
    bf16 error: the gradients that reach the float32 parameters are right, not just finite."""
    for name, (module, shape) in modules("cpu").items():
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            continue
        module.train()
        x = torch.randn(shape)
        grads = []
        for use_autocast in (False, True):
            torch.manual_seed(3)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_autocast):
                loss = module(x).float().square().mean()
                if hasattr(module, "kl"):
                    loss = loss + module.kl() / 1000
            grads.append(torch.autograd.grad(loss, params))
        for p, g32, g16 in zip(params, *grads):
            assert g16.dtype == torch.float32
            assert rel_err(g16, g32) < 0.08, f"{name}: gradient error {rel_err(g16, g32):.3g}"


def test_mc_predict_under_autocast():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    bdlkern.nn.convert(model)
    model.eval()
    x = torch.randn(10, 8)
    want = bdlkern.uncertainty.mc_predict(model, x, num_samples=8, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bdlkern.uncertainty.mc_predict(model, x, num_samples=8, seed=0)
    torch.testing.assert_close(got.mean_probs.float(), want.mean_probs, atol=0.03, rtol=0.05)


def test_module_parameters_in_float64_under_autocast_are_left_in_float64():
    """autocast never casts float64: a float64 module keeps computing in float64."""
    m = bdlkern.nn.SparseVDLinear(6, 3).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.float64


def test_f_linear_composes_with_bdlkern_layers_under_autocast():
    """A torch layer before and after a bdlkern layer: autocast's casts and ours compose."""
    model = nn.Sequential(nn.Linear(8, 24), nn.ReLU(), bdlkern.nn.SparseVDLinear(24, 10), nn.Linear(10, 2))
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
        F.mse_loss(y.float(), torch.zeros(5, 2)).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


class _ConvNet(nn.Module):
    """A model of the user's own: conv layers, a bdlkern Concrete conv wrapper, flattening and a
    sparse VD head, with a forward that mixes them by hand."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.drop_conv = bdlkern.nn.ConcreteDropout2d(nn.Conv2d(4, 4, 3, padding=1))
        self.head = bdlkern.nn.SparseVDLinear(4 * 5 * 5, 3)
        self.mc = bdlkern.nn.MCDropoutLinear(3, 2, p=0.2)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.drop_conv(h)  # a residual around the dropout conv
        return self.mc(torch.tanh(self.head(h.flatten(1))))


def test_a_custom_conv_model_under_autocast_trains_like_float32():
    torch.manual_seed(0)
    model = _ConvNet().train()
    x = torch.randn(2, 3, 5, 5)
    grads = []
    for enabled in (False, True):
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = model(x).float().square().mean() + model.head.kl() / 1000
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    for (name, p), g32, g16 in zip(model.named_parameters(), *grads):
        assert g16.dtype == p.dtype == torch.float32
        assert rel_err(g16, g32) < 0.08, f"{name}: gradient error {rel_err(g16, g32):.3g}"


def test_non_contiguous_inputs_under_autocast():
    """Transposed and step-sliced inputs reach the ops' casts and kernels: same values as the
    contiguous copies, under autocast."""
    state = fixed_state("cpu")
    base = torch.randn(24, 12)
    x = base.t()[:, ::2]  # [12, 12], neither stride is 1
    assert not x.is_contiguous()
    w, theta, ls = torch.randn(5, 12), torch.randn(5, 12), torch.randn(5, 12) - 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for fn in (
            lambda a: bdlkern.ops.mc_dropout_linear(a, w, None, 0.3, 2, rng_state=state),
            lambda a: bdlkern.ops.lrt_linear(a, theta, ls, num_samples=2, rng_state=state),
            lambda a: bdlkern.ops.concrete_dropout(a, torch.tensor(-1.0), rng_state=state),
        ):
            torch.testing.assert_close(fn(x), fn(x.contiguous()), rtol=0, atol=0)


def test_torch_compile_under_autocast_matches_eager():
    """torch.compile traces through the ops' autocast kernels: the compiled model under autocast
    gives the eager model's values under autocast, forward and gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), bdlkern.nn.SparseVDLinear(16, 6), bdlkern.nn.MCDropoutLinear(6, 3))
    model.eval()
    x = torch.randn(5, 8)
    compiled = torch.compile(model, fullgraph=True)
    outs = []
    for m in (model, compiled):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with bdlkern.sampling(4, seed=3):
                y = m(x)
            y.float().sum().backward()
        outs.append((y, [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    (y_eager, g_eager), (y_comp, g_comp) = outs
    assert y_comp.dtype == y_eager.dtype == torch.bfloat16
    torch.testing.assert_close(y_comp.float(), y_eager.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("channel_dim", [-1, 1])
def test_gaussian_dropout(backend, channel_dim):
    """float32 policy (as concrete_dropout): 16-bit inputs run in float32, gradients within 2x
    PyTorch's own autocast error of the reference with the same noise."""
    shape = (6, 5) if channel_dim == -1 else (3, 4, 5, 5)
    (x,) = problem(shape)
    log_alpha = torch.tensor(-1.0, dtype=torch.float64)
    state = fixed_state(backend.device)

    def fn(x, la):
        return backend.ops.gaussian_dropout(x, la, state, channel_dim)

    def ref_fn(x, la):
        return ref.gaussian_dropout(x, la, channel_dim=channel_dim, rng_state=state.cpu())

    compare(backend, fn, ref_fn, [x, log_alpha], torch.float32)
    x16 = torch.randn(8, 6, device=backend.device).to(AUTOCAST[backend.name])
    with autocast(backend):
        y = backend.ops.gaussian_dropout(x16, torch.tensor(0.0, device=backend.device), state, -1)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, backend.ops.gaussian_dropout(x16.float(), torch.tensor(0.0, device=backend.device), state, -1))
