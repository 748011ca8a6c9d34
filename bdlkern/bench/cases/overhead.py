"""Family ``overhead``: what a call costs beyond its kernel, on the small layers of the most common
Bayesian-DL workloads (UCI regression, active learning, small tabular models).

* ``overhead.mlp_step.*``: one Adam training step of a UCI-sized MLP, 13 -> 50 -> 1, batch 32, on
  one thread, with each bdlkern layer against the eager PyTorch a user writes without bdlkern:
  ``MCDropoutLinear`` against ``nn.Dropout -> nn.Linear``; ``ConcreteDropoutLinear`` against the
  Concrete dropout of the paper's notebooks (``torch.rand`` relaxed mask, the regulariser:
  ``bdlkern.bench.baselines.EagerConcreteLinear``); and ``SparseVDLinear`` against an eager LRT
  layer (two ``F.linear``, ``torch.randn``, the KL: ``baselines.EagerLRTLinear``);
* ``overhead.op_call``: one 1 x 1 ``bdlkern.ops.mc_dropout_linear`` call (one sample) against a
  1 x 1 ``F.linear``: the fixed cost of the op path (Python wrapper, rng_state, dispatcher,
  autograd, kernel setup) against torch's own.

The sizes are the same in quick and full runs: the point is the fixed per-call cost, which a
bigger problem would hide. Each variant runs on one intra-op thread (the way such models are
trained, many at a time), restored afterwards.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import bdlkern
from bdlkern.bench import baselines
from bdlkern.bench.registry import Workload, case

IN, HIDDEN, OUT, BATCH = 13, 50, 1, 32
P = 0.1
N_TRAIN = 1000  # the dataset size the KL and the Concrete regulariser are scaled by


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _data(device):
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, IN, generator=g).to(device), torch.randn(BATCH, OUT, generator=g).to(device)


def _trainer(model: nn.Module, loss_fn, device):
    """A zero-argument training step of ``model`` (Adam) on one fixed batch."""
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = _data(device)

    def step():
        with _one_thread():
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, x, y)
            loss.backward()
            opt.step()
        return loss

    return step


def _mse(model, x, y):
    return F.mse_loss(model(x), y)


def _step_case(family_name: str, what: str, subject: str, baseline: str, kind: str, make_ours, make_eager, loss_fn):
    """Registers ``overhead.mlp_step.<family_name>``: an Adam step of the MLP ``make_ours()`` builds,
    against the one ``make_eager()`` builds (both from seed 0), with loss ``loss_fn``."""

    @case(
        f"overhead.mlp_step.{family_name}",
        family="overhead",
        description=f"Adam step, MLP {IN}-{HIDDEN}-{OUT}, batch {BATCH}, 1 thread: {what}",
        subject=subject,
        baselines={baseline: kind},
    )
    def _setup(device: torch.device, quick: bool) -> Workload:
        torch.manual_seed(0)
        ours = _trainer(make_ours(), loss_fn, device)
        torch.manual_seed(0)
        eager = _trainer(make_eager(), loss_fn, device)

        def check() -> None:
            loss = ours()
            if not torch.isfinite(loss):
                raise AssertionError(f"a training step gave a non-finite loss {loss}")

        return Workload(
            variants={subject: ours, baseline: eager},
            params={"layers": f"{IN}-{HIDDEN}-{OUT}", "batch": BATCH, "threads": 1},
            check=check,
        )


_step_case(
    "mc_dropout",
    f"MC dropout, p = {P}",
    "MCDropoutLinear MLP",
    "nn.Dropout -> nn.Linear MLP",
    "library",
    lambda: nn.Sequential(
        bdlkern.nn.MCDropoutLinear(IN, HIDDEN, p=P), nn.ReLU(), bdlkern.nn.MCDropoutLinear(HIDDEN, OUT, p=P)
    ),
    lambda: nn.Sequential(nn.Dropout(P), nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Dropout(P), nn.Linear(HIDDEN, OUT)),
    _mse,
)


def _concrete_loss(model, x, y):
    reg = sum(m.regularization() for m in model if hasattr(m, "regularization"))
    return F.mse_loss(model(x), y) + reg / N_TRAIN


_step_case(
    "concrete",
    "Concrete dropout",
    "ConcreteDropoutLinear MLP",
    "eager Concrete reference MLP",
    "reference",
    lambda: nn.Sequential(
        bdlkern.nn.ConcreteDropoutLinear(IN, HIDDEN, weight_regularizer=1e-6, dropout_regularizer=1e-5),
        nn.ReLU(),
        bdlkern.nn.ConcreteDropoutLinear(HIDDEN, OUT, weight_regularizer=1e-6, dropout_regularizer=1e-5),
    ),
    lambda: nn.Sequential(
        baselines.EagerConcreteLinear(IN, HIDDEN, weight_regularizer=1e-6, dropout_regularizer=1e-5),
        nn.ReLU(),
        baselines.EagerConcreteLinear(HIDDEN, OUT, weight_regularizer=1e-6, dropout_regularizer=1e-5),
    ),
    _concrete_loss,
)


def _kl_loss(model, x, y):
    kl = sum(m.kl() for m in model if hasattr(m, "kl"))
    return F.mse_loss(model(x), y) + kl / N_TRAIN


_step_case(
    "sparse_vd",
    "sparse VD (LRT + KL)",
    "SparseVDLinear MLP",
    "eager LRT layer MLP",
    "reference",
    lambda: nn.Sequential(bdlkern.nn.SparseVDLinear(IN, HIDDEN), nn.ReLU(), bdlkern.nn.SparseVDLinear(HIDDEN, OUT)),
    lambda: nn.Sequential(baselines.EagerLRTLinear(IN, HIDDEN), nn.ReLU(), baselines.EagerLRTLinear(HIDDEN, OUT)),
    _kl_loss,
)


@case(
    "overhead.op_call",
    family="overhead",
    description="one 1x1 call, no grad, 1 thread: the op path's fixed cost",
    subject="bdlkern.ops.mc_dropout_linear 1x1",
    baselines={"F.linear 1x1": "library"},
)
def _op_call(device: torch.device, quick: bool) -> Workload:
    x = torch.randn(1, 1, device=device)
    w = torch.randn(1, 1, device=device)

    def ours():
        with _one_thread():
            return bdlkern.ops.mc_dropout_linear(x, w, None, 0.5, 1)

    def linear():
        with _one_thread():
            return F.linear(x, w)

    def check() -> None:
        y = ours()
        if y.shape != (1, 1, 1) or not (y == 0).logical_or(torch.isclose(y, 2 * x * w)).all():
            raise AssertionError(f"mc_dropout_linear 1x1 gave {y}")

    return Workload(
        variants={"bdlkern.ops.mc_dropout_linear 1x1": ours, "F.linear 1x1": linear},
        params={"shape": "1x1", "S": 1, "threads": 1},
        check=check,
    )
