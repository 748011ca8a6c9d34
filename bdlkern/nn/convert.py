"""What works on a whole model: :func:`convert` (``nn.Dropout -> nn.Linear`` pairs into
:class:`~bdlkern.nn.MCDropoutLinear`, dropout -> convolution pairs into the MC-dropout
convolutions), and the sums to add to the loss, :func:`regularization` (every
bdlkern regulariser and KL term) and :func:`kl_divergence` (the KL terms of the sparse VD layers)."""

from __future__ import annotations

import torch
from torch import nn

from .concrete import _ConcreteDropoutMixin
from .mc_dropout import MCDropoutConv1d, MCDropoutConv2d, MCDropoutConv3d, MCDropoutLinear


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """The sum of the KL terms of every sparse-VD layer (:class:`SparseVDLinear`,
    :class:`SparseVDConv2d`, ...) in ``model`` (0-dim)."""
    terms = [m.kl() for m in model.modules() if getattr(m, "_bdlkern_kl", False) and callable(getattr(m, "kl", None))]
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(terms).sum()


def regularization(model: nn.Module) -> torch.Tensor:
    """The sum of every bdlkern regulariser and KL term in ``model`` (add it to the loss).

    Returns:
        0-dim tensor (0 when the model has no such module).
    """
    total = None
    for module in model.modules():
        term = None
        if isinstance(module, _ConcreteDropoutMixin):
            term = module.regularization()
        elif callable(getattr(module, "kl", None)) and getattr(module, "_bdlkern_kl", False):
            term = module.kl()
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


#: (dropout type, layer type) -> (fused type, mask kind) of the pairs :func:`convert` fuses. The
#: channel dropouts only fuse with the convolution of their rank (``Dropout2d`` zeroes planes of a
#: 4-d input).
_FUSABLE = {
    (nn.Dropout, nn.Linear): (MCDropoutLinear, None),
    (nn.Dropout, nn.Conv1d): (MCDropoutConv1d, "element"),
    (nn.Dropout, nn.Conv2d): (MCDropoutConv2d, "element"),
    (nn.Dropout, nn.Conv3d): (MCDropoutConv3d, "element"),
    (nn.Dropout1d, nn.Conv1d): (MCDropoutConv1d, "channel"),
    (nn.Dropout2d, nn.Conv2d): (MCDropoutConv2d, "channel"),
    (nn.Dropout3d, nn.Conv3d): (MCDropoutConv3d, "channel"),
}


def _fuse(dropout: nn.Module, layer: nn.Module, shared_mask: bool) -> nn.Module | None:
    """The fused MC layer of a ``dropout -> layer`` pair, or None when the pair does not fuse."""
    target = _FUSABLE.get((type(dropout), type(layer)))
    if target is None:
        return None
    fused_type, mask = target
    if mask is None:
        return fused_type.from_linear(layer, dropout.p, shared_mask)
    if layer.padding_mode != "zeros":  # the fused op pads with zeros only
        return None
    return fused_type.from_conv(layer, dropout.p, mask=mask, shared_mask=shared_mask)


def convert(model: nn.Module, shared_mask: bool = False) -> nn.Module:
    """Fuse the dropout -> layer pairs of the ``nn.Sequential`` containers of ``model`` (nested
    ones included) into bdlkern MC layers, in place:

    * ``nn.Dropout -> nn.Linear`` into :class:`MCDropoutLinear`;
    * ``nn.Dropout -> nn.Conv1d/2d/3d`` into :class:`MCDropoutConv1d/2d/3d` with element masks;
    * ``nn.Dropout1d -> nn.Conv1d``, ``nn.Dropout2d -> nn.Conv2d`` and ``nn.Dropout3d ->
      nn.Conv3d`` into the same with channel masks (convolutions with ``padding_mode="zeros"``).

    The fused layer takes the layer's name in its container, so ``state_dict`` keys of the
    weights are unchanged (the dropout had none). Pairs split across containers are left alone.

    Returns:
        ``model`` itself (a bare ``nn.Sequential`` is modified and returned too).
    """
    for child in model.children():
        convert(child, shared_mask=shared_mask)
    if isinstance(model, nn.Sequential):
        names = list(model._modules.keys())
        fused: list[tuple[str, nn.Module]] = []
        i = 0
        while i < len(names):
            module = model._modules[names[i]]
            nxt = model._modules[names[i + 1]] if i + 1 < len(names) else None
            layer = _fuse(module, nxt, shared_mask) if nxt is not None else None
            if layer is not None:
                fused.append((names[i + 1], layer))
                i += 2
            else:
                fused.append((names[i], module))
                i += 1
        if len(fused) != len(names):
            model._modules.clear()
            for name, module in fused:
                model._modules[name] = module
    return model
