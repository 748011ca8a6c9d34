"""Functional API of bdlkern's operators.

Every random op is driven by an ``rng_state``: an int64 tensor ``[seed, offset]`` on the device the
op runs on. Given the same ``rng_state`` an op draws the same random bits (masks, uniforms, noise)
on the CPU, on CUDA and under the SIMT emulator, for any thread count (docs/design.md section 2),
and bdlkern's own kernels and reductions return the same bits for any thread count. Matrix products
that an op hands to torch's BLAS (the CPU MC-dropout and LRT paths) carry the BLAS's rounding,
which for MKL's float32 GEMM changes in the last bits with the thread count. When ``rng_state`` is
omitted it is
drawn from torch's generator (:func:`new_rng_state`), so ``torch.manual_seed`` makes every bdlkern
op reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import math
import operator

import torch

from . import _C

# Stream tags (Philox counter word 2), mirrored from csrc/include/bdlkern/random.h. Each op family
# draws from its own tag; the numbers are part of the reproducibility contract.
STREAMS: dict[str, int] = {
    "user": 0,
    "mc_dropout": 1,
    "concrete_dropout": 2,
    "lrt": 3,
    "sparse_lrt": 4,
}

_NAMESPACES = ["bdlkern"]
if hasattr(torch.ops, "bdlkern_simt") and hasattr(torch.ops.bdlkern_simt, "philox_bits"):
    _NAMESPACES.append("bdlkern_simt")

ShapeLike = int | Sequence[int] | torch.Size


def _is_int(v) -> bool:
    """An integer index (int, NumPy integer, SymInt), not a bool or a float."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _shape(shape: ShapeLike, name: str = "shape") -> list[int]:
    if _is_int(shape):
        return [shape if isinstance(shape, (int, torch.SymInt)) else operator.index(shape)]
    if not isinstance(shape, (str, bytes)):
        try:
            dims = list(shape)
        except TypeError:
            dims = None
        if dims is not None and all(_is_int(d) for d in dims):
            return [d if isinstance(d, (int, torch.SymInt)) else operator.index(d) for d in dims]
    raise TypeError(f"{name} must be an int or a sequence of ints, got {shape!r}")


def _number(value, name: str, op: str) -> float:
    """A real-valued argument as a Python float, with an error naming it."""
    if value is None or isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}") from None


def _stream(stream: int | str) -> int:
    if isinstance(stream, str):
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {sorted(STREAMS)} or its tag, got {stream!r}")
        return STREAMS[stream]
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise TypeError(f"stream must be an int tag or a stream name, got {type(stream).__name__}")
    return stream


