"""The machine and build a run was measured on (:func:`describe_machine`): CPU model and vector
ISA, usable CPUs, torch threads, platform, Python and torch versions, bdlkern's build and, on
CUDA, the GPU. ``bdlkern.demo`` records the same description with its results.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """The machine and software a run was measured on.

    Returns:
        dict with ``cpu`` (model), ``cpu_capability`` (the vector ISA torch dispatches to),
        ``logical_cpus``, ``usable_cpus`` (affinity), ``torch_threads`` (intra-op threads now),
        ``platform``, ``python``, ``torch``, ``bdlkern`` (:func:`bdlkern.build_info`) and, on CUDA,
        ``gpu`` (name, capability, memory, CUDA runtime).
    """
    import bdlkern

    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bdlkern": bdlkern.build_info(),
    }
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_bytes": props.total_memory,
            "cuda_runtime": torch.version.cuda,
        }
    return info
