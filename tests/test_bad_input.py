"""Bad-input matrix: every op must reject malformed arguments with an exception that names them.

* Raw ops, called directly on both namespaces (``torch.ops.bdlkern`` = C++ CPU kernels,
  ``torch.ops.bdlkern_simt`` = CUDA sources under the emulator), bypassing the Python checks: one
  valid call per op (checked to succeed) and one case per bad argument -- wrong rank or shape,
  mismatched feature sizes, wrong dtype (integer, complex, mixed between tensors), wrong device
  (a meta tensor next to CPU ones: dispatch then reaches the fake kernels, which must check too),
  p outside [0, 1) or NaN, temperature <= 0 / NaN / inf, non-finite logits, bad rng_state (dtype,
  shape, device), num_samples <= 0 or not matching x, channel_dim other than -1 / 1, bad in_features,
  and malformed CSR structures (crow not monotone / wrong length / crow[0] != 0, col out of range,
  unsorted or duplicated within a row, nnz mismatches, index dtypes float / int16 / int32, values
  of the wrong shape or dtype, row_order that is not an int64 permutation).
* The public functions of ``bdlkern.ops``: the Python-side checks (types, shapes, sample dims).

Each case must raise (RuntimeError from TORCH_CHECK, ValueError / TypeError from Python) with a
message that matches the offending argument's name. A row_order pointing outside the matrix is run
in a child process, since a kernel that trusts it reads and writes out of bounds. Negative seeds
and offsets are not bad input (they are unsigned 64-bit words): the property tests
(test_properties_*.py) draw them. Cases the other test files check are repeated only where the
matrix extends them (the raw op, the other namespace, the other ops that take the same argument).

Why one file of ~520 lines: the matrix is one table of cases over every op, run by one parametrised
test per namespace; split by family, each file would repeat the runner and lose the one place
where a reviewer can see which argument of which op is covered.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import bdlkern

NAMESPACES = ["bdlkern", "bdlkern_simt"]
F32, F64 = torch.float32, torch.float64
META = "meta"

# A valid CSR weight W [N=4, K=6] with an empty row: rows [0, 3], [], [1, 2, 5], [4].
CROW = [0, 2, 2, 5, 6]
COL = [0, 3, 1, 2, 5, 4]


def csr():
    crow, col = torch.tensor(CROW), torch.tensor(COL)
    values = torch.randn(6, 2).abs()
    return crow, col, values


def valid_args(op: str) -> dict:
    """Fresh valid arguments of raw op `op`, by schema name."""
    x, w, st = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2])
    crow, col, values = csr()
    xs = torch.randn(3, 6)
    return {
        "philox4x32": dict(counter=torch.zeros(3, 4, dtype=torch.long), key=torch.ones(3, 2, dtype=torch.long)),
        "philox_bits": dict(rng_state=st, size=[7], stream=0),
        "dropout_mask": dict(rng_state=st, size=[7], p=0.5, stream=0),
        "uniform": dict(rng_state=st, size=[7], stream=0, dtype=F32),
        "normal": dict(rng_state=st, size=[7], stream=0, dtype=F32),
        "mc_dropout_linear": dict(x=x, weight=w, bias=torch.randn(5), rng_state=st, p=0.5, num_samples=2, shared_mask=False),
        "mc_dropout_linear_grad_input": dict(grad_out=torch.randn(2, 3, 5), weight=w, rng_state=st, p=0.5, shared_mask=False, sum_samples=True),
        "mc_dropout_linear_grad_weight": dict(grad_out=torch.randn(2, 3, 5), x=x, rng_state=st, p=0.5, shared_mask=False),
        "concrete_dropout": dict(x=x, p_logit=torch.zeros(4), rng_state=st, temperature=0.1, channel_dim=-1),
        "concrete_dropout_backward": dict(grad_out=torch.randn(3, 4), x=x, p_logit=torch.tensor(0.0), rng_state=st, temperature=0.1, channel_dim=-1),
        "lrt_linear": dict(x=x, theta=w, log_sigma2=torch.randn(5, 4), bias=torch.randn(5), rng_state=st, num_samples=2),
        "lrt_linear_backward": dict(grad_out=torch.randn(2, 3, 5), x=x, theta=w, log_sigma2=torch.randn(5, 4), std=torch.ones(3, 5), rng_state=st),
        "variance_linear": dict(x=x, log_sigma2=torch.randn(5, 4), bias=torch.randn(5), rng_state=st, num_samples=2),
        "variance_linear_backward": dict(grad_out=torch.randn(2, 3, 5), x=x, log_sigma2=torch.randn(5, 4), std=torch.ones(3, 5), rng_state=st),
        "sparse_vd_kl": dict(theta=w, log_sigma2=torch.randn(5, 4)),
        "sparse_vd_kl_backward": dict(grad=torch.tensor(1.0), theta=w, log_sigma2=torch.randn(5, 4)),
        "sparse_vd_kl_with_grad": dict(theta=w, log_sigma2=torch.randn(5, 4)),
        "ard_kl": dict(theta=w, log_sigma2=torch.randn(5, 4)),
        "ard_kl_backward": dict(grad=torch.tensor(1.0), theta=w, log_sigma2=torch.randn(5, 4)),
        "ard_kl_with_grad": dict(theta=w, log_sigma2=torch.randn(5, 4)),
        "sparse_linear": dict(x=xs, crow=crow, col=col, values=values[:, 0], bias=torch.randn(4), row_order=torch.tensor([2, 0, 3, 1])),
        "sparse_linear_backward": dict(grad_out=torch.randn(3, 4), crow=crow, col=col, values=values[:, 0], in_features=6),
        "sparse_linear_lrt": dict(x=xs, crow=crow, col=col, values=values, bias=torch.randn(4), row_order=None, rng_state=st, num_samples=2),
        "sparse_linear_lrt_backward": dict(grad_out=torch.randn(2, 3, 4), x=xs, crow=crow, col=col, values=values, std=torch.ones(3, 4), rng_state=st),
        "gaussian_dropout": dict(x=x, log_alpha=torch.zeros(4), rng_state=st, channel_dim=-1),
        "gaussian_dropout_backward": dict(grad_out=torch.randn(3, 4), x=x, log_alpha=torch.tensor(0.0), rng_state=st, channel_dim=-1),
    }[op]


RAW_OPS = [
    "philox4x32", "philox_bits", "dropout_mask", "uniform", "normal",
    "mc_dropout_linear", "mc_dropout_linear_grad_input", "mc_dropout_linear_grad_weight",
    "concrete_dropout", "concrete_dropout_backward",
    "lrt_linear", "lrt_linear_backward", "sparse_vd_kl", "sparse_vd_kl_backward", "sparse_vd_kl_with_grad",
    "variance_linear", "variance_linear_backward",
    "ard_kl", "ard_kl_backward", "ard_kl_with_grad",
    "sparse_linear", "sparse_linear_backward", "sparse_linear_lrt", "sparse_linear_lrt_backward",
    "gaussian_dropout", "gaussian_dropout_backward",
]  # fmt: skip


def call(ns: str, op: str, **overrides):
    args = valid_args(op)
    for name, value in overrides.items():
        args[name] = value(args) if callable(value) else value
    return getattr(getattr(torch.ops, ns), op)(**args)


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("op", RAW_OPS)
def test_valid_baseline(ns, op):
    """The unmodified arguments are accepted: each bad case below changes exactly one of them."""
    call(ns, op)


# ---- the raw-op matrix: (op, argument, bad value or function of the valid args, message) ------------
def _col(changes: dict):
    """col with entries replaced: {index: new column}."""

    def f(a):
        col = a["col"].clone()
        for i, v in changes.items():
            col[i] = v
        return col

    return f


def _meta(name):
    return lambda a: a[name].to(META)


RNG_STREAM_OPS = ["philox_bits", "dropout_mask", "uniform", "normal"]
STATE_CASES = [  # (label, bad rng_state, message); dtype float / int32 / shapes [3], [1, 2], [] are in test_rng.py
    ("uint64", torch.tensor([1, 2], dtype=torch.uint64), "rng_state must be an int64"),
    ("bool", torch.tensor([True, False]), "rng_state must be an int64"),
    ("empty", torch.zeros(0, dtype=torch.long), r"rng_state must have shape \[2\]"),
]
STATE_CASES_FULL = STATE_CASES + [
    ("float", torch.tensor([1.0, 2.0]), "rng_state must be an int64"),
    ("int32", torch.tensor([1, 2], dtype=torch.int32), "rng_state must be an int64"),
    ("[3]", torch.tensor([1, 2, 3]), r"rng_state must have shape \[2\]"),
    ("[1, 2]", torch.tensor([[1, 2]]), r"rng_state must have shape \[2\]"),
]
P_OPEN_BAD = [-0.1, 1.0, 1.5, float("nan"), float("inf"), float("-inf")]
TEMPERATURE_BAD = [0.0, -1.0, float("nan"), float("inf"), float("-inf")]

CASES = []


def case(op, arg, value, match, label=None, exc=RuntimeError):
    CASES.append(pytest.param(op, arg, value, match, exc, id=f"{op}-{arg}-{label or value}"))


# RNG ops
for op in RNG_STREAM_OPS:
    for label, value, match in STATE_CASES:
        case(op, "rng_state", value, match, label)
    if op != "philox_bits":  # philox_bits: test_rng.py
        case(op, "stream", -1, "stream must be a registered stream tag")
        case(op, "stream", 6, "stream must be a registered stream tag")
    if op in ("uniform", "normal"):
        case(op, "size", [4, -1], "size must be non-negative")
        for dtype in (torch.bfloat16, torch.int64, torch.bool, torch.complex64):
            case(op, "dtype", dtype, "dtype must be torch.float32 or torch.float64", str(dtype))
case("dropout_mask", "p", float("-inf"), r"p must be in \[0, 1\]")
case("philox4x32", "counter", lambda a: a["counter"].int(), "counter must be int64", "int32")
case("philox4x32", "counter", torch.tensor(3), r"counter must have shape \[\.\.\., 4\]", "0-dim")
case("philox4x32", "key", torch.ones(3, 3, dtype=torch.long), r"key must have shape \[\.\.\., 2\]", "[3, 3]")
case("philox4x32", "key", lambda a: a["key"].float(), "key must be int64", "float")
case("philox4x32", "key", _meta("key"), "key must be on", "meta")

# MC-dropout linear
def sampling_cases(op: str, bad_samples) -> None:
    """The cases every sampling forward shares: num_samples, x's sample dimension, rng_state."""
    for n in bad_samples:
        case(op, "num_samples", n, "num_samples must be >= 1")
    case(op, "x", torch.randn(3, 3, 4), "x has 3 samples in its leading dimension but num_samples = 2", "3 samples vs 2")
    for label, value, match in STATE_CASES_FULL:
        case(op, "rng_state", value, match, label)
    case(op, "rng_state", lambda a: a["rng_state"].to(META), "rng_state must be on x's device", "meta")


