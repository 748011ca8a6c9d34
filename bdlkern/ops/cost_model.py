"""The cost model that picks the CUDA path of :func:`bdlkern.ops.mc_dropout_linear`.

On CUDA the op has two paths (``memory_efficient=`` picks one, ``None`` lets this model decide per
call):

* **fused** (``memory_efficient=True``): one tiled kernel that re-makes the Philox mask while it
  stages the input, so no ``[S, B, in]`` tensor is ever held; its tensor-core core is a plain
  WMMA kernel, far from cuBLAS on Hopper, and it re-makes the mask once per 64 output columns;
* **materialise** (``memory_efficient=False``): one memory-bound pass writes the masked input in
  the compute dtype (the mask itself is never stored), then cuBLAS multiplies; backward makes the
  masked input again for the weight gradient and applies the mask to ``grad_out @ W`` in one pass.

The model is the C++ function the op calls (``csrc/include/bdlkern/mc_dropout/cost_model.h``),
exposed here so that its choices can be read and tested on any machine: each path is a sum of
kernels, each the slower of its arithmetic (peak FLOP/s of the architecture times an assumed
efficiency) and its DRAM traffic (the memory interface's bandwidth times 0.8), plus 4 us a launch.
The device comes from ``cudaDeviceGetAttribute`` (SM count, SM and memory clocks, bus width). Its
efficiencies are assumptions until a GPU measures them (README, "GPU status").

Example::

    >>> from bdlkern.ops import cost_model as cm
    >>> plan = cm.mc_dropout_linear_plan(32, 256, 1024, 1024, dtype=torch.bfloat16, spec=cm.H100_SXM5_80GB)
    >>> plan.memory_efficient, plan.materialise.seconds < plan.fused.seconds
    (False, True)
"""

from __future__ import annotations

import dataclasses

import torch

from .. import _C

__all__ = [
    "GpuSpec",
    "PathEstimate",
    "MCDropoutPlan",
    "A100_SXM4_80GB",
    "H100_SXM5_80GB",
    "gpu_spec",
    "mc_dropout_linear_plan",
    "estimate_table",
]

_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_PASSES = {"forward": 0, "grad_input": 1, "grad_weight": 2}


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """What the model reads of a GPU (``cudaDevAttr*`` values)."""

    major: int
    minor: int
    sm_count: int
    sm_clock_khz: float  # maximum SM clock
    mem_clock_khz: float  # memory clock; 2 transfers per clock
    mem_bus_bits: int
    total_memory: float  # bytes

    @property
    def bandwidth(self) -> float:
        """Peak DRAM bandwidth in bytes/s."""
        return 2.0 * self.mem_clock_khz * 1e3 * self.mem_bus_bits / 8.0


@dataclasses.dataclass(frozen=True)
class PathEstimate:
    """One path's estimate: time (s), arithmetic (FLOP), DRAM traffic (bytes) and the workspace
    (bytes) it holds beyond its inputs and outputs."""

    seconds: float
    flops: float
    bytes: float
    workspace: float


@dataclasses.dataclass(frozen=True)
class MCDropoutPlan:
    """The estimates of the fused path, the materialise path and eager PyTorch (``F.dropout`` of
    the expanded input, then ``matmul``) for one pass, and the path ``memory_efficient=None``
    takes (``True``: fused)."""

    fused: PathEstimate
    materialise: PathEstimate
    eager: PathEstimate
    memory_efficient: bool


_RECORDED = _C._recorded_gpu_specs()
A100_SXM4_80GB = GpuSpec(**_RECORDED["A100-SXM4-80GB"])
H100_SXM5_80GB = GpuSpec(**_RECORDED["H100-SXM5-80GB"])


def gpu_spec(device: torch.device | str | int | None = None) -> GpuSpec:
    """The op's view of a CUDA device (the cached attribute queries it makes itself).

    Raises:
        RuntimeError: bdlkern was built without CUDA, or no CUDA device is present.
    """
    if not hasattr(_C, "_cuda_gpu_spec"):
        raise RuntimeError("gpu_spec: this bdlkern build has no CUDA kernels")
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_spec: no CUDA device is available")
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int) and not isinstance(device, bool):
        index = device
    else:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"gpu_spec: device must be a CUDA device, got {dev}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    return GpuSpec(**_C._cuda_gpu_spec(index))


