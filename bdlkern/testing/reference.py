"""Pure-Python/PyTorch references: the test oracle (never timed; the benchmarks time their own
eager baselines, ``bdlkern.bench.baselines``, which tests/test_bench.py holds to this oracle).

Everything here is written from the definitions in docs/design.md (sections 1 and 2),
independently of the C++/CUDA kernels: the Philox generator is NumPy integer arithmetic, the
conversions are the formulas spelled out again. Tests compare every kernel against these functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_LO = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 of Salmon et al. (2011), vectorised over leading dimensions.

    Args:
        counter: integers ``[..., 4]`` in ``[0, 2**32)``.
        key: integers ``[..., 2]`` in ``[0, 2**32)`` (same leading shape, or broadcastable).

    Returns:
        ``np.uint32`` array ``[..., 4]``.
    """
    c = np.asarray(counter, dtype=np.uint64) & _LO
    k = np.asarray(key, dtype=np.uint64) & _LO
    c0, c1, c2, c3 = (c[..., i] for i in range(4))
    k0, k1 = k[..., 0], k[..., 1]
    for _ in range(10):
        p0 = _M0 * c0  # < 2**64: exact in uint64
        p1 = _M1 * c2
        c0, c1, c2, c3 = (p1 >> _SHIFT) ^ c1 ^ k0, p1 & _LO, (p0 >> _SHIFT) ^ c3 ^ k1, p0 & _LO
        k0 = (k0 + np.uint64(_W0)) & _LO
        k1 = (k1 + np.uint64(_W1)) & _LO
    return np.stack([c0, c1, c2, c3], axis=-1).astype(np.uint32)


def _state_pair(rng_state) -> tuple[int, int]:
    if isinstance(rng_state, torch.Tensor):
        seed, offset = (int(v) for v in rng_state.detach().cpu().tolist())
    else:
        seed, offset = (int(v) for v in rng_state)
    return seed % 2**64, offset % 2**64


def stream_words(rng_state, n: int, stream: int = 0) -> np.ndarray:
    """The first ``n`` words of the logical stream of docs/design.md section 2.3.

    Element ``i`` is lane ``i % 4`` of the block with counter ``(lo32(b), hi32(b), stream, 0)``,
    ``b = i // 4 + offset (mod 2**64)``, and key ``(lo32(seed), hi32(seed))``.

    Returns:
        ``np.uint32`` array of length ``n``.
    """
    seed, offset = _state_pair(rng_state)
    num_blocks = (n + 3) // 4
    b = (np.arange(num_blocks, dtype=np.uint64) + np.uint64(offset))  # wraps mod 2**64
    counter = np.stack(
        [b & _LO, b >> _SHIFT, np.full_like(b, stream), np.zeros_like(b)], axis=-1
    )
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64)
    return philox4x32_10(counter, key).reshape(-1)[:n]


def keep_threshold(p: float) -> int:
    """``T = round((1 - p) * 2**32)`` in ``[0, 2**32]`` (ties to even, like C's nearbyint)."""
    return min(max(round((1.0 - p) * 2.0**32), 0), 2**32)


def dropout_mask(rng_state, shape, p: float, stream: int = 0) -> torch.Tensor:
    """Keep-mask (``True`` = kept) rebuilt from the stream words: ``w < keep_threshold(p)``."""
    shape = tuple(shape)
    n = math.prod(shape)
    words = stream_words(rng_state, n, stream).astype(np.uint64)
    return torch.from_numpy(words < np.uint64(keep_threshold(p))).reshape(shape)