op = "mc_dropout_linear"
case(op, "x", torch.randn(4), r"x must be \[B, in_features\]", "1-d")
case(op, "x", torch.randn(2, 2, 3, 4), r"x must be \[B, in_features\]", "4-d")
case(op, "x", lambda a: a["x"].int(), "x must be float32, float64, bfloat16", "int32")
case(op, "x", lambda a: a["x"].to(torch.complex64), "x must be float32, float64, bfloat16", "complex64")
case(op, "x", _meta("x"), "weight must be on x's device", "meta")
case(op, "weight", torch.randn(4), r"weight must be \[out_features, in_features\]", "1-d")
case(op, "weight", torch.randn(5, 4, 1), r"weight must be \[out_features, in_features\]", "3-d")
case(op, "weight", lambda a: a["weight"].int(), "weight must have the dtype of x", "int32")
case(op, "weight", lambda a: a["weight"].bfloat16(), "weight must have the dtype of x", "bfloat16")
case(op, "weight", torch.randn(5, 3), "weight expects in_features = 3", "features")
case(op, "bias", torch.randn(5, 1), r"bias must be \[out_features\]", "[5, 1]")
case(op, "bias", torch.tensor(1.0), r"bias must be \[out_features\]", "0-dim")
case(op, "bias", torch.randn(5, dtype=F64), "bias must have the dtype of x", "float64")
case(op, "bias", _meta("bias"), "bias must be on x's device", "meta")
for p in P_OPEN_BAD:
    case(op, "p", p, r"p must be in \[0, 1\)")
