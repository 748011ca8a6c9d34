"""Repeated calls leave memory flat: no op or module leaks per call.

For every operator family (the RNG ops, mc_dropout_linear, concrete_dropout, lrt_linear,
sparse_vd_kl, sparse_linear deterministic and stochastic) on the C++ CPU kernels and on the CUDA
kernel sources under the SIMT emulator, and for the nn modules (a training step or an MC prediction
per call), a warm-up runs, memory is measured (after ``gc.collect()``), many more forward +
backward calls run and memory is measured again. The growth of the resident set size
(``/proc/self/statm``), of the bytes malloc has handed out and, on cpu, of Python's allocated
blocks must stay below small bounds. Each call draws a new ``rng_state`` and new inputs, as real
use does, and keeps nothing.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

import pytest
import torch
from torch import nn

import bdlkern
from conftest import require_backend

KiB, MiB = 1 << 10, 1 << 20

# Calls before the first measurement (allocator pools, glibc arenas and thread-stack caches, the
# dispatcher's and autograd's lazily built tables reach their steady state), then calls measured.
# A CPU kernel call takes well under a millisecond; the SIMT emulator starts a host thread per CUDA
# thread (256 per launch: tens of milliseconds a launch on the loaded 2-core machine, 1-5 launches
# per forward + backward), so it runs fewer calls, on tiny (one-block) problems, and relies on the
# byte-exact heap count for its sensitivity.
WARMUP = {"cpu": 500, "simt": 5}
CALLS = {"cpu": 1000, "simt": 40}

# The bounds, and why:
# * RSS: without a leak these loops move it by 0-60 KiB (glibc keeps freed chunks, thread stacks
#   are cached). 1 MiB: 1000 cpu calls that each leak >= 1 KiB exceed it, e.g. any one of the
#   >= 32 x 32 float tensors (4 KiB) a cpu call makes; so does a per-launch leak of the emulator's
#   threads (stack and TLS pages, >= 8 KiB a thread, 256 threads a launch).
# * bytes in use by malloc (glibc's mallinfo2 over every arena, mmapped chunks included): exact,
#   so it sees leaks far below a page. Without a leak it moves by at most ~4 KiB (measured).
#   64 KiB over 1000 cpu calls catches >= 64 bytes a call; 12 KiB over 40 simt calls catches
#   >= 300 bytes a call, less than one leaked tensor (TensorImpl + StorageImpl, ~400 bytes, before
#   any data).
# * Python blocks in use (sys.getallocatedblocks, cpu only): 0-120 without a leak (free lists,
#   interned names); 500 over 1000 calls catches one leaked Python object every other call. The
#   Python layer (autograd wrappers, modules, sampling) is the same code for both backends.
# * warm-up: 500 cpu calls. A sampling block pushes a TorchFunctionMode (the sample tracker), and
#   torch's handling of calls under a Python mode fills caches over the first few hundred blocks
#   (measured: ~300 blocks in calls 200-1200, ~60 in the next 3000, ~20 in the 6000 after: it
#   levels off, a leak would not); 100 warm-up calls left a module case at 508.
RSS_BOUND = 1 * MiB
HEAP_BOUND = {"cpu": 64 * KiB, "simt": 12 * KiB}
PY_BLOCKS_BOUND = 500


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


_mallinfo2 = getattr(ctypes.CDLL(None), "mallinfo2", None)  # glibc >= 2.33
if _mallinfo2 is not None:
    _mallinfo2.restype = _MallInfo2


class _Usage:
    """One measurement: RSS bytes, malloc'd bytes in use, Python blocks in use."""

    def __init__(self):
        gc.collect()
        with open("/proc/self/statm") as f:
            self.rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        info = _mallinfo2()
        self.heap = info.uordblks + info.hblkhd
        self.py_blocks = sys.getallocatedblocks()


def test_memory_probes_see_an_allocation():
    """The probes work here (glibc's mallinfo2 exists) and see a 64 MiB tensor, and its release."""
    assert _mallinfo2 is not None, "glibc's mallinfo2 is missing"
    before = _Usage()
    block = torch.ones(16 << 20)  # 64 MiB, written: above glibc's largest mmap threshold, so fresh pages
    during = _Usage()
    # 63, not 64: whatever else the process frees meanwhile (gc, caches) counts against it
    assert during.rss - before.rss >= 60 * MiB and during.heap - before.heap >= 63 * MiB
    del block
    assert _Usage().heap - before.heap < 64 * KiB