def mc_dropout_linear_plan(
    num_samples: int,
    batch: int,
    in_features: int,
    out_features: int,
    *,
    dtype: torch.dtype = torch.float32,
    spec: GpuSpec | None = None,
    shared_input: bool = True,
    pass_: str = "forward",
    allow_tf32: bool | None = None,
    shared_mask: bool = False,
    p: float = 0.5,
) -> MCDropoutPlan:
    """The estimates behind ``mc_dropout_linear``'s CUDA path choice.

    Args:
        num_samples, batch, in_features, out_features: S, B (rows per sample), K, N.
        dtype: float32, float64, float16 or bfloat16.
        spec: the device (default: :func:`gpu_spec` of the current CUDA device).
        shared_input: ``x`` is ``[B, K]`` for every sample (else ``[S, B, K]``).
        pass_: ``"forward"``, ``"grad_input"`` or ``"grad_weight"``.
        allow_tf32: float32 GEMMs on TF32 tensor cores (default: what the op reads,
            ``torch.backends.cuda.matmul.fp32_precision == "tf32"``, which ``allow_tf32 = True``
            and ``torch.set_float32_matmul_precision("high")`` also set).
        shared_mask, p: the masks; with shared masks the fused forward multiplies over each
            sample's kept features only, about ``1 - p`` of the products.
    """
    if not (isinstance(p, (int, float)) and 0.0 <= float(p) < 1.0):
        raise ValueError(f"mc_dropout_linear_plan: p must be in [0, 1), got {p!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"mc_dropout_linear_plan: dtype must be one of {list(_DTYPES)}, got {dtype}")
    if pass_ not in _PASSES:
        raise ValueError(f"mc_dropout_linear_plan: pass_ must be one of {list(_PASSES)}, got {pass_!r}")
    sizes = {"num_samples": num_samples, "batch": batch, "in_features": in_features, "out_features": out_features}
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "num_samples" else 0):
            raise ValueError(f"mc_dropout_linear_plan: {name} must be an int >= {1 if name == 'num_samples' else 0}, got {v!r}")
    if spec is None:
        spec = gpu_spec()
    if not isinstance(spec, GpuSpec):
        raise TypeError(f"mc_dropout_linear_plan: spec must be a GpuSpec, got {type(spec).__name__}")
    if allow_tf32 is None:
        allow_tf32 = bool(_C._cuda_matmul_tf32())
    choice, paths = _C._mc_dropout_plan(
        spec.major, spec.minor, spec.sm_count, float(spec.sm_clock_khz), float(spec.mem_clock_khz),
        spec.mem_bus_bits, float(spec.total_memory), num_samples, batch, in_features, out_features,
        bool(shared_input), _DTYPES[dtype], bool(allow_tf32), _PASSES[pass_], bool(shared_mask), float(p),
    )
    return MCDropoutPlan(**{k: PathEstimate(*v) for k, v in paths.items()}, memory_efficient=bool(choice))


# The README's cases: ((S, B, K, N), shared_mask): the MC-dropout benchmark layer with per-element
# and with shared masks, a wide layer, and a narrow read-out over many samples.
README_CASES = (
    ((32, 256, 1024, 1024), False),
    ((32, 256, 1024, 1024), True),
    ((64, 64, 4096, 4096), False),
    ((100, 128, 512, 10), False),
)


def estimate_table(
    specs: dict[str, GpuSpec] | None = None,
    cases=README_CASES,
    dtypes=(torch.bfloat16, torch.float32),
) -> str:
    """A Markdown table of the model's forward estimates (input shared by the samples, p = 0.5,
    TF32 off) for the README: per device, case and dtype, the fused and materialise times, eager's,
    the pick of ``memory_efficient=None`` and the workspace the materialise path holds."""
    specs = specs or {"A100-SXM4-80GB": A100_SXM4_80GB, "H100-SXM5-80GB": H100_SXM5_80GB}
    lines = [
        "| device | S, B, K, N | masks | dtype | fused | materialise | eager | auto picks | workspace |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, spec in specs.items():
        for shape, shared in cases:
            for dtype in dtypes:
                plan = mc_dropout_linear_plan(*shape, dtype=dtype, spec=spec, allow_tf32=False, shared_mask=shared)
                pick = "fused" if plan.memory_efficient else "materialise"
                lines.append(
                    f"| {name} | {', '.join(map(str, shape))} | {'shared' if shared else 'element'} "
                    f"| {str(dtype).replace('torch.', '')} "
                    f"| {plan.fused.seconds * 1e6:.0f} us | {plan.materialise.seconds * 1e6:.0f} us "
                    f"| {plan.eager.seconds * 1e6:.0f} us | {pick} | {plan.materialise.workspace / 2**20:.0f} MiB |"
                )
    return "\n".join(lines)
