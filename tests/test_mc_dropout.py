"""Fused multi-sample MC-dropout linear (issue 3): kernels against the pure-PyTorch reference with
the same masks, gradients, registration, statistics, shared-mask semantics, dtypes, modules and bad
input."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.library import opcheck

import bdlkern
from bdlkern.testing import reference as ref

MC_STREAM = bdlkern.ops.STREAMS["mc_dropout"]


def make_problem(S, B, K, N, *, shared_input, bias=True, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x_shape = (B, K) if shared_input else (S, B, K)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g, dtype=torch.float64) / math.sqrt(K)).to(dtype).to(device)
    b = torch.randn(N, generator=g, dtype=torch.float64).to(dtype).to(device) if bias else None
    return x, w, b


def reference(x, w, b, p, S, shared_mask, state, shared_input):
    return ref.mc_dropout_linear(
        x, w, b, p, S if shared_input else None, shared_mask=shared_mask, rng_state=state.cpu()
    )


SHAPES = [  # S, B, K, N
    (1, 1, 1, 1),
    (3, 5, 7, 6),
    (2, 37, 70, 33),
    (4, 16, 64, 64),
    (1, 9, 130, 17),
    (2, 4, 5, 40),  # N > K: the CPU one-pass grad_weight accumulates grad_w^T
]


# ---- forward and backward against the reference --------------------------------------------------
@pytest.mark.parametrize("S,B,K,N", SHAPES)
@pytest.mark.parametrize("shared_input", [True, False])
@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.9])
def test_forward_backward_match_reference(backend, S, B, K, N, shared_input, shared_mask, p):
    x, w, b = make_problem(S, B, K, N, shared_input=shared_input, device=backend.device, seed=S * B + K)
    state = backend.tensor([1234 + K, 7], dtype=torch.int64)
    y = backend.ops.mc_dropout_linear(x, w, b, state, p, S, shared_mask)
    expected = reference(x.cpu(), w.cpu(), b.cpu(), p, S, shared_mask, state, shared_input)
    assert y.shape == (S, B, N)
    torch.testing.assert_close(y.cpu(), expected, rtol=1e-12, atol=1e-12)

    g = torch.randn(S, B, N, dtype=torch.float64).to(backend.device)
    gx = backend.ops.mc_dropout_linear_grad_input(g, w, state, p, shared_mask, shared_input)
    gw = backend.ops.mc_dropout_linear_grad_weight(g, x, state, p, shared_mask)
    xr, wr = x.cpu().requires_grad_(), w.cpu().requires_grad_()
    yr = reference(xr, wr, b.cpu(), p, S, shared_mask, state, shared_input)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), g.cpu())
    torch.testing.assert_close(gx.cpu(), gxr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw.cpu(), gwr, rtol=1e-12, atol=1e-12)


def test_functional_batch_dims_and_autograd():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 10, dtype=torch.float64, requires_grad=True)  # *batch = (2, 3, 4)
    w = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    state = torch.tensor([99, 1])
    y = bdlkern.ops.mc_dropout_linear(x, w, b, 0.4, 6, rng_state=state)
    assert y.shape == (6, 2, 3, 4, 5)
    yr = ref.mc_dropout_linear(x, w, b, 0.4, 6, rng_state=state)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), g), torch.autograd.grad(yr, (x, w, b), g)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    # A per-sample input with batch dims: [S, *batch, in].
    xs = torch.randn(6, 2, 3, 10, dtype=torch.float64)
    torch.testing.assert_close(
        bdlkern.ops.mc_dropout_linear(xs, w, b, 0.4, rng_state=state),
        ref.mc_dropout_linear(xs, w, b, 0.4, rng_state=state),
        rtol=1e-12,
        atol=1e-12,
    )


@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("num_samples", [3, None])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck(shared_mask, num_samples, bias):
    x, w, b = make_problem(3, 4, 6, 5, shared_input=num_samples is not None, bias=bias)
    state = torch.tensor([5, 5])
    inputs = (x.requires_grad_(), w.requires_grad_()) + ((b.requires_grad_(),) if bias else ())

    def f(x, w, *rest):
        return bdlkern.ops.mc_dropout_linear(
            x, w, rest[0] if rest else None, 0.35, num_samples, shared_mask=shared_mask, rng_state=state
        )

    assert torch.autograd.gradcheck(f, inputs)


def test_opcheck():
    x, w, b = make_problem(3, 5, 8, 4, shared_input=True, dtype=torch.float32)
    xs, _, _ = make_problem(3, 5, 8, 4, shared_input=False, dtype=torch.float32)
    state = torch.tensor([3, 0])
    ops = torch.ops.bdlkern
    for sm in (False, True):
        opcheck(ops.mc_dropout_linear, (x.requires_grad_(), w.requires_grad_(), b, state, 0.25, 3, sm))
        opcheck(ops.mc_dropout_linear, (xs, w, None, state, 0.25, 3, sm))
        g = torch.randn(3, 5, 4)
        opcheck(ops.mc_dropout_linear_grad_input, (g, w.detach(), state, 0.25, sm, True))
        opcheck(ops.mc_dropout_linear_grad_weight, (g, xs, state, 0.25, sm))


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    x, w, b = make_problem(4, 6, 12, 5, shared_input=True, dtype=torch.float32)
    state = torch.tensor([11, 0])

    def f(x, w, b, state):
        return bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 4, rng_state=state).relu().sum()

    compiled = torch.compile(f, fullgraph=True)
    args = [t.clone().requires_grad_() for t in (x, w, b)]
    args_eager = [t.clone().requires_grad_() for t in (x, w, b)]
    out, out_eager = compiled(*args, state), f(*args_eager, state)
    torch.testing.assert_close(out, out_eager)
    out.backward()
    out_eager.backward()
    for a, e in zip(args, args_eager):
        torch.testing.assert_close(a.grad, e.grad)


# ---- masks: statistics, shared-mask semantics, determinism ---------------------------------------
def _masks_through_identity(p, S, B, K, shared_mask, state):
    """With x = 1, W = I and no bias, y * (1 - p) is exactly the mask."""
    x = torch.ones(B, K)
    y = bdlkern.ops.mc_dropout_linear(x, torch.eye(K), None, p, S, shared_mask=shared_mask, rng_state=state)
    return y * (1.0 - p)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_fraction(p):
    m = _masks_through_identity(p, 8, 64, 256, False, torch.tensor([1, 0]))
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    n = m.numel()
    assert abs(m.mean().item() - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    # ... and it is the stream's mask, element for element.
    assert torch.equal(m.bool(), bdlkern.ops.dropout_mask([8, 64, 256], p, rng_state=torch.tensor([1, 0]), stream=MC_STREAM))


def test_shared_mask_semantics():
    state = torch.tensor([77, 3])
    m = _masks_through_identity(0.5, 6, 10, 50, True, state)
    assert torch.equal(m, m[:, :1].expand_as(m))  # every row of a sample sees one mask
    assert not torch.equal(m[0], m[1])  # samples differ
    expected = bdlkern.ops.dropout_mask([6, 50], 0.5, rng_state=state, stream=MC_STREAM)
    assert torch.equal(m[:, 0].bool(), expected)


def test_shared_mask_independent_of_batch_size():
    state = torch.tensor([5, 0])
    small = _masks_through_identity(0.5, 4, 3, 20, True, state)
    large = _masks_through_identity(0.5, 4, 40, 20, True, state)
    assert torch.equal(small[:, 0], large[:, 0])


def test_deterministic_across_thread_counts(threads):
    x, w, b = make_problem(5, 40, 300, 20, shared_input=True, dtype=torch.float32)
    state = torch.tensor([8, 8])
    g = torch.randn(5, 40, 20)
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(
            (
                _masks_through_identity(0.3, 5, 40, 300, False, state),
                bdlkern.ops.mc_dropout_linear(x, w, b, 0.3, 5, rng_state=state),
                torch.ops.bdlkern.mc_dropout_linear_grad_input(g, w, state, 0.3, False, True),
            )
        )
    assert torch.equal(results[0][0], results[1][0])  # masks: bit for bit
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][2], results[1][2], rtol=1e-6, atol=1e-6)


def test_same_state_same_output_and_backward_remakes_masks():
    x, w, b = make_problem(4, 8, 16, 8, shared_input=True, dtype=torch.float32)
    state = bdlkern.ops.new_rng_state()
    y1 = bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 4, rng_state=state)
    y2 = bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 4, rng_state=state)
    assert torch.equal(y1, y2)
    torch.manual_seed(1)
    a = bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 4)
    torch.manual_seed(1)
    assert torch.equal(a, bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 4))


# ---- strides, empty and degenerate shapes --------------------------------------------------------
def test_non_contiguous_and_broadcast_inputs():
    state = torch.tensor([21, 2])
    base = torch.randn(12, 9, dtype=torch.float64)
    x = base.t()  # [9, 12] non-contiguous
    w = torch.randn(12, 5, dtype=torch.float64).t()  # [5, 12] non-contiguous
    y = bdlkern.ops.mc_dropout_linear(x, w, None, 0.3, 4, rng_state=state)
    torch.testing.assert_close(y, ref.mc_dropout_linear(x, w, None, 0.3, 4, rng_state=state), rtol=1e-12, atol=1e-12)
    # An expanded per-sample input (stride 0 over samples) equals the shared-input call's values
    # and its gradient is per-sample, as autograd requires for the expanded view.
    xs = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    expanded = xs.expand(4, 9, 12)
    y_exp = bdlkern.ops.mc_dropout_linear(expanded, w, None, 0.3, rng_state=state)
    y_shared = bdlkern.ops.mc_dropout_linear(xs, w, None, 0.3, 4, rng_state=state)
    torch.testing.assert_close(y_exp, y_shared, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y_exp)
    (gx_exp,) = torch.autograd.grad(y_exp, xs, g)
    (gx_shared,) = torch.autograd.grad(y_shared, xs, g)
    torch.testing.assert_close(gx_exp, gx_shared, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared_mask", [False, True])
def test_empty_batch(shared_mask):
    w = torch.randn(4, 6, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    x = torch.randn(0, 6, requires_grad=True)
    y = bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 3, shared_mask=shared_mask)
    assert y.shape == (3, 0, 4)
    y.sum().backward()
    assert x.grad.shape == (0, 6) and torch.equal(w.grad, torch.zeros(4, 6))
    assert torch.equal(b.grad, torch.zeros(4))


def test_all_features_dropped_by_shared_mask_gives_bias():
    # p close to 1 with few features: some samples drop every feature.
    x, w, b = make_problem(64, 3, 2, 4, shared_input=True, dtype=torch.float64)
    state = torch.tensor([4, 0])
    y = bdlkern.ops.mc_dropout_linear(x, w, b, 0.95, 64, shared_mask=True, rng_state=state)
    expected = ref.mc_dropout_linear(x, w, b, 0.95, 64, shared_mask=True, rng_state=state)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    keep = bdlkern.ops.dropout_mask([64, 2], 0.95, rng_state=state, stream=MC_STREAM)
    assert (~keep.any(1)).any(), "the test needs a sample with every feature dropped"


# ---- dtypes --------------------------------------------------------------------------------------
def test_bfloat16_error_within_twice_pytorch():
    """Low-precision rule: error vs float64 <= 2x the error of PyTorch doing the same in bf16."""
    x, w, b = make_problem(4, 32, 96, 48, shared_input=True, dtype=torch.float64, seed=3)
    x, w, b = (t.to(torch.bfloat16).double() for t in (x, w, b))  # exactly representable inputs
    state = torch.tensor([6, 6])
    exact = ref.mc_dropout_linear(x, w, b, 0.3, 4, rng_state=state)
    torch_bf16 = ref.mc_dropout_linear(*(t.bfloat16() for t in (x, w, b)), 0.3, 4, rng_state=state)
    ours = bdlkern.ops.mc_dropout_linear(*(t.bfloat16() for t in (x, w, b)), 0.3, 4, rng_state=state)
    assert ours.dtype == torch.bfloat16
    err_ours = (ours.double() - exact).abs().max().item()
    err_torch = (torch_bf16.double() - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("shared_input", [True, False])
def test_device_kernel_low_precision(device_backend, dtype, shared_mask, shared_input):
    """CUDA-source kernels in half/bf16 (tensor-core path): error vs float64 <= 2x PyTorch's."""
    S, B, K, N = 3, 21, 40, 36
    x, w, b = make_problem(S, B, K, N, shared_input=shared_input, seed=11)
    x, w, b = (t.to(dtype).double() for t in (x, w, b))  # inputs exactly representable
    state = torch.tensor([31, 2])
    g = torch.randn(S, B, N, dtype=torch.float64).to(dtype).double()
    num = S if shared_input else None

    def run_reference(x, w, b, g):
        x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = ref.mc_dropout_linear(x, w, b, 0.25, num, shared_mask=shared_mask, rng_state=state)
        gx, gw = torch.autograd.grad(y, (x, w), g)
        return y.detach(), gx, gw

    exact = run_reference(x, w, b, g)
    pytorch = run_reference(*(t.to(dtype) for t in (x, w, b, g)))
    dev = device_backend.device
    xd, wd, bd, gd = (t.to(dtype).to(dev) for t in (x, w, b, g))
    sd = state.to(dev)
    ours = (
        device_backend.ops.mc_dropout_linear(xd, wd, bd, sd, 0.25, S, shared_mask),
        device_backend.ops.mc_dropout_linear_grad_input(gd, wd, sd, 0.25, shared_mask, shared_input),
        device_backend.ops.mc_dropout_linear_grad_weight(gd, xd, sd, 0.25, shared_mask),
    )
    for name, o, p_, e in zip(("y", "grad_x", "grad_w"), ours, pytorch, exact):
        assert o.dtype == dtype and o.shape == e.shape, name
        err_ours = (o.cpu().double() - e).abs().max().item()
        err_torch = (p_.double() - e).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-6, f"{name}: {err_ours} > 2 x {err_torch}"


