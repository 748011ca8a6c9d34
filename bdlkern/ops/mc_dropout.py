"""MC-dropout linear: S Monte Carlo dropout samples of a linear layer in one fused call
(:func:`mc_dropout_linear`), and the fake kernels of the forward and of its two backward ops."""

from __future__ import annotations

import torch

from .._C import _mc_dropout_linear_eager as _eager
from ._common import _check_devices, _number, _plain, _resolve_state, _sample_dim_input, _torch_function_mode, _tracing

_op = torch.ops.bdlkern.mc_dropout_linear.default


def mc_dropout_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    p: float = 0.5,
    num_samples: int | None = None,
    *,
    shared_mask: bool = False,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """S Monte Carlo dropout samples of a linear layer in one fused call.

    ``Y[s] = (X[s] * M_s) @ weight.T / (1 - p) + bias`` for ``s < S``, where ``M_s`` is a keep-mask
    made from the Philox stream (tag ``"mc_dropout"``) over the logical coordinates
    ``(s, row, feature)`` -- or ``(s, feature)`` with ``shared_mask`` -- and re-made in backward:
    no ``[S, *batch, in]`` tensor is ever stored.

    The sample dimension is explicit, never guessed from shapes:

    * ``num_samples=S``: ``x`` is ``[*batch, in]`` and every sample uses it (an input without a
      sample dimension, e.g. the first MC layer of a network);
    * ``num_samples=None``: ``x`` is ``[S, *batch, in]`` and sample ``s`` uses ``x[s]`` (a deeper MC
      layer). A broadcast view ``x.expand(S, ...)`` is read once.

    Args:
        x: input, float32 / float64 / bfloat16 (float16 on CUDA).
        weight: ``[out, in]``, same dtype and device as ``x``.
        bias: ``[out]`` or None.
        p: drop probability in ``[0, 1)``.
        num_samples: S for an input without sample dimension, else None.
        shared_mask: one mask per (sample, input feature), shared by every row of the batch: a
            posterior sample of the weights applied to all inputs (the right semantics for joint
            predictions); on the CPU the kernel skips dropped features, doing about ``1 - p`` of the GEMM
            work (the CUDA kernel does all of it).
        generator / rng_state: where the masks come from (see :func:`new_rng_state`).

    Returns:
        ``[S, *batch, out]``. Differentiable in ``x``, ``weight`` and ``bias``.
    """
    if (
        rng_state is None
        and generator is None
        and type(num_samples) is int
        and num_samples >= 1
        and type(p) is float
        and x.__class__ is torch.Tensor
        and x.dim() == 2
        and x.is_cpu
        and _plain(weight)
        and weight.dim() == 2
        and x.shape[1] == weight.shape[1]
        and (bias is None or _plain(bias))
        and not _tracing()
        and not _torch_function_mode()
    ):
        # The common eager call ([B, in] CPU input, a fresh state, the shapes the checks below
        # would pass): go straight to the op, unboxed; it checks the rest itself. Anything else,
        # bad input included, takes the general path and its errors.
        return _eager(x, weight, bias, p, num_samples, bool(shared_mask))
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("mc_dropout_linear: x and weight must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"mc_dropout_linear: weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    x_op, samples, batch = _sample_dim_input(x, weight.shape[1], num_samples, "mc_dropout_linear", "weight expects")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    p = _number(p, "p", "mc_dropout_linear")
    y = _op(x_op, weight, bias, state, p, samples, bool(shared_mask))
    return y if len(batch) == 1 else y.reshape(samples, *batch, weight.shape[0])


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::mc_dropout_linear")
    def _mc_dropout_linear_fake(x, weight, bias, rng_state, p, num_samples, shared_mask=False):
        _check_devices("mc_dropout_linear", "x", x, weight=weight, bias=bias, rng_state=rng_state)
        batch = x.shape[-2]
        return x.new_empty((num_samples, batch, weight.shape[0]))

    @torch.library.register_fake(f"{ns}::mc_dropout_linear_grad_input")
    def _grad_input_fake(grad_out, weight, rng_state, p, shared_mask, sum_samples):
        _check_devices("mc_dropout_linear_grad_input", "grad_out", grad_out, weight=weight, rng_state=rng_state)
        samples, batch = grad_out.shape[0], grad_out.shape[1]
        shape = (batch, weight.shape[1]) if sum_samples else (samples, batch, weight.shape[1])
        return weight.new_empty(shape)

    @torch.library.register_fake(f"{ns}::mc_dropout_linear_grad_weight")
    def _grad_weight_fake(grad_out, x, rng_state, p, shared_mask):
        _check_devices("mc_dropout_linear_grad_weight", "grad_out", grad_out, x=x, rng_state=rng_state)
        return x.new_empty((grad_out.shape[2], x.shape[-1]))


_register_fakes("bdlkern")