def uniform_from_words(words: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    """``(w >> 8) * 2**-24 + 2**-25``, exact in float64; in float32 rounded once and capped at
    the largest float below 1."""
    top = (np.asarray(words, dtype=np.uint32) >> np.uint32(8)).astype(np.float64)
    u = top * 2.0**-24 + 2.0**-25
    if dtype == torch.float64:
        return torch.from_numpy(u)
    u32 = u.astype(np.float32)
    return torch.from_numpy(np.minimum(u32, np.float32(np.nextafter(np.float32(1), np.float32(0)))))


def uniform(rng_state, shape, stream: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Reference of ``bdlkern.ops.uniform``."""
    shape = tuple(shape)
    return uniform_from_words(stream_words(rng_state, math.prod(shape), stream), dtype).reshape(shape)


def normal(rng_state, shape, stream: int = 0, dtype=torch.float32) -> torch.Tensor:
    """Reference of ``bdlkern.ops.normal``: Box-Muller on lanes (0,1) and (2,3), computed in
    float64 from the uniforms of ``dtype`` (compare with a tolerance: the kernel rounds each step
    in its own precision)."""
    shape = tuple(shape)
    n = math.prod(shape)
    padded = 4 * ((n + 3) // 4)
    u = uniform_from_words(stream_words(rng_state, padded, stream), dtype).double().numpy()
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    theta = 2.0 * np.pi * u2
    z = np.empty(padded, dtype=np.float64)
    z[0::2] = r * np.cos(theta)
    z[1::2] = r * np.sin(theta)
    return torch.from_numpy(z[:n]).to(dtype).reshape(shape)


def mc_dropout_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    p: float = 0.5,
    num_samples: int | None = None,
    *,
    shared_mask: bool = False,
    rng_state=None,
) -> torch.Tensor:
    """MC-dropout linear in plain PyTorch: ``x.expand(S, ...) -> dropout -> F.linear``.

    With ``rng_state`` the masks are rebuilt from the bdlkern stream (tag 1, index
    ``(s * B + b) * K + k``, or ``s * K + k`` with ``shared_mask``) -- the test oracle of
    ``bdlkern.ops.mc_dropout_linear``. Without it, ``F.dropout`` draws torch's own masks (it
    materialises the ``[S, *batch, in]`` input).
    """
    if num_samples is not None:
        x = x.unsqueeze(0).expand(num_samples, *x.shape)
    samples, features = x.shape[0], x.shape[-1]
    if rng_state is None:
        if shared_mask:
            keep = torch.empty(samples, *([1] * (x.dim() - 2)), features, device=x.device, dtype=x.dtype)
            keep.bernoulli_(1.0 - p)
            dropped = x * keep / (1.0 - p)
        else:
            dropped = torch.nn.functional.dropout(x, p, training=True)
        return torch.nn.functional.linear(dropped, weight, bias)
    rows = math.prod(x.shape[1:-1])
    stream = 1  # "mc_dropout"
    if shared_mask:
        mask = dropout_mask(rng_state, (samples, features), p, stream)
        mask = mask.reshape(samples, *([1] * (x.dim() - 2)), features)
    else:
        mask = dropout_mask(rng_state, (samples, rows, features), p, stream).reshape(x.shape)
    mask = mask.to(x.device)
    dropped = torch.where(mask, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))
    return torch.nn.functional.linear(dropped, weight, bias)


CONCRETE_EPS = 1e-7


def concrete_dropout(
    x: torch.Tensor,
    p_logit: torch.Tensor,
    temperature: float = 0.1,
    *,
    channel_dim: int | None = None,
    rng_state=None,
) -> torch.Tensor:
    """Concrete dropout written out as in the paper's notebooks (Gal, Hron & Kendall 2017)::

        p = sigmoid(p_logit)
        z = sigmoid((log(p + eps) - log(1 - p + eps) + log(u + eps) - log(1 - u + eps)) / t)
        y = x * (1 - z) / (1 - p)

    With ``rng_state`` the uniforms ``u`` are rebuilt from the bdlkern stream (tag 2, one per mask
    element: the elements of ``x``, or ``(n, c)`` with ``channel_dim=1``) -- the test oracle of
    ``bdlkern.ops.concrete_dropout``. Without it ``u = torch.rand`` (it keeps ``u`` and every
    intermediate for autograd).
    """
    eps = CONCRETE_EPS
    if channel_dim == 1:
        mask_shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
        rate = p_logit.reshape(-1, *([1] * (x.dim() - 2))) if p_logit.dim() == 1 else p_logit
    else:
        mask_shape = tuple(x.shape)
        rate = p_logit
    if rng_state is None:
        u = torch.rand(mask_shape, dtype=x.dtype, device=x.device)
    else:
        u = uniform(rng_state, (math.prod(mask_shape),), stream=2, dtype=x.dtype).reshape(mask_shape).to(x.device)
    p = torch.sigmoid(rate)
    drop = torch.log(p + eps) - torch.log(1 - p + eps) + torch.log(u + eps) - torch.log(1 - u + eps)
    z = torch.sigmoid(drop / temperature)
    return x * (1 - z) / (1 - p)


def concrete_dropout_regularizer(weight, p_logit, input_dim, weight_regularizer, dropout_regularizer):
    """docs/design.md section 1.2, for one rate: ``wr * ||W||^2 / (1 - p) + dr * D * (p log p + (1 - p) log(1 - p))``."""
    p = torch.sigmoid(p_logit)
    return weight_regularizer * (weight**2).sum() / (1 - p) + dropout_regularizer * input_dim * (
        p * torch.log(p) + (1 - p) * torch.log(1 - p)
    )


LOG_ALPHA_MIN, LOG_ALPHA_MAX = -8.0, 8.0
KL_K1, KL_K2, KL_K3 = 0.63576, 1.87320, 1.48695


def log_alpha(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """``clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)`` (docs/design.md section 1.3)."""
    return torch.clamp(log_sigma2 - torch.log(theta**2 + 1e-8), LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def lrt_linear(x, theta, log_sigma2, bias=None, num_samples=None, *, rng_state=None) -> torch.Tensor:
    """The LRT forward written out: ``mu = x theta^T + b``, ``v = x^2 (alpha theta^2)^T``,
    ``y = mu + sqrt(v + 1e-8) * eps``; ``[S, *batch, out]``.

    With ``rng_state`` eps is rebuilt from the bdlkern stream (tag 3, index ``(s * R + r) * N + o``
    over the flattened output) -- the test oracle. Without it ``eps = torch.randn`` (autograd keeps
    every intermediate).
    """
    if num_samples is not None:
        x = x.unsqueeze(0).expand(num_samples, *x.shape)
    alpha_theta2 = torch.exp(log_alpha(theta, log_sigma2)) * theta**2
    return _lrt_sample(x, theta, alpha_theta2, bias, rng_state, stream=3)


def variance_linear(x, log_sigma2, bias=None, num_samples=None, *, rng_state=None) -> torch.Tensor:
    """The variance layer written out (Neklyudov et al. 2018): weights ``N(0, exp(log_sigma2))``,
    ``y = b + sqrt(x^2 exp(log_sigma2)^T + 1e-8) * eps``, ``[S, *batch, out]``; eps as
    :func:`lrt_linear`'s (tag 3)."""
    if num_samples is not None:
        x = x.unsqueeze(0).expand(num_samples, *x.shape)
    return _lrt_sample(x, torch.zeros_like(log_sigma2), torch.exp(log_sigma2), bias, rng_state, stream=3)


