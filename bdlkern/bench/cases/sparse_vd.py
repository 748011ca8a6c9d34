"""Family ``sparse_vd``: sparse variational dropout (issue 5), training side.

Problems (full size): W [1024, 1024] float32 with log alpha spread over (-6, 6); the LRT layer on
x [256, 1024] with one noise sample per input (training); quick: W [128, 128], x [32, 128].

Baselines: the reference written out in plain PyTorch (``bdlkern.reference``: clamp/exp for
alpha theta^2, two ``F.linear``, sqrt, ``torch.randn``; autograd for backward), eager and
``torch.compile``d; for the LRT layer also the limit proxy of its GEMMs (the 2 forward and 4
backward products of the same shapes).
"""

from __future__ import annotations

import torch

import bdlkern
from bdlkern import reference as ref
from bdlkern.bench import Workload, case

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
    compiled = torch.compile(lambda x, t, s, b: ref.lrt_linear(x, t, s, b, 1))
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
        y = bdlkern.ops.lrt_linear(x, theta, log_sigma2, bias, num_samples=1, rng_state=state)
        expected = ref.lrt_linear(*(t.detach().cpu().double() for t in params), 1, rng_state=state.cpu())
        torch.testing.assert_close(y.detach().cpu().double(), expected, rtol=1e-3, atol=1e-3)

    flops = 2 * dims["B"] * dims["K"] * dims["N"]
    return Workload(
        variants={
            "bdlkern.lrt_linear": run(lambda: bdlkern.ops.lrt_linear(x, theta, log_sigma2, bias, num_samples=1, rng_state=state)),
            "reference (eager)": run(lambda: ref.lrt_linear(x, theta, log_sigma2, bias, 1)),
            "reference (torch.compile)": run(lambda: compiled(x, theta, log_sigma2, bias)),
            "6 GEMMs of the same shapes": gemms,
        },
        params={**dims, "num_samples": 1, "dtype": "float32"},
        flops=6 * flops,
        check=check,
    )


@case(
    "sparse_vd.kl_forward_backward",
    family="sparse_vd",
    description="the sparse VD KL term summed over W [N, K], forward + backward",
    subject="bdlkern.sparse_vd_kl",
    baselines={"reference (eager)": "reference", "reference (torch.compile)": "compiled"},
)
def _kl(device: torch.device, quick: bool) -> Workload:
    dims = QUICK if quick else FULL
    theta, log_sigma2, _ = _weights(dims, device)
    compiled = torch.compile(ref.sparse_vd_kl)

    def run(f):
        def call():
            return torch.autograd.grad(f(theta, log_sigma2), (theta, log_sigma2))

        return call

    def check() -> None:
        got = bdlkern.ops.sparse_vd_kl(theta, log_sigma2).item()
        expected = ref.sparse_vd_kl(theta.detach().double(), log_sigma2.detach().double()).item()
        if abs(got - expected) > 1e-5 * abs(expected) + 1e-3:
            raise AssertionError(f"KL {got} != reference {expected}")

    n = dims["N"] * dims["K"]
    return Workload(
        variants={
            "bdlkern.sparse_vd_kl": run(bdlkern.ops.sparse_vd_kl),
            "reference (eager)": run(ref.sparse_vd_kl),
            "reference (torch.compile)": run(compiled),
        },
        params={**dims, "dtype": "float32"},
        elements=n,
        bytes=4 * n * 4,  # read theta and log_sigma2 twice (forward, backward), write both grads
        check=check,
    )
