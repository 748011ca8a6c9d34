"""Data-parallel training of bdlkern layers with DistributedDataParallel (gloo, two processes).

Two worker processes (this file run as a script) train a small regression network made of
``SparseVDConv2d``, ``MCDropoutConv2d``, ``ConcreteDropoutLinear``, ``SparseVDLinear`` and
``MCDropoutLinear`` layers, with loss = MSE +
(Concrete regulariser + sparse-VD KL) / N, for a few Adam steps; each rank reads its own shard of a
fixed data set and seeds torch's generator with its own seed, so every rank draws different
dropout masks and LRT noise (the layers draw their ``rng_state`` from torch's default generator).

The test then replays the run in one process: for every step and rank it restores that rank's
generator state (``torch.set_rng_state``), computes that rank's loss and gradients on its shard,
averages the two gradient sets the way DDP's allreduce does and takes the optimizer step. The final
parameters and every per-rank loss must be bit-identical to the distributed run (why that holds is
explained in ``_averaged_like_ddp``), and the replay with another seed on one rank must not be,
which shows the comparison sees the per-rank randomness.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bdlkern

WORLD_SIZE = 2
SEEDS = (101, 202)  # torch.manual_seed of rank 0 and rank 1
STEPS = 6
BATCH = 8
N_TRAIN = 64
TIMEOUT_S = 90  # whole distributed run; a hang is killed and reported, never blocks CI
WORKER_DUMP_S = 75  # a worker still running then prints every thread's stack and exits


# ---- what every rank and the single-process replay share ------------------------------------------
def _dataset() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(N_TRAIN, 4, generator=g)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(N_TRAIN, 1, generator=g)
    return x, y


def _shard(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s mini-batch at ``step``: rows ``rank::WORLD_SIZE`` of the data set, in order."""
    x, y = _dataset()
    xs, ys = x[rank::WORLD_SIZE], y[rank::WORLD_SIZE]
    start = (step * BATCH) % xs.shape[0]
    return xs[start : start + BATCH], ys[start : start + BATCH]


def _make_model() -> nn.Module:
    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    return nn.Sequential(
        # a conv front (the input as 1x2x2 images): the sparse-VD and MC-dropout convolutions
        nn.Unflatten(1, (1, 2, 2)),
        bdlkern.nn.SparseVDConv2d(1, 4, 2, padding=1, log_sigma2_init=-4.0),  # [B, 4, 3, 3]
        nn.ReLU(),
        bdlkern.nn.MCDropoutConv2d(4, 8, 2, p=0.2, mask="channel"),  # [B, 8, 2, 2]
        nn.Flatten(),
        bdlkern.nn.ConcreteDropoutLinear(32, 32, init_p=0.2, weight_regularizer=1e-3, dropout_regularizer=1e-2),
        nn.ReLU(),
        bdlkern.nn.SparseVDLinear(32, 32, log_sigma2_init=-4.0),
        nn.ReLU(),
        bdlkern.nn.MCDropoutLinear(32, 1, p=0.25),
    )


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Data loss plus the Concrete regulariser and sparse-VD KL (the ELBO scaling 1 / N)."""
    return F.mse_loss(model(x), y) + bdlkern.nn.regularization(model) / N_TRAIN


def _averaged_like_ddp(grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """The gradients DDP leaves on every rank: its reducer scales each rank's gradient by
    1 / world_size into the bucket and allreduces (sums) the buckets. With two ranks, scaling by
    0.5 is exact and a sum of two terms does not depend on the order, so ``g0 * 0.5 + g1 * 0.5``
    is bit-for-bit what gloo returns; together with one intra-op thread everywhere this makes the
    whole replay bit-identical, not merely close."""
    return [g0 * (1.0 / WORLD_SIZE) + g1 * (1.0 / WORLD_SIZE) for g0, g1 in zip(*grads)]


# ---- the worker: python tests/test_distributed.py RANK PORT OUT_DIR --------------------------------
def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    faulthandler.dump_traceback_later(WORKER_DUMP_S, exit=True)  # a hang shows where, in the report
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60))
    try:
        model = DDP(_make_model())
        opt = _optimizer(model)
        torch.manual_seed(SEEDS[rank])
        losses = []
        for step in range(STEPS):
            x, y = _shard(rank, step)
            opt.zero_grad(set_to_none=True)
            loss = _loss(model, x, y)
            loss.backward()
            opt.step()
            losses.append(loss.detach().clone())
        params = {name: p.detach().clone() for name, p in model.module.named_parameters()}
        torch.save({"losses": torch.stack(losses), "params": params}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ---- the single-process replay -----------------------------------------------------------------------
def _replay(seeds: tuple[int, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What the ranks compute, in one process: per-rank losses [rank, step] and the final parameters."""
    model = _make_model()
    opt = _optimizer(model)
    params = list(model.parameters())
    rng_states = []
    for seed in seeds:
        torch.manual_seed(seed)
        rng_states.append(torch.get_rng_state())
    losses = torch.empty(WORLD_SIZE, STEPS)
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD_SIZE):
            torch.set_rng_state(rng_states[rank])
            x, y = _shard(rank, step)
            loss = _loss(model, x, y)
            grads.append(torch.autograd.grad(loss, params))
            rng_states[rank] = torch.get_rng_state()
            losses[rank, step] = loss.detach()
        for p, g in zip(params, _averaged_like_ddp(grads)):
            p.grad = g
        opt.step()
    return losses, {name: p.detach().clone() for name, p in model.named_parameters()}


