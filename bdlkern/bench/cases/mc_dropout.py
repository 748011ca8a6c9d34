"""Family ``mc_dropout``: the fused multi-sample MC-dropout linear layer (issue 3).

Problem (full size): S = 32 samples of x [256, 1024] through W [1024, 1024], p = 0.5, float32,
every sample sharing the input (the first MC layer of a network). Quick: S = 4, x [32, 128],
W [128, 128].

Baselines (:mod:`bdlkern.bench.baselines`): the code users write today (``x.expand -> F.dropout
-> F.linear``, eager and ``torch.compile``d; for shared masks a ``bernoulli_`` mask per sample and
feature broadcast over the batch), and the limit proxy: one plain ``addmm`` of the same
[S*B, in] x [in, out] shape with the input already in memory (what a fused kernel cannot beat).
The checks compare bdlkern with the test oracle, ``bdlkern.testing.reference``, imported when a
check runs.
"""

from __future__ import annotations

import torch

import bdlkern
from bdlkern.bench import baselines
from bdlkern.bench.registry import Workload, case

FULL = {"S": 32, "B": 256, "K": 1024, "N": 1024}
QUICK = {"S": 4, "B": 32, "K": 128, "N": 128}
P = 0.5


def _problem(device: torch.device, quick: bool, requires_grad: bool = False):
    dims = QUICK if quick else FULL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dims["B"], dims["K"], generator=g).to(device)
    w = (torch.randn(dims["N"], dims["K"], generator=g) / dims["K"] ** 0.5).to(device)
    b = torch.randn(dims["N"], generator=g).to(device)
    if requires_grad:
        x, w, b = (t.requires_grad_() for t in (x, w, b))
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    state = bdlkern.ops.new_rng_state(gen, device)
    return dims, x, w, b, state


def _flops(dims) -> int:
    return 2 * dims["S"] * dims["B"] * dims["K"] * dims["N"]


def _shared_mask_flops(dims, device: torch.device, spec=None) -> int:
    """FLOPs of the shared-mask op on ``device``: the CPU kernel and the fused CUDA forward multiply
    over each sample's kept features only, about (1 - p) of the products; the CUDA materialise path
    (when the cost model picks it) does every product. ``spec``: the GPU (default: ``device``'s)."""
    if device.type == "cuda":
        from bdlkern.ops import cost_model

        plan = cost_model.mc_dropout_linear_plan(
            dims["S"], dims["B"], dims["K"], dims["N"], spec=spec or cost_model.gpu_spec(device), shared_mask=True, p=P
        )
        if not plan.memory_efficient:
            return _flops(dims)
    return round((1 - P) * _flops(dims))


def _params(dims, **extra):
    return {**dims, "p": P, "dtype": "float32", **extra}


def _check_against_reference(x, w, b, S, state, shared_mask=False):
    def check() -> None:
        from bdlkern.testing import reference as ref

        y = bdlkern.ops.mc_dropout_linear(x, w, b, P, S, shared_mask=shared_mask, rng_state=state)
        expected = ref.mc_dropout_linear(x, w, b, P, S, shared_mask=shared_mask, rng_state=state.cpu())
        torch.testing.assert_close(y.cpu(), expected.cpu(), rtol=1e-4, atol=1e-4)

    return check


@case(
    "mc_dropout.forward",
    family="mc_dropout",
    description="S MC-dropout samples of a linear layer, input shared by the samples (forward)",
    subject="bdlkern.mc_dropout_linear",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
        "addmm [S*B,in]x[in,out]": "limit",
    },
)
def _forward(device: torch.device, quick: bool) -> Workload:
    dims, x, w, b, state = _problem(device, quick)
    S = dims["S"]
    compiled = torch.compile(lambda x, w, b: baselines.mc_dropout_linear(x, w, b, P, S))
    x_rows = x.repeat(S, 1)  # the limit proxy's input, already materialised
    return Workload(
        variants={
            "bdlkern.mc_dropout_linear": lambda: bdlkern.ops.mc_dropout_linear(x, w, b, P, S, rng_state=state),
            "reference (eager)": lambda: baselines.mc_dropout_linear(x, w, b, P, S),
            "reference (torch.compile)": lambda: compiled(x, w, b),
            "addmm [S*B,in]x[in,out]": lambda: torch.addmm(b, x_rows, w.t()),
        },
        params=_params(dims),
        flops=_flops(dims),
        check=_check_against_reference(x, w, b, S, state),
    )


