"""What every op family of :mod:`bdlkern.ops` shares.

* the stream tags (:data:`STREAMS`) and the namespaces whose fake kernels the families register
  (``bdlkern``, and ``bdlkern_simt`` when the SIMT test extension is loaded);
* ``rng_state``: drawing a fresh one (:func:`new_rng_state`, traceable under torch.compile /
  torch.export) and resolving the ``rng_state`` / ``generator`` / ``device`` arguments of a wrapper;
* argument checks that turn Python mistakes into errors naming the argument (shapes, real numbers,
  stream names) and the device check the fake kernels make;
* the explicit sample-dimension rule of the sampling ops (:func:`_sample_dim_input`).
"""

from __future__ import annotations

from collections.abc import Sequence

import math
import operator

import torch

from .. import _C

# Stream tags (Philox counter word 2), mirrored from csrc/include/bdlkern/random.h. Each op family
# draws from its own tag; the numbers are part of the reproducibility contract.
STREAMS: dict[str, int] = {
    "user": 0,
    "mc_dropout": 1,
    "concrete_dropout": 2,
    "lrt": 3,
    "sparse_lrt": 4,
    "gaussian_dropout": 5,
}

# The op namespaces whose fake kernels are registered: `bdlkern` when the families import, a test
# namespace with the same schemas (bdlkern_simt) when bdlkern.testing.simt loads its extension
# (bdlkern.ops._register_namespace).
_NAMESPACES = ["bdlkern"]

ShapeLike = int | Sequence[int] | torch.Size


def _is_int(v) -> bool:
    """An integer index (int, NumPy integer, SymInt), not a bool or a float."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _shape(shape: ShapeLike, name: str = "shape") -> list[int]:
    if _is_int(shape):
        return [shape if isinstance(shape, (int, torch.SymInt)) else operator.index(shape)]
    if not isinstance(shape, (str, bytes)):
        try:
            dims = list(shape)
        except TypeError:
            dims = None
        if dims is not None and all(_is_int(d) for d in dims):
            return [d if isinstance(d, (int, torch.SymInt)) else operator.index(d) for d in dims]
    raise TypeError(f"{name} must be an int or a sequence of ints, got {shape!r}")


def _number(value, name: str, op: str) -> float:
    """A real-valued argument as a Python float, with an error naming it."""
    if value is None or isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}") from None


def _stream(stream: int | str) -> int:
    if isinstance(stream, str):
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {sorted(STREAMS)} or its tag, got {stream!r}")
        return STREAMS[stream]
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"stream must be an int tag or a stream name, got {type(stream).__name__}")
    return stream


def new_rng_state(
    generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Draw a fresh ``rng_state`` from torch's random generator.

    Args:
        generator: the torch generator to draw from (default: the global generator of ``device``,
            seeded by ``torch.manual_seed``).
        device: where the state lives, which is where the ops that consume it run. Defaults to the
            generator's device, else the CPU.

    Returns:
        int64 tensor of shape ``[2]``: a random 63-bit ``seed`` and ``offset = 0``.
    """
    if generator is None and (device is None or _is_cpu(device)) and not _tracing():
        return _C._draw_cpu_rng_state()  # the same seed, one call instead of three ops
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but device is {device}: draw the state from a "
            "generator of the device the op runs on"
        )
    # Out-of-place draw (traceable by torch.compile): seed uniform in [0, 2**63 - 1), offset 0.
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=device)])


def _is_cpu(device) -> bool:
    return device == "cpu" or (isinstance(device, torch.device) and device.type == "cpu")


_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting


_torch_function_mode = torch._C._is_torch_function_mode_enabled


def _plain(t) -> bool:
    """A tensor whose calls need no __torch_function__ (a plain Tensor or an nn.Parameter): the
    eager entries may call the op without going through torch.ops."""
    return t.__class__ is torch.Tensor or t.__class__ is torch.nn.Parameter


def _tracing() -> bool:
    """Whether torch.compile / torch.export is tracing the call (they need the traceable draw)."""
    return _is_compiling() or _is_exporting()


