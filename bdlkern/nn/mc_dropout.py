"""MC dropout: :class:`MCDropoutLinear`, ``nn.Dropout`` followed by ``nn.Linear`` fused into one
kernel that draws all Monte Carlo samples at once inside ``bdlkern.sampling``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .._sampling import current_sampling
from ._base import _MC_DTYPES, _NotScriptable, _check_dtype, _check_width


class MCDropoutLinear(_NotScriptable, nn.Linear):
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
            predictions); on the CPU the kernel skips the dropped features.

    The state dict is that of ``nn.Linear`` (``weight``, ``bias``). The input is checked like
    ``nn.Linear``'s (last dimension ``in_features``; the parameters' dtype): see :mod:`bdlkern.nn`.
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
        """``[*, in] -> [*, out]``; inside ``sampling(S)`` ``[*, in]`` or ``[S, *, in]`` -> ``[S, *, out]``."""
        _check_width(self, x, self.in_features)
        state = current_sampling()
        if state is not None:
            _check_dtype(self, x, self.weight.dtype, _MC_DTYPES, "MC-dropout")
            rng_state, num_samples = state.layer_call(self, x, self.in_features)
            return ops.mc_dropout_linear(
                x, self.weight, self.bias, self.p, num_samples, shared_mask=self.shared_mask, rng_state=rng_state
            )
        if self.training and self.p > 0.0:
            weight = self.weight
            _check_dtype(self, x, weight.dtype, _MC_DTYPES, "MC-dropout")
            # Training is plain dropout: one sample, per-element masks (shared_mask is a sampling
            # option). The wrapper's eager path serves the common [B, in] CPU input.
            y = ops.mc_dropout_linear(x, weight, self.bias, self.p, 1)
            return y.squeeze(0)  # a view: its backward is free, [0]'s fills zeros
        _check_dtype(self, x, self.weight.dtype)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, shared_mask={self.shared_mask}"

