"""The eager PyTorch baselines that the benchmark cases time against bdlkern.

A baseline answers "how fast is this without bdlkern?", so it is the code a competent PyTorch user
writes for the job: torch ops only, torch's own generators for the random draws, nothing done
twice that could be done once (a scale is applied to a small mask, not to the big tensor it
multiplies; a fused torch op is used where one exists). It is not the test oracle:
:mod:`bdlkern.testing.reference` is written for exactness, rebuilds bdlkern's Philox stream in
NumPy and is never timed; the cases' ``check`` functions compare bdlkern with it.

The baselines compute the same functions as the oracle. Where a random draw can be kept apart
from the arithmetic (the shared MC-dropout mask, the Concrete uniforms, the LRT noise), the
function takes the draw as an optional keyword: ``None``, as every timed call passes, draws it
from torch's generator; a given tensor lets ``tests/test_bench.py`` feed the oracle's stream and
compare the results exactly. ``F.dropout`` draws inside one op, so the per-element MC-dropout
baseline is compared by its moments instead.

One-call library paths (``torch.rand``, ``torch.bernoulli_``, dense ``F.linear``) and the limit
proxies (a plain GEMM or elementwise pass of the case's shape) stay in the case modules: they are
a line of torch each and compute nothing a user could write differently.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# ---- MC dropout ---------------------------------------------------------------------------------


def mc_dropout_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: float, num_samples: int
) -> torch.Tensor:
    """``num_samples`` MC-dropout samples of a linear layer: ``x.expand(S, ...) -> F.dropout ->
    F.linear``, ``[S, *batch, out]``. Every element of the ``[S, *batch, in]`` input gets its own
    mask (torch draws and materialises it inside ``F.dropout``)."""
    samples = x.unsqueeze(0).expand(num_samples, *x.shape)
    return F.linear(F.dropout(samples, p, training=True), weight, bias)


def mc_dropout_linear_shared(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    p: float,
    num_samples: int,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MC dropout with one keep-mask per sample and input feature, shared by every row of ``x``
    (a weight sample per pass): ``[S, *batch, out]``.

    The ``[S, 1, ..., in]`` mask is drawn with ``bernoulli_`` (or taken from ``mask``: ``S * in``
    booleans, ``True`` = kept) and divided by ``1 - p`` while it is small, so the big
    ``[S, *batch, in]`` input is written once, by the broadcast product.
    """
    keep = 1.0 - p
    shape = (num_samples, *([1] * (x.dim() - 1)), x.shape[-1])
    if mask is None:
        scale = torch.empty(shape, dtype=x.dtype, device=x.device).bernoulli_(keep).div_(keep)
    else:
        scale = mask.reshape(shape).to(device=x.device, dtype=x.dtype) / keep
    return F.linear(x * scale, weight, bias)


# ---- Concrete dropout ---------------------------------------------------------------------------

#: The ``eps`` of the notebooks' formula, inside every log.
CONCRETE_EPS = 1e-7


def concrete_dropout(
    x: torch.Tensor, p_logit: torch.Tensor, temperature: float, *, u: torch.Tensor | None = None
) -> torch.Tensor:
    """Concrete dropout of every element of ``x``, the formula of Gal, Hron & Kendall's notebooks::

        p = sigmoid(p_logit)
        z = sigmoid((log(p + eps) - log(1 - p + eps) + log(u + eps) - log(1 - u + eps)) / t)
        y = x * (1 - z) / (1 - p)

    ``u`` (shaped like ``x``) defaults to ``torch.rand_like(x)``. Autograd keeps ``u`` and the
    intermediates for the backward, as it does for any user who writes this.
    """
    eps = CONCRETE_EPS
    p = torch.sigmoid(p_logit)
    if u is None:
        u = torch.rand_like(x)
    logit_p = torch.log(p + eps) - torch.log(1 - p + eps)  # a scalar per rate: cheap
    z = torch.sigmoid((logit_p + torch.log(u + eps) - torch.log(1 - u + eps)) / temperature)
    return x * (1 - z) / (1 - p)


def concrete_dropout_regularizer(
    weight: torch.Tensor,
    p_logit: torch.Tensor,
    input_dim: int,
    weight_regularizer: float,
    dropout_regularizer: float,
) -> torch.Tensor:
    """The notebooks' regulariser for one scalar rate:
    ``wr * ||W||^2 / (1 - p) + dr * D * (p log p + (1 - p) log(1 - p))``."""
    p = torch.sigmoid(p_logit)
    weight_term = weight_regularizer * weight.pow(2).sum() / (1 - p)
    return weight_term + dropout_regularizer * input_dim * (p * torch.log(p) + (1 - p) * torch.log(1 - p))


