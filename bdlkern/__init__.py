"""bdlkern: fused PyTorch kernels for Bayesian deep learning.

Importing the package loads the compiled operator library (``torch.ops.bdlkern.*``) and, when it
was built, the SIMT test extension (``torch.ops.bdlkern_simt.*``: the CUDA kernel sources run on
CPU tensors by the emulator in ``csrc/include/bdlkern/simt.h``).
"""

import torch

from . import _C  # noqa: F401  (registers torch.ops.bdlkern)

try:
    from . import _C_simt  # noqa: F401  (registers torch.ops.bdlkern_simt)

    _HAS_SIMT = True
except ImportError:  # built with BDLKERN_SIMT=0 or without CUDA headers
    _HAS_SIMT = False

from . import ops  # noqa: E402  (registers the fake kernels)
from . import nn, reference, uncertainty  # noqa: E402
from ._sampling import current_sampling, sampling  # noqa: E402

__version__ = _C.build_info()["version"]


def build_info() -> dict:
    """How this copy of bdlkern was built.

    Returns:
        dict with ``version``, ``torch_version`` (built against), ``cuda`` (bool: CUDA kernels
        compiled in), ``cuda_version``, ``cuda_archs`` (the ``TORCH_CUDA_ARCH_LIST`` used),
        ``simt`` (bool: SIMT test extension present), ``threads`` (intra-op threads now),
        ``parallel_backend`` and ``compiler``.
    """
    info = dict(_C.build_info())
    info["simt"] = _HAS_SIMT
    info["threads"] = torch.get_num_threads()
    return info


def has_simt() -> bool:
    """True when the SIMT emulation test extension was built and loaded."""
    return _HAS_SIMT


__all__ = ["build_info", "has_simt", "ops", "nn", "reference", "uncertainty", "sampling", "current_sampling"]