sampling_cases(op, (0, -1, -(2**40)))

op = "mc_dropout_linear_grad_input"
case(op, "grad_out", torch.randn(1, 2, 3, 5), r"grad_out must be \[S, B, out_features\]", "4-d")
case(op, "grad_out", torch.randn(2, 3, 5, dtype=F64), "grad_out must have the dtype of weight", "float64")
case(op, "grad_out", torch.randn(2, 3, 6), r"weight must be \[out_features = 6", "6 outputs")
case(op, "grad_out", lambda a: a["grad_out"].to(META), "grad_out must be on|weight must be on", "meta")
case(op, "weight", torch.randn(5), r"weight must be \[out_features = 5", "1-d")
case(op, "weight", lambda a: a["weight"].int(), "grad_out must have the dtype of weight", "int32")
case(op, "weight", _meta("weight"), "weight must be on", "meta")
case(op, "p", 1.0, r"p must be in \[0, 1\)")
case(op, "p", float("nan"), r"p must be in \[0, 1\)")
case(op, "rng_state", torch.tensor([1.0, 2.0]), "rng_state must be an int64", "float")
case(op, "rng_state", torch.tensor([1, 2, 3]), r"rng_state must have shape \[2\]", "[3]")
case(op, "rng_state", lambda a: a["rng_state"].to(META), "rng_state must be on", "meta")

op = "mc_dropout_linear_grad_weight"
case(op, "x", torch.randn(4), r"x must be \[B, in\]", "1-d")
case(op, "x", torch.randn(3, 3, 4), "does not match grad_out", "3 samples vs 2")
case(op, "x", lambda a: a["x"].double(), "grad_out must have the dtype of x", "float64")
case(op, "x", _meta("x"), "x must be on|grad_out must be on", "meta")
case(op, "grad_out", torch.randn(2, 5), r"grad_out must be \[S, B, out_features\]", "2-d")
case(op, "grad_out", lambda a: a["grad_out"].int(), "grad_out must have the dtype of x", "int32")
case(op, "p", -0.5, r"p must be in \[0, 1\)")
case(op, "rng_state", torch.tensor([[1, 2]]), r"rng_state must have shape \[2\]", "[1, 2]")
case(op, "rng_state", lambda a: a["rng_state"].to(META), "rng_state must be on", "meta")

# Concrete dropout
for op in ("concrete_dropout", "concrete_dropout_backward"):
    case(op, "x", lambda a: a["x"].int(), "x must be float32 or float64", "int32")
    case(op, "x", lambda a: a["x"].half(), "x must be float32 or float64", "float16")
    for cd in (0, 2, -2, 3):
        case(op, "channel_dim", cd, "channel_dim must be -1")
    for t in TEMPERATURE_BAD:
        case(op, "temperature", t, "temperature must be a finite number > 0")
    case(op, "p_logit", torch.zeros(2, 2), r"p_logit must be a scalar .* or have shape \[4\]", "[2, 2]")
    case(op, "p_logit", lambda a: torch.zeros(4, dtype=a["x"].dtype).int(), "p_logit must have the dtype of x", "int32")
    # (the non-finite rates: test_non_finite_p_logit_is_an_error_on_the_cpu_and_propagates_on_devices)
    case(op, "p_logit", lambda a: torch.zeros(4).to(META), "p_logit must be on x's device", "meta")
    case(op, "rng_state", torch.tensor([1, 2], dtype=torch.int32), "rng_state must be an int64", "int32")
    case(op, "rng_state", torch.tensor([1, 2, 3]), r"rng_state must have shape \[2\]", "[3]")
    case(op, "rng_state", lambda a: a["rng_state"].to(META), "rng_state must be on x's device", "meta")
case("concrete_dropout", "x", torch.tensor(1.0), "x must have at least one dimension", "0-dim")
case("concrete_dropout", "x", lambda a: a["x"].to(META), "p_logit must be on x's device", "meta")
case("concrete_dropout_backward", "grad_out", torch.randn(3, 4, dtype=F64), "grad_out must have x's dtype", "float64")
case("concrete_dropout_backward", "grad_out", lambda a: a["grad_out"].to(META), "grad_out must", "meta")
case("concrete_dropout_backward", "x", lambda a: a["x"].to(META), "must be on x's device|x must be on", "meta")