def variance_conv(x, log_sigma2, bias=None, num_samples=1, *, input_has_samples=False, rng_state=None, stride=1,
                  padding=0, dilation=1, groups=1) -> torch.Tensor:
    """The variance convolution written out: ``xs`` = x repeated S times sample-major (or x itself with
    ``input_has_samples``), ``y = b + sqrt(conv(xs^2, exp(log_sigma2)) + 1e-8) * eps`` with eps element i
    of stream 3 at the row-major index of ``y [S * N, C_out, *]`` (randn without ``rng_state``)."""
    conv = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)[log_sigma2.dim() - 3]
    xs = x if input_has_samples else x.repeat(num_samples, *([1] * (x.dim() - 1)))
    var = conv(xs * xs, torch.exp(log_sigma2), None, stride, padding, dilation, groups)
    if rng_state is None:
        eps = torch.randn_like(var)
    else:
        eps = normal(rng_state, tuple(var.shape), stream=3, dtype=var.dtype).to(var.device)
    y = torch.sqrt(var + 1e-8) * eps
    if bias is not None:
        y = y + bias.reshape(-1, *([1] * (var.dim() - 2)))
    return y


def _lrt_sample(x, weight, variance, bias, rng_state, stream: int) -> torch.Tensor:
    """``mu + sqrt(v + 1e-8) * eps`` with ``mu = x W^T + b``, ``v = x^2 V^T``; eps from the bdlkern
    stream ``stream`` over the output's row-major index when ``rng_state`` is given, else randn."""
    mu = torch.nn.functional.linear(x, weight, bias)
    var = torch.nn.functional.linear(x * x, variance)
    if rng_state is None:
        eps = torch.randn_like(mu)
    else:
        eps = normal(rng_state, tuple(mu.shape), stream=stream, dtype=mu.dtype).to(mu.device)
    return mu + torch.sqrt(var + 1e-8) * eps


