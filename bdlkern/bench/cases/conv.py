"""Family ``conv``: the conv ops of issue 16: the fused multi-sample MC-dropout convolution, the
LRT convolution of sparse VD training and the pruned sparse convolution.

Problem (full size): S = 16 samples of x [8, 32, 32, 32] (N, C_in, H, W) through W [64, 32, 3, 3],
padding 1, p = 0.2, float32, every sample sharing the input (the first MC layer of a conv net);
the output is folded, ``[S*N, C_out, H, W]`` sample-major. Quick: S = 4, x [2, 8, 8, 8],
W [16, 8, 3, 3].

Cases:

* ``conv.mc_dropout_conv2d_forward``: per-element masks (``nn.Dropout`` before the conv), forward
  under ``torch.no_grad``;
* ``conv.mc_dropout_conv2d_train``: the same, forward + backward (grads of x, W and b for a fixed
  random ``grad_out``); the harness reports the peak memory of each variant's call;
* ``conv.mc_dropout_conv2d_shared_channel``: ``mask="channel", shared_mask=True`` (one flag per
  sample and input channel, a weight sample per pass), p = 0.5: bdlkern convolves the kept
  channels only (CPU and CUDA), against its own per-element path at the same p and a
  Dropout2d-style eager reference.

Baselines: the code users write today (``x.unsqueeze(0).expand(S, ...) -> reshape -> F.dropout ->
F.conv2d``, eager and ``torch.compile``d; for the shared channel mask a ``bernoulli_`` mask per
sample and channel broadcast over the images and space). They are written here, a few lines of
torch each, in the style of :mod:`bdlkern.bench.baselines`.

The checks compare bdlkern with a pure-PyTorch float64 reference on the case's own inputs: the
op's keep mask rebuilt with ``bdlkern.ops.dropout_mask`` from the same ``rng_state`` (stream
``"mc_dropout"``), ``y = conv(x.repeat(S, ...) * M / (1 - p), W, b)``.

* ``conv.lrt_conv2d_train``: forward + backward of ``lrt_conv`` (x [32, 64, 16, 16], W [128, 64, 3,
  3], one sample), against the two-conv formula written in torch, eager and compiled, with the
  same noise;
* ``conv.sparse_conv2d``: the CSR convolution at density 0.05 (same shapes), against the dense
  ``F.conv2d`` of the pruned weight (oneDNN) and im2col (``F.unfold``) + ``torch.sparse`` CSR matmul.

The registry has no field for speed-up targets; the issue's are kept in :data:`TARGETS` and
printed with each case's description: forward >= 1.2x eager and >= 1.1x compiled; forward +
backward >= 1.15x eager; shared channel masks >= 1.6x bdlkern's per-element path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import bdlkern
from bdlkern.bench.registry import Workload, case

FULL = {"S": 16, "N": 8, "C": 32, "H": 32, "W": 32, "C_out": 64, "k": 3}
QUICK = {"S": 4, "N": 2, "C": 8, "H": 8, "W": 8, "C_out": 16, "k": 3}
PADDING = 1
P = 0.2
P_SHARED = 0.5

#: The issue's speed-up targets: case -> baseline -> minimum ``baseline time / bdlkern time``.
TARGETS: dict[str, dict[str, float]] = {
    "conv.mc_dropout_conv2d_forward": {"reference (eager)": 1.2, "reference (torch.compile)": 1.1},
    "conv.mc_dropout_conv2d_train": {"reference (eager)": 1.15},
    "conv.mc_dropout_conv2d_shared_channel": {"bdlkern per-element masks": 1.6},
}


def _targets(name: str) -> str:
    return "targets: " + ", ".join(f">= {r}x {b}" for b, r in TARGETS[name].items())


# ---- eager baselines (the code a user writes without bdlkern) -----------------------------------


def _eager_mc_dropout_conv2d(x, weight, bias, p: float, num_samples: int):
    """``num_samples`` MC-dropout samples of a conv layer, folded ``[S*N, C_out, H', W']``: the
    input expanded to ``[S*N, C, H, W]`` (sample-major), ``F.dropout`` (a mask per element), then
    ``F.conv2d``."""
    samples = x.unsqueeze(0).expand(num_samples, *x.shape).reshape(num_samples * x.shape[0], *x.shape[1:])
    return F.conv2d(F.dropout(samples, p, training=True), weight, bias, padding=PADDING)


def _eager_mc_dropout_conv2d_shared_channel(x, weight, bias, p: float, num_samples: int):
    """Dropout2d-style masks shared by the batch: one ``bernoulli_`` flag per (sample, channel),
    divided by ``1 - p`` while it is small and broadcast over the images and space, so the
    ``[S, N, C, H, W]`` input is written once, by the product."""
    keep = 1.0 - p
    n, c = x.shape[:2]
    scale = torch.empty(num_samples, 1, c, 1, 1, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)
    samples = (x.unsqueeze(0) * scale).reshape(num_samples * n, *x.shape[1:])
    return F.conv2d(samples, weight, bias, padding=PADDING)


# ---- problems, work and checks ------------------------------------------------------------------


def _problem(device: torch.device, quick: bool, requires_grad: bool = False):
    dims = QUICK if quick else FULL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dims["N"], dims["C"], dims["H"], dims["W"], generator=g).to(device)
    fan_in = dims["C"] * dims["k"] ** 2
    w = (torch.randn(dims["C_out"], dims["C"], dims["k"], dims["k"], generator=g) / fan_in**0.5).to(device)
    b = torch.randn(dims["C_out"], generator=g).to(device)
    if requires_grad:
        x, w, b = (t.requires_grad_() for t in (x, w, b))
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    state = bdlkern.ops.new_rng_state(gen, device)
    return dims, x, w, b, state


def _flops(dims) -> int:
    """Multiply-adds of the conv over every sample (padding 1, stride 1: H' = H, W' = W)."""
    return 2 * dims["S"] * dims["N"] * dims["C_out"] * dims["H"] * dims["W"] * dims["C"] * dims["k"] ** 2


def _params(dims, p: float, **extra):
    return {**dims, "padding": PADDING, "p": p, "dtype": "float32", **extra}


def _reference(x, w, b, p: float, S: int, state, *, mask: str = "element", shared_mask: bool = False):
    """``conv(x.repeat(S, 1, 1, 1) * M / (1 - p), w, b)`` in float64 on the CPU, ``M`` the op's keep
    mask rebuilt from ``state`` (the layouts of the spec: element ``[S*N, C, H, W]``, channel
    ``[S*N, C]``, element + shared ``[S, C, H, W]``, channel + shared ``[S, C]``)."""
    N, C, *sp = x.shape
    rows = [S] if shared_mask else [S * N]
    shape = [*rows, C, *sp] if mask == "element" else [*rows, C]
    keep = bdlkern.ops.dropout_mask(shape, p, rng_state=state, stream="mc_dropout").cpu()
    if mask == "channel":
        keep = keep.reshape(*keep.shape, *([1] * len(sp)))
    keep = keep.reshape(S, -1, C, *keep.shape[2:])  # [S, N or 1, C, *sp or 1s]
    xs = x.double().cpu().unsqueeze(0) * keep.double() / (1 - p)
    xs = xs.expand(S, N, C, *sp).reshape(S * N, C, *sp)
    return F.conv2d(xs, w.double().cpu(), b.double().cpu(), padding=PADDING)


def _check_forward(x, w, b, p: float, S: int, state, **mask_args):
    def check() -> None:
        with torch.no_grad():
            y = bdlkern.ops.mc_dropout_conv(x, w, b, p, S, padding=PADDING, rng_state=state, **mask_args)
            expected = _reference(x, w, b, p, S, state, **mask_args)
        assert y.shape == expected.shape, f"shape {tuple(y.shape)}, expected {tuple(expected.shape)}"
        assert y.dtype == x.dtype, y.dtype
        torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-4, atol=1e-4)

    return check


def _no_grad(f):
    """``f`` run under ``torch.no_grad()``: a forward pass at inference."""

    def call():
        with torch.no_grad():
            return f()

    return call


def _check_all(*checks):
    def check() -> None:
        for c in checks:
            c()

    return check


# ---- cases --------------------------------------------------------------------------------------


@case(
    "conv.mc_dropout_conv2d_forward",
    family="conv",
    description="S MC-dropout samples of a 3x3 conv (per-element masks), input shared by the samples, "
    "forward; " + _targets("conv.mc_dropout_conv2d_forward"),
    subject="bdlkern.mc_dropout_conv",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
    },
)
def _forward(device: torch.device, quick: bool) -> Workload:
    dims, x, w, b, state = _problem(device, quick)
    S = dims["S"]
    compiled = torch.compile(lambda x, w, b: _eager_mc_dropout_conv2d(x, w, b, P, S))

    return Workload(
        variants={
            "bdlkern.mc_dropout_conv": _no_grad(
                lambda: bdlkern.ops.mc_dropout_conv(x, w, b, P, S, padding=PADDING, rng_state=state)
            ),
            "reference (eager)": _no_grad(lambda: _eager_mc_dropout_conv2d(x, w, b, P, S)),
            "reference (torch.compile)": _no_grad(lambda: compiled(x, w, b)),
        },
        params=_params(dims, P),
        flops=_flops(dims),
        check=_check_forward(x, w, b, P, S, state),
    )


@case(
    "conv.mc_dropout_conv2d_train",
    family="conv",
    description="forward + backward (grads of x, W, b) of the S-sample MC-dropout 3x3 conv; "
    + _targets("conv.mc_dropout_conv2d_train"),
    subject="bdlkern.mc_dropout_conv",
    baselines={"reference (eager)": "reference"},
)
def _train(device: torch.device, quick: bool) -> Workload:
    dims, x, w, b, state = _problem(device, quick, requires_grad=True)
    S = dims["S"]
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(S * dims["N"], dims["C_out"], dims["H"], dims["W"], generator=g).to(device)

    def run(f):
        def call():
            y = f()
            return torch.autograd.grad(y, (x, w, b), grad)

        return call

    subject = run(lambda: bdlkern.ops.mc_dropout_conv(x, w, b, P, S, padding=PADDING, rng_state=state))

    def check() -> None:
        # The gradients the subject times, against autograd through the float64 reference with the
        # same masks (rng_state).
        got = subject()
        leaves = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
        y = _reference(*leaves, P, S, state)
        want = torch.autograd.grad(y, leaves, grad.cpu().double())
        for name, gt, e in zip(("x", "weight", "bias"), got, want):
            assert gt.shape == e.shape and gt.dtype == x.dtype, f"grad of {name}: {gt.shape} {gt.dtype}"
            torch.testing.assert_close(
                gt.cpu().double(), e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()), msg=f"grad of {name}"
            )

    return Workload(
        variants={
            "bdlkern.mc_dropout_conv": subject,
            "reference (eager)": run(lambda: _eager_mc_dropout_conv2d(x, w, b, P, S)),
        },
        params=_params(dims, P),
        flops=3 * _flops(dims),  # forward, grad of the input, grad of the weight
        check=check,
    )


@case(
    "conv.mc_dropout_conv2d_shared_channel",
    family="conv",
    description="S weight samples of a 3x3 conv: one channel flag per sample, shared by the batch "
    "(Dropout2d); bdlkern convolves the kept channels only; "
    + _targets("conv.mc_dropout_conv2d_shared_channel"),
    subject="bdlkern channel shared_mask=True",
    baselines={
        "bdlkern per-element masks": "variant",
        "reference channel mask (eager)": "reference",
    },
)
def _shared_channel(device: torch.device, quick: bool) -> Workload:
    dims, x, w, b, state = _problem(device, quick)
    S = dims["S"]

    full = _flops(dims)
    return Workload(
        variants={
            "bdlkern channel shared_mask=True": _no_grad(
                lambda: bdlkern.ops.mc_dropout_conv(
                    x, w, b, P_SHARED, S, padding=PADDING, mask="channel", shared_mask=True, rng_state=state
                )
            ),
            "bdlkern per-element masks": _no_grad(
                lambda: bdlkern.ops.mc_dropout_conv(x, w, b, P_SHARED, S, padding=PADDING, rng_state=state)
            ),
            "reference channel mask (eager)": _no_grad(
                lambda: _eager_mc_dropout_conv2d_shared_channel(x, w, b, P_SHARED, S)
            ),
        },
        params=_params(dims, P_SHARED, mask="channel", shared_mask=True),
        flops={
            # the kept channels only: (1 - p) of the products on average
            "bdlkern channel shared_mask=True": round((1 - P_SHARED) * full),
            "bdlkern per-element masks": full,
            "reference channel mask (eager)": full,
        },
        check=_check_all(
            _check_forward(x, w, b, P_SHARED, S, state, mask="channel", shared_mask=True),
            _check_forward(x, w, b, P_SHARED, S, state),
        ),
    )


# ---- the LRT convolution and the sparse convolution (sparse VD for conv nets) -------------------
LRT_FULL = {"N": 32, "C": 64, "H": 16, "W": 16, "C_out": 128, "k": 3}
LRT_QUICK = {"N": 4, "C": 8, "H": 8, "W": 8, "C_out": 16, "k": 3}
DENSITY = 0.05

TARGETS["conv.lrt_conv2d_train"] = {"reference (eager)": 1.25, "reference (torch.compile)": 1.1}
TARGETS["conv.sparse_conv2d"] = {"dense F.conv2d (oneDNN)": 5.0, "im2col + torch.sparse CSR": 2.0}


def _lrt_problem(device: torch.device, quick: bool):
    dims = LRT_QUICK if quick else LRT_FULL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dims["N"], dims["C"], dims["H"], dims["W"], generator=g).to(device)
    fan_in = dims["C"] * dims["k"] ** 2
    theta = (torch.randn(dims["C_out"], dims["C"], dims["k"], dims["k"], generator=g) / fan_in**0.5).to(device)
    log_sigma2 = (torch.randn(theta.shape, generator=g) - 8.0).to(device)
    b = torch.randn(dims["C_out"], generator=g).to(device)
    return dims, x, theta, log_sigma2, b


def _eager_lrt_conv2d(x, theta, log_sigma2, bias, eps=None):
    """The LRT convolution as users write it: two convolutions and the noise (drawn with
    ``torch.randn_like`` each call, as a training step does; ``eps`` given: the check's noise)."""
    log_alpha = torch.clamp(log_sigma2 - torch.log(theta**2 + 1e-8), -8.0, 8.0)
    mean = F.conv2d(x, theta, bias, padding=PADDING)
    var = F.conv2d(x * x, torch.exp(log_alpha) * theta**2, None, padding=PADDING)
    return mean + torch.sqrt(var + 1e-8) * (torch.randn_like(mean) if eps is None else eps)


@case(
    "conv.lrt_conv2d_train",
    family="conv",
    description="forward + backward (grads of x, theta, log sigma^2, b) of the LRT 3x3 conv of sparse VD, one "
    "sample per input; " + _targets("conv.lrt_conv2d_train"),
    subject="bdlkern.lrt_conv",
    baselines={"reference (eager)": "reference", "reference (torch.compile)": "compiled"},
)
def _lrt_train(device: torch.device, quick: bool) -> Workload:
    dims, x, theta, log_sigma2, b = _lrt_problem(device, quick)
    leaves = [t.requires_grad_() for t in (x, theta, log_sigma2, b)]
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    state = bdlkern.ops.new_rng_state(gen, device)
    out_shape = (dims["N"], dims["C_out"], dims["H"], dims["W"])
    eps = bdlkern.ops.normal(out_shape, rng_state=state, stream="lrt", dtype=x.dtype)
    g = torch.Generator().manual_seed(2)
    grad = torch.randn(out_shape, generator=g).to(device)
    compiled = torch.compile(_eager_lrt_conv2d)

    def run(f):
        def call():
            return torch.autograd.grad(f(), leaves, grad)

        return call

    subject = run(lambda: bdlkern.ops.lrt_conv(x, theta, log_sigma2, b, 1, padding=PADDING, rng_state=state))

    def check() -> None:
        got = subject()
        ref = [t.detach().cpu().double().requires_grad_() for t in leaves]
        y = _eager_lrt_conv2d(*ref, eps.cpu().double())
        want = torch.autograd.grad(y, ref, grad.cpu().double())
        for name, gt, e in zip(("x", "theta", "log_sigma2", "bias"), got, want):
            torch.testing.assert_close(
                gt.cpu().double(), e, rtol=1e-3, atol=1e-4 * max(1.0, e.abs().max().item()), msg=f"grad of {name}"
            )

    conv = 2 * dims["N"] * dims["C_out"] * dims["H"] * dims["W"] * dims["C"] * dims["k"] ** 2
    return Workload(
        variants={
            "bdlkern.lrt_conv": subject,
            "reference (eager)": run(lambda: _eager_lrt_conv2d(x, theta, log_sigma2, b)),
            "reference (torch.compile)": run(lambda: compiled(x, theta, log_sigma2, b)),
        },
        params={**dims, "padding": PADDING, "dtype": "float32"},
        flops=6 * conv,  # two convolutions, each with its input and weight gradients
        check=check,
    )


@case(
    "conv.sparse_conv2d",
    family="conv",
    description=f"pruned 3x3 conv at density {DENSITY} (CSR weight, no im2col), deterministic forward; "
    + _targets("conv.sparse_conv2d"),
    subject="bdlkern.sparse_conv",
    baselines={"dense F.conv2d (oneDNN)": "library", "im2col + torch.sparse CSR": "library"},
)
def _sparse_conv(device: torch.device, quick: bool) -> Workload:
    dims, x, theta, _, b = _lrt_problem(device, quick)
    g = torch.Generator().manual_seed(3)
    keep = (torch.rand(theta.shape, generator=g) < DENSITY).to(device)
    weight = theta * keep
    layer = bdlkern.nn.SparseConv2d.from_dense(weight, b, padding=PADDING)
    crow, col, values = layer.crow, layer.col, layer.values
    csr = weight.reshape(dims["C_out"], -1).to_sparse_csr()

    def im2col_csr():
        cols = F.unfold(x, dims["k"], padding=PADDING)  # [N, C k k, H W]
        out = csr @ cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [C_out, N H W]
        out = out.reshape(dims["C_out"], dims["N"], dims["H"], dims["W"]).transpose(0, 1)
        return out + b.reshape(1, -1, 1, 1)

    def subject():
        return bdlkern.ops.sparse_conv(x, crow, col, values, b, kernel_size=dims["k"], padding=PADDING)

    def check() -> None:
        expected = F.conv2d(x.cpu().double(), weight.cpu().double(), b.cpu().double(), padding=PADDING)
        torch.testing.assert_close(subject().cpu().double(), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(im2col_csr().cpu().double(), expected, rtol=1e-4, atol=1e-4)

    dense_flops = 2 * dims["N"] * dims["C_out"] * dims["H"] * dims["W"] * dims["C"] * dims["k"] ** 2
    nnz_flops = round(dense_flops * layer.density)
    return Workload(
        variants={
            "bdlkern.sparse_conv": _no_grad(subject),
            "dense F.conv2d (oneDNN)": _no_grad(lambda: F.conv2d(x, weight, b, padding=PADDING)),
            "im2col + torch.sparse CSR": _no_grad(im2col_csr),
        },
        params={**dims, "padding": PADDING, "density": round(layer.density, 4), "dtype": "float32"},
        flops={"bdlkern.sparse_conv": nnz_flops, "dense F.conv2d (oneDNN)": dense_flops,
               "im2col + torch.sparse CSR": nnz_flops},
        check=check,
    )


# ---- a pruned LeNet-style sparse-VD net, MC inference on the digits test set -----------------------
LENET_S = {"full": 32, "quick": 4}
LENET_TEST_IMAGES = {"full": 360, "quick": 32}  # the digits test split: 20% of 1797 images
LENET_KEEP = 0.05
TARGETS["conv.pruned_lenet_mc"] = {"dense sparse-VD net, batch replication (eager)": 3.0}


def _lenet(device: torch.device):
    """A LeNet-style sparse-VD net for 8x8 digits with ~95% of its weights at log alpha >= 3 (the
    pruned state training reaches; the timings do not depend on which weights survive)."""
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(
        bdlkern.nn.SparseVDConv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        bdlkern.nn.SparseVDConv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), bdlkern.nn.SparseVDLinear(32 * 2 * 2, 10),
    ).to(device).eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for m in net:
            if hasattr(m, "log_sigma2"):
                pruned = torch.rand(m.theta.shape, generator=g) >= LENET_KEEP
                log_alpha = torch.where(pruned, 6.0, -4.0).to(device)
                m.log_sigma2.copy_(log_alpha + torch.log(m.theta**2))
    return net


def _replicated_lrt(net, x, S):
    """What users run without bdlkern: the dense sparse-VD net on the batch repeated S times, each
    layer's LRT sample written out in torch (two dense convolutions / GEMMs and the noise)."""
    from torch import nn

    h = x.repeat(S, 1, 1, 1)
    for m in net:
        if isinstance(m, (bdlkern.nn.SparseVDConv2d, bdlkern.nn.SparseVDLinear)):
            var_w = torch.exp(m.log_alpha) * m.theta**2
            if isinstance(m, bdlkern.nn.SparseVDConv2d):
                mean = F.conv2d(h, m.theta, m.bias, padding=m.padding)
                var = F.conv2d(h * h, var_w, None, padding=m.padding)
            else:
                mean, var = F.linear(h, m.theta, m.bias), F.linear(h * h, var_w)
            h = mean + torch.sqrt(var + 1e-8) * torch.randn_like(mean)
        elif isinstance(m, nn.Module):
            h = m(h)
    return h


@case(
    "conv.pruned_lenet_mc",
    family="conv",
    description="MC inference (S=32 LRT samples) of a LeNet-style sparse-VD net on the 360 digits test images, "
    "95% of the weights pruned: the to_sparse() net in bdlkern.sampling against the dense net on the "
    "replicated batch; " + _targets("conv.pruned_lenet_mc"),
    subject="bdlkern pruned net, sampling(S)",
    baselines={"dense sparse-VD net, batch replication (eager)": "reference"},
)
def _pruned_lenet(device: torch.device, quick: bool) -> Workload:
    from torch import nn

    size = "quick" if quick else "full"
    S, n = LENET_S[size], LENET_TEST_IMAGES[size]
    net = _lenet(device)
    pruned = nn.Sequential(*[m.to_sparse() if hasattr(m, "to_sparse") else m for m in net]).eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 1, 8, 8, generator=g).to(device)

    def subject():
        with bdlkern.sampling(S, seed=0):
            return pruned(x)

    def check() -> None:
        with torch.no_grad():
            y = subject()
            ref = _replicated_lrt(net, x, S)
            assert y.shape == ref.shape == (S * n, 10), (tuple(y.shape), tuple(ref.shape))
            # Different noise: compare the per-image MC mean and spread, and the deterministic nets.
            torch.testing.assert_close(pruned(x), net(x), rtol=1e-4, atol=1e-4)
            m_y, m_r = y.reshape(S, n, 10).mean(0), ref.reshape(S, n, 10).mean(0)
            spread = ref.reshape(S, n, 10).std(0).mean().item()
            assert (m_y - m_r).abs().mean().item() < spread, "the MC means of the two nets disagree"

    return Workload(
        variants={
            "bdlkern pruned net, sampling(S)": _no_grad(subject),
            "dense sparse-VD net, batch replication (eager)": _no_grad(lambda: _replicated_lrt(net, x, S)),
        },
        params={"S": S, "images": n, "keep": LENET_KEEP, "dtype": "float32"},
        check=check,
    )
