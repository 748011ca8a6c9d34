"""The Philox RNG core: known answers, the logical-stream contract, conversions, determinism,
operator registration and bad input (docs/design.md section 2, issue 2)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.library import opcheck

import bdlkern
from bdlkern.testing import reference as ref

# Random123 known-answer vectors for Philox4x32-10: (counter, key) -> output.
KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    (
        [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344],
        [0xA4093822, 0x299F31D0],
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1],
    ),
]

# Contract vectors of the logical stream (docs/design.md section 2.5): (seed, offset, stream) ->
# first 8 words.
CONTRACT = [
    ((0, 0), 0, "6627e8d5 e169c58d bc57ac4c 9b00dbd8 f8e4cca4 5cb200db b1a574eb 097eff67"),
    ((0x0123456789ABCDEF, 5), 1, "22252b2a dcea3022 86f0ceb0 d1cdb8d1 36a9b705 57a35841 77c50247 a49265f3"),
    ((42, 2**32 - 1), 2, "c2cc56c6 8c2981bf eb48860d 57ce8e18 37e0f5a2 291c60e3 3cfecf69 b640ab01"),
]

ODD_SHAPES = [[0], [1], [3], [5], [7, 3], [2, 3, 5], [1031], [4099, 1]]


def u32(t: torch.Tensor) -> np.ndarray:
    """int32 words -> uint32 NumPy array."""
    return t.detach().cpu().numpy().astype(np.uint32)


def state(backend, seed: int, offset: int) -> torch.Tensor:
    """An rng_state tensor; seeds/offsets given as unsigned 64-bit values."""
    to_i64 = lambda v: v - 2**64 if v >= 2**63 else v  # noqa: E731
    return backend.tensor([to_i64(seed), to_i64(offset)], dtype=torch.int64)


# ---- known answers -------------------------------------------------------------------------------
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    assert ref.philox4x32_10(counter, key).tolist() == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_kernel_philox_known_answers(backend, counter, key, expected):
    out = backend.ops.philox4x32(
        backend.tensor([counter], dtype=torch.int64), backend.tensor([key], dtype=torch.int64)
    )
    assert out.cpu().tolist() == [expected]


def test_kernel_philox_matches_reference_on_random_inputs(backend):
    g = torch.Generator().manual_seed(1)
    counter = torch.randint(0, 2**32, (257, 4), generator=g, dtype=torch.int64)
    key = torch.randint(0, 2**32, (257, 2), generator=g, dtype=torch.int64)
    out = backend.ops.philox4x32(counter.to(backend.device), key.to(backend.device)).cpu()
    expected = ref.philox4x32_10(counter.numpy(), key.numpy()).astype(np.int64)
    np.testing.assert_array_equal(out.numpy(), expected)


@pytest.mark.parametrize("seed_offset,stream,expected", CONTRACT)
def test_stream_contract_vectors(backend, seed_offset, stream, expected):
    words = backend.ops.philox_bits(state(backend, *seed_offset), [8], stream)
    assert " ".join(f"{w:08x}" for w in u32(words)) == expected
    assert " ".join(f"{w:08x}" for w in ref.stream_words(seed_offset, 8, stream)) == expected


# ---- the logical stream --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize(
    "seed,offset", [(0, 0), (0xDEADBEEFCAFEF00D, 123), (7, 2**32 - 2), (9, 2**64 - 3), (2**63 + 5, 2**63 - 1)]
)
def test_philox_bits_matches_reference(backend, shape, seed, offset):
    stream = 3
    out = backend.ops.philox_bits(state(backend, seed, offset), shape, stream)
    assert out.dtype == torch.int32 and list(out.shape) == shape and out.device == backend.device
    expected = ref.stream_words((seed, offset), math.prod(shape), stream)
    np.testing.assert_array_equal(u32(out).reshape(-1), expected)


def test_streams_and_offsets_are_distinct_and_consistent(backend):
    s0 = backend.ops.philox_bits(state(backend, 5, 0), [64], 0)
    s1 = backend.ops.philox_bits(state(backend, 5, 0), [64], 1)
    assert not torch.equal(s0, s1)
    # Advancing the offset by k blocks shifts the stream by 4k elements.
    shifted = backend.ops.philox_bits(state(backend, 5, 3), [52], 0)
    assert torch.equal(shifted, s0[12:])


@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_cpu_and_simt_agree(shape):
    simt = torch.ops.bdlkern_simt
    cpu = torch.ops.bdlkern
    rs = torch.tensor([0x1234567, 99], dtype=torch.int64)
    assert torch.equal(cpu.philox_bits(rs, shape, 4), simt.philox_bits(rs, shape, 4))
    assert torch.equal(cpu.dropout_mask(rs, shape, 0.3, 1), simt.dropout_mask(rs, shape, 0.3, 1))
    for dtype in (torch.float32, torch.float64):
        assert torch.equal(cpu.uniform(rs, shape, 2, dtype), simt.uniform(rs, shape, 2, dtype))
        # Same libm on both sides; a tolerance keeps the test honest about FMA contraction.
        torch.testing.assert_close(
            cpu.normal(rs, shape, 2, dtype), simt.normal(rs, shape, 2, dtype), rtol=1e-6, atol=1e-6
        )


def test_float32_normals_do_not_depend_on_where_a_call_starts_or_ends():
    """A float32 normal's bits are a function of its stream element alone: the CPU Box-Muller runs
    whole vectors and a zero-padded tail through the same code. Rows of 7 outputs start and end
    inside Philox blocks and vectors, so the stochastic sparse layer's noise rows (all weights
    zero: y = sqrt(1e-8) * eps exactly) must match one long `normal` call bit for bit."""
    S, B, N, K = 3, 5, 7, 4
    crow = torch.arange(0, 2 * N + 1, 2)
    col = torch.tensor([0, 2] * N)
    values = torch.zeros(2 * N, 2)
    rs = torch.tensor([77, 3])
    y = bdlkern.ops.sparse_linear(torch.randn(B, K), crow, col, values, num_samples=S, stochastic=True, rng_state=rs)
    eps = bdlkern.ops.normal([S, B, N], rng_state=rs, stream="sparse_lrt")
    std = torch.tensor(1e-8).double().sqrt().float()  # correctly rounded, like sqrtf (torch.sqrt is not)
    assert torch.equal(y, std * eps)
    # and a stream that starts k blocks later is the same normals 4k elements on
    full = bdlkern.ops.normal([2000], rng_state=rs, stream=1)
    for k in (1, 5, 301):
        assert torch.equal(bdlkern.ops.normal([333], rng_state=torch.tensor([77, 3 + k]), stream=1), full[4 * k : 4 * k + 333])


@pytest.mark.parametrize("op", ["philox_bits", "dropout_mask", "uniform", "normal"])
def test_deterministic_across_thread_counts(threads, op):
    rs = torch.tensor([2024, 7], dtype=torch.int64)
    shape = [300_001]  # many parallel chunks
    args = {
        "philox_bits": (rs, shape, 0),
        "dropout_mask": (rs, shape, 0.25, 0),
        "uniform": (rs, shape, 0, torch.float32),
        "normal": (rs, shape, 0, torch.float64),
    }[op]
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        results.append(getattr(torch.ops.bdlkern, op)(*args))
        results.append(getattr(torch.ops.bdlkern, op)(*args))  # and run to run
    for r in results[1:]:
        assert torch.equal(r, results[0])


@pytest.mark.parametrize("path", ["scalar", "avx2"])
def test_cpu_simd_paths_give_identical_bits(path):
    """BDLKERN_CPU_SIMD narrows the run-time choice; every path must produce the same stream."""
    code = (
        "import torch, bdlkern, hashlib;"
        "rs = torch.tensor([31337, 2**32 - 5]);"
        "w = torch.ops.bdlkern.philox_bits(rs, [100_003], 2);"
        "print(hashlib.sha256(w.numpy().tobytes()).hexdigest())"
    )
    digests = {}
    for name in ("default", path):
        env = dict(os.environ)
        if name != "default":
            env["BDLKERN_CPU_SIMD"] = name
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests[name] = out.stdout.strip()
    expected = ref.stream_words((31337, 2**32 - 5), 100_003, 2).astype(np.int32)
    import hashlib

    assert digests["default"] == digests[path] == hashlib.sha256(expected.tobytes()).hexdigest()


# ---- dropout masks -------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.5, 0.9, 1.0 - 1e-9, 1.0])
def test_dropout_mask_matches_reference(backend, p):
    rs = state(backend, 77, 11)
    mask = backend.ops.dropout_mask(rs, [37, 29], p, 0)
    assert mask.dtype == torch.bool and mask.device == backend.device
    assert torch.equal(mask.cpu(), ref.dropout_mask((77, 11), [37, 29], p, 0))


def test_dropout_mask_extremes(backend):
    rs = state(backend, 3, 0)
    assert bool(backend.ops.dropout_mask(rs, [100_000], 0.0, 0).all())
    assert not bool(backend.ops.dropout_mask(rs, [100_000], 1.0, 0).any())


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_dropout_keep_fraction(p):
    n = 1 << 20
    mask = bdlkern.ops.dropout_mask(n, p, rng_state=torch.tensor([11, 0]))
    keep = 1.0 - p
    sigma = math.sqrt(keep * p / n)
    assert abs(mask.double().mean().item() - keep) < 4 * sigma


def test_dropout_mask_words_and_threshold_rule():
    rs = torch.tensor([5, 5])
    words = u32(bdlkern.ops.philox_bits([1000], rng_state=rs)).astype(np.uint64)
    mask = bdlkern.ops.dropout_mask([1000], 0.3, rng_state=rs).numpy()
    np.testing.assert_array_equal(mask, words < ref.keep_threshold(0.3))


# ---- uniform and normal --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_matches_reference(backend, dtype):
    rs = state(backend, 1, 2**40)
    out = backend.ops.uniform(rs, [4097], 3, dtype)
    assert out.dtype == dtype
    assert torch.equal(out.cpu(), ref.uniform((1, 2**40), [4097], 3, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_open_interval_and_moments(dtype):
    u = bdlkern.ops.uniform(1 << 20, dtype=dtype, rng_state=torch.tensor([8, 0]))
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0
    n = u.numel()
    assert abs(u.double().mean().item() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(u.double().var().item() - 1 / 12) < 0.002


def test_uniform_float32_edges():
    """The smallest and largest words map inside (0, 1)."""
    edges = ref.uniform_from_words(np.array([0, 0xFF, 0xFFFFFF00, 0xFFFFFFFF], dtype=np.uint32))
    assert edges[0].item() == 2.0**-25
    assert edges[-1].item() < 1.0 and edges[-2].item() < 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_matches_reference(backend, dtype):
    rs = state(backend, 123, 456)
    out = backend.ops.normal(rs, [1025], 4, dtype)
    expected = ref.normal((123, 456), [1025], 4, dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.cpu(), expected, rtol=tol, atol=tol)


def test_normal_moments():
    z = bdlkern.ops.normal(1 << 20, dtype=torch.float64, rng_state=torch.tensor([9, 9]))
    n = z.numel()
    assert abs(z.mean().item()) < 4 / math.sqrt(n)
    assert abs(z.var().item() - 1.0) < 4 * math.sqrt(2 / n)
    assert abs(((z - z.mean()) ** 3).mean().item()) < 0.02  # symmetric
    # Pairs from one block are independent: correlation of (z0, z1) near zero.
    pairs = z.view(-1, 2)
    corr = torch.corrcoef(pairs.T)[0, 1].item()
    assert abs(corr) < 4 / math.sqrt(n / 2)


# ---- rng_state from torch's generator ------------------------------------------------------------
def test_new_rng_state_follows_torch_seed():
    torch.manual_seed(0)
    a = bdlkern.ops.new_rng_state()
    b = bdlkern.ops.new_rng_state()
    torch.manual_seed(0)
    assert torch.equal(a, bdlkern.ops.new_rng_state())
    assert not torch.equal(a, b)
    assert a.dtype == torch.int64 and a.shape == (2,) and int(a[1]) == 0 and int(a[0]) >= 0


def test_ops_reproducible_under_manual_seed_and_fork_rng():
    torch.manual_seed(123)
    m1 = bdlkern.ops.dropout_mask([1000], 0.5)
    with torch.random.fork_rng():
        bdlkern.ops.dropout_mask([1000], 0.5)  # consumes the forked generator only
    m2 = bdlkern.ops.dropout_mask([1000], 0.5)
    torch.manual_seed(123)
    assert torch.equal(m1, bdlkern.ops.dropout_mask([1000], 0.5))
    assert torch.equal(m2, bdlkern.ops.dropout_mask([1000], 0.5))


def test_explicit_generator():
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(bdlkern.ops.uniform(100, generator=g1), bdlkern.ops.uniform(100, generator=g2))


def test_stream_names():
    rs = torch.tensor([1, 1])
    for name, tag in bdlkern.ops.STREAMS.items():
        assert torch.equal(
            bdlkern.ops.philox_bits(8, rng_state=rs, stream=name),
            bdlkern.ops.philox_bits(8, rng_state=rs, stream=tag),
        )


# ---- registration: opcheck and torch.compile -----------------------------------------------------
@pytest.mark.parametrize("ns", ["bdlkern", "bdlkern_simt"])
def test_opcheck(ns):
    ops = getattr(torch.ops, ns)
    rs = torch.tensor([3, 4])
    opcheck(ops.philox_bits, (rs, [5, 3], 1))
    opcheck(ops.dropout_mask, (rs, [17], 0.25, 0))
    opcheck(ops.uniform, (rs, [9], 0, torch.float64))
    opcheck(ops.normal, (rs, [2, 7], 2, None))
    opcheck(ops.philox4x32, (torch.zeros(3, 4, dtype=torch.int64), torch.ones(3, 2, dtype=torch.int64)))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(rs):
        mask = bdlkern.ops.dropout_mask([64, 33], 0.2, rng_state=rs)
        noise = bdlkern.ops.normal([64, 33], rng_state=rs, stream="lrt")
        return torch.where(mask, noise, torch.zeros_like(noise)) + bdlkern.ops.uniform([64, 33], rng_state=rs)

    rs = torch.tensor([17, 0])
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(rs), f(rs), rtol=0, atol=0)
    # A new state value reuses the graph (rng_state is a tensor, not a Python constant).
    rs2 = torch.tensor([18, 0])
    torch.testing.assert_close(compiled(rs2), f(rs2), rtol=0, atol=0)


def test_torch_compile_draws_state_from_generator():
    torch._dynamo.reset()
    compiled = torch.compile(lambda: bdlkern.ops.dropout_mask([256], 0.5), fullgraph=True)
    torch.manual_seed(1)
    a = compiled()
    torch.manual_seed(1)
    b = compiled()
    assert a.shape == (256,) and torch.equal(a, b)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rs,match",
    [
        (torch.tensor([1.0, 2.0]), "rng_state must be an int64"),
        (torch.tensor([1, 2], dtype=torch.int32), "rng_state must be an int64"),
        (torch.tensor([1, 2, 3]), r"rng_state must have shape \[2\]"),
        (torch.tensor([[1, 2]]), r"rng_state must have shape \[2\]"),
        (torch.tensor(1), r"rng_state must have shape \[2\]"),
    ],
)
def test_bad_rng_state(backend, rs, match):
    rs = rs.to(backend.device)
    for call in (
        lambda: backend.ops.philox_bits(rs, [4], 0),
        lambda: backend.ops.dropout_mask(rs, [4], 0.5, 0),
        lambda: backend.ops.uniform(rs, [4], 0, None),
        lambda: backend.ops.normal(rs, [4], 0, None),
    ):
        with pytest.raises(RuntimeError, match=match):
            call()


def test_rng_state_device_mismatch():
    with pytest.raises(ValueError, match="rng_state is on cpu but device is meta"):
        bdlkern.ops.dropout_mask(4, 0.5, rng_state=torch.tensor([1, 2]), device="meta")
    with pytest.raises(TypeError, match="rng_state must be an int64 tensor"):
        bdlkern.ops.uniform(4, rng_state=[1, 2])
    with pytest.raises(ValueError, match="rng_state or generator"):
        bdlkern.ops.uniform(4, rng_state=torch.tensor([1, 2]), generator=torch.Generator())


def test_bad_size(backend):
    rs = state(backend, 1, 1)
    with pytest.raises(RuntimeError, match="size must be non-negative"):
        backend.ops.philox_bits(rs, [3, -1], 0)
    with pytest.raises(RuntimeError, match="size must be non-negative"):
        backend.ops.dropout_mask(rs, [-2], 0.5, 0)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_p(backend, p):
    with pytest.raises(RuntimeError, match=r"p must be in \[0, 1\]"):
        backend.ops.dropout_mask(state(backend, 1, 1), [4], p, 0)


@pytest.mark.parametrize("stream", [-1, 6, 2**32])
def test_unknown_stream(backend, stream):
    with pytest.raises(RuntimeError, match="stream must be a registered stream tag"):
        backend.ops.philox_bits(state(backend, 1, 1), [4], stream)


def test_unknown_stream_name_and_types():
    with pytest.raises(ValueError, match="stream must be one of"):
        bdlkern.ops.philox_bits(4, stream="nope")
    with pytest.raises(TypeError, match="stream must be an int"):
        bdlkern.ops.philox_bits(4, stream=1.5)
    with pytest.raises(TypeError, match="shape must be an int or a sequence"):
        bdlkern.ops.philox_bits(None)


def test_bad_dtype(backend):
    with pytest.raises(RuntimeError, match="dtype must be torch.float32 or torch.float64"):
        backend.ops.uniform(state(backend, 1, 1), [4], 0, torch.int32)
    with pytest.raises(RuntimeError, match="dtype must be torch.float32 or torch.float64"):
        backend.ops.normal(state(backend, 1, 1), [4], 0, torch.float16)


def test_bad_philox4x32_input(backend):
    with pytest.raises(RuntimeError, match=r"counter must have shape \[\.\.\., 4\]"):
        backend.ops.philox4x32(backend.tensor([[1, 2, 3]]), backend.tensor([[1, 2]]))
    with pytest.raises(RuntimeError, match="same leading shape"):
        backend.ops.philox4x32(backend.tensor([[1, 2, 3, 4]]), backend.tensor([[1, 2], [3, 4]]))
    with pytest.raises(RuntimeError, match="key must be int64"):
        backend.ops.philox4x32(backend.tensor([[1, 2, 3, 4]]), backend.tensor([[1.0, 2.0]]))


# ---- build --------------------------------------------------------------------------------------
def test_build_info():
    info = bdlkern.build_info()
    for key in ("version", "torch_version", "cuda", "cuda_archs", "simt", "threads"):
        assert key in info
    assert info["version"] == bdlkern.__version__
    assert info["simt"] is True
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if info["cuda"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key("bdlkern::philox_bits", "CUDA")
        assert info["cuda_archs"]


def test_new_rng_state_fast_path_draws_what_randint_draws():
    """In eager mode on the CPU, new_rng_state takes one C++ call instead of randint + cat: it must
    consume torch's generator exactly as the traceable path (torch.randint), so that eager and
    compiled code, and this release and the previous ones, draw the same states after
    torch.manual_seed."""
    for seed in (0, 1, 12345, 2**40 + 3):
        torch.manual_seed(seed)
        fast = [bdlkern.ops.new_rng_state() for _ in range(3)]
        torch.manual_seed(seed)
        traced = [
            torch.cat([torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)])
            for _ in range(3)
        ]
        for a, b in zip(fast, traced):
            assert a.dtype == torch.int64 and a.shape == (2,)
            assert torch.equal(a, b)
    torch.manual_seed(7)
    eager = bdlkern.ops.new_rng_state()
    torch.manual_seed(7)
    compiled = torch.compile(lambda: bdlkern.ops.new_rng_state(), fullgraph=True)()
    assert torch.equal(eager, compiled)