def new_rng_state(
    generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Draw a fresh ``rng_state`` from torch's random generator.

    Args:
        generator: the torch generator to draw from (default: the global generator of ``device``,
            seeded by ``torch.manual_seed``).
        device: where the state lives, which is where the ops that consume it run. Defaults to the
            generator's device, else the CPU.

    Returns:
        int64 tensor of shape ``[2]``: a random 63-bit ``seed`` and ``offset = 0``.
    """
    if generator is None and (device is None or _is_cpu(device)) and not _tracing():
        return _C._draw_cpu_rng_state()  # the same seed, one call instead of three ops
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but device is {device}: draw the state from a "
            "generator of the device the op runs on"
        )
    # Out-of-place draw (traceable by torch.compile): seed uniform in [0, 2**63 - 1), offset 0.
    seed = torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=device)])


def _is_cpu(device) -> bool:
    return device == "cpu" or (isinstance(device, torch.device) and device.type == "cpu")


_is_compiling = torch.compiler.is_compiling
_is_exporting = torch.compiler.is_exporting


def _tracing() -> bool:
    """Whether torch.compile / torch.export is tracing the call (they need the traceable draw)."""
    return _is_compiling() or _is_exporting()


def _resolve_state(
    rng_state: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    if rng_state is None:
        return new_rng_state(generator, device)
    if generator is not None:
        raise ValueError("pass rng_state or generator, not both")
    if not isinstance(rng_state, torch.Tensor):
        raise TypeError(f"rng_state must be an int64 tensor [seed, offset], got {type(rng_state).__name__}")
    if device is not None and rng_state.device != torch.device(device):
        raise ValueError(f"rng_state is on {rng_state.device} but device is {device}")
    return rng_state


def philox_bits(
    shape: ShapeLike,
    *,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The raw 32-bit words of the logical Philox stream (a test and reference helper).

    Element ``i`` (row-major) is lane ``i mod 4`` of Philox4x32-10 block ``i div 4 + offset`` with
    counter ``(lo32, hi32 of the block index, stream tag, 0)`` and key ``(lo32, hi32 of seed)``.

    Returns:
        int32 tensor of ``shape`` on ``rng_state``'s device (reinterpret as uint32).
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.philox_bits(state, _shape(shape), _stream(stream))


def dropout_mask(
    shape: ShapeLike,
    p: float,
    *,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Bernoulli keep-mask with drop probability ``p``: ``True`` where the element is kept.

    Element ``i`` is kept iff its stream word ``w_i < T`` with ``T = round((1 - p) * 2**32)``
    (an integer compare, so masks are bit-identical across devices). ``p = 0`` keeps everything,
    ``p = 1`` drops everything.

    Args:
        shape: output shape.
        p: drop probability in ``[0, 1]``.

    Returns:
        bool tensor of ``shape`` on ``rng_state``'s device.
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.dropout_mask(state, _shape(shape), _number(p, "p", "dropout_mask"), _stream(stream))


def uniform(
    shape: ShapeLike,
    *,
    dtype: torch.dtype = torch.float32,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform samples in the open interval (0, 1): ``(w >> 8) * 2**-24 + 2**-25``.

    In float32 the largest value is clamped to the largest float below 1, so 0 and 1 never occur.

    Returns:
        float32 or float64 tensor of ``shape`` on ``rng_state``'s device.
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.uniform(state, _shape(shape), _stream(stream), dtype)


def normal(
    shape: ShapeLike,
    *,
    dtype: torch.dtype = torch.float32,
    rng_state: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    stream: int | str = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Standard normal samples by Box-Muller on lanes (0, 1) and (2, 3) of each Philox block.

    Elements ``4k, 4k+1`` are ``r cos(2 pi u2), r sin(2 pi u2)`` with ``r = sqrt(-2 log u1)`` from the
    uniforms of lanes 0 and 1 of block ``k``; elements ``4k+2, 4k+3`` likewise from lanes 2 and 3.

    Returns:
        float32 or float64 tensor of ``shape`` on ``rng_state``'s device.
    """
    state = _resolve_state(rng_state, generator, device)
    return torch.ops.bdlkern.normal(state, _shape(shape), _stream(stream), dtype)


# ---- MC-dropout linear -----------------------------------------------------------------------------
def _sample_dim_input(
    x: torch.Tensor, in_features: int | None, num_samples: int | None, op: str, weight: str = "the weights expect"
):
    """(x as the op takes it, S, batch shape) under the explicit sample-dimension rule, shared by
    every sampling op: ``num_samples=S`` with ``x [*batch, in]`` (x as ``[rows, in]``), or
    ``num_samples=None`` with ``x [S, *batch, in]`` (x as ``[S, rows, in]``). ``in_features=None``
    leaves the feature check to the op."""
    if num_samples is None:
        if x.dim() < 2:
            raise ValueError(
                f"{op}: x has no sample dimension (shape {tuple(x.shape)}): pass num_samples=S for an input "
                "shared by all samples, or x of shape [S, *batch, in_features]"
            )
        samples, batch = x.shape[0], x.shape[1:-1]
        # Explicit sizes: reshape(..., -1, K) is ambiguous for K == 0.
        x_op = x.reshape(samples, math.prod(batch), x.shape[-1]) if x.dim() != 3 else x
    else:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"{op}: num_samples must be an int or None, got {type(num_samples).__name__}")
        if num_samples < 1:
            raise ValueError(f"{op}: num_samples must be >= 1, got {num_samples}")
        if x.dim() < 1:
            raise ValueError(f"{op}: x must have a feature dimension")
        samples, batch = num_samples, x.shape[:-1]
        # A 2-d x is already [rows, in]: no view (it costs more than a small layer's kernel).
        x_op = x if x.dim() == 2 else x.reshape(math.prod(batch), x.shape[-1])
    if in_features is not None and x.shape[-1] != in_features:
        raise ValueError(f"{op}: x has {x.shape[-1]} features but {weight} in_features = {in_features}")
    return x_op, samples, batch


