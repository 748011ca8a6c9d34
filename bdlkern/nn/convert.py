"""What works on a whole model: :func:`convert` (``nn.Dropout -> nn.Linear`` pairs into
:class:`~bdlkern.nn.MCDropoutLinear`), and the sums to add to the loss, :func:`regularization` (every
bdlkern regulariser and KL term) and :func:`kl_divergence` (the KL terms of the sparse VD layers)."""

from __future__ import annotations

import torch
from torch import nn

from .concrete import _ConcreteDropoutMixin
from .mc_dropout import MCDropoutLinear
from .sparse_vd import SparseVDLinear


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """The sum of the KL terms of every :class:`SparseVDLinear` in ``model`` (0-dim)."""
    terms = [m.kl() for m in model.modules() if isinstance(m, SparseVDLinear)]
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


def convert(model: nn.Module, shared_mask: bool = False) -> nn.Module:
    """Fuse every ``nn.Dropout -> nn.Linear`` pair of the ``nn.Sequential`` containers of ``model``
    (nested ones included) into one :class:`MCDropoutLinear`, in place.

    The fused layer takes the Linear's name in its container, so ``state_dict`` keys of the
    weights are unchanged (the Dropout had none). Pairs split across containers are left alone.

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
            if type(module) is nn.Dropout and type(nxt) is nn.Linear:
                fused.append((names[i + 1], MCDropoutLinear.from_linear(nxt, module.p, shared_mask)))
                i += 2
            else:
                fused.append((names[i], module))
                i += 1
        if len(fused) != len(names):
            model._modules.clear()
            for name, module in fused:
                model._modules[name] = module
    return model
