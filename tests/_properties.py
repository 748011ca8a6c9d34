"""Shared pieces of the property-based tests (hypothesis), one file per op family:

* ``test_properties_rng.py``: philox_bits, dropout_mask, uniform, normal;
* ``test_properties_mc_dropout.py``: mc_dropout_linear;
* ``test_properties_concrete.py``: concrete_dropout;
* ``test_properties_sparse_vd.py``: lrt_linear, sparse_vd_kl, sparse_linear (CSR, deterministic and
  stochastic);
* ``test_properties_zero_in_features.py``: the in_features = 0 case of every linear op.

Each test draws shapes with 0, 1 and odd sizes, inputs that are contiguous, transposed,
step-sliced or expanded (stride 0), every dtype the op supports, extreme parameters and any
rng_state (negative seeds and offsets are unsigned 64-bit words), and runs the op on the ``cpu``
backend (C++ kernels) and the ``simt`` backend (CUDA sources under the emulator), against the
float64 ``bdlkern.testing.reference``. The allowed errors are explicit bounds; the low-precision
cases follow the rule of docs/design.md section 6.2 (:func:`assert_design_rule`). Every family
also checks determinism: the same rng_state gives the same bits, gradients included, with 1 and 2
threads (:func:`_deterministic`).

This module holds what the families share: the dtype and eps tables, the strategies (rng states,
shapes, tensor layouts through :class:`Arg`), the error assertions, the example counts
(:func:`examples`, cut down by BDLKERN_FUZZ_DIVISOR in the sanitizer runs) and the determinism
harness. Its name does not start with ``test_``, so pytest does not collect it; the test files
(and test_sparse_vd.py, test_fuzz_modules.py) import it by name, as they import conftest.

Settings come from the ``bdlkern`` hypothesis profile of conftest.py (derandomized, no deadline).
"""

from __future__ import annotations

import os

import torch
from hypothesis import Phase, settings
from hypothesis import strategies as st

import bdlkern

BACKENDS = ["cpu", "simt"]
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
EPS = {F32: 2.0**-23, F64: 2.0**-52, BF16: 2.0**-7, F16: 2.0**-10}
STREAMS = bdlkern.ops.STREAMS
LAYOUTS = ["contiguous", "transposed", "strided", "expanded"]

# p of the ops that take p in [0, 1) (dropout_mask also takes 1).
P_OPEN = st.one_of(st.sampled_from([0.0, 1e-6, 0.5, 1.0 - 1e-6]), st.floats(0.0, 1.0, exclude_max=True))
TEMPERATURES = st.one_of(st.sampled_from([1e-3, 1e-2, 0.1, 0.25, 0.3, 0.5, 1.0]), st.floats(1e-3, 10.0))


# ---- strategies and helpers -------------------------------------------------------------------------
def _int64(v: int) -> int:
    return v - 2**64 if v >= 2**63 else v


@st.composite
def rng_states(draw) -> torch.Tensor:
    """int64 [seed, offset], sometimes a strided view (the ops read it through .contiguous())."""
    word = st.one_of(
        st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2]),
        st.integers(0, 2**64 - 1),
    )
    seed, offset = _int64(draw(word)), _int64(draw(word))
    if draw(st.booleans()):
        return torch.tensor([seed, 3, offset, 5], dtype=torch.int64)[::2]
    return torch.tensor([seed, offset], dtype=torch.int64)