def mc_dropout_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    p: float = 0.5,
    num_samples: int | None = None,
    *,
    shared_mask: bool = False,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """S Monte Carlo dropout samples of a linear layer in one fused call.

    ``Y[s] = (X[s] * M_s) @ weight.T / (1 - p) + bias`` for ``s < S``, where ``M_s`` is a keep-mask
    made from the Philox stream (tag ``"mc_dropout"``) over the logical coordinates
    ``(s, row, feature)`` -- or ``(s, feature)`` with ``shared_mask`` -- and re-made in backward:
    no ``[S, *batch, in]`` tensor is ever stored.

    The sample dimension is explicit, never guessed from shapes:

    * ``num_samples=S``: ``x`` is ``[*batch, in]`` and every sample uses it (an input without a
      sample dimension, e.g. the first MC layer of a network);
    * ``num_samples=None``: ``x`` is ``[S, *batch, in]`` and sample ``s`` uses ``x[s]`` (a deeper MC
      layer). A broadcast view ``x.expand(S, ...)`` is read once.

    Args:
        x: input, float32 / float64 / bfloat16 (float16 on CUDA).
        weight: ``[out, in]``, same dtype and device as ``x``.
        bias: ``[out]`` or None.
        p: drop probability in ``[0, 1)``.
        num_samples: S for an input without sample dimension, else None.
        shared_mask: one mask per (sample, input feature), shared by every row of the batch: a
            posterior sample of the weights applied to all inputs (the right semantics for joint
            predictions); on the CPU the kernel skips dropped features, doing about ``1 - p`` of the GEMM
            work (the CUDA kernel does all of it).
        generator / rng_state: where the masks come from (see :func:`new_rng_state`).

    Returns:
        ``[S, *batch, out]``. Differentiable in ``x``, ``weight`` and ``bias``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("mc_dropout_linear: x and weight must be tensors")
    if weight.dim() != 2:
        raise ValueError(f"mc_dropout_linear: weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    x_op, samples, batch = _sample_dim_input(x, weight.shape[1], num_samples, "mc_dropout_linear", "weight expects")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    p = _number(p, "p", "mc_dropout_linear")
    y = torch.ops.bdlkern.mc_dropout_linear.default(x_op, weight, bias, state, p, samples, bool(shared_mask))
    return y if len(batch) == 1 else y.reshape(samples, *batch, weight.shape[0])


# ---- Concrete dropout -----------------------------------------------------------------------------
def _channel_dim(channel_dim: int | None, x: torch.Tensor, op: str) -> int:
    if channel_dim is not None and not _is_int(channel_dim):
        raise TypeError(f"{op}: channel_dim must be None, 1 or -1, got {channel_dim!r}")
    if channel_dim == 1:
        return 1
    if channel_dim is None or channel_dim == -1 or (not isinstance(channel_dim, bool) and channel_dim == x.dim() - 1):
        return -1
    raise ValueError(
        f"{op}: channel_dim must be None / -1 (a mask value per element, rates along the last dim) or 1 "
        f"(one mask value per (sample, channel) of [N, C, *]), got {channel_dim!r}"
    )


def concrete_dropout(
    x: torch.Tensor,
    p_logit: torch.Tensor,
    temperature: float = 0.1,
    *,
    channel_dim: int | None = None,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """Concrete dropout (Gal, Hron & Kendall 2017): a relaxed Bernoulli drop mask whose rate is learnt.

    With ``p = sigmoid(p_logit)``, ``eps = 1e-7`` and ``u`` uniform in (0, 1) from the Philox stream
    (tag ``"concrete_dropout"``)::

        z = sigmoid((log(p + eps) - log(1 - p + eps) + log(u + eps) - log(1 - u + eps)) / temperature)
        y = x * (1 - z) / (1 - p)

    One fused kernel forward; one fused kernel backward re-makes ``u`` and returns the gradients of
    ``x`` and ``p_logit`` (the latter reduced in a fixed order: the same bits every run). Only ``x``,
    ``p_logit`` and ``rng_state`` are saved for backward.

    Args:
        x: input, float32 or float64, any shape ``[*, F]`` (or ``[N, C, *]`` with ``channel_dim=1``).
        p_logit: the drop-rate logit, same dtype and device as ``x``: a 0-dim tensor (one rate for
            the layer, as in the paper), or ``[F]`` (one rate per feature of the last dim), or
            ``[C]`` with ``channel_dim=1``.
        temperature: relaxation temperature ``t > 0`` (0.1 in the paper); as ``t -> 0`` the mask
            becomes a hard Bernoulli(1 - p) keep-mask.
        channel_dim: ``None`` / ``-1``: one mask value per element of ``x``. ``1``: spatial
            (per-channel) dropout on ``[N, C, *]``: one mask value per ``(n, c)``, shared by the
            spatial positions (element ``n * C + c`` of the stream).
        generator / rng_state: where ``u`` comes from (see :func:`new_rng_state`). The mask value of
            flattened mask index ``i`` is ``uniform`` element ``i`` of stream ``"concrete_dropout"``.

    Returns:
        ``y`` with the shape and dtype of ``x``. Differentiable in ``x`` and ``p_logit``.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(p_logit, torch.Tensor):
        raise TypeError("concrete_dropout: x and p_logit must be tensors")
    temperature = _number(temperature, "temperature", "concrete_dropout")
    if not (temperature > 0.0 and temperature != float("inf")):
        raise ValueError(f"concrete_dropout: temperature must be a finite number > 0, got {temperature}")
    cd = _channel_dim(channel_dim, x, "concrete_dropout")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    return torch.ops.bdlkern.concrete_dropout(x, p_logit, state, temperature, cd)


