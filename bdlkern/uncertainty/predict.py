"""Monte Carlo prediction: :func:`mc_predict` runs a model inside ``bdlkern.sampling(S)`` and
summarises its ``S`` samples as an :class:`MCPrediction` (predictive distribution, entropies and
mutual information for classification; MC mean and variance for regression). It also holds the
detection of a model in which no bdlkern stochastic layer ran (:class:`NoStochasticLayerWarning`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from .._sampling import NoStochasticLayerWarning, current_sampling, sampling
from ._checks import _check_int, _check_tensor
from .metrics import _entropy


# --------------------------------------------------------------------------------------------
# Monte Carlo prediction
# --------------------------------------------------------------------------------------------


@dataclass
class MCPrediction:
    """The ``S`` Monte Carlo samples of a prediction and their summaries (see :func:`mc_predict`).

    Attributes:
        samples: the raw model outputs ``[S, N, ...]`` (logits for classification).
        mean_probs: ``[N, C]``, mean over samples of ``softmax(logits)`` (classification).
        predictive_entropy: ``[N]``, ``H[mean_probs]``, total uncertainty in nats (classification).
        expected_entropy: ``[N]``, mean over samples of ``H[softmax(logits_s)]``, the aleatoric
            part (classification).
        mutual_information: ``[N]``, ``predictive_entropy - expected_entropy`` clamped at 0, the
            epistemic part (BALD) (classification).
        prediction: ``[N]`` int64, ``mean_probs.argmax(-1)`` (classification).
        mean: ``[N]`` or ``[N, D]``, the MC mean of the samples (regression).
        variance: same shape as ``mean``, the MC (epistemic) variance (regression).

    Fields of the other task are None. Tensors live on the device of the model's output.
    """

    samples: torch.Tensor
    mean_probs: torch.Tensor | None = None
    predictive_entropy: torch.Tensor | None = None
    expected_entropy: torch.Tensor | None = None
    mutual_information: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    variance: torch.Tensor | None = None


def _samples_of(state, out, num_samples: int) -> tuple[torch.Tensor, bool]:
    """One pass's output as ``[S, ...]`` (S = ``num_samples``, the samples the pass drew), and
    whether no MC layer ran in the block so far. A deterministic output is broadcast over the
    samples."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"mc_predict: model must return a torch.Tensor, got {type(out).__name__}")
    # The block counts the MC layer calls: none means a deterministic model (never a guess from
    # the output's shape, which misfires when the batch size equals num_samples).
    if state.mc_layer_calls == 0:
        # No bdlkern MC layer ran: the model is deterministic, every sample is the same output.
        return out.unsqueeze(0).expand(num_samples, *out.shape).contiguous(), True
    # Where the output carries the samples: its own mark (what the MC layers it was computed from
    # made), else the layout of the block's last MC layer output.
    if (state.carries(out) or state.layout) == "folded":
        # The samples are folded into the batch, sample-major ([S * N, ...]).
        if out.dim() < 1 or out.shape[0] % num_samples:
            raise ValueError(
                f"mc_predict: the model's output carries the samples folded into the batch (a convolution MC layer "
                f"started the sampling), so it must be [S * N, ...] with S = num_samples = {num_samples}, got shape "
                f"{tuple(out.shape)}"
            )
        return state.unfold(out), False
    if out.dim() < 2 or out.shape[0] != num_samples:
        raise ValueError(
            f"mc_predict: the model's output must have a leading sample dimension of size "
            f"num_samples={num_samples}, got shape {tuple(out.shape)}"
        )
    return out, False


