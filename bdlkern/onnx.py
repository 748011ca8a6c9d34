"""ONNX export of bdlkern models, deterministic and Monte Carlo.

bdlkern's layers run custom operators (``torch.ops.bdlkern.*``) that ONNX does not know. This module
holds their translations to standard ONNX operators, as ONNX Script functions for the dynamo
exporter of PyTorch (``torch.onnx.export(..., dynamo=True)``), so that a model exports to a plain
ONNX file that any ONNX runtime (onnxruntime, ...) can run, with no bdlkern at inference time.

It needs the ``onnx`` and ``onnxscript`` packages (and ``onnxruntime`` to run the result):
``pip install onnx onnxscript onnxruntime``. ``import bdlkern`` does not import them; this module
imports onnxscript only when a translation is asked for, and says what to install if it is
missing (an ``ImportError``).

How to export::

    import torch, bdlkern, bdlkern.onnx

    model.eval()
    bdlkern.onnx.export(model, (x,), "model.onnx")          # the deterministic eval model

    with bdlkern.sampling(32):                              # MC inference: [32, *batch, out]
        bdlkern.onnx.export(model, (x,), "model_mc.onnx")   # (a conv net: [32 * N, C, ...], folded)

    # or with torch's exporter directly:
    torch.onnx.export(model, (x,), "model.onnx", dynamo=True,
                      custom_translation_table=bdlkern.onnx.translation_table())

:func:`export` is ``torch.onnx.export(..., dynamo=True)`` with :func:`translation_table` merged
into the caller's ``custom_translation_table`` (the caller's entries win), and a clear
:class:`UnsupportedOpError` when the model reaches a bdlkern op that has no translation. Every
other argument (``dynamic_shapes``, ``input_names``, ``opset_version``, ...) is passed through.

What is translated (the ops every ``bdlkern.nn`` module reaches in eval, in training and inside
``bdlkern.sampling``):

* ``sparse_linear`` (``SparseLinear`` below its crossover density; above it the layer is a dense
  ``F.linear``, a plain ``Gemm``/``MatMul``): stays sparse. The CSR buffers ``crow``, ``col`` and
  ``values`` are initializers; the row of each stored weight is computed from ``crow``
  (``ScatterElements`` + ``CumSum``, folded by the runtime at load time), the input column of
  each stored weight is gathered (``Gather`` by ``col``), scaled by the weight and summed into
  its output row (``ScatterND`` with ``reduction="add"``): work and memory proportional to nnz;
* ``mc_dropout_linear``: ``Y[s] = (X[s] * M_s) W^T / (1 - p) + b`` with keep-masks
  ``M_s = (uniform < 1 - p)``, one per (sample, row, feature), or per (sample, feature) shared by
  the rows with ``shared_mask``; ``x [B, K]`` with ``num_samples=S`` or ``x [S, B, K]``;
* ``lrt_linear`` (``SparseVDLinear``) and ``sparse_linear_lrt`` (``SparseLinear`` with weight
  variances, inside ``sampling``): ``mu + sqrt(var + 1e-8) * eps`` with eps standard normal;
* the convolutions (``MCDropoutConv1d/2d/3d``, ``SparseVDConv1d/2d/3d``, ``SparseConv1d/2d/3d``),
  with the samples folded into the batch, sample-major (row ``s * N + n`` of ``[S * N, C, *]`` is
  sample ``s`` of image ``n``), as bdlkern's conv ops: an ONNX ``Conv`` with the op's ``strides``,
  ``dilations``, ``group`` and ``pads`` (the op's symmetric ``padding`` at both ends):

  - ``mc_dropout_conv``: ``Conv(Xs * M / (1 - p), W, b)``, where ``Xs`` is the input ``[N, C, *]``
    repeated for the S samples (broadcast over them by the product; an input ``[S * N, C, *]`` as
    it is) and ``M = (uniform < 1 - p)`` one keep flag per element of ``Xs``, or per (row, channel)
    broadcast over space with channel masks (``Dropout1d/2d``); with ``shared_mask`` one mask per
    sample, broadcast over its N images. ``p = 0``: one convolution, tiled for the samples;
  - ``lrt_conv`` (``SparseVDConv*`` in training and inside ``sampling``): ``mean = Conv(x, theta, b)``,
    ``var = Conv(x^2, alpha theta^2)`` with ``log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8),
    -8, 8)``, once for the N images of a shared input, then ``mean + sqrt(var + 1e-8) * eps``
    for the S samples, eps standard normal;
  - ``sparse_conv`` (``SparseConv*`` below its crossover density; above it the layer is a dense
    convolution) and ``sparse_conv_lrt`` (``SparseConv*`` with weight variances, inside
    ``sampling``): the dense weight ``[C_out, C_in / groups, *kernel]`` is made in the graph from
    the CSR buffers (the rows from ``crow`` as for ``sparse_linear``, the values written into zeros
    by ``ScatterND``; with the buffers as initializers the exporter's optimiser or the runtime folds
    it into a constant), then ``Conv``; the LRT samples as ``lrt_conv``'s, with the variance column.
    ONNX has no sparse convolution: the file holds the dense weight (or the CSR buffers) and the
    runtime convolves densely.

  onnxruntime's CPU provider has no float64 ``Conv`` (NOT_IMPLEMENTED when the session is
  created): export conv nets in float32 to run them there;

* ``concrete_dropout`` (Concrete modules in training, or with ``relaxed_eval``) and ``uniform``
  (the hard Bernoulli masks of the Concrete modules inside ``sampling``), ``normal`` and
  ``dropout_mask``;
* ``gaussian_dropout`` (``GaussianDropout`` in training and inside ``sampling``):
  ``x * (1 + exp(0.5 log_alpha) * eps)``, eps from ``RandomNormalLike`` per element of x (per
  (n, c) with ``channel_dim=1``); in eval outside ``sampling`` the module is the identity and
  exports no node;
* ``aten.randint.low_generator``, which draws the ``rng_state`` of an unseeded ``sampling`` block
  (``bdlkern.ops.new_rng_state``) and which torch's exporter lacks; the node is dead once the
  bdlkern ops are translated and is dropped from the graph.

What the Monte Carlo translation means: the samples have the same distribution as the op's
(Bernoulli(1 - p) keep-masks, uniform and standard normal noise), but not the same bits. bdlkern
draws them from its counter-based Philox stream selected by ``rng_state``; ONNX has no such
generator, so the translations ignore ``rng_state`` (and ``sampling``'s ``seed``) and use the
runtime's random operators (``RandomUniformLike``, ``RandomNormalLike``): every run of the
exported model is a fresh draw. The sequence of draws is the runtime's: onnxruntime seeds each
random node from a process-wide seed when the session is created, so for reproducible samples call
``onnxruntime.set_seed(n)`` before creating the session. The first MC layer's ``num_samples`` is
fixed at export; the exported graph materialises the ``[S, B, K]`` masks and ``[S, B, N]`` noise
(for a convolution the ``[S * N, C, *]`` masked input and noise) that bdlkern's fused kernels never
store, and a channel mask shared by the images convolves every channel (bdlkern's kernel skips the
dropped ones). A Concrete module with one rate, which runs the fused
MC-dropout kernel in eager PyTorch, takes its unfused path (uniform masks, the same distribution)
under ``torch.export``, where its rate is not a Python number.

Opset: the translations use ONNX opset 18 operators (``ScatterElements``/``ScatterND`` with
``reduction="add"`` need opset 16 or newer); the model's opset is the exporter's
(``opset_version``, torch's default is 20; at least 18).

Not exportable (:data:`NOT_EXPORTABLE`): the backward ops (ONNX export covers the forward
pass), the KL term of sparse variational dropout (``sparse_vd_kl``, ``ard_kl``: a training objective;
compute it in PyTorch), the raw Philox stream (``philox_bits``, ``philox4x32``) and the SIMT emulator's
test ops (``torch.ops.bdlkern_simt``). A model that reaches one fails in :func:`export` with an
:class:`UnsupportedOpError` naming the op and the reason (through ``torch.onnx.export`` directly:
torch's ``ConversionError``, "No ONNX function found for <OpOverload(op='bdlkern....')>").
The forward of training mode exports (the dropout ops are the same ops), but a deployed model
belongs in ``eval()``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["translation_table", "export", "UnsupportedOpError", "NOT_EXPORTABLE", "OPSET"]

#: The ONNX opset of the operators the translations emit.
OPSET = 18

_BACKWARD = "a backward op: ONNX export covers the forward pass only"
_PHILOX = (
    "the raw Philox stream: ONNX has no counter-based generator (the translated random ops draw from "
    "the runtime's generator instead)"
)

#: bdlkern ops without a translation, and why.
NOT_EXPORTABLE: dict[str, str] = {
    "sparse_vd_kl": (
        "the KL term of sparse variational dropout is a training objective, not part of inference: "
        "compute it in PyTorch (export a forward that does not call kl() / regularization())"
    ),
    "sparse_vd_kl_with_grad": (
        "the KL term of sparse variational dropout (with its gradient) is a training objective, not part "
        "of inference: compute it in PyTorch (export a forward that does not call kl() / regularization())"
    ),
    "sparse_vd_kl_backward": _BACKWARD,
    "ard_kl": (
        "the KL term of sparse variational dropout under the ARD prior is a training objective, not part of "
        "inference: compute it in PyTorch (export a forward that does not call kl() / regularization())"
    ),
    "ard_kl_with_grad": (
        "the KL term of sparse variational dropout under the ARD prior (with its gradient) is a training "
        "objective, not part of inference: compute it in PyTorch (export a forward that does not call kl() / "
        "regularization())"
    ),
    "ard_kl_backward": _BACKWARD,
    "mc_dropout_linear_grad_input": _BACKWARD,
    "mc_dropout_linear_grad_weight": _BACKWARD,
    "concrete_dropout_backward": _BACKWARD,
    "lrt_linear_backward": _BACKWARD,
    "sparse_linear_backward": _BACKWARD,
    "sparse_linear_lrt_backward": _BACKWARD,
    "mc_dropout_conv_backward": _BACKWARD,
    "lrt_conv_backward": _BACKWARD,
    "variance_linear_backward": _BACKWARD,
    "variance_conv_backward": _BACKWARD,
    "sparse_conv_backward": _BACKWARD,
    "sparse_conv_lrt_backward": _BACKWARD,
    "philox_bits": _PHILOX,
    "philox4x32": _PHILOX,
    "gaussian_dropout_backward": _BACKWARD,
}


class UnsupportedOpError(RuntimeError):
    """The model reaches a bdlkern operator that has no ONNX translation (see :data:`NOT_EXPORTABLE`)."""


def _translations():
    """The translation module, importing onnxscript (with an ImportError that says what to install)."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "bdlkern.onnx needs the ONNX packages to export: pip install onnx onnxscript "
            "(and onnxruntime to run the exported model)"
        ) from e
    from . import _onnx_ops

    return _onnx_ops