# LRT linear and the KL term
op = "lrt_linear"
case(op, "x", torch.randn(4), r"x must be \[B, in_features\]", "1-d")
case(op, "x", torch.randn(2, 2, 3, 4), r"x must be \[B, in_features\]", "4-d")
case(op, "x", lambda a: a["x"].int(), "x must have the dtype of theta", "int32")
case(op, "x", torch.randn(3, 6), "x has 6 features but theta expects in_features = 4", "features")
case(op, "x", _meta("x"), "theta must be on x's device", "meta")
case(op, "*", dict(theta=torch.randn(4), log_sigma2=torch.randn(4)), r"theta must be \[out_features, in_features\]", "theta 1-d")
case(op, "theta", lambda a: a["theta"].int(), "theta must be float32 or float64", "int32")
case(op, "theta", lambda a: a["theta"].bfloat16(), "theta must be float32 or float64", "bfloat16")
case(op, "log_sigma2", torch.randn(4, 5), "log_sigma2 must have theta's shape", "transposed")
case(op, "log_sigma2", lambda a: a["log_sigma2"].int(), "log_sigma2 must have the dtype of theta", "int32")
case(op, "log_sigma2", _meta("log_sigma2"), "log_sigma2 must be on", "meta")
case(op, "bias", torch.randn(5, 1), r"bias must be \[out_features\]", "[5, 1]")
case(op, "bias", torch.randn(5, dtype=F64), "bias must have the dtype of theta", "float64")
case(op, "bias", _meta("bias"), "bias must be on x's device", "meta")
sampling_cases(op, (0, -2))

op = "lrt_linear_backward"
case(op, "grad_out", torch.randn(3, 5), r"grad_out must be \[S, B, out_features\]", "2-d")
case(op, "grad_out", torch.randn(2, 4, 5), r"grad_out must be \[2, 3, 5\]", "4 rows")
case(op, "grad_out", torch.randn(2, 3, 5, dtype=F64), "grad_out must have the dtype of theta", "float64")
case(op, "grad_out", lambda a: a["grad_out"].to(META), "grad_out must be on", "meta")
case(op, "std", torch.ones(2, 5), r"std must be \[3, 5\]", "[2, 5]")
case(op, "std", torch.ones(3, 5, dtype=F64), "std must have the dtype of theta", "float64")
case(op, "std", lambda a: a["std"].to(META), "std must be on", "meta")
case(op, "theta", torch.randn(4), r"theta must be \[out_features, in_features\]|log_sigma2 must have theta's shape", "1-d")
case(op, "rng_state", torch.tensor([1.0, 2.0]), "rng_state must be an int64", "float")
case(op, "rng_state", lambda a: a["rng_state"].to(META), "rng_state must be on", "meta")
# x [S=2, B, K] with a grad_out of 3 samples: the message must name grad_out (the backward ops have
# no num_samples argument: S is grad_out's leading size).
case(op, "*", dict(x=torch.randn(2, 3, 4), std=torch.ones(6, 5), grad_out=torch.randn(3, 3, 5)), "grad_out", "grad_out 3 samples vs x 2")

# Variance layers: log_sigma2 is their only weight, and the errors name it
op = "variance_linear"
case(op, "x", torch.randn(4), r"x must be \[B, in_features\]", "1-d")
case(op, "x", lambda a: a["x"].double(), "x must have the dtype of log_sigma2", "float64")
case(op, "x", torch.randn(3, 6), "x has 6 features but log_sigma2 expects in_features = 4", "features")
case(op, "log_sigma2", torch.randn(4), r"log_sigma2 must be \[out_features, in_features\]", "1-d")
case(op, "log_sigma2", lambda a: a["log_sigma2"].int(), "log_sigma2 must be float32 or float64", "int32")
case(op, "log_sigma2", _meta("log_sigma2"), "log_sigma2 must be on", "meta")
case(op, "bias", torch.randn(4), r"bias must be \[out_features\] = \[5\]", "[4]")
case(op, "bias", torch.randn(5, dtype=F64), "bias must have the dtype of log_sigma2", "float64")
sampling_cases(op, (0, -2))

op = "variance_linear_backward"
case(op, "grad_out", torch.randn(3, 5), r"grad_out must be \[S, B, out_features\]", "2-d")
case(op, "grad_out", torch.randn(2, 4, 5), r"grad_out must be \[2, 3, 5\]", "4 rows")
case(op, "std", torch.ones(2, 5), r"std must be \[3, 5\] \(saved by variance_linear\)", "[2, 5]")
case(op, "std", torch.ones(3, 5, dtype=F64), "std must have the dtype of log_sigma2", "float64")
case(op, "rng_state", torch.tensor([1.0, 2.0]), "rng_state must be an int64", "float")

for op in ("sparse_vd_kl", "sparse_vd_kl_with_grad", "ard_kl", "ard_kl_with_grad"):
    case(op, "theta", lambda a: a["theta"].int(), "theta must be float32 or float64", "int32")
    case(op, "theta", lambda a: a["theta"].half(), "theta must be float32 or float64", "float16")
    case(op, "theta", _meta("theta"), "log_sigma2 must be on theta's device", "meta")
    case(op, "log_sigma2", torch.randn(5, 4, 1), "log_sigma2 must have theta's shape", "[5, 4, 1]")
    case(op, "log_sigma2", lambda a: a["log_sigma2"].double(), "log_sigma2 must have the dtype of theta", "float64")

for op in ("sparse_vd_kl_backward", "ard_kl_backward"):
    case(op, "grad", torch.tensor(1.0, dtype=F64), "grad must have the dtype of theta", "float64")
    case(op, "grad", torch.ones(0), "grad must hold one value", "empty")
    case(op, "grad", lambda a: a["grad"].to(META), "grad must be on", "meta")
    case(op, "theta", lambda a: a["theta"].int(), "theta must be float32 or float64", "int32")
    case(op, "log_sigma2", torch.randn(4, 5), "log_sigma2 must have theta's shape", "transposed")
    case(op, "log_sigma2", _meta("log_sigma2"), "log_sigma2 must be on", "meta")