def concrete_dropout_regularizer(
    weight: torch.Tensor,
    p_logit: torch.Tensor,
    input_dim: int,
    weight_regularizer: float,
    dropout_regularizer: float,
) -> torch.Tensor:
    """The Concrete-dropout regulariser of the layer that follows the dropout (a 0-dim tensor).

    ``weight_regularizer * ||W||^2 / (1 - p) + dropout_regularizer * D * (p log p + (1 - p) log(1 - p))``
    with ``D = input_dim`` (the input features of the wrapped layer), as in Gal, Hron & Kendall
    (2017). With one rate per input feature (``p_logit`` of shape ``[in]``) the first term is
    ``sum_k ||W[:, k]||^2 / (1 - p_k)`` and the entropy term is averaged over the features, so equal
    rates give the scalar formula. ``1 - p`` is ``sigmoid(-p_logit)`` and ``0 log 0 = 0``: finite for
    any finite logit. Differentiable in ``weight`` and ``p_logit``.

    Args:
        weight: ``[out, in, *]`` (a Linear or Conv weight).
        p_logit: 0-dim, or ``[in]`` (= ``weight.shape[1]``).
        input_dim: D >= 1.
        weight_regularizer, dropout_regularizer: the two coefficients (>= 0).
    """
    if not isinstance(weight, torch.Tensor) or not isinstance(p_logit, torch.Tensor):
        raise TypeError("concrete_dropout_regularizer: weight and p_logit must be tensors")
    if isinstance(input_dim, bool) or not isinstance(input_dim, int) or input_dim < 1:
        raise ValueError(f"concrete_dropout_regularizer: input_dim must be an int >= 1, got {input_dim!r}")
    if weight_regularizer < 0 or dropout_regularizer < 0:
        raise ValueError(
            "concrete_dropout_regularizer: weight_regularizer and dropout_regularizer must be >= 0, got "
            f"{weight_regularizer} and {dropout_regularizer}"
        )
    p = torch.sigmoid(p_logit)
    q = torch.sigmoid(-p_logit)
    neg_entropy = torch.special.xlogy(p, p) + torch.special.xlogy(q, q)
    if p_logit.dim() == 0:
        return weight_regularizer * weight.pow(2).sum() / q + dropout_regularizer * input_dim * neg_entropy
    if p_logit.dim() != 1 or weight.dim() < 2 or p_logit.shape[0] != weight.shape[1]:
        raise ValueError(
            "concrete_dropout_regularizer: p_logit must be 0-dim or [in_features] = weight.shape[1], got "
            f"p_logit {tuple(p_logit.shape)} and weight {tuple(weight.shape)}"
        )
    dims = [d for d in range(weight.dim()) if d != 1]
    column_sq = weight.pow(2).sum(dims)
    return weight_regularizer * (column_sq / q).sum() + dropout_regularizer * input_dim * neg_entropy.mean()


