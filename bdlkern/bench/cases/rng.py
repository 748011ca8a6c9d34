"""Family ``rng``: making random tensors with the Philox stream vs torch's own generators.

Every case makes N elements (32M, or 1M with ``quick``) on the chosen device. The bdlkern variants
read a fixed ``rng_state`` drawn once in setup, so the time is that of the kernel plus the op call
(no state draw per call); torch's variants draw from its default generator as users call them.
"""

from __future__ import annotations

import torch

import bdlkern
from bdlkern.bench.registry import Workload, case

N_FULL = 32 * 1024 * 1024
N_QUICK = 1024 * 1024
P = 0.5  # drop probability of the mask cases


def _size(quick: bool) -> int:
    return N_QUICK if quick else N_FULL


def _fixed_state(device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device)
    generator.manual_seed(0)
    return bdlkern.ops.new_rng_state(generator, device)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def _check_close(name: str, value: float, expected: float, tol: float) -> None:
    _require(abs(value - expected) <= tol, f"{name} = {value:.5f}, expected {expected} +- {tol}")


@case(
    "rng.dropout_mask",
    family="rng",
    description="Bernoulli keep-mask of N elements at drop probability p (bool output)",
    subject="bdlkern.dropout_mask",
    baselines={
        "torch.bernoulli_": "library",  # the same result: a bool mask
        "torch.rand": "library",  # just the float uniforms a mask is usually made from
        "torch.rand<keep": "library",  # the common user idiom: uniforms, then a compare
    },
)
def _dropout_mask(device: torch.device, quick: bool) -> Workload:
    n = _size(quick)
    keep = 1.0 - P
    state = _fixed_state(device)

    def check() -> None:
        mask = bdlkern.ops.dropout_mask(n, P, rng_state=state)
        _require(mask.dtype == torch.bool and mask.shape == (n,), f"bad mask {mask.dtype} {tuple(mask.shape)}")
        _require(mask.device.type == device.type, f"mask on {mask.device}, expected {device}")
        _check_close("kept fraction", mask.float().mean().item(), keep, 0.01)

    return Workload(
        variants={
            "bdlkern.dropout_mask": lambda: bdlkern.ops.dropout_mask(n, P, rng_state=state),
            "torch.bernoulli_": lambda: torch.empty(n, dtype=torch.bool, device=device).bernoulli_(keep),
            "torch.rand": lambda: torch.rand(n, device=device),
            "torch.rand<keep": lambda: torch.rand(n, device=device) < keep,
        },
        params={"n": n, "p": P},
        elements=n,
        # bool writes 1 byte per element, float32 4; rand<keep writes and re-reads the floats.
        bytes={
            "bdlkern.dropout_mask": n,
            "torch.bernoulli_": n,
            "torch.rand": 4 * n,
            "torch.rand<keep": 4 * n + 4 * n + n,
        },
        check=check,
    )


@case(
    "rng.uniform",
    family="rng",
    description="N float32 uniforms in (0, 1)",
    subject="bdlkern.uniform",
    baselines={"torch.rand": "library"},
)
def _uniform(device: torch.device, quick: bool) -> Workload:
    n = _size(quick)
    state = _fixed_state(device)

    def check() -> None:
        u = bdlkern.ops.uniform(n, rng_state=state)
        _require(u.dtype == torch.float32 and u.shape == (n,), f"bad uniforms {u.dtype} {tuple(u.shape)}")
        _require(0.0 < u.min().item() and u.max().item() < 1.0, "uniforms must lie in the open interval (0, 1)")
        _check_close("uniform mean", u.double().mean().item(), 0.5, 0.01)

    return Workload(
        variants={
            "bdlkern.uniform": lambda: bdlkern.ops.uniform(n, rng_state=state),
            "torch.rand": lambda: torch.rand(n, device=device),
        },
        params={"n": n, "dtype": "float32"},
        elements=n,
        bytes=4 * n,
        check=check,
    )


@case(
    "rng.normal",
    family="rng",
    description="N float32 standard normals (Box-Muller)",
    subject="bdlkern.normal",
    baselines={"torch.randn": "library"},
)
def _normal(device: torch.device, quick: bool) -> Workload:
    n = _size(quick)
    state = _fixed_state(device)

    def check() -> None:
        z = bdlkern.ops.normal(n, rng_state=state).double()
        _require(z.shape == (n,) and bool(torch.isfinite(z).all()), "normals must be N finite values")
        _check_close("normal mean", z.mean().item(), 0.0, 0.01)
        _check_close("normal std", z.std().item(), 1.0, 0.01)

    return Workload(
        variants={
            "bdlkern.normal": lambda: bdlkern.ops.normal(n, rng_state=state),
            "torch.randn": lambda: torch.randn(n, device=device),
        },
        params={"n": n, "dtype": "float32"},
        elements=n,
        bytes=4 * n,
        check=check,
    )