# Sparse (CSR) linear: the structure checks, on every op that takes a CSR
CSR_CASES = [  # (arg, value, message, label)
    ("crow", lambda a: a["crow"].double(), "crow must be an int64", "float64"),
    ("crow", lambda a: a["crow"].to(torch.int16), "crow must be an int64", "int16"),
    ("crow", lambda a: a["crow"].int(), "crow must be an int64", "int32"),
    ("crow", lambda a: a["crow"][None], "crow must be 1-d", "2-d"),
    ("crow", torch.zeros(0, dtype=torch.long), r"crow must have N \+ 1 >= 1 entries", "empty"),
    ("crow", torch.tensor([1, 2, 2, 5, 6]), r"crow\[0\] must be 0", "crow[0]=1"),
    ("crow", torch.tensor([0, 3, 2, 5, 6]), "crow must be non-decreasing", "not monotone"),
    ("crow", torch.tensor([0, 2, 7, 5, 6]), "crow must be non-decreasing", "above nnz inside"),
    ("crow", torch.tensor([0, -2, 2, 5, 6]), "crow must be non-decreasing", "negative"),
    ("crow", torch.tensor([0, 2, 2, 5]), r"crow\[-1\] must equal nnz = 6", "one short"),
    ("crow", torch.tensor([0, 2, 2, 5, 7]), r"crow\[-1\] must equal nnz = 6", "last above nnz"),
    ("crow", _meta("crow"), "crow must be on (x|grad_out)'s device", "meta"),
    ("col", lambda a: a["col"].float(), "col must be an int64", "float32"),
    ("col", lambda a: a["col"].to(torch.int16), "col must be an int64", "int16"),
    ("col", lambda a: a["col"][:, None], "col must be 1-d", "2-d"),
    ("col", _col({4: 6}), r"col\[4\] = 6 is out of range for in_features = 6", "col=K"),
    ("col", _col({0: -1}), r"col\[0\] = -1 is out of range", "negative"),
    ("col", _col({2: 2, 3: 1}), "col must be strictly increasing within each row", "unsorted"),
    ("col", _col({3: 1}), "col must be strictly increasing within each row", "duplicate"),
    ("col", torch.tensor(COL + [0]), r"col has nnz = 7|crow\[-1\] must equal nnz = 7", "one extra"),
    ("col", _meta("col"), "col must be on (x|grad_out)'s device", "meta"),
    ("values", lambda a: a["values"][:-1], "values has 5 entries but col has nnz = 6", "one short"),
    ("values", lambda a: a["values"].double(), "values must have (x|grad_out)'s dtype", "float64"),
    ("values", lambda a: a["values"].int(), "values must have (x|grad_out)'s dtype", "int32"),
    ("values", torch.randn(6, 3), r"values must be \[nnz\] .* or \[nnz, 2\]", "[nnz, 3]"),
    ("values", torch.randn(6, 2, 1), r"values must be \[nnz\] .* or \[nnz, 2\]", "3-d"),
    ("values", _meta("values"), "values must .*device|values must be on", "meta"),
]
for op in ("sparse_linear", "sparse_linear_backward", "sparse_linear_lrt", "sparse_linear_lrt_backward"):
    for arg, value, match, label in CSR_CASES:
        case(op, arg, value, match, label)
for op in ("sparse_linear", "sparse_linear_lrt"):
    case(op, "x", torch.randn(6), r"x must be \[B, in_features\]", "1-d")
    case(op, "x", lambda a: a["x"].int(), "x must be float32 or float64", "int32")
    case(op, "x", lambda a: a["x"].half(), "x must be float32 or float64", "float16")
    case(op, "x", torch.randn(3, 4), "out of range for in_features = 4", "4 features")
    case(op, "bias", torch.randn(5), r"bias must be \[out_features\] = \[4\]", "[5]")
    case(op, "bias", torch.randn(4, dtype=F64), "bias must have x's dtype", "float64")
    case(op, "bias", _meta("bias"), "bias must .*device|bias must be on", "meta")
    case(op, "row_order", torch.tensor([2.0, 0.0, 3.0, 1.0]), r"row_order must be an int64 \[4\] permutation", "float")
    case(op, "row_order", torch.tensor([2, 0, 3]), r"row_order must be an int64 \[4\] permutation", "3 entries")
    case(op, "row_order", torch.tensor([[2, 0, 3, 1]]), r"row_order must be an int64 \[4\] permutation", "2-d")
    case(op, "row_order", torch.tensor([0, 0, 1, 1]), "row_order", "duplicates")
    case(op, "row_order", torch.tensor([2, 0, 3, 1]).to(META), "row_order must be on x's device|row_order", "meta")
case("sparse_linear", "x", torch.randn(2, 3, 6), r"x must be \[B, in_features\]", "3-d")
case("sparse_linear_lrt", "values", lambda a: a["values"][:, 0], r"stochastic samples need values \[nnz, 2\]", "[nnz]")
case("sparse_linear_lrt", "values", lambda a: a["values"] * torch.tensor([1.0, -1.0]), r"variances values\[:, 1\] .* must be >= 0, but values\[0, 1\] = -", "negative variances")
case("sparse_linear_lrt", "values", lambda a: torch.cat([a["values"][:3], -a["values"][3:]]), r"but values\[3, 1\] = -", "negative from entry 3")
case("sparse_linear_lrt", "x", torch.randn(2, 2, 3, 6), r"x must be \[B, in_features\]", "4-d")
case("sparse_linear_lrt", "x", torch.randn(3, 3, 6), "num_samples = 2", "3 samples vs 2")
for n in (0, -1):
    case("sparse_linear_lrt", "num_samples", n, "num_samples must be >= 1")
for label, value, match in STATE_CASES_FULL:
    case("sparse_linear_lrt", "rng_state", value, match, label)
case("sparse_linear_lrt", "rng_state", lambda a: a["rng_state"].to(META), "rng_state must be on x's device", "meta")