def _resolve_state(
    rng_state: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    if rng_state is None:
        return new_rng_state(generator, device)
    if generator is not None:
        raise ValueError("pass rng_state or generator, not both")
    if not isinstance(rng_state, torch.Tensor):
        raise TypeError(f"rng_state must be an int64 tensor [seed, offset], got {type(rng_state).__name__}")
    if device is not None and rng_state.device != torch.device(device):
        raise ValueError(f"rng_state is on {rng_state.device} but device is {device}")
    return rng_state


def _sample_dim_input(
    x: torch.Tensor, in_features: int | None, num_samples: int | None, op: str, weight: str = "the weights expect"
):
    """(x as the op takes it, S, batch shape) under the explicit sample-dimension rule, shared by
    every sampling op: ``num_samples=S`` with ``x [*batch, in]`` (x as ``[rows, in]``), or
    ``num_samples=None`` with ``x [S, *batch, in]`` (x as ``[S, rows, in]``). ``in_features=None``
    leaves the feature check to the op."""
    if num_samples is None:
        if x.dim() < 2:
            raise ValueError(
                f"{op}: x has no sample dimension (shape {tuple(x.shape)}): pass num_samples=S for an input "
                "shared by all samples, or x of shape [S, *batch, in_features]"
            )
        samples, batch = x.shape[0], x.shape[1:-1]
        # Explicit sizes: reshape(..., -1, K) is ambiguous for K == 0.
        x_op = x.reshape(samples, math.prod(batch), x.shape[-1]) if x.dim() != 3 else x
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"{op}: num_samples must be an int or None, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"{op}: num_samples must be >= 1, got {num_samples}")
        if x.dim() < 1:
            raise ValueError(f"{op}: x must have a feature dimension")
        samples, batch = num_samples, x.shape[:-1]
        # A 2-d x is already [rows, in]: no view (it costs more than a small layer's kernel).
        x_op = x if x.dim() == 2 else x.reshape(math.prod(batch), x.shape[-1])
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} features but {weight} in_features = {in_features}")
    return x_op, samples, batch


def _check_devices(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Mixed devices reach the fake kernel (meta outranks cpu in dispatch): check them here too."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"{op}: {name} must be on {ref_name}'s device ({ref.device}), got {t.device}")


# ---- convolution arguments, shared by the conv ops ----------------------------------------------
def _conv_arg(value, dims: int, name: str, minimum: int, op: str) -> list[int]:
    """stride / padding / dilation as ``dims`` ints (an int is repeated), checked."""
    if _is_int(value):
        values = [int(value)] * dims
    elif isinstance(value, (tuple, list)) and all(_is_int(v) for v in value):
        values = [int(v) for v in value]
        if len(values) == 1:
            values = values * dims
    else:
        raise TypeError(f"{op}: {name} must be an int or a tuple of {dims} ints, got {value!r}")
    if len(values) != dims:
        raise ValueError(f"{op}: {name} must have {dims} values (one per spatial dimension), got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value!r}")
    return values


def _conv_padding(padding, weight: torch.Tensor, dilation: list[int], stride: list[int], op: str) -> list[int]:
    """``padding`` as ints; ``"valid"`` is 0 and ``"same"`` the symmetric padding that keeps the
    size (stride 1 and an odd effective kernel; F.conv2d pads asymmetrically otherwise, which the
    conv ops do not do)."""
    dims = weight.dim() - 2
    if not isinstance(padding, str):
        return _conv_arg(padding, dims, "padding", 0, op)
    if padding == "valid":
        return [0] * dims
    if padding != "same":
        raise ValueError(f"{op}: padding must be ints, 'valid' or 'same', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"{op}: padding='same' needs stride 1 (as F.conv2d)")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    if any(t % 2 for t in total):
        raise ValueError(
            f"{op}: padding='same' with an even effective kernel size needs asymmetric padding, which "
            "this op does not do; pad the input with F.pad and use padding=0"
        )
    return [t // 2 for t in total]


def _conv_args(x, weight, num_samples, stride, padding, dilation, groups, op: str, weight_name: str):
    """Checks the Python-level arguments of a conv op (tensors, ranks, num_samples, groups) and
    returns (stride, padding, dilation, groups) as the raw op takes them."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError(f"{op}: x and {weight_name} must be tensors")
    if not 3 <= weight.dim() <= 5:
        raise ValueError(
            f"{op}: {weight_name} must be [out_channels, in_channels / groups, *kernel] with 1 to 3 "
            f"kernel dimensions, got shape {tuple(weight.shape)}"
        )
    if x.dim() != weight.dim():
        raise ValueError(
            f"{op}: x must be [batch, channels, *spatial] with {weight.dim() - 2} spatial "
            f"dimension(s) for a {weight_name} of shape {tuple(weight.shape)}, got shape {tuple(x.shape)}"
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"{op}: num_samples must be an int >= 1, got {num_samples!r}")
    if isinstance(groups, bool) or not _is_int(groups) or int(groups) < 1:
        raise ValueError(f"{op}: groups must be an int >= 1, got {groups!r}")
    dims = weight.dim() - 2
    stride_ = _conv_arg(stride, dims, "stride", 1, op)
    dilation_ = _conv_arg(dilation, dims, "dilation", 1, op)
    padding_ = _conv_padding(padding, weight, dilation_, stride_, op)
    return stride_, padding_, dilation_, int(groups)


def _conv_out_shape(x, weight, num_samples, shared_input, stride, padding, dilation):
    """The output shape of a conv op: the samples folded into the batch."""
    batch = x.shape[0] * num_samples if shared_input else x.shape[0]
    spatial = [
        (size + 2 * pad - dil * (k - 1) - 1) // st + 1
        for size, k, st, pad, dil in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    return (batch, weight.shape[0], *spatial)
