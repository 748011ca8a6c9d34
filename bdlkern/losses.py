"""Training losses for Bayesian deep learning on Monte Carlo samples.

* :func:`alpha_divergence`: the black-box alpha-divergence energy of MC dropout (Li & Gal, ICML
  2017), on K stochastic forward passes per input, e.g. the outputs of a model run inside
  ``bdlkern.sampling(K)`` in training mode (the MC layers then draw K samples with gradients, in
  one fused call per layer).
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

__all__ = ["alpha_divergence"]

_TASKS = ("classification", "regression")
_REDUCTIONS = ("mean", "sum", "none")
_LOG_2PI = math.log(2.0 * math.pi)


def alpha_divergence(
    outputs: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.5,
    *,
    task: str = "classification",
    log_variance: torch.Tensor | None = None,
    precision: float | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The alpha-divergence data term of MC-dropout training (Li & Gal 2017), over K samples.

    Y. Li and Y. Gal, "Dropout Inference in Bayesian Neural Networks with Alpha-divergences",
    ICML 2017. With ``log p_k(n) = log p(y_n | x_n, omega_k)``, the log-likelihood of input ``n``
    under the k-th of K dropout samples ``omega_k``, the loss of input ``n`` is

        ``L_n = -(1 / alpha) * log( (1/K) * sum_k exp(alpha * log p_k(n)) )``
        ``    = -(1 / alpha) * (logsumexp_k(alpha * log p_k(n)) - log K)``.

    ``alpha = 0`` is its limit, ``-(1/K) sum_k log p_k(n)``: the data term of plain MC dropout
    (variational inference); ``alpha = 1`` is the negative log of the MC predictive likelihood;
    the paper recommends ``alpha = 0.5``. The sum is computed centred on the mean of the
    ``log p_k`` and with ``expm1`` / ``log1p``, which is the logsumexp form made accurate for
    small alpha too: it never overflows (logits of any magnitude give a finite loss) and tends to
    the ``alpha = 0`` value continuously. Add the usual weight decay (the KL term of the dropout
    posterior) to it for the full energy.

    Likelihoods:

    * ``task="classification"``: categorical, ``log p_k(n) = log_softmax(outputs[k, n])[target[n]]``;
    * ``task="regression"``: Gaussian, ``log p_k(n) = sum_d -0.5 * (log(2 pi) + v + (y - mu)^2 / exp(v))``
      with ``mu = outputs[k, n, d]`` and log-variance ``v`` from ``log_variance`` (heteroscedastic:
      a tensor broadcastable to ``outputs``, e.g. a second head of the model, per sample) or
      ``precision`` (homoscedastic: ``v = -log(tau)``, the paper's regression experiments). Give
      exactly one of them.

    Args:
        outputs: ``[K, N, C]`` logits (classification), or ``[K, N]`` / ``[K, N, D]`` means
            (regression); floating point. K is the sample dimension: a network run inside
            ``bdlkern.sampling(K)`` returns it stacked in front (an MLP), or folded into the batch
            (a conv net, ``[K * N, C]``: pass ``bdlkern.unfold_samples(out, K)``).
        target: ``[N]`` class indices, an integer dtype (classification); ``[N]`` / ``[N, D]``
            values matching ``outputs[0]`` (regression).
        alpha: ``alpha >= 0``, finite.
        task: ``"classification"`` or ``"regression"``.
        log_variance: regression only: the log-variance of the Gaussian likelihood, broadcastable
            to ``outputs`` (``[K, N, D]``, ``[N, D]``, ``[D]``, ...).
        precision: regression only: the homoscedastic precision ``tau > 0`` (a float).
        reduction: ``"mean"`` (over N, the default), ``"sum"`` or ``"none"`` (``[N]``).

    Returns:
        A scalar (``"mean"``, ``"sum"``) or ``[N]`` (``"none"``), in the dtype of ``outputs``
        promoted to at least float32. Differentiable in ``outputs`` and ``log_variance``.

    Raises:
        ValueError: ``alpha`` negative or not finite; an unknown ``task`` or ``reduction``;
            ``outputs`` without the sample dimension K (wrong rank) or with K = 0; ``target`` of
            another shape than the N (and D) of ``outputs``; class indices outside ``[0, C)``; both
            or neither of ``log_variance`` / ``precision`` for regression, either of them for
            classification; ``precision <= 0``; ``log_variance`` not broadcastable to ``outputs``;
            NaN in ``outputs`` or ``log_variance`` (these value checks are skipped under
            ``torch.compile``).
        TypeError: a non-tensor ``outputs`` / ``target`` / ``log_variance``, ``outputs`` not
            floating point, a classification ``target`` that is not an integer tensor, a
            non-real ``alpha`` or ``precision``.

    Example::

        K = 10
        model.train()
        for x, y in loader:
            with bdlkern.sampling(K):
                logits = model(x)  # [K, N, C] for an MLP of MC layers
            loss = alpha_divergence(logits, y, 0.5) + weight_decay * sum(w.pow(2).sum() for w in model.parameters())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    """
    alpha = _check_alpha(alpha)
    if task not in _TASKS:
        raise ValueError(f"alpha_divergence: task must be 'classification' or 'regression', got {task!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"alpha_divergence: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"alpha_divergence: outputs must be a tensor, got {type(outputs).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"alpha_divergence: target must be a tensor, got {type(target).__name__}")
    if not outputs.is_floating_point():
        raise TypeError(f"alpha_divergence: outputs must be a floating-point tensor, got {outputs.dtype}")
    checking = not torch.compiler.is_compiling()
    if checking and torch.isnan(outputs).any():
        raise ValueError("alpha_divergence: outputs contains NaN")
    compute = torch.promote_types(outputs.dtype, torch.float32)
    if task == "classification":
        log_p = _categorical_log_likelihood(outputs, target, log_variance, precision, compute, checking)
    else:
        log_p = _gaussian_log_likelihood(outputs, target, log_variance, precision, compute, checking)
    loss = _energy(log_p, alpha)  # [N]
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha_divergence: alpha must be a real number, got {type(alpha).__name__}")
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0.0:
        raise ValueError(f"alpha_divergence: alpha must be a finite number >= 0, got {alpha}")
    return alpha


def _samples(outputs: torch.Tensor, expected: str, rank_ok: bool) -> int:
    """K of ``outputs``; raises unless ``rank_ok`` (``outputs`` has the rank of ``expected``) and K > 0."""
    if not rank_ok:
        raise ValueError(
            f"alpha_divergence: outputs must be {expected} with the sample dimension K in front (run the model "
            "inside bdlkern.sampling(K); a conv net's folded [K * N, ...] output needs "
            f"bdlkern.unfold_samples(out, K)), got shape {tuple(outputs.shape)}"
        )
    if outputs.shape[0] == 0:
        raise ValueError(f"alpha_divergence: outputs has K = 0 samples, shape {tuple(outputs.shape)}")
    return outputs.shape[0]


def _categorical_log_likelihood(outputs, target, log_variance, precision, compute, checking) -> torch.Tensor:
    """``log_softmax(outputs)[k, n, target[n]]``: ``[K, N]``."""
    if log_variance is not None or precision is not None:
        raise ValueError("alpha_divergence: log_variance and precision are for task='regression' only")
    K = _samples(outputs, "[K, N, C] logits", outputs.dim() == 3)
    _, N, C = outputs.shape
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"alpha_divergence: target must hold class indices (an integer dtype), got {target.dtype}")
    if target.dim() != 1 or target.shape[0] != N:
        raise ValueError(
            f"alpha_divergence: target must be [N = {N}] class indices for outputs [K, N, C] = {list(outputs.shape)}, "
            f"got shape {tuple(target.shape)}"
        )
    if target.device != outputs.device:
        raise ValueError(f"alpha_divergence: target is on {target.device}, outputs on {outputs.device}")
    if checking and N > 0 and (bool((target < 0).any()) or bool((target >= C).any())):
        raise ValueError(f"alpha_divergence: target holds class indices outside [0, C = {C})")
    log_probs = F.log_softmax(outputs.to(compute), dim=-1)
    index = target.long().view(1, N, 1).expand(K, N, 1)
    return log_probs.gather(-1, index).squeeze(-1)