@pytest.mark.parametrize("shared_mask", [False, True])
def test_device_kernel_float32(device_backend, shared_mask):
    S, B, K, N = 2, 67, 90, 70  # several tiles in every direction, ragged edges
    x, w, b = make_problem(S, B, K, N, shared_input=True, seed=5)
    state = torch.tensor([8, 1])
    dev = device_backend.device
    y = device_backend.ops.mc_dropout_linear(x.float().to(dev), w.float().to(dev), b.float().to(dev), state.to(dev), 0.5, S, shared_mask)
    expected = ref.mc_dropout_linear(x, w, b, 0.5, S, shared_mask=shared_mask, rng_state=state)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_float32_matches_float64():
    x, w, b = make_problem(3, 20, 50, 30, shared_input=False)
    state = torch.tensor([2, 9])
    y64 = bdlkern.ops.mc_dropout_linear(x, w, b, 0.2, rng_state=state)
    y32 = bdlkern.ops.mc_dropout_linear(x.float(), w.float(), b.float(), 0.2, rng_state=state)
    torch.testing.assert_close(y32.double(), y64, rtol=1e-5, atol=1e-5)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_input_messages():
    x, w, b = make_problem(2, 3, 4, 5, shared_input=True, dtype=torch.float32)
    st = torch.tensor([1, 1])
    f = bdlkern.ops.mc_dropout_linear
    with pytest.raises(ValueError, match="x has 4 features but weight expects in_features = 3"):
        f(x, torch.randn(5, 3), None, 0.5, 2, rng_state=st)
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        f(x, w.double(), None, 0.5, 2, rng_state=st)
    with pytest.raises(RuntimeError, match=r"bias must be \[out_features\]"):
        f(x, w, torch.randn(4), 0.5, 2, rng_state=st)
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        f(x, w, b.double(), 0.5, 2, rng_state=st)
    for p in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\)"):
            f(x, w, b, p, 2, rng_state=st)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        f(x, w, b, 0.5, 0, rng_state=st)
    with pytest.raises(TypeError, match="num_samples must be an int"):
        f(x, w, b, 0.5, 2.0, rng_state=st)
    with pytest.raises(ValueError, match="x has no sample dimension"):
        f(torch.randn(4), w, b, 0.5, rng_state=st)
    with pytest.raises(RuntimeError, match="float16 is supported on CUDA only"):
        f(x.half(), w.half(), None, 0.5, 2, rng_state=st)
    with pytest.raises(RuntimeError, match="x must be float32, float64, bfloat16"):
        f(x.int(), w.int(), None, 0.5, 2, rng_state=st)
    with pytest.raises(RuntimeError, match="rng_state must be an int64"):
        f(x, w, b, 0.5, 2, rng_state=torch.tensor([1.0, 2.0]))
    with pytest.raises(RuntimeError, match="weight must be on x's device"):
        torch.ops.bdlkern.mc_dropout_linear(x, w.to("meta"), None, st, 0.5, 2, False)
    with pytest.raises(RuntimeError, match="x has 3 samples in its leading dimension but num_samples = 2"):
        torch.ops.bdlkern.mc_dropout_linear(torch.randn(3, 2, 4), w, None, st, 0.5, 2, False)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[S, B, out_features\]"):
        torch.ops.bdlkern.mc_dropout_linear_grad_input(torch.randn(2, 5), w, st, 0.5, False, True)
    with pytest.raises(RuntimeError, match="does not match grad_out"):
        torch.ops.bdlkern.mc_dropout_linear_grad_weight(torch.randn(2, 7, 5), x, st, 0.5, False)


