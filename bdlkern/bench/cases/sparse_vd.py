"""Family ``sparse_vd``: sparse variational dropout (issue 5), training side.

Problems (full size): W [1024, 1024] float32 with log alpha spread over (-6, 6); the LRT layer on
x [256, 1024] with one noise sample per input (training); quick: W [128, 128], x [32, 128].

Baselines: the layer and the KL written out in plain PyTorch (``bdlkern.bench.baselines``:
clamp/exp for alpha theta^2, two ``F.linear``, sqrt, ``torch.randn``; autograd for backward), eager
and ``torch.compile``d; for the LRT layer also the limit proxy of its GEMMs (the 2 forward and 4
backward products of the same shapes). The pruned CSR layer (``sparse_linear.*``) is compared with
dense ``F.linear`` and torch.sparse CSR products (``baselines.CsrLinear``), and its stochastic
samples also with the dense two-GEMM LRT layer (eager and compiled). The checks compare bdlkern
with the test oracle, ``bdlkern.testing.reference``, imported when a check runs.
"""

from __future__ import annotations

import torch

import bdlkern
from bdlkern.bench import baselines
from bdlkern.bench.registry import Workload, case

FULL = {"B": 256, "K": 1024, "N": 1024}
QUICK = {"B": 32, "K": 128, "N": 128}