# ---- sparse variational dropout -----------------------------------------------------------------------


def lrt_linear(
    x: torch.Tensor,
    theta: torch.Tensor,
    log_sigma2: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer with Gaussian weights, sampled by the local reparameterisation trick.

    Each weight is ``N(theta, alpha theta^2)`` with
    ``log_alpha = clamp(log_sigma2 - log(theta^2 + 1e-8), -8, 8)`` (sparse variational dropout,
    Molchanov et al. 2017). Instead of sampling weights, the pre-activations are sampled (Kingma et
    al. 2015)::

        mu = x theta^T + bias,   var = x^2 (alpha theta^2)^T,   y = mu + sqrt(var + 1e-8) * eps

    with ``eps`` standard normal from the Philox stream (tag ``"lrt"``) over the output's logical
    coordinates (sample, row, output feature). Two GEMMs plus fused passes for ``alpha theta^2``,
    the square root, the noise and the bias; backward re-makes ``eps`` (it saves x, the weights and
    ``sqrt(var + 1e-8)``, one value per output element of a sample).

    The sample dimension follows :func:`mc_dropout_linear`: ``num_samples=S`` with ``x [*batch, in]``
    (mu and var computed once, S noise draws), or ``num_samples=None`` with ``x [S, *batch, in]``.

    Args:
        x: float32 or float64.
        theta, log_sigma2: ``[out, in]``, same dtype and device as ``x``.
        bias: ``[out]`` or None.

    Returns:
        ``[S, *batch, out]``, differentiable in x, theta, log_sigma2 and bias.
    """
    for name, t in (("x", x), ("theta", theta), ("log_sigma2", log_sigma2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lrt_linear: {name} must be a tensor, got {type(t).__name__}")
    if theta.dim() != 2:
        raise ValueError(f"lrt_linear: theta must be [out_features, in_features], got shape {tuple(theta.shape)}")
    x_op, samples, batch = _sample_dim_input(x, theta.shape[1], num_samples, "lrt_linear")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.lrt_linear.default(x_op, theta, log_sigma2, bias, state, samples)
    return y if len(batch) == 1 else y.reshape(samples, *batch, theta.shape[0])


def sparse_vd_kl(theta: torch.Tensor, log_sigma2: torch.Tensor) -> torch.Tensor:
    """The KL term of sparse variational dropout, summed over the weights (a 0-dim tensor).

    Molchanov et al. (2017)'s approximation of ``KL(q(w) || p(w))`` for the log-uniform prior::

        KL ~= -(k1 sigmoid(k2 + k3 log_alpha) - 0.5 log1p(exp(-log_alpha)) - k1)

    with ``k1, k2, k3 = 0.63576, 1.87320, 1.48695`` and the clamped ``log_alpha`` of
    :func:`lrt_linear`. One fused reduction (chunk sums in double, added in a fixed order). When a
    gradient will be needed (grad mode on and an input requiring grad), the same pass also writes
    the KL's gradient (``sparse_vd_kl_with_grad``; on the CPU from the exponentials the KL computes
    anyway), held until backward, which only scales it: the memory of ``theta`` and
    ``log_sigma2`` once more, for half the transcendental work of recomputing it.

    Args:
        theta, log_sigma2: any shape (the same), float32 or float64.
    """
    if not isinstance(theta, torch.Tensor) or not isinstance(log_sigma2, torch.Tensor):
        raise TypeError("sparse_vd_kl: theta and log_sigma2 must be tensors")
    if torch.is_grad_enabled() and (theta.requires_grad or log_sigma2.requires_grad):
        return torch.ops.bdlkern.sparse_vd_kl_with_grad(theta, log_sigma2)[0]
    return torch.ops.bdlkern.sparse_vd_kl(theta, log_sigma2)


# ---- sparse (CSR) linear: pruned sparse VD inference --------------------------------------------------
def sparse_linear(
    x: torch.Tensor,
    crow: torch.Tensor,
    col: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    num_samples: int | None = None,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
    rng_state: torch.Tensor | None = None,
    row_order: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer whose weight W [N, K] is stored in CSR: the pruned sparse VD layer.

    ``crow`` (int64 ``[N + 1]``), ``col`` (int64 ``[nnz]``, ascending within each row) and ``values``:
    ``[nnz]`` (theta) or ``[nnz, 2]`` (theta and the weight variance ``alpha theta^2`` interleaved on
    the same pattern). The structure is validated before any kernel runs.

    * deterministic (default): ``y = x W^T + bias``, ``x [*, K] -> [*, N]``;
    * ``stochastic=True``: S local-reparameterisation samples ``y_s = mu + sqrt(v + 1e-8) * eps_s``
      with ``mu = x W^T + bias`` and ``v = x^2 V^T`` from one pass over the sparse structure, the
      noise from the Philox stream (tag ``"sparse_lrt"``) over the output's logical coordinates, and
      the sample-dimension rule of :func:`mc_dropout_linear` (``num_samples=S`` with ``x [*batch, K]``,
      or ``x [S, *batch, K]``); needs ``values [nnz, 2]`` with variances ``>= 0``.

    Differentiable in ``x`` only (saliency and adversarial uses); no gradient reaches the values.

    Args:
        row_order: optional int64 ``[N]`` permutation in which the CUDA kernel hands rows to warps
            (longest first balances the work; ``bdlkern.nn.SparseLinear`` keeps one).
    """
    for name, t in (("x", x), ("crow", crow), ("col", col), ("values", values)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"sparse_linear: {name} must be a tensor, got {type(t).__name__}")
    if not stochastic:
        if num_samples is not None:
            raise ValueError("sparse_linear: num_samples needs stochastic=True (the deterministic layer has no samples)")
        if x.dim() < 1:
            raise ValueError("sparse_linear: x must have a feature dimension")
        if x.dim() == 2:  # the usual [B, K]: no views (two reshapes cost more than a small layer)
            return torch.ops.bdlkern.sparse_linear(x, crow, col, values, bias, row_order)
        y = torch.ops.bdlkern.sparse_linear(
            x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), crow, col, values, bias, row_order
        )
        return y.reshape(*x.shape[:-1], y.shape[-1])
    # in_features is whatever the CSR's columns allow: the op checks col against x's last dim.
    x_op, samples, batch = _sample_dim_input(x, None, num_samples, "sparse_linear")
    state = _resolve_state(rng_state, generator, None if rng_state is not None else x.device)
    y, _ = torch.ops.bdlkern.sparse_linear_lrt(x_op, crow, col, values, bias, row_order, state, samples)
    return y.reshape(samples, *batch, y.shape[-1])


