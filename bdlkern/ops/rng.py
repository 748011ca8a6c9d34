"""The random streams themselves: the raw Philox words, dropout keep-masks, uniform and normal
samples (:func:`philox_bits`, :func:`dropout_mask`, :func:`uniform`, :func:`normal`), and the fake
kernels of those ops and of ``philox4x32``."""

from __future__ import annotations

import torch

from ._common import ShapeLike, _check_devices, _number, _resolve_state, _shape, _stream


def philox_bits(
    shape: ShapeLike,
    *,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The raw 32-bit words of the logical Philox stream (a test and reference helper).

    Element ``i`` (row-major) is lane ``i mod 4`` of Philox4x32-10 block ``i div 4 + offset`` with
    counter ``(lo32, hi32 of the block index, stream tag, 0)`` and key ``(lo32, hi32 of seed)``.

    Returns:
        int32 tensor of ``shape`` on ``rng_state``'s device (reinterpret as uint32).
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.philox_bits(state, _shape(shape), _stream(stream))


def dropout_mask(
    shape: ShapeLike,
    p: float,
    *,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bernoulli keep-mask with drop probability ``p``: ``True`` where the element is kept.

    Element ``i`` is kept iff its stream word ``w_i < T`` with ``T = round((1 - p) * 2**32)``
    (an integer compare, so masks are bit-identical across devices). ``p = 0`` keeps everything,
    ``p = 1`` drops everything.

    Args:
        shape: output shape.
        p: drop probability in ``[0, 1]``.

    Returns:
        bool tensor of ``shape`` on ``rng_state``'s device.
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.dropout_mask(state, _shape(shape), _number(p, "p", "dropout_mask"), _stream(stream))


def uniform(
    shape: ShapeLike,
    *,
    dtype: torch.dtype = torch.float32,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform samples in the open interval (0, 1): ``(w >> 8) * 2**-24 + 2**-25``.

    In float32 the largest value is clamped to the largest float below 1, so 0 and 1 never occur.

    Returns:
        float32 or float64 tensor of ``shape`` on ``rng_state``'s device.
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.uniform(state, _shape(shape), _stream(stream), dtype)


def normal(
    shape: ShapeLike,
    *,
    dtype: torch.dtype = torch.float32,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal samples by Box-Muller on lanes (0, 1) and (2, 3) of each Philox block.

    Elements ``4k, 4k+1`` are ``r cos(2 pi u2), r sin(2 pi u2)`` with ``r = sqrt(-2 log u1)`` from the
    uniforms of lanes 0 and 1 of block ``k``; elements ``4k+2, 4k+3`` likewise from lanes 2 and 3.

    Returns:
        float32 or float64 tensor of ``shape`` on ``rng_state``'s device.
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.normal(state, _shape(shape), _stream(stream), dtype)


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::philox4x32")
    def _philox4x32_fake(counter, key):
        _check_devices("philox4x32", "counter", counter, key=key)
        return torch.empty_like(counter)

    @torch.library.register_fake(f"{ns}::philox_bits")
    def _philox_bits_fake(rng_state, size, stream=0):
        return rng_state.new_empty(size, dtype=torch.int32)

    @torch.library.register_fake(f"{ns}::dropout_mask")
    def _dropout_mask_fake(rng_state, size, p, stream=0):
        return rng_state.new_empty(size, dtype=torch.bool)

    @torch.library.register_fake(f"{ns}::uniform")
    def _uniform_fake(rng_state, size, stream=0, dtype=None):
        return rng_state.new_empty(size, dtype=dtype or torch.float32)

    @torch.library.register_fake(f"{ns}::normal")
    def _normal_fake(rng_state, size, stream=0, dtype=None):
        return rng_state.new_empty(size, dtype=dtype or torch.float32)


_register_fakes("bdlkern")