def _weights(dims, device, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(dims["N"], dims["K"], generator=g) / dims["K"] ** 0.5
    log_alpha = torch.rand(dims["N"], dims["K"], generator=g) * 12 - 6
    log_sigma2 = log_alpha + torch.log(theta**2 + 1e-8)
    bias = torch.randn(dims["N"], generator=g)
    out = [t.to(device) for t in (theta, log_sigma2, bias)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


def _state(device):
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    return bdlkern.ops.new_rng_state(gen, device)


@case(
    "sparse_vd.lrt_forward_backward",
    family="sparse_vd",
    description="LRT linear layer (sparse VD training) forward + backward: grads of x, theta, log_sigma2, bias",
    subject="bdlkern.lrt_linear",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
        "6 GEMMs of the same shapes": "limit",
    },
)
def _lrt(device: torch.device, quick: bool) -> Workload:
    dims = QUICK if quick else FULL
    theta, log_sigma2, bias = _weights(dims, device)
    x = torch.randn(dims["B"], dims["K"], generator=torch.Generator().manual_seed(2)).to(device).requires_grad_()
    grad = torch.randn(1, dims["B"], dims["N"], generator=torch.Generator().manual_seed(3)).to(device)
    state = _state(device)
    compiled = torch.compile(lambda x, t, s, b: baselines.lrt_linear(x, t, s, b, 1))
    params = (x, theta, log_sigma2, bias)
    xd, td = x.detach(), theta.detach()
    gd = grad[0]

    def run(f):
        def call():
            return torch.autograd.grad(f(), params, grad)

        return call

    def gemms():
        return (xd @ td.t(), xd @ td.t(), gd @ td, gd @ td, gd.t() @ xd, gd.t() @ xd)

    def check() -> None:
        from bdlkern.testing import reference as ref

        y = bdlkern.ops.lrt_linear(x, theta, log_sigma2, bias, num_samples=1, rng_state=state)
        expected = ref.lrt_linear(*(t.detach().cpu().double() for t in params), 1, rng_state=state.cpu())
        torch.testing.assert_close(y.detach().cpu().double(), expected, rtol=1e-3, atol=1e-3)

    flops = 2 * dims["B"] * dims["K"] * dims["N"]
    return Workload(
        variants={
            "bdlkern.lrt_linear": run(lambda: bdlkern.ops.lrt_linear(x, theta, log_sigma2, bias, num_samples=1, rng_state=state)),
            "reference (eager)": run(lambda: baselines.lrt_linear(x, theta, log_sigma2, bias, 1)),
            "reference (torch.compile)": run(lambda: compiled(x, theta, log_sigma2, bias)),
            "6 GEMMs of the same shapes": gemms,
        },
        params={**dims, "num_samples": 1, "dtype": "float32"},
        flops=6 * flops,
        check=check,
    )


#: N of the KL benchmark's loss ``KL / N``: a training-set size, as a user scales the KL term.
KL_TRAIN_SIZE = 50_000


@case(
    "sparse_vd.kl_forward_backward",
    family="sparse_vd",
    description=f"the sparse VD KL term summed over W [N, K] and scaled by 1/{KL_TRAIN_SIZE} (a training-set size), forward + backward",
    subject="bdlkern.sparse_vd_kl",
    baselines={"reference (eager)": "reference", "reference (torch.compile)": "compiled"},
)
def _kl(device: torch.device, quick: bool) -> Workload:
    dims = QUICK if quick else FULL
    theta, log_sigma2, _ = _weights(dims, device)
    compiled = torch.compile(baselines.sparse_vd_kl)

    def run(f):
        # What training differentiates: the KL divided by the training-set size (the ELBO per
        # example), never the bare KL, so every variant runs a backward with a real scale
        # (bdlkern's backward hands its saved gradient back unscaled only for a grad of exactly 1).
        def call():
            return torch.autograd.grad(f(theta, log_sigma2) / KL_TRAIN_SIZE, (theta, log_sigma2))

        return call

    def check() -> None:
        from bdlkern.testing import reference as ref

        got = bdlkern.ops.sparse_vd_kl(theta, log_sigma2).item()
        expected = ref.sparse_vd_kl(theta.detach().double(), log_sigma2.detach().double()).item()
        if abs(got - expected) > 1e-5 * abs(expected) + 1e-3:
            raise AssertionError(f"KL {got} != reference {expected}")
        # the scaled gradients the subject times, against float64 autograd of the reference
        grads = run(bdlkern.ops.sparse_vd_kl)()
        leaves = [t.detach().cpu().double().requires_grad_() for t in (theta, log_sigma2)]
        want = torch.autograd.grad(ref.sparse_vd_kl(*leaves) / KL_TRAIN_SIZE, leaves)
        for name, g, w in zip(("theta", "log_sigma2"), grads, want):
            torch.testing.assert_close(g.cpu().double(), w, rtol=1e-4, atol=1e-9, msg=f"grad of {name}")

    n = dims["N"] * dims["K"]
    return Workload(
        variants={
            "bdlkern.sparse_vd_kl": run(bdlkern.ops.sparse_vd_kl),
            "reference (eager)": run(baselines.sparse_vd_kl),
            "reference (torch.compile)": run(compiled),
        },
        params={**dims, "train_size": KL_TRAIN_SIZE, "dtype": "float32"},
        elements=n,
        bytes=4 * n * 4,  # the minimum: read theta and log_sigma2 once, write their two gradients
        check=check,
    )


# ---- sparse inference on the pruned CSR weights -------------------------------------------------------
SPARSE_K = SPARSE_N = 1024
SPARSE_QUICK = 128
GRID_BATCHES = (1, 16, 64, 256)
GRID_DENSITIES = (0.05, 0.02, 0.01)
CROSSOVER_DENSITIES = (0.1, 0.2, 0.3)  # batch 64: where the dense GEMM catches up


def _sparse_problem(device, quick, density, batch, variance=False):
    k = SPARSE_QUICK if quick else SPARSE_K
    n = SPARSE_QUICK if quick else SPARSE_N
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(n, k, generator=g) < density
    w = torch.randn(n, k, generator=g) / k**0.5 * keep
    v = torch.rand(n, k, generator=g) * 0.01 * keep
    bias = torch.randn(n, generator=g)
    layer = bdlkern.nn.SparseLinear.from_dense(w, bias, variance=v if variance else None, mask=keep).to(device)
    x = torch.randn(batch, k, generator=g).to(device)
    return layer, w.to(device), v.to(device), bias.to(device), x


def _register_sparse_case(batch: int, density: float) -> None:
    @case(
        f"sparse_linear.b{batch}_d{density:g}",
        family="sparse_vd",
        description=f"pruned layer y = x W^T + b, W [1024, 1024] in CSR at density {density:g}, batch {batch}",
        subject="bdlkern.sparse_linear",
        baselines={"dense F.linear": "library", "torch.sparse CSR addmm": "library"},
    )
    def _setup(device: torch.device, quick: bool) -> Workload:
        layer, w, _, bias, x = _sparse_problem(device, quick, density, batch)
        csr = baselines.CsrLinear(w, bias)

        def check() -> None:
            dense = torch.nn.functional.linear(x, w, bias)
            got = bdlkern.ops.sparse_linear(x, layer.crow, layer.col, layer.values, layer.bias)
            torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(csr(x), dense, rtol=1e-4, atol=1e-4)  # the baseline too

        return Workload(
            variants={
                "bdlkern.sparse_linear": lambda: bdlkern.ops.sparse_linear(
                    x, layer.crow, layer.col, layer.values, layer.bias, row_order=layer.row_order
                ),
                "dense F.linear": lambda: torch.nn.functional.linear(x, w, bias),
                "torch.sparse CSR addmm": lambda: csr(x),
            },
            params={"B": batch, "K": w.shape[1], "N": w.shape[0], "density": density, "nnz": layer.nnz, "dtype": "float32"},
            flops={
                "bdlkern.sparse_linear": 2 * batch * layer.nnz,
                "dense F.linear": 2 * batch * w.numel(),
                "torch.sparse CSR addmm": 2 * batch * layer.nnz,
            },
            check=check,
        )


for _b in GRID_BATCHES:
    for _d in GRID_DENSITIES:
        _register_sparse_case(_b, _d)
for _d in CROSSOVER_DENSITIES:
    _register_sparse_case(64, _d)


@case(
    "sparse_linear.stochastic",
    family="sparse_vd",
    description="S = 32 stochastic LRT samples of the pruned layer (density 0.05, batch 64) from one pass over the CSR",
    subject="bdlkern.sparse_linear stochastic",
    baselines={
        "dense two-GEMM LRT reference": "reference",
        "dense LRT (torch.compile)": "compiled",
        "torch.sparse two-product LRT": "library",
    },
)
def _stochastic(device: torch.device, quick: bool) -> Workload:
    samples = 4 if quick else 32
    layer, w, v, bias, x = _sparse_problem(device, quick, 0.05, 64, variance=True)
    state = _state(device)
    values = layer.values
    # The same LRT samples with torch's CSR products: the mean and the variance, each one sparse x
    # dense product over the kept weights, then the noise for every sample.
    csr = baselines.CsrLinear(w, bias, variance=v)
    compiled = torch.compile(lambda x, w, v, b: baselines.lrt_sample(x, w, v, b, samples))

    def check() -> None:
        from bdlkern.testing import reference as ref

        got = bdlkern.ops.sparse_linear(x, layer.crow, layer.col, values, bias, num_samples=samples, stochastic=True, rng_state=state)
        expected = ref.sparse_linear(x.cpu(), layer.crow.cpu(), layer.col.cpu(), values.cpu(), bias.cpu(), samples, stochastic=True, rng_state=state.cpu())
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
        # the torch.sparse baseline computes the same two moments as the dense one
        for a, b in zip(csr.moments(x), baselines.lrt_moments(x, w, v, bias)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    return Workload(
        variants={
            "bdlkern.sparse_linear stochastic": lambda: bdlkern.ops.sparse_linear(
                x, layer.crow, layer.col, values, bias, num_samples=samples, stochastic=True, rng_state=state,
                row_order=layer.row_order,
            ),
            "dense two-GEMM LRT reference": lambda: baselines.lrt_sample(x, w, v, bias, samples),
            "dense LRT (torch.compile)": lambda: compiled(x, w, v, bias),
            "torch.sparse two-product LRT": lambda: csr.sample(x, samples),
        },
        params={"S": samples, "B": 64, "K": w.shape[1], "N": w.shape[0], "density": 0.05, "dtype": "float32"},
        elements=samples * 64 * w.shape[0],
        check=check,
    )
