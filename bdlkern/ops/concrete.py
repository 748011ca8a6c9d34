"""Concrete dropout: the relaxed Bernoulli mask with a learnt rate (:func:`concrete_dropout`), its
regulariser (:func:`concrete_dropout_regularizer`), and the fake kernels of the forward and
backward ops."""

from __future__ import annotations

import torch

from ._common import _check_devices, _is_int, _number, _resolve_state


def _channel_dim(channel_dim: int | None, x: torch.Tensor, op: str) -> int:
    if channel_dim is not None and not _is_int(channel_dim):
        raise TypeError(f"{op}: channel_dim must be None, 1 or -1, got {channel_dim!r}")
    if channel_dim == 1:
        return 1
    if channel_dim is None or channel_dim == -1 or (not isinstance(channel_dim, bool) and channel_dim == x.dim() - 1):
        return -1
    raise ValueError(
        f"{op}: channel_dim must be None / -1 (a mask value per element, rates along the last dim) or 1 "
        f"(one mask value per (sample, channel) of [N, C, *]), got {channel_dim!r}"
    )


def concrete_dropout(
    x: torch.Tensor,
    p_logit: torch.Tensor,
    temperature: float = 0.1,
    *,
    channel_dim: int | None = None,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concrete dropout (Gal, Hron & Kendall 2017): a relaxed Bernoulli drop mask whose rate is learnt.

    With ``p = sigmoid(p_logit)``, ``eps = 1e-7`` and ``u`` uniform in (0, 1) from the Philox stream
    (tag ``"concrete_dropout"``)::

        z = sigmoid((log(p + eps) - log(1 - p + eps) + log(u + eps) - log(1 - u + eps)) / temperature)
        y = x * (1 - z) / (1 - p)

    One fused kernel forward; one fused kernel backward re-makes ``u`` and returns the gradients of
    ``x`` and ``p_logit`` (the latter reduced in a fixed order: the same bits every run). Only ``x``,
    ``p_logit`` and ``rng_state`` are saved for backward.

    Args:
        x: input, float32 or float64, any shape ``[*, F]`` (or ``[N, C, *]`` with ``channel_dim=1``).
        p_logit: the drop-rate logit, same dtype and device as ``x``: a 0-dim tensor (one rate for
            the layer, as in the paper), or ``[F]`` (one rate per feature of the last dim), or
            ``[C]`` with ``channel_dim=1``.
        temperature: relaxation temperature ``t > 0`` (0.1 in the paper); as ``t -> 0`` the mask
            becomes a hard Bernoulli(1 - p) keep-mask.
        channel_dim: ``None`` / ``-1``: one mask value per element of ``x``. ``1``: spatial
            (per-channel) dropout on ``[N, C, *]``: one mask value per ``(n, c)``, shared by the
            spatial positions (element ``n * C + c`` of the stream).
        generator / rng_state: where ``u`` comes from (see :func:`new_rng_state`). The mask value of
            flattened mask index ``i`` is ``uniform`` element ``i`` of stream ``"concrete_dropout"``.

    Returns:
        ``y`` with the shape and dtype of ``x``. Differentiable in ``x`` and ``p_logit``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(p_logit, torch.Tensor):
        raise TypeError("concrete_dropout: x and p_logit must be tensors")
    temperature = _number(temperature, "temperature", "concrete_dropout")
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"concrete_dropout: temperature must be a finite number > 0, got {temperature}")
    cd = _channel_dim(channel_dim, x, "concrete_dropout")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    return torch.ops.bdlkern.concrete_dropout(x, p_logit, state, temperature, cd)


def concrete_dropout_regularizer(
    weight: torch.Tensor,
    p_logit: torch.Tensor,
    input_dim: int,
    weight_regularizer: float,
    dropout_regularizer: float,
) -> torch.Tensor:
    """The Concrete-dropout regulariser of the layer that follows the dropout (a 0-dim tensor).

    ``weight_regularizer * ||W||^2 / (1 - p) + dropout_regularizer * D * (p log p + (1 - p) log(1 - p))``
    with ``D = input_dim`` (the input features of the wrapped layer), as in Gal, Hron & Kendall
    (2017). With one rate per input feature (``p_logit`` of shape ``[in]``) the first term is
    ``sum_k ||W[:, k]||^2 / (1 - p_k)`` and the entropy term is averaged over the features, so equal
    rates give the scalar formula. ``1 - p`` is ``sigmoid(-p_logit)`` and ``0 log 0 = 0``: finite for
    any finite logit. Differentiable in ``weight`` and ``p_logit``.

    Args:
        weight: ``[out, in, *]`` (a Linear or Conv weight).
        p_logit: 0-dim, or ``[in]`` (= ``weight.shape[1]``).
        input_dim: D >= 1.
        weight_regularizer, dropout_regularizer: the two coefficients (>= 0).
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(p_logit, torch.Tensor):
        raise TypeError("concrete_dropout_regularizer: weight and p_logit must be tensors")
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
        raise ValueError(f"concrete_dropout_regularizer: input_dim must be an int >= 1, got {input_dim!r}")
    if weight_regularizer < 0 or dropout_regularizer < 0:
        raise ValueError(
            "concrete_dropout_regularizer: weight_regularizer and dropout_regularizer must be >= 0, got "
            f"{weight_regularizer} and {dropout_regularizer}"
        )
    p = torch.sigmoid(p_logit)
    q = torch.sigmoid(-p_logit)
    neg_entropy = torch.special.xlogy(p, p) + torch.special.xlogy(q, q)
    if p_logit.dim() == 0:
        return weight_regularizer * weight.pow(2).sum() / q + dropout_regularizer * input_dim * neg_entropy
    if p_logit.dim() != 1 or weight.dim() < 2 or p_logit.shape[0] != weight.shape[1]:
        raise ValueError(
            "concrete_dropout_regularizer: p_logit must be 0-dim or [in_features] = weight.shape[1], got "
            f"p_logit {tuple(p_logit.shape)} and weight {tuple(weight.shape)}"
        )
    dims = [d for d in range(weight.dim()) if d != 1]
    column_sq = weight.pow(2).sum(dims)
    return weight_regularizer * (column_sq / q).sum() + dropout_regularizer * input_dim * neg_entropy.mean()


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::concrete_dropout")
    def _concrete_fake(x, p_logit, rng_state, temperature=0.1, channel_dim=-1):
        _check_devices("concrete_dropout", "x", x, p_logit=p_logit, rng_state=rng_state)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{ns}::concrete_dropout_backward")
    def _concrete_backward_fake(grad_out, x, p_logit, rng_state, temperature, channel_dim):
        _check_devices("concrete_dropout_backward", "x", x, grad_out=grad_out, p_logit=p_logit, rng_state=rng_state)
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(p_logit)


_register_fakes("bdlkern")
