"""Family ``concrete``: fused Concrete dropout (issue 4).

Problem (full size): x [256, 4096] float32, one learnt rate for the layer (scalar ``p_logit``),
temperature 0.1; quick: x [32, 512]. Forward + backward computes the gradients of x and p_logit.

Baselines: the notebooks' formula in plain PyTorch (``bdlkern.bench.baselines.concrete_dropout``,
``torch.rand`` noise), eager and ``torch.compile``d, and a limit proxy: the two elementwise passes a
fused kernel cannot avoid (``y = x * s`` forward, ``grad_x = g * s`` backward). The check compares
bdlkern with the test oracle, ``bdlkern.testing.reference``, imported when it runs.
"""

from __future__ import annotations

import torch

import bdlkern
from bdlkern.bench import baselines
from bdlkern.bench.registry import Workload, case

FULL = {"B": 256, "F": 4096}
QUICK = {"B": 32, "F": 512}
TEMPERATURE = 0.1
P_LOGIT = -2.0  # p = 0.12


def _problem(device: torch.device, quick: bool):
    dims = QUICK if quick else FULL
    g = torch.Generator().manual_seed(0)
    x = torch.randn(dims["B"], dims["F"], generator=g).to(device).requires_grad_()
    p_logit = torch.tensor(P_LOGIT, device=device, requires_grad=True)
    grad = torch.randn(dims["B"], dims["F"], generator=g).to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(1)
    state = bdlkern.ops.new_rng_state(gen, device)
    return dims, x, p_logit, grad, state


def _check(x, p_logit, state):
    def check() -> None:
        from bdlkern.testing import reference as ref

        y = bdlkern.ops.concrete_dropout(x, p_logit, TEMPERATURE, rng_state=state)
        expected = ref.concrete_dropout(x.double(), p_logit.double(), TEMPERATURE, rng_state=state.cpu())
        torch.testing.assert_close(y.detach().cpu().double(), expected.detach().cpu(), rtol=1e-4, atol=1e-4)

    return check


@case(
    "concrete.forward_backward",
    family="concrete",
    description="Concrete dropout forward + backward (grads of x and the scalar p_logit)",
    subject="bdlkern.concrete_dropout",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
        "x*s and g*s (2 elementwise passes)": "limit",
    },
)
def _forward_backward(device: torch.device, quick: bool) -> Workload:
    dims, x, p_logit, grad, state = _problem(device, quick)
    compiled = torch.compile(lambda x, p: baselines.concrete_dropout(x, p, TEMPERATURE))
    xd, scale = x.detach(), torch.tensor(1.1, device=device)
    n = dims["B"] * dims["F"]

    def run(f):
        def call():
            y = f()
            return torch.autograd.grad(y, (x, p_logit), grad)

        return call

    return Workload(
        variants={
            "bdlkern.concrete_dropout": run(lambda: bdlkern.ops.concrete_dropout(x, p_logit, TEMPERATURE, rng_state=state)),
            "reference (eager)": run(lambda: baselines.concrete_dropout(x, p_logit, TEMPERATURE)),
            "reference (torch.compile)": run(lambda: compiled(x, p_logit)),
            "x*s and g*s (2 elementwise passes)": lambda: (xd * scale, grad * scale),
        },
        params={**dims, "p_logit": P_LOGIT, "temperature": TEMPERATURE, "dtype": "float32"},
        elements=n,
        bytes=4 * n * 5,  # read x, write y; read g and x, write grad_x
        check=_check(x, p_logit, state),
    )


@case(
    "concrete.forward",
    family="concrete",
    description="Concrete dropout forward only (inference with relaxed masks, or the first half of training)",
    subject="bdlkern.concrete_dropout",
    baselines={
        "reference (eager)": "reference",
        "reference (torch.compile)": "compiled",
        "x*s (1 elementwise pass)": "limit",
    },
)
def _forward(device: torch.device, quick: bool) -> Workload:
    dims, x, p_logit, _, state = _problem(device, quick)
    xd, pd = x.detach(), p_logit.detach()
    compiled = torch.compile(lambda x, p: baselines.concrete_dropout(x, p, TEMPERATURE))
    scale = torch.tensor(1.1, device=device)
    n = dims["B"] * dims["F"]
    return Workload(
        variants={
            "bdlkern.concrete_dropout": lambda: bdlkern.ops.concrete_dropout(xd, pd, TEMPERATURE, rng_state=state),
            "reference (eager)": lambda: baselines.concrete_dropout(xd, pd, TEMPERATURE),
            "reference (torch.compile)": lambda: compiled(xd, pd),
            "x*s (1 elementwise pass)": lambda: xd * scale,
        },
        params={**dims, "p_logit": P_LOGIT, "temperature": TEMPERATURE, "dtype": "float32"},
        elements=n,
        bytes=8 * n,
        check=_check(x, p_logit, state),
    )
