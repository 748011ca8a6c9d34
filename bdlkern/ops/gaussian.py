"""Gaussian dropout with a learnt rate (:func:`gaussian_dropout`) and the fake kernels of its forward
and backward ops."""

from __future__ import annotations

import torch

from ._common import _check_devices, _resolve_state
from .concrete import _channel_dim


def gaussian_dropout(
    x: torch.Tensor,
    log_alpha: torch.Tensor,
    *,
    channel_dim: int | None = None,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gaussian dropout: multiplicative ``N(1, alpha)`` noise with a learnt ``alpha`` (Kingma, Salimans &
    Welling 2015, "Variational dropout and the local reparameterization trick", arXiv:1506.02557)::

        y = x * (1 + sqrt(alpha) * eps),   alpha = exp(log_alpha),   eps ~ N(0, 1)

    (``sqrt(alpha)`` is computed as ``exp(0.5 * log_alpha)``). ``alpha = p / (1 - p)`` gives the noise
    the variance of Bernoulli dropout with drop rate ``p`` (Srivastava et al. 2014). One fused kernel
    forward; one fused kernel backward re-makes ``eps`` from ``rng_state`` and returns the gradients of
    ``x`` and ``log_alpha``::

        grad_x = grad_y * (1 + sqrt(alpha) * eps)
        grad_log_alpha = 0.5 * sqrt(alpha) * sum(grad_y * x * eps)   (over all but log_alpha's dims)

    the latter reduced in a fixed order (the same bits every run, any thread count). Only ``x``,
    ``log_alpha`` and ``rng_state`` are saved for backward, never the noise. No argument check reads
    tensor values (no host synchronisation on CUDA): a NaN or inf in ``x`` or ``log_alpha`` propagates
    to ``y`` and the gradients.

    Args:
        x: input, float32 or float64, any shape ``[*, F]`` with at least one dimension (or
            ``[N, C, *]`` with ``channel_dim=1``); non-contiguous inputs are copied. Under autocast a
            16-bit input runs in float32.
        log_alpha: ``log alpha``, same dtype and device as ``x``: a 0-dim tensor (one alpha for the
            layer), ``[F]`` (one alpha per feature of the last dim), or ``[C]`` with ``channel_dim=1``.
        channel_dim: ``None`` / ``-1``: one noise value per element of ``x``. ``1``: spatial
            (per-channel) noise on ``[N, C, *]``: one value per ``(n, c)``, shared by the spatial
            positions.
        generator / rng_state: where ``eps`` comes from (see :func:`new_rng_state`). The noise of
            flattened noise index ``i`` (the element index, or ``n * C + c`` with ``channel_dim=1``) is
            element ``i`` of ``normal(size, dtype=x.dtype, stream="gaussian_dropout", rng_state=...)``.

    Returns:
        ``y`` with the shape and dtype of ``x`` (contiguous). Differentiable in ``x`` and ``log_alpha``
        (twice as well, through a composite form of the op).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(log_alpha, torch.Tensor):
        raise TypeError("gaussian_dropout: x and log_alpha must be tensors")
    cd = _channel_dim(channel_dim, x, "gaussian_dropout")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    return torch.ops.bdlkern.gaussian_dropout(x, log_alpha, state, cd)


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::gaussian_dropout")
    def _gaussian_fake(x, log_alpha, rng_state, channel_dim=-1):
        _check_devices("gaussian_dropout", "x", x, log_alpha=log_alpha, rng_state=rng_state)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{ns}::gaussian_dropout_backward")
    def _gaussian_backward_fake(grad_out, x, log_alpha, rng_state, channel_dim):
        _check_devices("gaussian_dropout_backward", "x", x, grad_out=grad_out, log_alpha=log_alpha, rng_state=rng_state)
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(log_alpha)


_register_fakes("bdlkern")