def _check_flat(step, backend: str, what: str) -> None:
    for i in range(WARMUP[backend]):
        step(i)
    before = _Usage()
    for i in range(CALLS[backend]):
        step(WARMUP[backend] + i)
    after = _Usage()
    rss, heap, blocks = after.rss - before.rss, after.heap - before.heap, after.py_blocks - before.py_blocks
    where = f"{what} on {backend}, {CALLS[backend]} calls"
    assert rss < RSS_BOUND, f"{where}: RSS grew by {rss / MiB:.2f} MiB"
    assert heap < HEAP_BOUND[backend], f"{where}: malloc'd bytes in use grew by {heap} ({heap / CALLS[backend]:.0f} a call)"
    if backend == "cpu":
        assert blocks < PY_BLOCKS_BOUND, f"{where}: {blocks} more Python memory blocks in use"


def _state(i: int) -> torch.Tensor:
    return torch.tensor([0x5EED + i, i % 3], dtype=torch.int64)


def _leaf(*shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape) * scale + shift).requires_grad_()


# ---- per-op steps: forward and backward through the op's registered autograd -----------------------
def _size(backend):
    """cpu: tensors of >= 32 x 32 floats (RSS_BOUND); simt: tiny, so a launch is one block."""
    return {"cpu": 32, "simt": 16}[backend]


def _rng_step(name):
    def make(ops, n):
        numel = n * n * 2

        def step(i):
            st = _state(i)
            if name == "philox_bits":
                out = ops.philox_bits(st, [numel], 1)
            elif name == "dropout_mask":
                out = ops.dropout_mask(st, [numel], 0.3, 1)
            elif name == "uniform":
                out = ops.uniform(st, [numel], 2, None)
            else:
                out = ops.normal(st, [numel], 3, torch.float64)
            assert out.numel() == numel

        return step

    return make


def _mc_dropout_step(ops, n):
    w, b = _leaf(n, n), _leaf(n)

    def step(i):  # both input layouts ([B, K] shared by the samples, [S, B, K]) x both mask layouts
        x = _leaf(n, n) if i % 4 < 2 else _leaf(2, n, n)
        y = ops.mc_dropout_linear(x, w, b, _state(i), 0.3, 2, i % 2 == 0)
        y.square().sum().backward()
        assert x.grad is not None
        w.grad = b.grad = None

    return step


def _concrete_step(ops, n):
    p_logit = torch.full((n,), -1.0, requires_grad=True)

    def step(i):  # a rate per feature of the last dim, or per channel of [N, C, H, W] (spatial)
        x, channel_dim = (_leaf(2 * n, n), -1) if i % 2 else (_leaf(2, n, 4, 4), 1)
        ops.concrete_dropout(x, p_logit, _state(i), 0.1, channel_dim).square().sum().backward()
        assert x.grad is not None and p_logit.grad is not None
        p_logit.grad = None

    return step


def _lrt_step(ops, n):
    theta, log_sigma2, b = _leaf(n, n), _leaf(n, n, shift=-3.0), _leaf(n)

    def step(i):
        x = _leaf(n, n) if i % 2 else _leaf(2, n, n)
        y, std = ops.lrt_linear(x, theta, log_sigma2, b, _state(i), 2)
        y.square().sum().backward()
        assert theta.grad is not None
        theta.grad = log_sigma2.grad = b.grad = None

    return step


def _kl_step(ops, n):
    def step(i):
        theta, log_sigma2 = _leaf(2 * n, n), _leaf(2 * n, n, shift=-2.0)
        ops.sparse_vd_kl(theta, log_sigma2).backward()
        assert theta.grad is not None and log_sigma2.grad is not None

    return step


def _csr(n):
    layer = bdlkern.nn.SparseVDLinear(n, n)
    with torch.no_grad():  # about 60% of the weights kept
        layer.log_sigma2.copy_(torch.log(layer.theta**2) + torch.randn(n, n) * 3 + 2)
    sparse = layer.to_sparse()
    return sparse.crow, sparse.col, sparse.values, sparse.bias, sparse.row_order


