"""Argument checks of :mod:`bdlkern.uncertainty`, shared by :func:`~bdlkern.uncertainty.mc_predict`
and the metrics. Every message starts with "<function>: <argument> ..." (the caller passes its own
name as ``fn``), so an error names the public function that was called.
"""

from __future__ import annotations

import math

import torch

_ROW_SUM_TOL = 1e-3  # how far a row of probabilities may sum from 1


# --------------------------------------------------------------------------------------------
# Argument checks. Every message starts with "<function>: <argument> ...".
# --------------------------------------------------------------------------------------------


def _check_tensor(fn: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_int(fn: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {value}")
    return value


def _check_positive_float(fn: str, name: str, value: object) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {value}")
    return value


def _check_floating(fn: str, name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{fn}: {name} must not be empty, got shape {tuple(x.shape)}")
    if torch.isnan(x).any():
        raise ValueError(f"{fn}: {name} contains NaN")


def _check_probs(fn: str, probs: object, dim: int = -1, name: str = "probs") -> torch.Tensor:
    """A floating tensor of probabilities in [0, 1] whose slices along ``dim`` sum to 1."""
    probs = _check_tensor(fn, name, probs)
    _check_floating(fn, name, probs)
    if probs.dim() == 0:
        raise ValueError(f"{fn}: {name} must have at least one dimension, got a scalar")
    if (probs < 0).any() or (probs > 1).any():
        lo, hi = probs.min().item(), probs.max().item()
        raise ValueError(f"{fn}: {name} must lie in [0, 1], got values in [{lo:.6g}, {hi:.6g}]")
    err = (probs.sum(dim, dtype=torch.float64) - 1.0).abs().max().item()
    if err > _ROW_SUM_TOL:
        raise ValueError(
            f"{fn}: {name} must sum to 1 along dim {dim} (tolerance {_ROW_SUM_TOL:g}), "
            f"largest deviation {err:.6g}"
        )
    return probs


def _check_classification(fn: str, probs: object, targets: object) -> tuple[torch.Tensor, torch.Tensor]:
    """probs [N, C] (checked by _check_probs) and integer targets [N] in [0, C), on probs' device."""
    probs = _check_tensor(fn, "probs", probs)
    if probs.dim() != 2:
        raise ValueError(f"{fn}: probs must be [N, C], got shape {tuple(probs.shape)}")
    probs = _check_probs(fn, probs)
    targets = _check_tensor(fn, "targets", targets)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"{fn}: targets must be an integer tensor of class indices, got dtype {targets.dtype}")
    if targets.dim() != 1:
        raise ValueError(f"{fn}: targets must be [N], got shape {tuple(targets.shape)}")
    if targets.shape[0] != probs.shape[0]:
        raise ValueError(
            f"{fn}: targets has {targets.shape[0]} entries but probs has {probs.shape[0]} rows"
        )
    num_classes = probs.shape[1]
    if (targets < 0).any() or (targets >= num_classes).any():
        raise ValueError(
            f"{fn}: targets must be class indices in [0, {num_classes}), got values in "
            f"[{targets.min().item()}, {targets.max().item()}]"
        )
    return probs, targets.to(device=probs.device, dtype=torch.long)