op = "sparse_linear_backward"
case(op, "grad_out", torch.randn(4), r"grad_out must be \[B, out_features\]", "1-d")
case(op, "grad_out", torch.randn(3, 5), "grad_out has 5 features but W has 4 rows", "5 outputs")
case(op, "grad_out", lambda a: a["grad_out"].int(), "grad_out", "int32")  # not "x must be ..."
case(op, "grad_out", lambda a: a["grad_out"].to(META), "grad_out must be on|must be on", "meta")
case(op, "in_features", 5, r"col\[4\] = 5 is out of range for in_features = 5", "5")
for k in (-1, -6):
    case(op, "in_features", k, "in_features", k)

op = "sparse_linear_lrt_backward"
case(op, "grad_out", torch.randn(3, 4), r"grad_out must be \[S, B, out_features\]", "2-d")
case(op, "grad_out", torch.randn(2, 3, 5), r"grad_out must be \[2, 3, 4\]", "5 outputs")
case(op, "grad_out", lambda a: a["grad_out"].to(META), "grad_out must be on|must be on", "meta")
case(op, "std", torch.ones(2, 4), r"std must be \[3, 4\]", "[2, 4]")
case(op, "std", torch.ones(3, 4, dtype=F64), r"std must be \[3, 4\]", "float64")
case(op, "std", lambda a: a["std"].to(META), "std must be on|std must", "meta")
case(op, "values", lambda a: a["values"][:, 0], r"stochastic samples need values \[nnz, 2\]", "[nnz]")
case(op, "*", dict(x=torch.randn(2, 3, 6), std=torch.ones(6, 4), grad_out=torch.randn(3, 3, 4)), "grad_out", "grad_out 3 samples vs x 2")
case(op, "rng_state", torch.tensor([1, 2], dtype=torch.int32), "rng_state must be an int64", "int32")

# Gaussian dropout (no value checks: a NaN log_alpha propagates, test_gaussian_dropout.py)
for op in ("gaussian_dropout", "gaussian_dropout_backward"):
    case(op, "x", lambda a: a["x"].int(), "x must be float32 or float64", "int32")
    case(op, "x", lambda a: a["x"].half(), "x must be float32 or float64", "float16")
    for cd in (0, 2, -2, 3):
        case(op, "channel_dim", cd, "channel_dim must be -1")
    case(op, "log_alpha", torch.zeros(2, 2), r"log_alpha must be a scalar .* or have shape \[4\]", "[2, 2]")
    case(op, "log_alpha", torch.zeros(3), r"log_alpha must be a scalar .* or have shape \[4\]", "[3]")
    case(op, "log_alpha", lambda a: torch.zeros(4, dtype=a["x"].dtype).int(), "log_alpha must have the dtype of x", "int32")
    case(op, "log_alpha", torch.zeros(4, dtype=F64), "log_alpha must have the dtype of x", "float64")
    case(op, "log_alpha", lambda a: torch.zeros(4).to(META), "log_alpha must be on x's device", "meta")
    for label, value, match in STATE_CASES_FULL:
        case(op, "rng_state", value, match, label)
    case(op, "rng_state", lambda a: a["rng_state"].to(META), "rng_state must be on x's device", "meta")
case("gaussian_dropout", "x", torch.tensor(1.0), "x must have at least one dimension", "0-dim")
case("gaussian_dropout", "*", dict(x=torch.randn(3), channel_dim=1), r"x must have shape \[N, C, \*\]", "1-d channel")
case("gaussian_dropout", "x", lambda a: a["x"].to(META), "log_alpha must be on x's device", "meta")
case("gaussian_dropout_backward", "grad_out", torch.randn(3, 5), "grad_out must have x's shape", "[3, 5]")
case("gaussian_dropout_backward", "grad_out", torch.randn(3, 4, dtype=F64), "grad_out must have x's dtype", "float64")
case("gaussian_dropout_backward", "grad_out", lambda a: a["grad_out"].to(META), "grad_out must", "meta")
case("gaussian_dropout_backward", "x", lambda a: a["x"].to(META), "must be on x's device|x must be on", "meta")


@pytest.mark.parametrize("ns", NAMESPACES)
@pytest.mark.parametrize("op,arg,value,match,exc", CASES)
def test_raw_op_rejects(ns, op, arg, value, match, exc):
    overrides = value if arg == "*" else {arg: value}
    with pytest.raises(exc, match=match):
        call(ns, op, **overrides)