def translation_table() -> dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: every translated
    op (``torch.ops.bdlkern.<op>.default`` and ``torch.ops.aten.randint.low_generator``) mapped to its
    ONNX Script function. A new dict on every call.

    Raises:
        ImportError: onnxscript is not installed.
    """
    return dict(_translations().table())


def export(
    model: torch.nn.Module | torch.export.ExportedProgram,
    args: tuple[Any, ...] = (),
    f=None,
    *,
    kwargs: dict[str, Any] | None = None,
    custom_translation_table: dict[Callable, Callable] | None = None,
    **export_kwargs,
):
    """``torch.onnx.export(model, args, f, kwargs=kwargs, dynamo=True, ...)`` with bdlkern's
    translations (module docstring). Inside ``bdlkern.sampling(S)`` the model is exported
    with its MC layers sampling.

    Args:
        model, args, f, kwargs: as ``torch.onnx.export`` (``f=None``: nothing is written).
        custom_translation_table: more translations; they take precedence over bdlkern's.
        **export_kwargs: passed to ``torch.onnx.export`` (``dynamic_shapes``, ``opset_version``,
            ``input_names``, ``verbose``, ...). ``dynamo=False`` (the TorchScript exporter) is refused.

    Returns:
        the ``torch.onnx.ONNXProgram`` (``.model_proto``, ``.save(path)``, ``__call__``).

    Raises:
        UnsupportedOpError: the model reaches a bdlkern op without translation (the exporter's error
            is chained).
        ImportError: onnx / onnxscript are not installed.
    """
    if export_kwargs.pop("dynamo", True) is not True:
        raise ValueError(
            "bdlkern.onnx.export: only the dynamo exporter takes custom translations; dynamo=False (the "
            "TorchScript exporter) cannot export bdlkern's ops"
        )
    table = translation_table()
    if custom_translation_table:
        table.update(custom_translation_table)
    try:
        return torch.onnx.export(
            model, args, f, kwargs=kwargs, dynamo=True, custom_translation_table=table, **export_kwargs
        )
    except Exception as e:
        missing = _missing_bdlkern_ops(e)
        if not missing:
            raise
        raise UnsupportedOpError(_unsupported_message(missing, table)) from e


_MISSING = re.compile(r"No ONNX function found for <OpOverload\(op='(bdlkern(?:_simt)?)\.(\w+)'")


def _missing_bdlkern_ops(error: BaseException) -> list[tuple[str, str]]:
    """(namespace, op) of the bdlkern ops the exporter found no translation for, from the error chain."""
    found: list[tuple[str, str]] = []
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        for match in _MISSING.findall(str(e)):
            if match not in found:
                found.append(match)
        e = e.__cause__ or e.__context__
    return found


def _unsupported_message(missing: list[tuple[str, str]], table: dict) -> str:
    translated = sorted(
        op.name().split("::")[1].split(".")[0] for op in table if isinstance(op, torch._ops.OpOverload)
        and op.namespace == "bdlkern"
    )
    lines = []
    for ns, name in missing:
        if ns == "bdlkern_simt":
            reason = "the SIMT emulator's test ops are not exportable; build the model on torch.ops.bdlkern"
        else:
            reason = NOT_EXPORTABLE.get(name, "no translation is registered for it")
        lines.append(f"torch.ops.{ns}.{name}: {reason}")
    return (
        "bdlkern.onnx.export: the model reaches bdlkern ops that have no ONNX translation:\n  "
        + "\n  ".join(lines)
        + f"\nTranslated bdlkern ops: {', '.join(translated)}."
    )
