"""MC dropout: S Monte Carlo dropout samples of a linear layer in one fused call
(:func:`mc_dropout_linear`) and of a convolution with the samples folded into the batch
(:func:`mc_dropout_conv`), and the fake kernels of their forward and backward ops."""

from __future__ import annotations

import torch

from .._C import _mc_dropout_linear_eager as _eager
from ._common import _check_devices, _conv_args, _conv_out_shape, _number, _plain, _resolve_state, _sample_dim_input, _torch_function_mode, _tracing

_op = torch.ops.bdlkern.mc_dropout_linear.default


def mc_dropout_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    p: float = 0.5,
    num_samples: int | None = None,
    *,
    shared_mask: bool = False,
    memory_efficient: bool | None = None,
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
            predictions). The CPU kernel and the fused CUDA forward skip dropped features, doing
            about ``1 - p`` of the GEMM work (and never reading the dropped weights); the CUDA
            backward and the materialise path mask them and do every product.
        memory_efficient: the CUDA path. ``True``: the fused kernel, which never holds the
            ``[S, B, in]`` masked input (it re-makes the mask per tile instead). ``False``: one
            mask pass writes the masked input (the mask itself is never stored), then cuBLAS
            multiplies it (fastest on large layers; float32 then follows
            ``torch.backends.cuda.matmul.fp32_precision`` / ``allow_tf32``); backward makes it
            again for the weight gradient. ``None`` (default): a cost model picks per call from
            the device's properties (:func:`bdlkern.ops.cost_model.mc_dropout_linear_plan`). Both
            paths draw the same masks and differ in rounding only (and, with shared masks, in
            that the fused forward never reads a dropped feature's weights: an inf there stays
            out of its output). The CPU path works on cache-sized row chunks, never holds an
            S-fold copy, and ignores this flag.
        generator / rng_state: where the masks come from (see :func:`new_rng_state`).

    Returns:
        ``[S, *batch, out]``. Differentiable in ``x``, ``weight`` and ``bias``.
    """
    if (
        rng_state is None
        and generator is None
        and memory_efficient is None
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
    if memory_efficient is not None and not isinstance(memory_efficient, bool):
        raise TypeError(f"mc_dropout_linear: memory_efficient must be True, False or None, got {memory_efficient!r}")
    y = _op(x_op, weight, bias, state, p, samples, bool(shared_mask), memory_efficient)
    return y if len(batch) == 1 else y.reshape(samples, *batch, weight.shape[0])


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::mc_dropout_linear")
    def _mc_dropout_linear_fake(x, weight, bias, rng_state, p, num_samples, shared_mask=False, memory_efficient=None):
        _check_devices("mc_dropout_linear", "x", x, weight=weight, bias=bias, rng_state=rng_state)
        batch = x.shape[-2]
        return x.new_empty((num_samples, batch, weight.shape[0]))

    @torch.library.register_fake(f"{ns}::mc_dropout_linear_grad_input")
    def _grad_input_fake(grad_out, weight, rng_state, p, shared_mask, sum_samples, memory_efficient=None):
        _check_devices("mc_dropout_linear_grad_input", "grad_out", grad_out, weight=weight, rng_state=rng_state)
        samples, batch = grad_out.shape[0], grad_out.shape[1]
        shape = (batch, weight.shape[1]) if sum_samples else (samples, batch, weight.shape[1])
        return weight.new_empty(shape)

    _register_conv_fakes(ns)

    @torch.library.register_fake(f"{ns}::mc_dropout_linear_grad_weight")
    def _grad_weight_fake(grad_out, x, rng_state, p, shared_mask, memory_efficient=None):
        _check_devices("mc_dropout_linear_grad_weight", "grad_out", grad_out, x=x, rng_state=rng_state)
        return x.new_empty((grad_out.shape[2], x.shape[-1]))




# ---- the MC-dropout convolution ---------------------------------------------------------------
_conv_op = torch.ops.bdlkern.mc_dropout_conv.default
_MASKS = ("element", "channel")


def mc_dropout_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    p: float = 0.5,
    num_samples: int = 1,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    mask: str = "element",
    shared_mask: bool = False,
    input_has_samples: bool = False,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """S Monte Carlo dropout samples of a convolution (1-d, 2-d or 3-d by the rank of ``weight``),
    with the samples folded into the batch, sample-major.

    ``Y = conv(Xs * M / (1 - p), weight, bias)``, where ``Xs`` is ``x`` repeated for the ``S``
    samples (row ``s * N + n`` is sample ``s`` of image ``n``) and ``M`` a keep-mask from the
    Philox stream (tag ``"mc_dropout"``) over logical coordinates, re-made in backward (nothing
    random is stored). One fused pass masks, scales and writes the folded input; the convolution
    is ATen's (oneDNN / cuDNN).

    Mask kinds (the stream index of a flag, ``g = s * N + n``, or ``g = s`` with ``shared_mask``):

    * ``mask="element"`` (``nn.Dropout`` before the conv): one flag per input element,
      index ``(g * C + c) * L + l`` with ``L`` the number of spatial positions;
    * ``mask="channel"`` (``nn.Dropout2d`` / ``Dropout1d``): one flag per channel plane, index
      ``g * C + c``;
    * ``shared_mask=True``: the N images of a sample share its flags (a posterior sample of the
      filter bank). With channel masks and ``groups == 1`` each sample's convolution runs on the
      kept channels only, so dropped channels cost no FLOPs (on CUDA the kept channels are read
      on the host, one 16-byte copy per call).

    A flag depends only on its coordinates, so an input with samples and the same input shared
    by all samples see the same masks.

    Args:
        x: ``[N, C_in, *spatial]`` shared by the samples, or ``[S * N, C_in, *spatial]``
            sample-major with ``input_has_samples=True``. float32 / float64 / bfloat16 (float16
            where ATen convolves it).
        weight: ``[C_out, C_in / groups, *kernel]``, same dtype and device as ``x``.
        bias: ``[C_out]`` or None.
        p: drop probability in ``[0, 1)``.
        num_samples: S >= 1.
        stride, padding, dilation, groups: as ``F.conv2d`` (``padding`` also ``"valid"`` /
            ``"same"``).
        mask: ``"element"`` or ``"channel"``.
        shared_mask: share the masks of a sample across its images.
        input_has_samples: ``x`` already carries the samples (a deeper MC layer).
        generator / rng_state: where the masks come from (see :func:`new_rng_state`).

    Returns:
        ``[S * N, C_out, *spatial_out]``, sample-major (``bdlkern.unfold_samples`` views it as
        ``[S, N, ...]``). Differentiable in ``x``, ``weight`` and ``bias``.
    """
    if mask not in _MASKS:
        raise ValueError(f"mc_dropout_conv: mask must be 'element' or 'channel', got {mask!r}")
    stride_, padding_, dilation_, groups = _conv_args(
        x, weight, num_samples, stride, padding, dilation, groups, "mc_dropout_conv", "weight"
    )
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    p = _number(p, "p", "mc_dropout_conv")
    return _conv_op(
        x, weight, bias, state, p, num_samples, not input_has_samples, stride_, padding_, dilation_,
        groups, mask == "channel", bool(shared_mask),
    )


def _register_conv_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::mc_dropout_conv")
    def _mc_dropout_conv_fake(
        x, weight, bias, rng_state, p, num_samples, shared_input, stride, padding, dilation, groups,
        channel_mask=False, shared_mask=False,
    ):
        _check_devices("mc_dropout_conv", "x", x, weight=weight, bias=bias, rng_state=rng_state)
        shape = _conv_out_shape(x, weight, num_samples, shared_input, stride, padding, dilation)
        return x.new_empty(shape)

    @torch.library.register_fake(f"{ns}::mc_dropout_conv_backward")
    def _mc_dropout_conv_backward_fake(
        grad_out, x, weight, rng_state, p, num_samples, shared_input, stride, padding, dilation, groups,
        channel_mask, shared_mask, output_mask,
    ):
        _check_devices("mc_dropout_conv_backward", "x", x, grad_out=grad_out, weight=weight, rng_state=rng_state)
        empty = x.new_empty(0)
        return (
            x.new_empty(x.shape) if output_mask[0] else empty,
            weight.new_empty(weight.shape) if output_mask[1] else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0),
        )


_register_fakes("bdlkern")