def _sparse_step(ops, n):
    crow, col, values, bias, order = _csr(n)
    theta = values[:, 0].contiguous()

    def step(i):
        x = _leaf(2 * n, n)
        ops.sparse_linear(x, crow, col, theta, bias, order).square().sum().backward()
        assert x.grad is not None

    return step


def _sparse_lrt_step(ops, n):
    crow, col, values, bias, order = _csr(n)

    def step(i):
        x = _leaf(n, n) if i % 2 else _leaf(2, n, n)
        y, std = ops.sparse_linear_lrt(x, crow, col, values, bias, order, _state(i), 2)
        y.square().sum().backward()
        assert x.grad is not None

    return step


def _mc_dropout_conv_step(ops, n):
    w, b = _leaf(8, 4, 3, 3), _leaf(8)

    def step(i):  # both input layouts x element / channel masks x shared or not
        shared_input, channel, shared_mask = i % 2 == 0, i % 4 < 2, i % 3 == 0
        x = _leaf(2, 4, n // 4, n // 4) if shared_input else _leaf(4, 4, n // 4, n // 4)
        # Shared channel masks convolve each sample's kept channels: a new kept count is a new
        # convolution shape, which oneDNN caches once. Two states keep the shapes to a warm set.
        state = _state(i % 2) if channel and shared_mask else _state(i)
        y = ops.mc_dropout_conv(x, w, b, state, 0.3, 2, shared_input, [1, 1], [1, 1], [1, 1], 1, channel, shared_mask)
        y.square().sum().backward()
        assert x.grad is not None and w.grad is not None
        w.grad = b.grad = None

    return step


def _lrt_conv_step(ops, n):
    theta, log_sigma2, b = _leaf(8, 4, 3, 3), _leaf(8, 4, 3, 3, shift=-3.0), _leaf(8)

    def step(i):
        shared_input = i % 2 == 0
        x = _leaf(2, 4, n // 4, n // 4) if shared_input else _leaf(4, 4, n // 4, n // 4)
        y, std = ops.lrt_conv(x, theta, log_sigma2, b, _state(i), 2, shared_input, [1, 1], [1, 1], [1, 1], 1)
        y.square().sum().backward()
        assert theta.grad is not None and x.grad is not None
        theta.grad = log_sigma2.grad = b.grad = None

    return step


def _sparse_conv_csr():
    layer = bdlkern.nn.SparseVDConv2d(4, 8, 3, padding=1)
    with torch.no_grad():  # about 60% of the weights kept
        layer.log_sigma2.copy_(torch.log(layer.theta**2) + torch.randn_like(layer.theta) * 3 + 2)
    sparse = layer.to_sparse()
    return sparse.crow, sparse.col, sparse.values, sparse.bias


def _sparse_conv_step(ops, n):
    crow, col, values, bias = _sparse_conv_csr()
    theta = values[:, 0].contiguous()

    def step(i):  # stride 1 (padded planes) and 2 (rows)
        stride = 1 + i % 2
        x = _leaf(2, 4, n // 4, n // 4)
        ops.sparse_conv(x, crow, col, theta, bias, [3, 3], [stride, stride], [1, 1], [1, 1], 1).square().sum().backward()
        assert x.grad is not None

    return step


def _sparse_conv_lrt_step(ops, n):
    crow, col, values, bias = _sparse_conv_csr()

    def step(i):
        shared_input = i % 2 == 0
        x = _leaf(2, 4, n // 4, n // 4) if shared_input else _leaf(4, 4, n // 4, n // 4)
        y, std = ops.sparse_conv_lrt(x, crow, col, values, bias, _state(i), 2, shared_input, [3, 3], [1, 1], [1, 1], [1, 1], 1)
        y.square().sum().backward()
        assert x.grad is not None

    return step


OP_STEPS = {
    "philox_bits": _rng_step("philox_bits"),
    "dropout_mask": _rng_step("dropout_mask"),
    "uniform": _rng_step("uniform"),
    "normal": _rng_step("normal"),
    "mc_dropout_linear": _mc_dropout_step,
    "concrete_dropout": _concrete_step,
    "lrt_linear": _lrt_step,
    "sparse_vd_kl": _kl_step,
    "sparse_linear": _sparse_step,
    "sparse_linear_stochastic": _sparse_lrt_step,
    "mc_dropout_conv": _mc_dropout_conv_step,
    "lrt_conv": _lrt_conv_step,
    "sparse_conv": _sparse_conv_step,
    "sparse_conv_stochastic": _sparse_conv_lrt_step,
}


@pytest.mark.parametrize("op", list(OP_STEPS))
@pytest.mark.parametrize("name", ["cpu", "simt"])
def test_op_calls_keep_memory_flat(name, op, threads):
    torch.set_num_threads(1)  # one pool thread: the CPU kernels' OpenMP team stays as it is
    backend = require_backend(name)
    torch.manual_seed(0)
    step = OP_STEPS[op](backend.ops, _size(name))
    _check_flat(step, name, op)


# ---- nn modules: per call a training step (forward, loss + regulariser, backward, SGD step) or an ----
# ---- MC prediction in a seeded sampling block, differentiated w.r.t. its input ---------------------
def _module_cases():
    def concrete2d():
        return nn.Sequential(bdlkern.nn.ConcreteDropout2d(nn.Conv2d(4, 8, 3, padding=1)), nn.Flatten(-3), nn.Linear(8 * 8 * 8, 32))

    def sparse_linear():
        layer = bdlkern.nn.SparseVDLinear(32, 32)
        with torch.no_grad():  # ~15% of the weights kept: below the dense crossover, the CSR kernel runs
            layer.log_sigma2.copy_(torch.log(layer.theta**2) + torch.randn(32, 32) * 3 + 6)
        sparse = layer.to_sparse()
        assert sparse.density < sparse.crossover_density(32)
        return nn.Sequential(nn.Linear(32, 32), sparse)

    def conv_net(first):
        return lambda: nn.Sequential(first(), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 16))

    def sparse_conv():
        layer = bdlkern.nn.SparseVDConv2d(4, 8, 3, padding=1)
        with torch.no_grad():  # ~15% of the weights kept: below the dense crossover, the CSR kernel runs
            layer.log_sigma2.copy_(torch.log(layer.theta**2) + torch.randn_like(layer.theta) * 3 + 6)
        sparse = layer.to_sparse()
        assert sparse.density < sparse.crossover_density
        return nn.Sequential(nn.Conv2d(4, 4, 1), sparse, nn.Flatten(), nn.Linear(8 * 8 * 8, 16))

    return {
        "MCDropoutConv2d": (conv_net(lambda: bdlkern.nn.MCDropoutConv2d(4, 8, 3, padding=1, p=0.3, mask="channel")), (4, 4, 8, 8)),
        "SparseVDConv2d": (conv_net(lambda: bdlkern.nn.SparseVDConv2d(4, 8, 3, padding=1)), (4, 4, 8, 8)),
        "SparseConv2d": (sparse_conv, (4, 4, 8, 8)),
        "MCDropoutLinear": (lambda: bdlkern.nn.MCDropoutLinear(32, 32, p=0.3), (32, 32)),
        "ConcreteDropoutLinear": (lambda: bdlkern.nn.ConcreteDropoutLinear(32, 32, per_feature=True), (32, 32)),
        "ConcreteDropout": (lambda: bdlkern.nn.ConcreteDropout(nn.Linear(32, 32)), (32, 32)),
        "ConcreteDropout2d": (concrete2d, (4, 4, 8, 8)),
        "SparseVDLinear": (lambda: bdlkern.nn.SparseVDLinear(32, 32), (32, 32)),
        "SparseLinear": (sparse_linear, (32, 32)),
    }


MODULES = _module_cases()


@pytest.mark.parametrize("kind", list(MODULES))
def test_module_steps_keep_memory_flat(kind, threads):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    make, x_shape = MODULES[kind]
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(i):
        x = torch.randn(*x_shape)
        if i % 2:  # a training step
            model.train()
            loss = model(x).square().mean() + bdlkern.nn.regularization(model) * 1e-3
        else:  # an MC prediction (seeded sampling block), differentiated w.r.t. its input
            model.eval()
            x.requires_grad_()
            with bdlkern.sampling(2, seed=i):
                loss = model(x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    _check_flat(step, "cpu", f"{kind} training / sampling steps")