@case(
    "mc_dropout.paths",
    family="mc_dropout",
    description="the CUDA paths of mc_dropout_linear in bfloat16: auto (cost model) against the fused kernel, "
    "the materialise-then-cuBLAS path and eager",
    subject="bdlkern auto",
    baselines={
        "bdlkern memory_efficient=True (fused)": "variant",
        "bdlkern memory_efficient=False (cuBLAS)": "variant",
        "reference (eager)": "reference",
    },
    devices=("cuda",),
)
def _paths(device: torch.device, quick: bool) -> Workload:
    dims, x, w, b, state = _problem(device, quick)
    x, w, b = (t.bfloat16() for t in (x, w, b))
    S = dims["S"]

    def ours(memory_efficient):
        return lambda: bdlkern.ops.mc_dropout_linear(x, w, b, P, S, rng_state=state, memory_efficient=memory_efficient)

    def check() -> None:
        fused, cublas = ours(True)(), ours(False)()
        torch.testing.assert_close(fused.float(), cublas.float(), rtol=2e-2, atol=2e-2)

    return Workload(
        variants={
            "bdlkern auto": ours(None),
            "bdlkern memory_efficient=True (fused)": ours(True),
            "bdlkern memory_efficient=False (cuBLAS)": ours(False),
            "reference (eager)": lambda: baselines.mc_dropout_linear(x, w, b, P, S),
        },
        params={**dims, "p": P, "dtype": "bfloat16"},
        flops=_flops(dims),
        check=check,
    )


@case(
    "mc_dropout.shared_mask",
    family="mc_dropout",
    description="S weight samples (one mask per sample and feature, shared by the batch); the CPU kernel skips dropped features",
    subject="bdlkern shared_mask=True",
    baselines={
        "bdlkern per-element masks": "variant",
        "reference shared mask (eager)": "reference",
    },
)
def _shared(device: torch.device, quick: bool) -> Workload:
    dims, x, w, b, state = _problem(device, quick)
    S = dims["S"]
    return Workload(
        variants={
            "bdlkern shared_mask=True": lambda: bdlkern.ops.mc_dropout_linear(
                x, w, b, P, S, shared_mask=True, rng_state=state
            ),
            "bdlkern per-element masks": lambda: bdlkern.ops.mc_dropout_linear(x, w, b, P, S, rng_state=state),
            "reference shared mask (eager)": lambda: baselines.mc_dropout_linear_shared(x, w, b, P, S),
        },
        params=_params(dims, shared_mask=True),
        flops={
            "bdlkern shared_mask=True": _shared_mask_flops(dims, device),
            "bdlkern per-element masks": _flops(dims),
            "reference shared mask (eager)": _flops(dims),
        },
        check=_check_against_reference(x, w, b, S, state, shared_mask=True),
    )


@case(
    "mc_dropout.forward_backward",
    family="mc_dropout",
    description="forward + backward (grads of x, W, b) of the S-sample MC-dropout linear layer",
    subject="bdlkern.mc_dropout_linear",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
        "3 GEMMs of the same shapes": "limit",
    },
)
def _forward_backward(device: torch.device, quick: bool) -> Workload:
    dims, x, w, b, state = _problem(device, quick, requires_grad=True)
    S = dims["S"]
    compiled = torch.compile(lambda x, w, b: baselines.mc_dropout_linear(x, w, b, P, S))
    grad = torch.randn(S, dims["B"], dims["N"], device=device)
    x_rows = x.detach().repeat(S, 1)
    g_rows = grad.reshape(-1, dims["N"])
    wd = w.detach()

    def run(f):
        def call():
            y = f()
            return torch.autograd.grad(y, (x, w, b), grad)

        return call

    def gemms():
        y = torch.addmm(b.detach(), x_rows, wd.t())
        return y, g_rows @ wd, g_rows.t() @ x_rows

    def check() -> None:
        # The gradients the subject times, against autograd through the reference with the same
        # masks (rng_state), on CPU copies of the inputs.
        from bdlkern.testing import reference as ref

        got = run(lambda: bdlkern.ops.mc_dropout_linear(x, w, b, P, S, rng_state=state))()
        leaves = [t.detach().cpu().requires_grad_() for t in (x, w, b)]
        y = ref.mc_dropout_linear(*leaves, P, S, rng_state=state.cpu())
        want = torch.autograd.grad(y, leaves, grad.cpu())
        for name, g, e in zip(("x", "weight", "bias"), got, want):
            torch.testing.assert_close(g.cpu(), e, rtol=1e-4, atol=1e-4 * max(1.0, e.abs().max().item()), msg=f"grad of {name}")

    return Workload(
        variants={
            "bdlkern.mc_dropout_linear": run(lambda: bdlkern.ops.mc_dropout_linear(x, w, b, P, S, rng_state=state)),
            "reference (eager)": run(lambda: baselines.mc_dropout_linear(x, w, b, P, S)),
            "reference (torch.compile)": run(lambda: compiled(x, w, b)),
            "3 GEMMs of the same shapes": gemms,
        },
        params=_params(dims),
        flops=3 * _flops(dims),
        check=check,
    )