def _gaussian_log_likelihood(outputs, target, log_variance, precision, compute, checking) -> torch.Tensor:
    """``sum_d -0.5 * (log(2 pi) + v + (y - mu)^2 / exp(v))``: ``[K, N]``."""
    _samples(outputs, "[K, N] or [K, N, D] means", outputs.dim() in (2, 3))
    if outputs.dim() != target.dim() + 1:
        raise ValueError(
            f"alpha_divergence: regression outputs {list(outputs.shape)} need target [N] (outputs [K, N]) or [N, D] "
            f"(outputs [K, N, D]); got target shape {tuple(target.shape)} (outputs of the target's rank lack the "
            "sample dimension K: run the model inside bdlkern.sampling(K))"
        )
    if tuple(target.shape) != tuple(outputs.shape[1:]):
        raise ValueError(
            f"alpha_divergence: target shape {tuple(target.shape)} does not match outputs [K, ...] = "
            f"{list(outputs.shape)} (expected {tuple(outputs.shape[1:])})"
        )
    if not target.is_floating_point():
        raise TypeError(f"alpha_divergence: a regression target must be floating point, got {target.dtype}")
    if target.device != outputs.device:
        raise ValueError(f"alpha_divergence: target is on {target.device}, outputs on {outputs.device}")
    if (log_variance is None) == (precision is None):
        raise ValueError(
            "alpha_divergence: regression needs exactly one of log_variance (a tensor, heteroscedastic) and precision "
            f"(a float tau > 0, homoscedastic); got {'both' if log_variance is not None else 'neither'}"
        )
    mu = outputs.to(compute)
    sq = (target.to(compute) - mu).square()
    if precision is not None:
        if isinstance(precision, bool) or not isinstance(precision, numbers.Real):
            raise TypeError(f"alpha_divergence: precision must be a real number, got {type(precision).__name__}")
        tau = float(precision)
        if not (math.isfinite(tau) and tau > 0.0):
            raise ValueError(f"alpha_divergence: precision must be a finite number > 0, got {precision}")
        log_p = -0.5 * (_LOG_2PI - math.log(tau) + sq * tau)
    else:
        if not isinstance(log_variance, torch.Tensor):
            raise TypeError(f"alpha_divergence: log_variance must be a tensor, got {type(log_variance).__name__}")
        if not log_variance.is_floating_point():
            raise TypeError(f"alpha_divergence: log_variance must be floating point, got {log_variance.dtype}")
        try:
            shape = torch.broadcast_shapes(log_variance.shape, outputs.shape)
        except RuntimeError:
            shape = None
        if shape != outputs.shape:
            raise ValueError(
                f"alpha_divergence: log_variance of shape {tuple(log_variance.shape)} does not broadcast to outputs "
                f"{list(outputs.shape)}"
            )
        if checking and torch.isnan(log_variance).any():
            raise ValueError("alpha_divergence: log_variance contains NaN")
        v = log_variance.to(compute)
        log_p = -0.5 * (_LOG_2PI + v + sq * torch.exp(-v))
    return log_p.sum(-1) if log_p.dim() == 3 else log_p


def _energy(log_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """``-(1/alpha) * log mean_k exp(alpha * log_p[k])`` over dim 0 of ``log_p`` ``[K, N]``: ``[N]``.

    With ``m = mean_k log_p[k]`` and ``d_k = alpha * (log_p[k] - m)``, ``c = max_k d_k >= 0``:
    ``log mean_k exp(alpha * log_p[k]) = alpha * m + c + log1p(mean_k expm1(d_k - c))``, where
    ``d_k - c <= 0`` (no overflow) and ``expm1`` / ``log1p`` keep the small terms exact (no
    cancellation against ``log K`` as alpha goes to 0)."""
    mean = log_p.mean(0)
    if alpha == 0.0:
        return -mean
    d = alpha * (log_p - mean)
    c = d.amax(0).detach()  # any shift gives the same value; the max keeps exp() <= 1
    spread = c + torch.log1p(torch.expm1(d - c).mean(0))
    return -mean - spread / alpha
