"""What every module of :mod:`bdlkern.nn` shares: the checks of the input (its width and dtype,
raising errors in the module's terms, as described in :mod:`bdlkern.nn`), the dtypes each kernel
family takes, and :class:`_NotScriptable`, the base that makes ``torch.jit.script`` fail with a
clear message."""

from __future__ import annotations

import math

import torch
from torch import nn

# ---- input checks shared by the modules ------------------------------------------------------------
#: Parameter dtypes of the kernels: the Concrete, LRT, KL and sparse kernels take float32/float64;
#: the MC-dropout kernel also bfloat16 (and float16 on CUDA, allowed in :func:`_dtype_error`).
_F32_F64 = frozenset({torch.float32, torch.float64})
_MC_DTYPES = frozenset({torch.float32, torch.float64, torch.bfloat16})


def _module_label(module: nn.Module) -> str:
    """``Name(in_features=.., out_features=..)``: how error messages name a module. A module named
    otherwise (a wrapper, named by the layer it wraps) defines ``_error_label()``."""
    error_label = getattr(module, "_error_label", None)
    if error_label is not None:
        return error_label()
    name = type(module).__name__
    return f"{name}(in_features={module.in_features}, out_features={module.out_features})"


def _width_error(module: nn.Module, x: torch.Tensor, expected: int) -> ValueError:
    """The error for an input whose last dimension is not ``expected`` (the layer's in_features)."""
    if x.dim() == 0:
        got = "is a 0-dim tensor (a scalar)"
    else:
        got = f"has {x.shape[-1]} features in its last dimension"
    return ValueError(f"{_module_label(module)}: input {got}, expected {expected}")


def _check_width(module: nn.Module, x: torch.Tensor, expected: int) -> None:
    """``x.shape[-1] == expected`` (the check ``nn.Linear`` makes), in the module's terms."""
    try:
        ok = x.shape[-1] == expected
    except IndexError:  # a 0-dim input
        ok = False
    if not ok:
        raise _width_error(module, x, expected)


def _check_memory_efficient(module: nn.Module, value) -> bool | None:
    """The ``memory_efficient`` argument of a module (``True``, ``False`` or ``None``)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{type(module).__name__}: memory_efficient must be True, False or None, got {value!r}")
    return value


def _check_conv_input(module: nn.Module, x: torch.Tensor, dims: int, in_channels: int, where: str) -> None:
    """``x`` is ``[B, in_channels, *dims spatial]`` (the check a torch convolution makes), in the
    module's terms; ``where`` says which input was expected."""
    if x.dim() != dims + 2 or x.shape[1] != in_channels:
        spatial = ", ".join(["*"] * dims)
        name = type(module).__name__
        label = f"{name}(in_channels={in_channels}, out_channels={module.out_channels})"
        raise ValueError(f"{label}: expected {where} [B, {in_channels}, {spatial}], got shape {tuple(x.shape)}")


def _check_dtype(
    module: nn.Module, x: torch.Tensor, param_dtype: torch.dtype, kernel_dtypes=None, kernel: str = ""
) -> None:
    """``x`` has the parameters' dtype, which the kernel the call runs supports (``kernel_dtypes``;
    None: the call runs no bdlkern kernel). The common case is two compares."""
    if x.dtype != param_dtype or (kernel_dtypes is not None and param_dtype not in kernel_dtypes):
        _dtype_error(module, x, param_dtype, kernel_dtypes, kernel)


def _dtype_error(module, x, param_dtype, kernel_dtypes, kernel) -> None:
    """The slow path of :func:`_check_dtype`: raises, unless autocast or a CUDA-only dtype allows it."""
    if torch.is_autocast_enabled(x.device.type):
        return  # the ops' autocast rules cast the inputs: mixed dtypes are legal here
    name = type(module).__name__
    if x.dtype != param_dtype:
        raise TypeError(
            f"{name}: input is {x.dtype} but the parameters are {param_dtype}; convert one of them "
            f"(module.to({x.dtype}) or x.to({param_dtype}))"
        )
    if kernel_dtypes is _MC_DTYPES and param_dtype == torch.float16 and x.device.type == "cuda":
        return
    supported = ", ".join(str(d) for d in sorted(kernel_dtypes, key=str))
    if kernel_dtypes is _MC_DTYPES:
        supported += ", torch.float16 (CUDA only)"
    raise TypeError(
        f"{name}: parameters of dtype {param_dtype} are not supported by the {kernel} kernel (it takes "
        f"{supported}); keep the parameters in torch.float32 and run the model under "
        f"torch.autocast(\"{x.device.type}\", dtype={param_dtype}) for lower precision"
    )


class _NotScriptable:
    """TorchScript cannot compile bdlkern's modules (their forward reads the Python-side
    ``sampling`` state and calls Python op wrappers): ``torch.jit.script`` calls this hook on a
    module and each of its submodules before it compiles anything, so it fails with a clear
    message instead of an error from deep inside the compiler."""

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"bdlkern.nn.{type(self).__name__}: TorchScript (torch.jit.script) is not supported; use "
            "torch.compile or torch.export (torch.export.export) to compile or serialise the model"
        )



def _conv_out_spatial(layer: nn.Module, spatial, kernel) -> list[int]:
    """The spatial output size of the convolution ``layer`` (its ``stride``, ``padding``,
    ``dilation``; ``padding`` may be ``"same"`` / ``"valid"``) on an input of ``spatial`` size."""
    padding = layer.padding
    if isinstance(padding, str):
        if padding == "same":
            return list(spatial)
        padding = (0,) * len(spatial)
    return [
        max((n + 2 * p - d * (k - 1) - 1) // s + 1, 0)
        for n, k, s, p, d in zip(spatial, kernel, layer.stride, padding, layer.dilation)
    ]


def _image_out_numel(layer: nn.Module, x: torch.Tensor, dims: int, kernel, out_channels: int) -> int:
    """The elements of one output image ``[C_out, *spatial_out]`` of the convolution ``layer``
    on ``x [..., C, *spatial]``: what an op that draws noise over its output draws per image and
    sample (see ``SamplingState.conv_call``)."""
    spatial = x.shape[-dims:] if dims else ()
    return out_channels * math.prod(_conv_out_spatial(layer, spatial, kernel))


def _copied_from(layer: nn.Module, source: nn.Module, weight: str = "weight") -> nn.Module:
    """``layer`` with copies of ``source``'s weight (into ``layer.<weight>``) and bias, in
    ``source``'s training mode: what every ``from_linear`` / ``from_conv`` ends with."""
    with torch.no_grad():
        getattr(layer, weight).copy_(source.weight)
        if source.bias is not None:
            layer.bias.copy_(source.bias)
    layer.train(source.training)
    return layer