def _run_block(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_samples: int,
    seed: int | None,
    sample_chunk: int | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, bool]:
    """``model(x)`` in one ``sampling`` block: (``[S, ...]``, whether no MC layer ran). With
    ``sample_chunk`` the model runs once per chunk of samples (``SamplingState.chunks``)."""
    with sampling(num_samples, seed=seed, chunk=sample_chunk) as state:
        if sample_chunk is None or sample_chunk >= num_samples:
            return _samples_of(state, model(x), num_samples)
        chunks = state.chunks()
        bar = _progress(chunks, -(-num_samples // sample_chunk), progress)
        parts = [_samples_of(state, model(x), size)[0] for _, size in bar]
        return torch.cat(parts, 0), state.mc_layer_calls == 0


def _progress(iterable, total: int, progress: bool | None):
    """A tqdm bar over ``iterable`` on stderr: always with ``progress=True``, never with False,
    and with None only once a run has lasted 2 s (so short runs print nothing). Without tqdm
    installed, the plain iterable."""
    if progress is False:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional (the demo and bench extras)
        return iterable
    return tqdm(iterable, total=total, desc="mc_predict", unit="chunk", delay=0.0 if progress else 2.0, leave=False)


#: torch's dropout modules that bdlkern does not sample (their masks are one draw, not S).
_TORCH_DROPOUTS = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def _no_stochastic_layer_message(model: object, num_samples: int) -> str:
    """What :func:`mc_predict` says when no bdlkern stochastic layer ran: the torch dropout
    modules it can see in ``model`` (by name), and that functional dropout is invisible."""
    found = []
    if isinstance(model, torch.nn.Module):
        found = [
            f"{name or '(the model itself)'} ({type(m).__name__})"
            for name, m in model.named_modules()
            if isinstance(m, _TORCH_DROPOUTS)
        ]
    message = (
        f"mc_predict: no bdlkern stochastic layer ran inside sampling({num_samples}), so the "
        f"{num_samples} samples are one deterministic output repeated and the epistemic uncertainty "
        "(mutual information, regression variance) is exactly 0."
    )
    if found:
        shown = ", ".join(found[:8]) + (f", ... ({len(found)} in all)" if len(found) > 8 else "")
        message += (
            f" The model has torch dropout modules that bdlkern does not sample: {shown}; "
            "bdlkern.nn.convert(model) makes them sample (fused with the next layer where it can)."
        )
    message += (
        " Functional dropout (F.dropout and friends) is not sampled either; bdlkern.nn.convert rewrites it"
        " through torch.fx when the model traces."
        " For a model that is deterministic on purpose, ignore bdlkern.NoStochasticLayerWarning."
    )
    return message


def _no_stochastic_layer(model: object, num_samples: int, strict: bool) -> None:
    """Warns (or raises, ``strict``) that the samples of ``mc_predict`` are all the same; called
    once the output has passed its shape checks, so a malformed output gets its own error."""
    message = _no_stochastic_layer_message(model, num_samples)
    if strict:
        raise RuntimeError(message + " (strict=True)")
    warnings.warn(message, NoStochasticLayerWarning, stacklevel=3)


def mc_predict(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    num_samples: int,
    *,
    batch_size: int | None = None,
    seed: int | None = None,
    task: Literal["classification", "regression"] = "classification",
    strict: bool = False,
    sample_chunk: int | None = None,
    progress: bool | None = None,
) -> MCPrediction:
    """Monte Carlo prediction: ``model(x)`` inside ``bdlkern.sampling(num_samples)``, summarised.

    The model runs under ``torch.no_grad()`` in whatever train/eval mode it is in (bdlkern MC
    layers sample inside ``sampling`` in either mode; call ``model.eval()`` first so that layers
    such as batch norm use their running statistics). The training flags of the model and its
    submodules are the same afterwards.

    A model without any bdlkern MC layer (no layer ran in the ``sampling`` block) is treated as
    deterministic: its output ``[N, ...]`` is repeated ``num_samples`` times, so its epistemic
    uncertainty (mutual information, regression variance) is exactly zero. Since that is usually a
    mistake (torch's ``nn.Dropout*`` modules and ``F.dropout`` are not sampled by bdlkern), it
    warns with :class:`NoStochasticLayerWarning`, naming the torch dropout modules it finds in the
    model, or raises with ``strict=True``. Silence the warning for a model that is deterministic
    on purpose (``warnings.simplefilter("ignore", bdlkern.NoStochasticLayerWarning)``).

    ``mc_predict`` opens its own ``sampling`` block, so it cannot be called inside one (blocks do
    not nest): it raises a ``RuntimeError`` naming both sample counts.

    Args:
        model: a callable (usually an ``nn.Module``) mapping ``x`` to logits ``[N, C]`` for
            classification, or to ``[N]`` / ``[N, D]`` for regression, per sample.
        x: the input batch ``[N, ...]``, on the model's device.
        num_samples: the number S of Monte Carlo samples, >= 1.
        batch_size: if given, ``x`` is split along dim 0 into chunks of at most this many rows,
            each run in its own ``sampling`` block (bounding memory to ``S * batch_size`` rows) and
            the outputs are concatenated along the batch dimension. With ``shared_mask=True``
            layers, sample ``s`` of different chunks then comes from different weight samples.
        seed: if given, the result is reproducible from it alone (chunk ``i`` uses ``seed + i``,
            so one chunk gives the same result as no chunking): chunk ``i`` runs in
            ``sampling(num_samples, seed=seed + i)``, which also forks torch's generators (CPU, and
            the CUDA devices in use) and seeds them from it, so random torch ops in the model
            (``F.dropout``, an ``nn.Dropout`` in training mode) repeat too, and torch's random
            stream is left as it was. Without a seed torch's generator is used (and advanced).
        task: ``"classification"`` (outputs are logits ``[S, N, C]``) or ``"regression"``
            (outputs ``[S, N]`` or ``[S, N, D]``).
        strict: raise a ``RuntimeError`` instead of warning when no bdlkern stochastic layer ran.
        sample_chunk: if given, the S samples run in chunks of at most this many, one model call
            per chunk (``sampling(S, chunk=sample_chunk)``, :meth:`SamplingState.chunks`), which
            bounds the activation memory to ``sample_chunk`` samples. With a seed the result is
            the unchunked call's: a layer's noise is a pure function of (seed, the call's index in
            the pass, the sample index). A multiple of 4 always works; another size raises a
            ``ValueError`` where a chunk would start inside a Philox block of some layer's stream.
        progress: a tqdm progress bar over the chunks (``sample_chunk``): True always, False
            never, None (default) once the run has lasted 2 s.

    Returns:
        :class:`MCPrediction`; tensors are on the device of the model's output. Probabilities and
        entropies are computed in the logits' dtype, promoted to at least float32. Entropies are
        in nats. For regression ``variance`` is the epistemic variance
        ``samples.var(0, unbiased=False)``; for a model with known precision ``tau`` (homoscedastic
        noise) the predictive variance is ``variance + 1 / tau``.

    Raises:
        TypeError / ValueError: for invalid arguments, a non-tensor model output, or an output
            whose shape does not fit ``task``.
        RuntimeError: inside a ``sampling`` block; with ``strict=True``, when no bdlkern
            stochastic layer ran.

    Warns:
        NoStochasticLayerWarning: when no bdlkern stochastic layer ran (and not ``strict``).
    """
    fn = "mc_predict"
    if not callable(model):
        raise TypeError(f"{fn}: model must be callable, got {type(model).__name__}")
    x = _check_tensor(fn, "x", x)
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"{fn}: x must be a non-empty batch [N, ...], got shape {tuple(x.shape)}")
    if x.is_floating_point() and torch.isnan(x).any():
        raise ValueError(f"{fn}: x contains NaN")
    _check_int(fn, "num_samples", num_samples, 1)
    if batch_size is not None:
        _check_int(fn, "batch_size", batch_size, 1)
    if sample_chunk is not None:
        _check_int(fn, "sample_chunk", sample_chunk, 1)
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"{fn}: progress must be a bool or None, got {type(progress).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"{fn}: seed must be an int or None, got {type(seed).__name__}")
    if task not in ("classification", "regression"):
        raise ValueError(f"{fn}: task must be 'classification' or 'regression', got {task!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"{fn}: strict must be a bool, got {type(strict).__name__}")
    outer = current_sampling()
    if outer is not None:
        raise RuntimeError(
            f"{fn}(num_samples={num_samples}) was called inside an active bdlkern.sampling({outer.num_samples}); "
            "mc_predict opens its own sampling block and blocks do not nest. Call mc_predict outside "
            "the block (it samples by itself), or call the model directly inside the block"
        )

    modules = list(model.modules()) if isinstance(model, torch.nn.Module) else []
    training_flags = [m.training for m in modules]
    try:
        with torch.no_grad():
            chunks = [x] if batch_size is None else list(torch.split(x, batch_size, dim=0))
            runs = [
                _run_block(model, chunk, num_samples, None if seed is None else seed + i, sample_chunk, progress)
                for i, chunk in enumerate(chunks)
            ]
    finally:
        for module, flag in zip(modules, training_flags):
            module.training = flag
    outputs = [out for out, _ in runs]
    deterministic = all(det for _, det in runs)
    samples = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    if task == "regression":
        if samples.dim() not in (2, 3):
            raise ValueError(
                f"{fn}: for task='regression' the model must return [N] or [N, D] per sample "
                f"(samples [S, N] or [S, N, D]), got samples of shape {tuple(samples.shape)}"
            )
        if deterministic:
            _no_stochastic_layer(model, num_samples, strict)
        values = samples if samples.is_floating_point() else samples.double()
        variance = torch.zeros_like(values[0]) if deterministic else values.var(0, unbiased=False)
        return MCPrediction(samples=samples, mean=values.mean(0), variance=variance)

    if samples.dim() != 3:
        raise ValueError(
            f"{fn}: for task='classification' the model must return logits [N, C] per sample "
            f"(samples [S, N, C]), got samples of shape {tuple(samples.shape)}"
        )
    if not samples.is_floating_point():
        raise TypeError(f"{fn}: the model's logits must be floating point, got dtype {samples.dtype}")
    if deterministic:
        _no_stochastic_layer(model, num_samples, strict)
    logits = samples.to(torch.promote_types(samples.dtype, torch.float32))
    probs = logits.softmax(-1)  # [S, N, C]
    mean_probs = probs[0] if deterministic else probs.mean(0)  # [N, C]
    predictive_entropy = _entropy(mean_probs)
    if deterministic:  # identical samples: no epistemic part, exactly (not up to rounding)
        expected_entropy = predictive_entropy.clone()
        mutual_information = torch.zeros_like(predictive_entropy)
    else:
        expected_entropy = _entropy(probs).mean(0)
        mutual_information = (predictive_entropy - expected_entropy).clamp(min=0.0)
    return MCPrediction(
        samples=samples,
        mean_probs=mean_probs,
        predictive_entropy=predictive_entropy,
        expected_entropy=expected_entropy,
        mutual_information=mutual_information,
        prediction=mean_probs.argmax(-1),
    )