class EagerConcreteLinear(nn.Module):
    """Concrete dropout in front of an ``nn.Linear``, as the notebooks write the layer: a learnt
    scalar logit, the relaxed mask from :func:`concrete_dropout`, and the regulariser
    (:meth:`regularization`) that the loss adds, scaled by the training-set size."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        init_p: float = 0.1,
        temperature: float = 0.1,
        weight_regularizer: float = 1e-6,
        dropout_regularizer: float = 1e-5,
    ):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.p_logit = nn.Parameter(torch.tensor(math.log(init_p) - math.log1p(-init_p)))
        self.temperature = temperature
        self.weight_regularizer = weight_regularizer
        self.dropout_regularizer = dropout_regularizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(concrete_dropout(x, self.p_logit, self.temperature))

    def regularization(self) -> torch.Tensor:
        return concrete_dropout_regularizer(
            self.linear.weight, self.p_logit, self.linear.in_features, self.weight_regularizer, self.dropout_regularizer
        )


# ---- sparse variational dropout: the LRT layer and the KL ---------------------------------------

LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 8.0
#: The constants of Molchanov et al.'s KL approximation.
KL_K1, KL_K2, KL_K3 = 0.63576, 1.87320, 1.48695


def log_alpha(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)``."""
    return torch.clamp(log_sigma2 - torch.log(theta**2 + 1e-8), LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def lrt_moments(
    x: torch.Tensor, weight: torch.Tensor, variance: torch.Tensor, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of the pre-activations of a Gaussian weight: ``x W^T + b`` and
    ``x^2 V^T``, two ``F.linear``."""
    return F.linear(x, weight, bias), F.linear(x * x, variance)


def lrt_noise(
    mu: torch.Tensor, var: torch.Tensor, num_samples: int | None = None, *, eps: torch.Tensor | None = None
) -> torch.Tensor:
    """``mu + sqrt(var + 1e-8) * eps``: ``[S, *mu.shape]`` samples (the moments computed once and
    broadcast over the samples), or one sample shaped like ``mu`` when ``num_samples`` is None.
    ``eps`` defaults to ``torch.randn`` of that shape."""
    if eps is None:
        shape = mu.shape if num_samples is None else (num_samples, *mu.shape)
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
    return mu + torch.sqrt(var + 1e-8) * eps


def lrt_sample(
    x: torch.Tensor,
    weight: torch.Tensor,
    variance: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_samples: int | None = None,
    *,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Local-reparameterisation samples of a dense layer with weight means ``W`` and variances
    ``V``: :func:`lrt_moments` then :func:`lrt_noise`."""
    mu, var = lrt_moments(x, weight, variance, bias)
    return lrt_noise(mu, var, num_samples, eps=eps)


def lrt_linear(
    x: torch.Tensor,
    theta: torch.Tensor,
    log_sigma2: torch.Tensor,
    bias: torch.Tensor | None = None,
    num_samples: int | None = None,
    *,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """The sparse-VD training layer: LRT samples with ``V = alpha theta^2 = exp(log_alpha) theta^2``
    (:func:`lrt_sample`); autograd differentiates through everything."""
    variance = torch.exp(log_alpha(theta, log_sigma2)) * theta**2
    return lrt_sample(x, theta, variance, bias, num_samples, eps=eps)


def sparse_vd_kl(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s approximation of the KL term, summed over the weights:
    ``-sum(k1 sigmoid(k2 + k3 la) - 0.5 softplus(-la) - k1)``. ``softplus(-la)`` is
    ``log1p(exp(-la))`` in one op."""
    la = log_alpha(theta, log_sigma2)
    return -(KL_K1 * torch.sigmoid(KL_K2 + KL_K3 * la) - 0.5 * F.softplus(-la) - KL_K1).sum()


class EagerLRTLinear(nn.Module):
    """The sparse-VD layer as users write it: parameters ``theta``, ``log_sigma2`` and ``bias``,
    one LRT sample per input in training (:func:`lrt_linear`), and :meth:`kl` for the loss."""

    def __init__(self, in_features: int, out_features: int, init_log_sigma2: float = -10.0):
        super().__init__()
        self.theta = nn.Parameter(torch.randn(out_features, in_features) / math.sqrt(in_features))
        self.log_sigma2 = nn.Parameter(torch.full((out_features, in_features), init_log_sigma2))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrt_linear(x, self.theta, self.log_sigma2, self.bias)

    def kl(self) -> torch.Tensor:
        return sparse_vd_kl(self.theta, self.log_sigma2)


# ---- pruned layers with torch.sparse ------------------------------------------------------------


def to_csr(dense: torch.Tensor) -> torch.Tensor:
    """``dense.to_sparse_csr()`` without torch's "sparse CSR support is in beta" warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return dense.to_sparse_csr()


class CsrLinear:
    """A pruned linear layer on torch.sparse CSR products, its weights converted once.

    ``__call__(x)`` is ``y = x W^T + b`` as ``addmm(b[:, None], W_csr, x^T)^T``: torch has no
    dense x CSR^T product, so the CSR weight multiplies ``x^T`` and the bias rides along as a
    column. With a ``variance`` matrix the layer also draws LRT samples (:meth:`sample`), the
    variance one more CSR product of ``x^2``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, variance: torch.Tensor | None = None):
        self.weight = to_csr(weight)
        self.variance = None if variance is None else to_csr(variance)
        self.bias_col = None if bias is None else bias.unsqueeze(1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias_col is None:
            return torch.sparse.mm(self.weight, x.t()).t()
        return torch.addmm(self.bias_col, self.weight, x.t()).t()

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``x W^T + b`` and variance ``x^2 V^T`` of the pre-activations."""
        if self.variance is None:
            raise ValueError("CsrLinear.moments needs the variance matrix")
        return self(x), torch.sparse.mm(self.variance, (x * x).t()).t()

    def sample(self, x: torch.Tensor, num_samples: int | None = None, *, eps: torch.Tensor | None = None) -> torch.Tensor:
        """LRT samples (:func:`lrt_noise`) from the two sparse products."""
        mu, var = self.moments(x)
        return lrt_noise(mu, var, num_samples, eps=eps)
