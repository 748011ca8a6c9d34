"""``nn`` modules built on bdlkern's fused kernels.

MC layers follow one convention for the sample dimension, documented in :mod:`bdlkern._sampling`:
outside ``bdlkern.sampling(S)`` they behave like the PyTorch layers they replace; inside it they
sample and carry an explicit leading sample dimension ``S``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._sampling import current_sampling


class MCDropoutLinear(nn.Linear):
    """``nn.Dropout(p)`` followed by ``nn.Linear``, fused, with Monte Carlo sampling.

    * training (outside ``sampling``): exactly dropout then linear, ``[*, in] -> [*, out]``, with
      the mask drawn from the bdlkern Philox stream (``torch.manual_seed`` reproducible);
    * eval (outside ``sampling``): the deterministic linear layer;
    * inside ``bdlkern.sampling(S)`` (train or eval): S samples in one fused kernel. The first MC
      layer of a pass maps ``[*, in]`` to ``[S, *, out]``; later ones map ``[S, *, in]`` to
      ``[S, *, out]`` (see :mod:`bdlkern._sampling` for the exact rule).

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        p: drop probability of the layer's *input*, in ``[0, 1)``.
        shared_mask: inside ``sampling``, one mask per (sample, input feature) shared by every row
            of the batch: each sample is one weight sample applied to the whole batch (joint
            predictions), and the kernel skips the dropped features.

    The state dict is that of ``nn.Linear`` (``weight``, ``bias``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        p: float = 0.5,
        bias: bool = True,
        shared_mask: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if not (0.0 <= float(p) < 1.0):
            raise ValueError(f"MCDropoutLinear: p must be in [0, 1), got {p}")
        self.p = float(p)
        self.shared_mask = bool(shared_mask)

    @classmethod
    def from_linear(cls, linear: nn.Linear, p: float = 0.5, shared_mask: bool = False) -> "MCDropoutLinear":
        """An MC layer with a copy of ``linear``'s parameters (same device and dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(
            linear.in_features,
            linear.out_features,
            p=p,
            bias=linear.bias is not None,
            shared_mask=shared_mask,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.train(linear.training)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = current_sampling()
        if state is not None:
            rng_state = state.rng_state(x.device)
            if state.input_has_sample_dim(self):
                if x.dim() < 2 or x.shape[0] != state.num_samples:
                    raise ValueError(
                        f"MCDropoutLinear: inside sampling({state.num_samples}) this layer is not the "
                        f"first MC layer of the pass, so its input must be [S={state.num_samples}, ..., "
                        f"{self.in_features}], got shape {tuple(x.shape)}"
                    )
                return ops.mc_dropout_linear(
                    x, self.weight, self.bias, self.p, None, shared_mask=self.shared_mask, rng_state=rng_state
                )
            return ops.mc_dropout_linear(
                x, self.weight, self.bias, self.p, state.num_samples, shared_mask=self.shared_mask, rng_state=rng_state
            )
        if self.training and self.p > 0.0:
            return ops.mc_dropout_linear(x, self.weight, self.bias, self.p, 1)[0]
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, shared_mask={self.shared_mask}"


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


__all__ = ["MCDropoutLinear", "convert"]