def sparse_vd_kl(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """Molchanov et al.'s KL approximation summed over the weights:
    ``-sum(k1 sigmoid(k2 + k3 la) - 0.5 log1p(exp(-la)) - k1)``."""
    la = log_alpha(theta, log_sigma2)
    neg_kl = KL_K1 * torch.sigmoid(KL_K2 + KL_K3 * la) - 0.5 * torch.log1p(torch.exp(-la)) - KL_K1
    return -neg_kl.sum()


def ard_kl(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """The exact KL under the ARD prior N(0, theta^2 + sigma^2) (Kharitonov et al. 2018), summed
    over the weights: ``sum(0.5 log1p(exp(-la)))``."""
    la = log_alpha(theta, log_sigma2)
    return (0.5 * torch.log1p(torch.exp(-la))).sum()


def csr_to_dense(crow, col, values, in_features: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, V or None): the dense [N, K] matrices of a CSR weight, rebuilt entry by entry."""
    n = crow.numel() - 1
    rows = torch.repeat_interleave(torch.arange(n, device=crow.device), crow[1:] - crow[:-1])
    theta = values if values.dim() == 1 else values[:, 0]
    w = torch.zeros(n, in_features, dtype=values.dtype, device=values.device)
    w[rows, col] = theta
    if values.dim() == 1:
        return w, None
    v = torch.zeros_like(w)
    v[rows, col] = values[:, 1]
    return w, v


def sparse_linear(x, crow, col, values, bias=None, num_samples=None, *, stochastic=False, rng_state=None):
    """Dense reference of ``bdlkern.ops.sparse_linear``: ``F.linear`` with the densified weight, or
    LRT samples ``mu + sqrt(x^2 V^T + 1e-8) * eps`` (eps from stream tag 4 with ``rng_state``)."""
    w, v = csr_to_dense(crow, col, values, x.shape[-1])
    if not stochastic:
        return torch.nn.functional.linear(x, w, bias)
    if num_samples is not None:
        x = x.unsqueeze(0).expand(num_samples, *x.shape)
    return _lrt_sample(x, w, v, bias, rng_state, stream=4)


def gaussian_dropout(
    x: torch.Tensor,
    log_alpha: torch.Tensor,
    *,
    channel_dim: int | None = None,
    rng_state=None,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Gaussian dropout (Kingma, Salimans & Welling 2015): ``y = x * (1 + exp(0.5 log_alpha) * eps)``.

    ``eps`` is one standard normal per noise element: the elements of ``x``, or ``(n, c)`` of
    ``[N, C, *]`` with ``channel_dim=1`` (shared by the spatial positions). Given, ``eps`` has that
    noise shape (``x.shape``, or ``[N, C, 1, ...]``); otherwise with ``rng_state`` it is rebuilt from the
    bdlkern stream (tag 5, index ``i`` of the flattened noise, by :func:`normal`) -- the test oracle of
    ``bdlkern.ops.gaussian_dropout``; without either, ``torch.randn``. ``log_alpha`` is 0-dim, ``[F]``
    (the last dim) or ``[C]`` with ``channel_dim=1``.
    """
    if channel_dim == 1:
        noise_shape = tuple(x.shape[:2]) + (1,) * (x.dim() - 2)
        rate = log_alpha.reshape(-1, *([1] * (x.dim() - 2))) if log_alpha.dim() == 1 else log_alpha
    else:
        noise_shape = tuple(x.shape)
        rate = log_alpha
    if eps is None:
        if rng_state is None:
            eps = torch.randn(noise_shape, dtype=x.dtype, device=x.device)
        else:
            eps = normal(rng_state, (math.prod(noise_shape),), stream=5, dtype=x.dtype).reshape(noise_shape)
    eps = eps.reshape(noise_shape).to(device=x.device, dtype=x.dtype)
    return x * (1 + torch.exp(0.5 * rate) * eps)
