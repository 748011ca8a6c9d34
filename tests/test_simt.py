"""The SIMT emulator itself (csrc/include/bdlkern/common/simt.h), through the self-test kernels of
csrc/testing/selftest.cu. Each test builds the expected result in NumPy from CUDA's documented
semantics. The same kernels run on a GPU when one is present (the ``cuda`` backend), which checks
that emulator and hardware agree."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import Backend

ops = torch.ops.bdlkern_simt


def _tensor(backend: Backend, array, dtype=None) -> torch.Tensor:
    return torch.as_tensor(array, dtype=dtype).to(backend.device)


# ---- grids, blocks and the built-in index variables --------------------------------------------
@pytest.mark.parametrize(
    "grid,block",
    [((1, 1, 1), (1, 1, 1)), ((3, 1, 1), (64, 1, 1)), ((2, 3, 1), (4, 2, 3)), ((1, 2, 2), (5, 3, 2)), ((2, 1, 3), (33, 1, 1))],
)
def test_indices(device_backend, grid, block):
    out = ops.selftest_indices(torch.empty(0, device=device_backend.device), list(grid), list(block)).cpu().numpy()
    threads = int(np.prod(block))
    expected = np.empty_like(out)
    for bz, by, bx in itertools.product(range(grid[2]), range(grid[1]), range(grid[0])):
        block_linear = bx + grid[0] * (by + grid[1] * bz)
        for tz, ty, tx in itertools.product(range(block[2]), range(block[1]), range(block[0])):
            tid = tx + block[0] * (ty + block[1] * tz)
            expected[block_linear * threads + tid] = [bx, by, bz, tx, ty, tz, *block, *grid]
    np.testing.assert_array_equal(out, expected)


def test_launch_rejects_bad_block():
    like = torch.empty(0)
    with pytest.raises(ValueError, match=r"block size 2048 outside \[1, 1024\]"):
        ops.selftest_indices(like, [1, 1, 1], [1024, 2, 1])


@pytest.mark.parametrize(
    "grid,block,match",
    [
        ((1, 65536, 1), (1, 1, 1), r"grid \(1, 65536, 1\) exceeds CUDA's limits"),
        ((1, 1, 65536), (1, 1, 1), r"grid \(1, 1, 65536\) exceeds CUDA's limits"),
        ((1, 1, 1), (1, 1, 65), r"block \(1, 1, 65\) exceeds CUDA's limits"),
    ],
)
def test_launch_rejects_what_a_gpu_rejects(grid, block, match):
    """The emulator enforces CUDA's grid and block limits (issue 18 section 4): a launch a GPU would
    refuse fails here too, so a kernel that puts a large dimension on gridDim.y cannot pass under SIMT.
    The largest legal grids on y and z still run."""
    like = torch.empty(0)
    with pytest.raises(ValueError, match=match):
        ops.selftest_indices(like, list(grid), list(block))
    assert ops.selftest_indices(like, [1, 65535, 1], [1, 1, 1]).shape[0] == 65535
    assert ops.selftest_indices(like, [1, 1, 2], [1, 1, 64]).shape[0] == 128


@pytest.mark.parametrize("mode,threads", [(0, 64), (1, 64), (0, 33)])
def test_a_barrier_not_reached_by_every_thread_aborts_naming_both_sites(mode, threads):
    """A __syncthreads that some thread of the block skips by exiting (mode 0) or that the block's
    halves reach at two different call sites (mode 1) is undefined on a GPU (a hang, or threads
    released early); the emulator aborts at once with the two sites (issue 18 section 4), instead of
    the 120 s deadlock timeout or a silent early release at the end of the block. In a child process,
    since it aborts."""
    code = (
        "import torch, bdlkern; from bdlkern.testing import simt; simt.load(); "
        f"torch.ops.bdlkern_simt.selftest_bad_barrier(torch.empty(0), {mode}, {threads})"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "divergent barrier" in result.stderr, result.stderr
    assert "__syncthreads at " in result.stderr and ("end of block" in result.stderr) == (mode == 0)


def test_shared_memory_is_poisoned_at_every_block_start():
    """Static __shared__ arrays are filled with 0xff bytes before each block (issue 18 section 4):
    a kernel that reads shared memory it has not written reads the poison, not the zeros of a
    static's initialisation, nor what an earlier block (here 42 + t) or launch left. On a GPU such a
    read is undefined; under the emulator it is garbage every time, so a test catches it."""
    like = torch.empty(0)
    for _ in range(2):  # a second launch sees no trace of the first
        out = ops.selftest_shared_poison(like, 3)
        assert out.shape == (3, 4)
        assert (out == -1).all(), out  # 0xffffffff as int32


def test_static_shared_memory_over_48_kib_is_refused():
    """A kernel whose static shared arrays total more than 48 KiB per block is a ptxas error for a
    GPU; the emulator keeps a per-kernel tally of BDL_SHARED arrays and refuses it too (issue 18
    section 4), while the largest real kernel (the WMMA GEMM's 36 KiB) runs."""
    with pytest.raises(ValueError, match="49152"):
        ops.selftest_big_shared(torch.empty(0))


def test_launch_must_be_on_the_current_stream():
    """Every emulated launch is checked against the emulated current stream (issue 18 section 4): a
    kernel launched on the legacy default stream (nullptr), which on a GPU would run out of order
    with the caller's work on the current stream, fails under the emulator."""
    like = torch.empty(0)
    with pytest.raises(ValueError, match="stream other than the current one"):
        ops.selftest_indices(like, [1, 1, 1], [2, 1, 1], True)
    assert ops.selftest_indices(like, [1, 1, 1], [2, 1, 1], False).shape[0] == 2


# ---- static __shared__ and __syncthreads --------------------------------------------------------
def _tree_sum(chunk: np.ndarray) -> np.float32:
    t = chunk.astype(np.float32).copy()
    s = len(t) // 2
    while s > 0:
        t[:s] = t[:s] + t[s : 2 * s]
        s //= 2
    return t[0]


@pytest.mark.parametrize("n", [1, 255, 256, 1000])
def test_shared_memory_and_syncthreads(device_backend, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    sums, reversed_ = ops.selftest_block_sum(_tensor(device_backend, x))
    blocks = -(-n // 256)
    padded = np.zeros(blocks * 256, dtype=np.float32)
    padded[:n] = x
    tiles = padded.reshape(blocks, 256)
    # Tree order is fixed, so the float sums must match bit for bit.
    np.testing.assert_array_equal(sums.cpu().numpy(), np.array([_tree_sum(t) for t in tiles]))
    np.testing.assert_array_equal(reversed_.cpu().numpy(), tiles[:, ::-1].reshape(-1)[:n])


# ---- warp shuffles and __syncwarp -----------------------------------------------------------------
def _shuffle_reference(x: np.ndarray, threads: int) -> np.ndarray:
    n = len(x)
    blocks = -(-n // threads)
    v = np.zeros(blocks * threads, dtype=np.float32)
    v[:n] = x
    warps = v.reshape(-1, 32)
    out = np.zeros((warps.shape[0], 32, 6), dtype=np.float32)
    lanes = np.arange(32)
    for w, vals in enumerate(warps):
        butterfly = vals.copy()
        for m in (16, 8, 4, 2, 1):
            butterfly = butterfly + butterfly[lanes ^ m]
        down = vals.copy()
        for d in (16, 8, 4, 2, 1):
            src = lanes + d
            down = down + np.where(src < 32, down[np.minimum(src, 31)], down)
        butterfly8 = vals.copy()
        for m in (4, 2, 1):
            butterfly8 = butterfly8 + butterfly8[lanes ^ m]
        within = (lanes % 8) + 1 < 8
        down8 = np.where(within, vals[np.minimum(lanes + 1, 31)], vals)
        out[w, :, 0] = butterfly
        out[w, :, 1] = down
        out[w, :, 2] = vals[3]
        out[w, :, 3] = butterfly8
        out[w, :, 4] = down8
        out[w, :, 5] = vals[31 - lanes]
    return out.reshape(-1, 6)[:n]


@pytest.mark.parametrize("threads,n", [(32, 32), (64, 200), (96, 96), (256, 1000)])
def test_warp_shuffles(device_backend, threads, n):
    # Small integers: every partial sum is exact, so any order gives the same floats.
    x = np.random.default_rng(threads).integers(-100, 100, n).astype(np.float32)
    out = ops.selftest_shuffle(_tensor(device_backend, x), threads).cpu().numpy()
    np.testing.assert_array_equal(out, _shuffle_reference(x, threads))


# ---- atomics -------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,blocks,threads", [(1, 1, 1), (10_000, 3, 128), (4097, 2, 1024)])
def test_atomic_add(device_backend, n, blocks, threads):
    rng = np.random.default_rng(n)
    x = rng.integers(-50, 50, n).astype(np.float32)
    xd = rng.standard_normal(n)
    out = ops.selftest_atomic_add(_tensor(device_backend, x), _tensor(device_backend, xd), blocks, threads).numpy()
    assert out[0] == x.sum()  # integer-valued: exact in any order
    assert out[1] == pytest.approx(xd.sum(), rel=1e-12, abs=1e-12)
    assert out[2] == n and out[3] == n
    assert out[4] == n * (n - 1) // 2


# ---- nvcuda::wmma --------------------------------------------------------------------------------
def _tile_memory(tile: torch.Tensor, col_major: bool, ld: int) -> torch.Tensor:
    """Lay a 16x16 tile out in memory as WMMA reads it: [16, ld] rows (or columns) with padding."""
    mem = torch.full((16, ld), 7.0, dtype=tile.dtype)  # padding must never be read
    mem[:, :16] = tile.T if col_major else tile
    return mem


WMMA_TYPES = [(torch.float16, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("in_dtype,acc_dtype", WMMA_TYPES)
@pytest.mark.parametrize("a_col,b_col", list(itertools.product([False, True], repeat=2)))
@pytest.mark.parametrize("c_mode", ["row", "col", "fill"])
@pytest.mark.parametrize("d_col", [False, True])
def test_wmma_mma(device_backend, in_dtype, acc_dtype, a_col, b_col, c_mode, d_col):
    g = torch.Generator().manual_seed(hash((in_dtype, acc_dtype, a_col, b_col, c_mode, d_col)) % 2**31)
    a = torch.randn(16, 16, generator=g).to(in_dtype)
    b = torch.randn(16, 16, generator=g).to(in_dtype)
    c = torch.randn(16, 16, generator=g).to(acc_dtype)
    lda, ldb = (16, 24) if a_col else (24, 16)
    a_mem = _tile_memory(a, a_col, lda).to(device_backend.device)
    b_mem = _tile_memory(b, b_col, ldb).to(device_backend.device)
    fill = 0.75
    if c_mode == "fill":
        c_arg, c_col, c_used = None, False, torch.full((16, 16), fill, dtype=acc_dtype)
    else:
        c_col = c_mode == "col"
        c_arg, c_used = _tile_memory(c, c_col, 16).to(device_backend.device), c
    d = ops.selftest_wmma(a_mem, a_col, b_mem, b_col, c_arg, c_col, fill, acc_dtype, d_col).cpu()
    if d_col:
        d = d.T
    expected = a.double() @ b.double() + c_used.double()
    # Products of half/bf16 values are exact in float; the float sum then rounds to acc_dtype.
    tol = {torch.float32: 1e-5, torch.float16: 2e-3}[acc_dtype]
    torch.testing.assert_close(d.double(), expected, rtol=tol, atol=tol * 4)
    assert d.dtype == acc_dtype