@st.composite
def shapes(draw, min_rank: int, max_rank: int, cap: int, side: int = 70) -> tuple[int, ...]:
    """Sizes in [0, side] (0, 1 and odd ones included) whose nonzero product stays under cap."""
    rank = draw(st.integers(min_rank, max_rank))
    dims, prod = [], 1
    for _ in range(rank):
        d = draw(st.integers(0, max(1, min(side, cap // prod))))
        dims.append(d)
        prod *= max(d, 1)
    return tuple(dims)


class Arg:
    """A test tensor: a contiguous float64 ``base`` and the ``view`` the op receives (transposed,
    step-sliced, expanded or none). ``push`` maps a tensor of the view's shape back to the base's
    shape (the adjoint of the view: stride-0 dimensions are summed), as autograd does for the
    gradient of the base."""

    def __init__(self, base: torch.Tensor, view, layout: str):
        self.base, self.view, self.layout = base, view, layout

    def value(self, dtype, grad: bool = False):
        """(leaf, view of it) in dtype."""
        leaf = self.base.to(dtype).requires_grad_(grad)
        return leaf, self.view(leaf)

    def exact(self, dtype) -> torch.Tensor:
        """The view's values rounded to dtype, in float64, as a fresh leaf requiring grad."""
        return self.view(self.base.to(dtype).double()).detach().requires_grad_()

    def push(self, t: torch.Tensor) -> torch.Tensor:
        leaf = torch.zeros(self.base.shape, dtype=t.dtype, requires_grad=True)
        return torch.autograd.grad(self.view(leaf), leaf, t)[0]

    def __repr__(self) -> str:
        return f"Arg({self.layout}, {tuple(self.view(self.base).shape)})"


def make_arg(draw, g, shape, *, scale=1.0, shift=0.0, layouts=LAYOUTS, label="") -> Arg:
    shape = tuple(shape)
    n = len(shape)
    layout = draw(st.sampled_from(layouts), label=f"{label} layout")
    if layout == "transposed" and n >= 2:
        base_shape, view = shape[:-2] + (shape[-1], shape[-2]), lambda t: t.transpose(-1, -2)
    elif layout == "strided" and n >= 1:
        base_shape, view = shape[:-1] + (2 * shape[-1],), lambda t: t[..., ::2]
    elif layout == "expanded" and n >= 1:
        d = draw(st.integers(0, n - 1), label=f"{label} expanded dim")
        base_shape, view = shape[:d] + (1,) + shape[d + 1 :], lambda t: t.expand(shape)
    else:
        layout, base_shape, view = "contiguous", shape, lambda t: t
    base = torch.randn(base_shape, generator=g, dtype=F64) * scale + shift
    return Arg(base, view, layout)


def generator(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1), label="tensor seed"))


def assert_within(got: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    """|got - exact| <= bound elementwise; NaN exactly where exact is NaN, infinities equal."""
    got = got.detach().double()
    assert got.shape == exact.shape, f"{what}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    nan = exact.isnan()
    assert torch.equal(got.isnan(), nan), f"{what}: NaN at {got.isnan().nonzero()[:4].tolist()} vs {nan.nonzero()[:4].tolist()}"
    inf = exact.isinf()
    assert torch.equal(got[inf], exact[inf]), f"{what}: infinities differ"
    fin = ~(nan | inf)
    err = (got[fin] - exact[fin]).abs()
    lim = bound.expand_as(exact)[fin]
    bad = ~(err <= lim)
    if bad.any():
        i = int((err - lim).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements outside the bound; worst: got "
            f"{got[fin][i].item()!r}, exact {exact[fin][i].item()!r}, error {err[i].item():.3g} > {lim[i].item():.3g}"
        )


def assert_design_rule(ours, lowp, exact, what, floor=0.0) -> None:
    """docs/design.md section 6.2: max error of the kernel <= 2 x max error of PyTorch's computation
    in that dtype."""
    exact = exact.detach().double()
    err_ours = (ours.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    err_torch = (lowp.detach().double() - exact).abs().max().item() if exact.numel() else 0.0
    assert err_ours <= 2 * err_torch + floor, f"{what}: error {err_ours:.3g} > 2 x {err_torch:.3g} + {floor:.3g}"


def grads(out, inputs, grad_out):
    """autograd.grad that gives zeros for inputs out does not reach (empty shapes)."""
    res = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    return [torch.zeros_like(i) if r is None else r for i, r in zip(inputs, res)]


def examples(n: int) -> int:
    """Example count of a property: n, divided by BDLKERN_FUZZ_DIVISOR in the sanitizer runs
    (tools/sanitize.sh), where every emulated CUDA thread costs 5-20x more."""
    return max(3, n // int(os.environ.get("BDLKERN_FUZZ_DIVISOR", "1")))


def equal_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype.is_floating_point:
        a, b = a.detach().contiguous(), b.detach().contiguous()
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return a.shape == b.shape and torch.equal(a.view(bits), b.view(bits))
    return torch.equal(a, b)


def at_threads(n: int, fn):
    torch.set_num_threads(n)
    return fn()


# ---- determinism: the same rng_state, 1 or 2 threads, the same bits ----------------------------------
def _deterministic(threads_fn, names, blas=()):
    """Runs threads_fn() with 1, 2 and again 1 thread.

    Every output keeps its bits from run to run at one thread count. Across thread counts every
    output keeps its bits too, except those named in ``blas``: outputs of matrix products bdlkern
    hands to torch's BLAS. MKL's float32 GEMM rounds differently with 1 and 2 threads (its blocking
    depends on the thread count; MKL_CBWR narrows but does not remove it), so those only have to
    agree to the GEMM's rounding. bdlkern's own kernels, random streams and reductions have no such
    exception.
    """
    runs = [at_threads(n, threads_fn) for n in (1, 2, 1)]
    for run in runs[1:]:
        assert len(run) == len(names)
    changed = [name for name, a, b in zip(names, runs[0], runs[2]) if not equal_bits(a, b)]
    assert not changed, f"run to run with 1 thread, these outputs changed bits: {changed}"
    differ = [name for name, a, b in zip(names, runs[0], runs[1]) if name not in blas and not equal_bits(a, b)]
    assert not differ, f"with 2 threads instead of 1, these outputs changed bits: {differ}"
    for name, a, b in zip(names, runs[0], runs[1]):
        if name in blas:
            # The GEMM's rounding (well under 1e3 eps of the largest element for these sizes); a
            # different mask or noise draw would move elements by O(the largest element).
            scale = a.detach().abs().max().item() if a.numel() else 0.0
            eps = torch.finfo(a.dtype).eps
            # float32 accumulation for 16-bit inputs, plus the rounding of the output
            rel = 1e3 * torch.finfo(torch.float32).eps + 2 * eps if a.element_size() == 2 else 1e3 * eps
            tol = rel * max(scale, 1e-30)
            torch.testing.assert_close(a, b, rtol=0, atol=tol, equal_nan=True, msg=lambda m: f"{name}: {m}")


# Determinism examples run each op three times at larger sizes: no shrinking (a failure prints the
# example as drawn, and its blob reproduces it).
DETERMINISM = settings(max_examples=examples(10), phases=[Phase.explicit, Phase.reuse, Phase.generate])