# ---- fake (meta) kernels: shapes and dtypes for torch.compile / FakeTensor -------------------------
def _register_fakes(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::philox4x32")
    def _philox4x32_fake(counter, key):
        _check_devices("philox4x32", "counter", counter, key=key)
        return torch.empty_like(counter)

    @torch.library.register_fake(f"{ns}::philox_bits")
    def _philox_bits_fake(rng_state, size, stream=0):
        return rng_state.new_empty(size, dtype=torch.int32)

    @torch.library.register_fake(f"{ns}::dropout_mask")
    def _dropout_mask_fake(rng_state, size, p, stream=0):
        return rng_state.new_empty(size, dtype=torch.bool)

    @torch.library.register_fake(f"{ns}::uniform")
    def _uniform_fake(rng_state, size, stream=0, dtype=None):
        return rng_state.new_empty(size, dtype=dtype or torch.float32)

    @torch.library.register_fake(f"{ns}::normal")
    def _normal_fake(rng_state, size, stream=0, dtype=None):
        return rng_state.new_empty(size, dtype=dtype or torch.float32)


def _check_devices(op: str, ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Mixed devices reach the fake kernel (meta outranks cpu in dispatch): check them here too."""
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"{op}: {name} must be on {ref_name}'s device ({ref.device}), got {t.device}")


def _register_mc_dropout(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::mc_dropout_linear")
    def _mc_dropout_linear_fake(x, weight, bias, rng_state, p, num_samples, shared_mask=False):
        _check_devices("mc_dropout_linear", "x", x, weight=weight, bias=bias, rng_state=rng_state)
        batch = x.shape[-2]
        return x.new_empty((num_samples, batch, weight.shape[0]))

    @torch.library.register_fake(f"{ns}::mc_dropout_linear_grad_input")
    def _grad_input_fake(grad_out, weight, rng_state, p, shared_mask, sum_samples):
        _check_devices("mc_dropout_linear_grad_input", "grad_out", grad_out, weight=weight, rng_state=rng_state)
        samples, batch = grad_out.shape[0], grad_out.shape[1]
        shape = (batch, weight.shape[1]) if sum_samples else (samples, batch, weight.shape[1])
        return weight.new_empty(shape)

    @torch.library.register_fake(f"{ns}::mc_dropout_linear_grad_weight")
    def _grad_weight_fake(grad_out, x, rng_state, p, shared_mask):
        _check_devices("mc_dropout_linear_grad_weight", "grad_out", grad_out, x=x, rng_state=rng_state)
        return x.new_empty((grad_out.shape[2], x.shape[-1]))


def _register_concrete(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::concrete_dropout")
    def _concrete_fake(x, p_logit, rng_state, temperature=0.1, channel_dim=-1):
        _check_devices("concrete_dropout", "x", x, p_logit=p_logit, rng_state=rng_state)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake(f"{ns}::concrete_dropout_backward")
    def _concrete_backward_fake(grad_out, x, p_logit, rng_state, temperature, channel_dim):
        _check_devices("concrete_dropout_backward", "x", x, grad_out=grad_out, p_logit=p_logit, rng_state=rng_state)
        return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(p_logit)


def _register_sparse_vd(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::lrt_linear")
    def _lrt_fake(x, theta, log_sigma2, bias, rng_state, num_samples):
        _check_devices("lrt_linear", "x", x, theta=theta, log_sigma2=log_sigma2, bias=bias, rng_state=rng_state)
        rows = x.shape[-2]
        std_rows = rows if x.dim() == 2 else num_samples * rows
        return x.new_empty((num_samples, rows, theta.shape[0])), x.new_empty((std_rows, theta.shape[0]))

    @torch.library.register_fake(f"{ns}::lrt_linear_backward")
    def _lrt_backward_fake(grad_out, x, theta, log_sigma2, std, rng_state):
        _check_devices(
            "lrt_linear_backward", "x", x, grad_out=grad_out, theta=theta, log_sigma2=log_sigma2, std=std,
            rng_state=rng_state,
        )
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(theta),
            torch.empty_like(log_sigma2),
            theta.new_empty((theta.shape[0],)),
        )

    @torch.library.register_fake(f"{ns}::sparse_vd_kl")
    def _kl_fake(theta, log_sigma2):
        _check_devices("sparse_vd_kl", "theta", theta, log_sigma2=log_sigma2)
        return theta.new_empty(())

    @torch.library.register_fake(f"{ns}::sparse_vd_kl_backward")
    def _kl_backward_fake(grad, theta, log_sigma2):
        _check_devices("sparse_vd_kl_backward", "theta", theta, grad=grad, log_sigma2=log_sigma2)
        return torch.empty_like(theta), torch.empty_like(log_sigma2)

    @torch.library.register_fake(f"{ns}::sparse_vd_kl_with_grad")
    def _kl_with_grad_fake(theta, log_sigma2):
        _check_devices("sparse_vd_kl_with_grad", "theta", theta, log_sigma2=log_sigma2)
        return theta.new_empty(()), theta.new_empty(theta.shape), log_sigma2.new_empty(log_sigma2.shape)


def _register_sparse_linear(ns: str) -> None:
    @torch.library.register_fake(f"{ns}::sparse_linear")
    def _fake(x, crow, col, values, bias=None, row_order=None):
        _check_devices("sparse_linear", "x", x, crow=crow, col=col, values=values, bias=bias, row_order=row_order)
        return x.new_empty((x.shape[0], crow.shape[0] - 1))

    @torch.library.register_fake(f"{ns}::sparse_linear_backward")
    def _fake_backward(grad_out, crow, col, values, in_features):
        _check_devices("sparse_linear_backward", "grad_out", grad_out, crow=crow, col=col, values=values)
        return grad_out.new_empty((grad_out.shape[0], in_features))

    @torch.library.register_fake(f"{ns}::sparse_linear_lrt")
    def _fake_lrt(x, crow, col, values, bias, row_order, rng_state, num_samples):
        _check_devices(
            "sparse_linear_lrt", "x", x, crow=crow, col=col, values=values, bias=bias, row_order=row_order,
            rng_state=rng_state,
        )
        n = crow.shape[0] - 1
        rows = x.shape[-2]
        std_rows = rows if x.dim() == 2 else num_samples * rows
        return x.new_empty((num_samples, rows, n)), x.new_empty((std_rows, n))

    @torch.library.register_fake(f"{ns}::sparse_linear_lrt_backward")
    def _fake_lrt_backward(grad_out, x, crow, col, values, std, rng_state):
        _check_devices(
            "sparse_linear_lrt_backward", "x", x, grad_out=grad_out, crow=crow, col=col, values=values, std=std,
            rng_state=rng_state,
        )
        return torch.empty_like(x, memory_format=torch.contiguous_format)


for _ns in _NAMESPACES:
    _register_fakes(_ns)
    _register_mc_dropout(_ns)
    _register_concrete(_ns)
    _register_sparse_vd(_ns)
    _register_sparse_linear(_ns)

__all__ = [
    "STREAMS",
    "new_rng_state",
    "philox_bits",
    "dropout_mask",
    "uniform",
    "normal",
    "mc_dropout_linear",
    "concrete_dropout",
    "concrete_dropout_regularizer",
    "lrt_linear",
    "sparse_vd_kl",
    "sparse_linear",
]