def _run_workers(tmp_path) -> list[dict]:
    """Runs the ranks as two fresh interpreters; a failure or hang fails the test with their logs."""
    import torch.distributed as dist

    # The rendezvous store lives here, on a port the OS picks: no race for a "free" port.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    logs = [tmp_path / f"rank{rank}.log" for rank in range(WORLD_SIZE)]
    procs, codes = [], []
    try:
        for rank in range(WORLD_SIZE):
            with open(logs[rank], "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, os.path.abspath(__file__), str(rank), str(store.port), str(tmp_path)],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                ))
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for proc in procs:  # nothing outlives the test
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        del store
    if any(code != 0 for code in codes):
        report = [
            f"--- rank {rank} ({f'killed after {TIMEOUT_S} s' if code is None else f'exit code {code}'}):\n"
            + logs[rank].read_text()
            for rank, code in enumerate(codes)
        ]
        pytest.fail("distributed workers failed:\n" + "\n".join(report), pytrace=False)
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


def test_ddp_matches_single_process_replay(tmp_path, threads):
    results = _run_workers(tmp_path)

    # DDP keeps the replicas identical, and the ranks really did see different data and randomness.
    for name, p in results[0]["params"].items():
        assert torch.equal(p, results[1]["params"][name]), f"ranks disagree on {name}"
    assert not torch.equal(results[0]["losses"], results[1]["losses"])

    torch.set_num_threads(1)  # as in the workers: GEMM results can depend on the thread count
    with torch.random.fork_rng():  # the replay seeds torch's generator; leave other tests' stream alone
        losses, params = _replay(SEEDS)
        other_losses, other_params = _replay((SEEDS[0], SEEDS[1] + 1))  # another seed on rank 1
        initial = dict(_make_model().named_parameters())
    for rank in range(WORLD_SIZE):
        assert torch.equal(losses[rank], results[rank]["losses"]), (
            f"rank {rank} losses: replay {losses[rank].tolist()} vs DDP {results[rank]['losses'].tolist()}"
        )
    assert params.keys() == results[0]["params"].keys()
    for name, p in params.items():
        assert torch.equal(p, results[0]["params"][name]), (
            f"{name}: max |replay - DDP| = {(p - results[0]['params'][name]).abs().max().item():.3g}"
        )
    # The trained weights moved away from the initial ones (the comparison is not of untouched copies).
    assert all(not torch.equal(p, initial[name]) for name, p in params.items())

    # The comparison sees the per-rank randomness: the same replay with another seed on rank 1
    # (rank 1 draws other masks and noise) no longer matches the distributed run.
    assert torch.equal(other_losses[0, 0], results[0]["losses"][0])  # rank 0's first step is unaffected
    assert not torch.equal(other_losses[1], results[1]["losses"])
    assert any(not torch.equal(p, results[0]["params"][name]) for name, p in other_params.items())


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
