"""bdlkern: fused PyTorch kernels for Bayesian deep learning.

Importing the package loads the compiled operator library (``torch.ops.bdlkern.*``) and nothing
test-only: the SIMT test namespace (``torch.ops.bdlkern_simt.*``, the CUDA kernel sources run on
CPU tensors by an emulator) is loaded by :func:`bdlkern.testing.simt.load`, and the test oracle
lives in :mod:`bdlkern.testing.reference`.
"""

import torch


def _check_torch_version() -> None:
    """The extension links torch's C++ API, whose ABI changes between major.minor releases: say so
    before loading it, instead of an undefined-symbol error from the loader."""
    try:
        from ._build import TORCH_VERSION as built
    except ImportError:  # built without setup.py (e.g. the CMake library): nothing recorded
        return
    running = torch.__version__.split("+")[0]
    if built.split(".")[:2] != running.split(".")[:2]:
        major_minor = ".".join(built.split(".")[:2])
        raise ImportError(
            f"bdlkern was built against torch {built}, but torch {running} is installed: its compiled "
            f"extension only loads with torch {major_minor}.x. Install torch=={major_minor}.* or rebuild "
            "bdlkern against this torch (pip install --no-build-isolation .)"
        )


_check_torch_version()

from . import _C  # noqa: E402,F401  (registers torch.ops.bdlkern)

from . import ops  # noqa: E402  (registers the fake kernels)
from . import losses, nn, uncertainty  # noqa: E402
from ._sampling import NoStochasticLayerWarning, current_sampling, sampling, unfold_samples  # noqa: E402

from ._version import __version__  # noqa: E402


def build_info() -> dict:
    """How this copy of bdlkern was built.

    Returns:
        dict with ``version``, ``torch_version`` (built against), ``cuda`` (bool: CUDA kernels
        compiled in), ``cuda_version``, ``cuda_archs`` (the ``TORCH_CUDA_ARCH_LIST`` used),
        ``simt`` (bool: SIMT test extension present), ``threads`` (intra-op threads now),
        ``parallel_backend``, ``compiler`` and ``debug_info`` (compiled with -g).
    """
    info = dict(_C.build_info())
    info["simt"] = has_simt()
    info["threads"] = torch.get_num_threads()
    return info


def __getattr__(name: str):
    # bdlkern.onnx on first use: importing it eagerly would cost every user the exporter's import.
    # bdlkern.reference: the test oracle, now bdlkern.testing.reference (never imported eagerly).
    if name in ("onnx", "reference"):
        import importlib

        return importlib.import_module(".onnx" if name == "onnx" else ".testing.reference", __name__)
    raise AttributeError(f"module 'bdlkern' has no attribute {name!r}")


def has_simt() -> bool:
    """True when this build has the SIMT emulation test extension (``BDLKERN_SIMT=1``). Importing
    bdlkern does not load it: :func:`bdlkern.testing.simt.load` does."""
    import importlib.util

    return importlib.util.find_spec(__name__ + "._C_simt") is not None


__all__ = [
    "build_info",
    "has_simt",
    "ops",
    "nn",
    "uncertainty",
    "losses",
    "sampling",
    "current_sampling",
    "unfold_samples",
    "NoStochasticLayerWarning",
]
