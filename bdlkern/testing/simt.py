"""The SIMT test namespace ``torch.ops.bdlkern_simt``: the CUDA kernel sources run on CPU tensors by
the emulator in ``csrc/include/bdlkern/common/simt.h``, with the same schemas as ``bdlkern``.

It lives in test-only extensions that a development build adds (``BDLKERN_SIMT=1``; the Makefile
sets it): ``bdlkern._C_simt`` (the emulated kernels and the emulator's self-tests) and, in CUDA
builds, ``bdlkern._C_simt_cuda`` (the same self-tests on a real GPU). ``import bdlkern`` never
loads them, so a library user's process carries no test code; :func:`load` does.
"""

from __future__ import annotations

import importlib
import importlib.util

__all__ = ["load"]


def load() -> None:
    """Register ``torch.ops.bdlkern_simt`` (its kernels, autograd, autocast and fake kernels).
    Idempotent.

    Raises:
        ImportError: the build has no SIMT extension (a release build, or ``BDLKERN_SIMT=0``).
    """
    import bdlkern

    if not bdlkern.has_simt():
        raise ImportError(
            "bdlkern was built without the SIMT test extension: rebuild with BDLKERN_SIMT=1 "
            "(make build does) to run the CUDA kernel sources under the emulator"
        )
    importlib.import_module("bdlkern._C_simt")
    if importlib.util.find_spec("bdlkern._C_simt_cuda") is not None:  # CUDA development builds
        importlib.import_module("bdlkern._C_simt_cuda")
    from bdlkern import ops

    ops._register_namespace("bdlkern_simt")