# ---- modules -------------------------------------------------------------------------------------
def _replay_masks_module(model: nn.Sequential, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Run a plain Dropout/Linear model with the masks the fused layers draw after manual_seed."""
    torch.manual_seed(seed)
    out = x
    pending_p = None
    for module in model:
        if isinstance(module, nn.Dropout):
            pending_p = module.p
            continue
        if isinstance(module, nn.Linear) and pending_p is not None:
            state = bdlkern.ops.new_rng_state()
            rows = out.reshape(-1, out.shape[-1]).shape[0]
            mask = ref.dropout_mask(state, (1, rows, out.shape[-1]), pending_p, MC_STREAM).reshape(out.shape)
            out = module(torch.where(mask, out / (1 - pending_p), torch.zeros_like(out)))
            pending_p = None
            continue
        out = module(out)
    return out


def test_module_training_is_dropout_then_linear_with_same_masks():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Dropout(0.3), nn.Linear(20, 7), nn.Dropout(0.6), nn.Linear(7, 3))
    fused = bdlkern.nn.convert(nn.Sequential(*[m for m in plain]))  # shares the Linear weights' values
    assert [type(m).__name__ for m in fused] == ["Linear", "ReLU", "MCDropoutLinear", "MCDropoutLinear"]
    x = torch.randn(6, 10)
    torch.manual_seed(42)
    y = fused.train()(x)
    torch.testing.assert_close(y, _replay_masks_module(plain.train(), x, 42))
    fused.eval()
    plain.eval()
    torch.testing.assert_close(fused(x), plain(x))  # eval: deterministic linear layers


def test_convert_nested_and_state_dict_keys():
    model = nn.Sequential(
        nn.Linear(4, 8),
        nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 8)),
        nn.Dropout(0.5),
        nn.Linear(8, 2),
    )
    keys = set(model.state_dict())
    bdlkern.nn.convert(model)
    assert isinstance(model[1][1], bdlkern.nn.MCDropoutLinear) and model[1][1].p == 0.2
    assert isinstance(model[2], bdlkern.nn.MCDropoutLinear) and model[2].p == 0.5
    assert set(model.state_dict()) == keys


def test_sampling_shapes_and_single_run_of_deterministic_prefix():
    calls = []

    class Counting(nn.Module):
        def forward(self, x):
            calls.append(tuple(x.shape))
            return x

    model = nn.Sequential(
        Counting(), nn.Linear(5, 8), bdlkern.nn.MCDropoutLinear(8, 8, p=0.5), nn.ReLU(), bdlkern.nn.MCDropoutLinear(8, 3, p=0.5)
    ).eval()
    x = torch.randn(4, 5)
    with bdlkern.sampling(16, seed=0):
        y = model(x)
    assert y.shape == (16, 4, 3)
    assert calls == [(4, 5)]  # the prefix ran once, without the sample dimension
    assert not torch.equal(y[0], y[1])
    assert model(x).shape == (4, 3)  # outside the block: deterministic


def test_sampling_seed_reproducible_and_repeated_passes():
    model = nn.Sequential(bdlkern.nn.MCDropoutLinear(6, 6, p=0.4), nn.Tanh(), bdlkern.nn.MCDropoutLinear(6, 2, p=0.4)).eval()
    x = torch.randn(3, 6)
    with bdlkern.sampling(5, seed=123):
        a1 = model(x)
        a2 = model(x)  # a second pass in the same block starts over
    torch.manual_seed(999)  # the global generator does not matter with a seed
    with bdlkern.sampling(5, seed=123):
        b1 = model(x)
    assert a1.shape == a2.shape == (5, 3, 2)
    assert torch.equal(a1, b1) and not torch.equal(a1, a2)


def test_sampling_matches_functional_with_same_states():
    """Seeded call k of a block uses rng_state [seed, k * 2**40] (bdlkern._sampling), on any device."""
    first = bdlkern.nn.MCDropoutLinear(6, 4, p=0.3, shared_mask=True).eval()
    second = bdlkern.nn.MCDropoutLinear(4, 3, p=0.6).eval()
    x = torch.randn(5, 6)
    seed = 2**64 - 9  # any int: reduced mod 2**64 and stored as int64
    with bdlkern.sampling(7, seed=seed):
        h = first(x)
        y = second(h)
    s64 = seed - 2**64
    h_ref = ref.mc_dropout_linear(x, first.weight, first.bias, 0.3, 7, shared_mask=True, rng_state=torch.tensor([s64, 0]))
    y_ref = ref.mc_dropout_linear(h_ref, second.weight, second.bias, 0.6, None, rng_state=torch.tensor([s64, 2**40]))
    torch.testing.assert_close(h, h_ref.detach())
    torch.testing.assert_close(y, y_ref.detach())


def test_sampling_rejects_wrong_sample_dim():
    model = nn.Sequential(bdlkern.nn.MCDropoutLinear(4, 4), bdlkern.nn.MCDropoutLinear(4, 4))
    with bdlkern.sampling(3):
        first = model[0](torch.randn(2, 4))
        with pytest.raises(ValueError, match=r"carries the samples, so it must be \[S=3"):
            model[1](first[0])  # drops the sample dimension
    with pytest.raises(ValueError, match="num_samples must be an int >= 1"):
        bdlkern.sampling(0)


def test_module_validation_and_from_linear():
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        bdlkern.nn.MCDropoutLinear(3, 3, p=1.0)
    with pytest.raises(TypeError, match="expected an nn.Linear"):
        bdlkern.nn.MCDropoutLinear.from_linear(nn.Conv1d(1, 1, 1))
    lin = nn.Linear(3, 2, bias=False, dtype=torch.float64)
    layer = bdlkern.nn.MCDropoutLinear.from_linear(lin, 0.1)
    assert layer.bias is None and layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, lin.weight) and layer.weight is not lin.weight
    assert "p=0.1" in repr(layer)


def test_gradcheck_through_simt_autograd():
    """The autograd registration of the SIMT namespace runs the CUDA-source backward kernels."""
    x, w, b = make_problem(2, 3, 5, 4, shared_input=True)
    state = torch.tensor([13, 0])
    ops = torch.ops.bdlkern_simt

    def f(x, w, b):
        return ops.mc_dropout_linear(x, w, b, state, 0.4, 2, False)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), w.requires_grad_(), b.requires_grad_()))


@pytest.mark.parametrize("shared_mask", [False, True])
@pytest.mark.parametrize("shared_input", [True, False])
def test_cpu_one_pass_and_gemm_paths_agree(shared_mask, shared_input):
    """The CPU op runs small problems (S B K N up to 2^16 multiply-adds) in one pass and larger ones
    through chunked GEMMs (csrc/torch/mc_dropout_cpu.cpp). Sample 0's masks do not depend on S, so
    S = 1 (65536 MACs: one pass) and S = 3 (GEMMs) must agree on sample 0 (the output, and the
    gradients of a cotangent that is zero on samples 1 and 2), and both match the reference."""
    B, K, N = 16, 64, 64
    x3, w, b = make_problem(3, B, K, N, shared_input=shared_input, seed=5)
    state = torch.tensor([99, 3])
    g3 = torch.randn(3, B, N, dtype=torch.float64)
    g3[1:] = 0
    ops = torch.ops.bdlkern
    runs = {}
    for S in (1, 3):
        x = x3 if shared_input else x3[:S].contiguous()
        g = g3[:S].contiguous()
        y = ops.mc_dropout_linear(x, w, b, state, 0.3, S, shared_mask)
        torch.testing.assert_close(y, reference(x, w, b, 0.3, S, shared_mask, state, shared_input), rtol=1e-12, atol=1e-12)
        gx = ops.mc_dropout_linear_grad_input(g, w, state, 0.3, shared_mask, shared_input)
        gw = ops.mc_dropout_linear_grad_weight(g, x, state, 0.3, shared_mask)
        runs[S] = (y, gx, gw)
    (y1, gx1, gw1), (y3, gx3, gw3) = runs[1], runs[3]
    torch.testing.assert_close(y3[0], y1[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw3, gw1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx3 if shared_input else gx3[0], gx1 if shared_input else gx1[0], rtol=1e-12, atol=1e-12)
