"""Gaussian dropout (Srivastava et al. 2014; Kingma, Salimans & Welling 2015): :class:`GaussianDropout`,
multiplicative ``N(1, alpha)`` noise on activations on the fused ``gaussian_dropout`` op, with a fixed
or learnt ``alpha`` and Monte Carlo sampling."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops
from .._sampling import current_sampling
from .variational import LOG_ALPHA_MAX, variational_dropout_kl


class GaussianDropout(nn.Module):
    """Gaussian dropout: ``y = x * (1 + sqrt(alpha) * eps)``, ``eps ~ N(0, 1)``, the sampling-aware
    multiplicative-noise layer (the fused op :func:`bdlkern.ops.gaussian_dropout`).

    ``alpha = p / (1 - p)`` gives the noise the variance of Bernoulli dropout with drop rate ``p``
    (Srivastava et al. 2014). With ``learn_alpha=True`` ``log_alpha`` is a parameter trained with the
    data loss plus :meth:`kl` (variational dropout of the units, Kingma et al. 2015, arXiv:1506.02557);
    it is clamped to ``log_alpha <= 0`` (``alpha <= 1``, where the paper's KL approximation holds) in
    the forward pass, with a zero gradient above the bound.

    * training (outside ``sampling``): fresh noise on every call, drawn from the bdlkern Philox stream
      (``torch.manual_seed`` reproducible), ``[*] -> [*]``;
    * eval (outside ``sampling``): the identity (``E[1 + sqrt(alpha) eps] = 1``);
    * inside ``bdlkern.sampling(S)`` (train or eval): S noise draws at once. An input without samples
      ``[N, ...]`` gives ``[S * N, ...]``, the samples folded into the batch sample-major (a 0-d or
      1-d input gives ``[S, ...]``); an input that carries the samples keeps its layout (see
      :mod:`bdlkern._sampling`). ``sampling(S, seed, chunk=K)`` gives the unchunked result.

    Noise shapes: one ``eps`` per element (``channel=False``; ``log_alpha`` 0-d or ``[F]`` along the
    last dimension of ``[*, F]``), or, with ``channel=True``, one per ``(n, c)`` of ``[N, C, *]``
    shared by the spatial positions (``log_alpha`` 0-d or ``[C]``). ``eps`` of flattened noise index
    ``i`` (the row-major index of the (folded) input, or ``n * C + c``) is element ``i`` of
    ``ops.normal(..., stream="gaussian_dropout")`` with the call's ``rng_state``.

    Args:
        p: the Bernoulli drop rate whose variance the noise matches, in ``[0, 1)``; ``p = 0`` is the
            identity. With ``learn_alpha`` the initial rate, in ``(0, 0.5]`` (``alpha <= 1``).
        learn_alpha: learn ``log_alpha`` (an ``nn.Parameter``) instead of a fixed buffer.
        num_features: ``None``: one alpha for the layer (0-d ``log_alpha``); ``F`` (or ``C`` with
            ``channel``): one alpha per feature / channel.
        channel: per-channel (spatial) noise on ``[N, C, *]`` inputs (``channel_dim=1``).

    Inputs are float32 or float64 (16-bit inputs run in float32 under ``torch.autocast``);
    ``log_alpha`` is used in the input's dtype. The state dict holds ``log_alpha`` (a parameter or a
    buffer).
    """

    def __init__(
        self,
        p: float = 0.5,
        *,
        learn_alpha: bool = False,
        num_features: int | None = None,
        channel: bool = False,
    ):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
            raise ValueError(f"GaussianDropout: p must be a number in [0, 1), got {p!r}")
        if num_features is not None and (
            isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 1
        ):
            raise ValueError(f"GaussianDropout: num_features must be None or an int >= 1, got {num_features!r}")
        p = float(p)
        if learn_alpha and not (0.0 < p <= 0.5):
            raise ValueError(
                f"GaussianDropout: with learn_alpha, p must be in (0, 0.5] (alpha = p / (1 - p) in (0, 1], "
                f"where log_alpha is learnt; p = 0 gives log_alpha = -inf), got {p}"
            )
        self.p = p
        self.learn_alpha = bool(learn_alpha)
        self.num_features = num_features
        self.channel = bool(channel)
        shape = () if num_features is None else (num_features,)
        init = torch.full(shape, math.log(p / (1.0 - p)) if p > 0.0 else -math.inf)
        if self.learn_alpha:
            self.log_alpha = nn.Parameter(init)
            self._bdlkern_kl = True  # picked up by bdlkern.nn.regularization / kl_divergence
        else:
            self.register_buffer("log_alpha", init)

    def log_alpha_eff(self) -> torch.Tensor:
        """The ``log alpha`` the noise uses (``log_alpha``'s shape): clamped to ``<= 0`` when learnt
        (gradient 1 up to the bound, 0 above it)."""
        la = self.log_alpha
        if self.learn_alpha:
            la = torch.where(la > LOG_ALPHA_MAX, la.new_tensor(LOG_ALPHA_MAX), la)
        return la

    def alpha(self) -> torch.Tensor:
        """``exp(log_alpha_eff())``: the noise variance of each feature / channel (or the layer's)."""
        return torch.exp(self.log_alpha_eff())

    def kl(self) -> torch.Tensor:
        """The KL term of the learnt alphas (0-dim): Kingma et al.'s approximation
        ``-(0.5 log alpha + c1 alpha + c2 alpha^2 + c3 alpha^3)`` (:func:`bdlkern.nn.variational_dropout_kl`,
        constant dropped) summed over ``log_alpha``'s entries, i.e. the KL *per noise variable* of
        one alpha. Weight it by the number of noise variables one alpha governs (e.g. the F
        features of a layer with one alpha) for the total over units. Meaningful with ``learn_alpha`` (only then does :func:`bdlkern.nn.kl_divergence`
        collect it); with a fixed alpha it is a constant (infinite for ``p = 0``)."""
        return variational_dropout_kl(self.log_alpha_eff()).sum()

    def _check(self, x: torch.Tensor, features_dim: int) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"GaussianDropout: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dtype not in (torch.float32, torch.float64) and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"GaussianDropout: the input must be float32 or float64, got {x.dtype} (use torch.autocast for "
                "16-bit inputs)"
            )
        if self.channel and x.dim() < 2 + features_dim:
            raise ValueError(f"GaussianDropout(channel=True): expected an input [N, C, *], got shape {tuple(x.shape)}")
        if self.num_features is not None:
            dim = 1 + features_dim if self.channel else -1
            size = x.shape[dim] if x.dim() > 0 else None
            if size != self.num_features:
                what = "channels (dim 1)" if self.channel else "features (last dim)"
                raise ValueError(
                    f"GaussianDropout(num_features={self.num_features}): the input has {size} {what}, "
                    f"shape {tuple(x.shape)}"
                )

    def _noise(self, x: torch.Tensor, rng_state: torch.Tensor | None) -> torch.Tensor:
        la = self.log_alpha_eff()
        if x.dtype in (torch.float32, torch.float64) and la.dtype != x.dtype:
            la = la.to(x.dtype)
        return ops.gaussian_dropout(x, la, channel_dim=1 if self.channel else None, rng_state=rng_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[*] -> [*]``; inside ``sampling(S)`` see the class docstring."""
        state = current_sampling()
        if state is None:
            self._check(x, 0)
            if not self.training or self.p == 0.0:
                return x
            return self._noise(x, ops.new_rng_state(device=x.device))
        rng_state, layout = state.tensor_call(self, x, channel=self.channel)
        S = state.num_samples
        if layout is None:
            # Starts the sampling: [N, ...] -> [S, N, ...], the noise index that of the folded
            # [S * N, ...] (sample-major), folded unless there is no batch to fold into.
            self._check(x, 0)
            xs = x.unsqueeze(0).expand(S, *x.shape)
            if x.dim() >= 2:
                return state.output(self._noise(xs.flatten(0, 1), rng_state), "folded")
            return state.output(self._noise(xs, rng_state), "stacked")
        if layout == "folded" or not self.channel:
            self._check(x, 0 if layout == "folded" else 1)
            return state.output(self._noise(x, rng_state), layout)
        # A stacked [S, N, C, *]: the channel noise of the folded [S * N, C, *].
        self._check(x, 1)
        y = self._noise(x.flatten(0, 1), rng_state)
        return state.output(y.unflatten(0, (S, -1)), layout)

    def extra_repr(self) -> str:
        return (
            f"p={self.p}, learn_alpha={self.learn_alpha}, num_features={self.num_features}, "
            f"channel={self.channel}"
        )