@pytest.mark.parametrize("op", ["concrete_dropout", "concrete_dropout_backward"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_p_logit_is_an_error_on_the_cpu_and_propagates_on_devices(op, bad):
    """The CPU kernels reject a non-finite rate by name. The CUDA sources (run here by the SIMT
    emulator) cannot without waiting for the device on every call (issue 18): there a NaN rate's
    outputs are NaN, never a silently finite result, and an infinite one is its limit."""
    p_logit = torch.tensor([0.0, 1.0, bad, 0.0])
    with pytest.raises(RuntimeError, match="p_logit must be finite"):
        call("bdlkern", op, p_logit=p_logit)
    args = {**valid_args(op), "p_logit": p_logit}
    out = getattr(torch.ops.bdlkern_simt, op)(**args)
    y = out[0] if isinstance(out, tuple) else out
    if bad != bad:  # NaN: the feature's outputs (and its rate's gradient) are NaN
        assert y[:, 2].isnan().all() and not y[:, [0, 1, 3]].isnan().any()
        if isinstance(out, tuple):
            assert out[1][2].isnan()
    else:  # +-inf: the limits p = 1 (all dropped) and p = 0 (all kept, unscaled)
        kept = args["x"] if op == "concrete_dropout" else args["grad_out"]
        want = torch.zeros_like(kept[:, 2]) if bad > 0 else kept[:, 2]
        torch.testing.assert_close(y[:, 2], want)


@pytest.mark.parametrize("op", ["mc_dropout_linear", "mc_dropout_linear_grad_input", "mc_dropout_linear_grad_weight"])
def test_float16_is_cuda_only_on_the_cpu_kernels(op):
    """float16 runs on the CUDA sources (the simt namespace takes it); the CPU kernels refuse it."""
    half = {k: (v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in valid_args(op).items()}
    getattr(torch.ops.bdlkern_simt, op)(**half)
    with pytest.raises(RuntimeError, match="float16 is supported on CUDA only"):
        getattr(torch.ops.bdlkern, op)(**half)


# ---- row_order outside [0, N): a child process (an unchecked index reads and writes out of bounds) ------
ROW_ORDER_OUT_OF_RANGE = [(op, order) for op in ("sparse_linear", "sparse_linear_lrt") for order in ("[0, 1, 2, 1000000]", "[0, 1, 2, -100000]")]


@pytest.mark.parametrize("ns", NAMESPACES)
def test_row_order_out_of_range_is_rejected_in_a_child_process(ns):
    """Each case prints its outcome before the next starts, so a crash names the case it hit."""
    code = textwrap.dedent(
        f"""
        import re, torch, bdlkern, bdlkern.testing.simt
        bdlkern.testing.simt.load()
        crow, col, st = torch.tensor({CROW}), torch.tensor({COL}), torch.tensor([1, 2])
        x, ops = torch.randn(3, 6), torch.ops.{ns}
        for op, order in {ROW_ORDER_OUT_OF_RANGE!r}:
            print(op, order, end=": ", flush=True)
            order = torch.tensor(eval(order))
            try:
                if op == "sparse_linear":
                    ops.sparse_linear(x, crow, col, torch.randn(6), None, order)
                else:
                    ops.sparse_linear_lrt(x, crow, col, torch.rand(6, 2), None, order, st, 2)
                print("no exception: the index was used unchecked", flush=True)
            except RuntimeError as e:
                print("ok" if re.search("row_order", str(e)) else "an exception that does not name row_order", flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    report = done.stdout + ("" if done.returncode == 0 else f"<the process died: exit status {done.returncode}>")
    outcomes = [line.rpartition(": ")[2] for line in report.strip().splitlines()]
    assert done.returncode == 0 and outcomes == ["ok"] * len(ROW_ORDER_OUT_OF_RANGE), f"{ns}:\n{report}"


# ---- the public functions of bdlkern.ops: their own checks --------------------------------------------
def _public_cases():
    """(id, exception, message, call) for the Python-side checks of bdlkern.ops."""
    x, w, st, z = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([1, 2]), torch.tensor(0.0)
    x3 = torch.randn(2, 3, 4)
    crow, col, values = csr()
    xs = torch.randn(3, 6)
    o = bdlkern.ops
    TV = (TypeError, ValueError)
    return [
        ("philox_bits shape str", TV, "shape", lambda: o.philox_bits("abc", rng_state=st)),
        ("philox_bits shape [2.5]", TV, "shape", lambda: o.philox_bits([2.5], rng_state=st)),
        ("philox_bits shape [-1]", RuntimeError, "size must be non-negative", lambda: o.philox_bits([-1], rng_state=st)),
        ("philox_bits stream True", TypeError, "stream must be an int", lambda: o.philox_bits(4, rng_state=st, stream=True)),
        ("philox_bits stream 7", RuntimeError, "stream must be a registered", lambda: o.philox_bits(4, rng_state=st, stream=7)),
        ("dropout_mask p None", TypeError, r"\bp\b", lambda: o.dropout_mask(4, None, rng_state=st)),
        ("dropout_mask p 1.5", RuntimeError, r"p must be in \[0, 1\]", lambda: o.dropout_mask(4, 1.5, rng_state=st)),
        ("uniform dtype int32", RuntimeError, "dtype must be", lambda: o.uniform(4, dtype=torch.int32, rng_state=st)),
        ("normal rng_state tuple", TypeError, "rng_state must be an int64 tensor", lambda: o.normal(4, rng_state=(1, 2))),
        (
            "new_rng_state generator device", ValueError, "generator is on cpu but device is meta",
            lambda: o.new_rng_state(torch.Generator(), device="meta"),
        ),
        ("mc x list", TypeError, "x and weight must be tensors", lambda: o.mc_dropout_linear([[1.0]], w, rng_state=st)),
        (
            "mc weight 1-d", ValueError, r"weight must be \[out_features",
            lambda: o.mc_dropout_linear(x, torch.randn(4), num_samples=2, rng_state=st),
        ),
        (
            "mc x 0-dim", ValueError, "x must have a feature dimension",
            lambda: o.mc_dropout_linear(z, w, num_samples=2, rng_state=st),
        ),
        ("mc num_samples -1", ValueError, "num_samples must be >= 1", lambda: o.mc_dropout_linear(x, w, num_samples=-1, rng_state=st)),
        ("mc num_samples True", TypeError, "num_samples must be an int", lambda: o.mc_dropout_linear(x, w, num_samples=True, rng_state=st)),
        ("mc p None", TypeError, r"\bp\b", lambda: o.mc_dropout_linear(x, w, None, None, 2, rng_state=st)),
        (
            "mc rng_state and generator", ValueError, "rng_state or generator",
            lambda: o.mc_dropout_linear(x, w, num_samples=2, rng_state=st, generator=torch.Generator()),
        ),
        (
            "mc rng_state list", TypeError, "rng_state must be an int64 tensor",
            lambda: o.mc_dropout_linear(x, w, num_samples=2, rng_state=[1, 2]),
        ),
        ("concrete p_logit float", TypeError, "x and p_logit must be tensors", lambda: o.concrete_dropout(x, 0.5, rng_state=st)),
        *[
            (f"concrete temperature {t}", ValueError, "temperature must be a finite number > 0", lambda t=t: o.concrete_dropout(x, z, t, rng_state=st))
            for t in (float("nan"), float("inf"), -1.0)
        ],
        ("concrete temperature None", TypeError, "temperature", lambda: o.concrete_dropout(x, z, None, rng_state=st)),
        ("concrete channel_dim 0", ValueError, "channel_dim must be", lambda: o.concrete_dropout(x3, z, channel_dim=0, rng_state=st)),
        ("concrete channel_dim -2", ValueError, "channel_dim must be", lambda: o.concrete_dropout(x3, z, channel_dim=-2, rng_state=st)),
        ("concrete channel_dim True", TV, "channel_dim", lambda: o.concrete_dropout(x3, z, channel_dim=True, rng_state=st)),
        ("concrete channel_dim str", TV, "channel_dim", lambda: o.concrete_dropout(x3, z, channel_dim="1", rng_state=st)),
        (
            "regularizer p_logit shape", ValueError, r"p_logit must be 0-dim or \[in_features\]",
            lambda: o.concrete_dropout_regularizer(w, torch.zeros(5), 4, 1.0, 1.0),
        ),
        (
            "regularizer weight_regularizer < 0", ValueError, "weight_regularizer and dropout_regularizer must be >= 0",
            lambda: o.concrete_dropout_regularizer(w, z, 4, -1.0, 1.0),
        ),
        (
            "regularizer input_dim True", ValueError, "input_dim must be an int >= 1",
            lambda: o.concrete_dropout_regularizer(w, z, True, 1.0, 1.0),
        ),
        (
            "regularizer weight list", TypeError, "weight and p_logit must be tensors",
            lambda: o.concrete_dropout_regularizer([1.0], z, 4, 1.0, 1.0),
        ),
        (
            "lrt theta 1-d", ValueError, r"theta must be \[out_features",
            lambda: o.lrt_linear(x, torch.randn(4), torch.randn(4), num_samples=2, rng_state=st),
        ),
        ("lrt log_sigma2 float", TypeError, "log_sigma2 must be a tensor", lambda: o.lrt_linear(x, w, 0.0, num_samples=2, rng_state=st)),
        ("lrt x list", TypeError, "x must be a tensor", lambda: o.lrt_linear([[1.0] * 4], w, w, num_samples=2, rng_state=st)),
        ("lrt num_samples -3", ValueError, "num_samples must be >= 1", lambda: o.lrt_linear(x, w, w, num_samples=-3, rng_state=st)),
        ("lrt num_samples 2.0", TypeError, "num_samples must be an int", lambda: o.lrt_linear(x, w, w, num_samples=2.0, rng_state=st)),
        (
            "lrt bias list", RuntimeError, "for argument 'bias'",
            lambda: o.lrt_linear(x, w, w, [0.0] * 5, num_samples=2, rng_state=st),
        ),
        ("kl theta list", TypeError, "theta and log_sigma2 must be tensors", lambda: o.sparse_vd_kl([1.0], torch.tensor([1.0]))),
        ("ard_kl theta list", TypeError, "ard_kl: theta and log_sigma2 must be tensors", lambda: o.ard_kl([1.0], torch.tensor([1.0]))),
        ("ard_kl log_sigma2 float", TypeError, "ard_kl: theta and log_sigma2 must be tensors", lambda: o.ard_kl(w, 0.0)),
        ("sparse crow list", TypeError, "crow must be a tensor", lambda: o.sparse_linear(xs, CROW, col, values[:, 0])),
        ("sparse values float", TypeError, "values must be a tensor", lambda: o.sparse_linear(xs, crow, col, 1.0)),
        ("sparse x 0-dim", ValueError, "x must have a feature dimension", lambda: o.sparse_linear(z, crow, col, values[:, 0])),
        (
            "sparse stochastic num_samples 0", ValueError, "num_samples must be >= 1",
            lambda: o.sparse_linear(xs, crow, col, values, num_samples=0, stochastic=True, rng_state=st),
        ),
        (
            "sparse stochastic x 1-d", ValueError, "x has no sample dimension",
            lambda: o.sparse_linear(torch.randn(6), crow, col, values, stochastic=True, rng_state=st),
        ),
        (
            "sparse stochastic values [nnz]", RuntimeError, r"values \[nnz, 2\]",
            lambda: o.sparse_linear(xs, crow, col, values[:, 0], num_samples=2, stochastic=True, rng_state=st),
        ),
        (
            "sparse row_order duplicates", RuntimeError, "row_order",
            lambda: o.sparse_linear(xs, crow, col, values[:, 0], row_order=torch.tensor([0, 0, 1, 1])),
        ),
        ("gaussian log_alpha float", TypeError, "x and log_alpha must be tensors", lambda: o.gaussian_dropout(x, 0.5, rng_state=st)),
        ("gaussian x list", TypeError, "x and log_alpha must be tensors", lambda: o.gaussian_dropout([1.0], z, rng_state=st)),
        ("gaussian channel_dim 0", ValueError, "channel_dim must be", lambda: o.gaussian_dropout(x3, z, channel_dim=0, rng_state=st)),
        ("gaussian channel_dim -2", ValueError, "channel_dim must be", lambda: o.gaussian_dropout(x3, z, channel_dim=-2, rng_state=st)),
        ("gaussian channel_dim True", TV, "channel_dim", lambda: o.gaussian_dropout(x3, z, channel_dim=True, rng_state=st)),
        (
            "gaussian rng_state and generator", ValueError, "rng_state or generator",
            lambda: o.gaussian_dropout(x, z, rng_state=st, generator=torch.Generator()),
        ),
        (
            "gaussian log_alpha shape", RuntimeError, r"log_alpha must be a scalar .* or have shape \[4\]",
            lambda: o.gaussian_dropout(x, torch.zeros(3), rng_state=st),
        ),
    ]


PUBLIC = _public_cases()


@pytest.mark.parametrize("index", range(len(PUBLIC)), ids=[c[0] for c in PUBLIC])
def test_public_op_rejects(index):
    _, exc, match, fn = _public_cases()[index]
    with pytest.raises(exc, match=match):
        fn()
