"""``bdlkern.sampling(S)``: Monte Carlo inference with an explicit sample dimension.

Inside ``with bdlkern.sampling(S):`` every bdlkern MC layer samples, in train and eval mode alike,
and the network maps an input without sample dimension to outputs with a leading dimension ``S``.

The rule that tells a sample dimension apart is explicit, never a guess from shapes:

* the **first** MC layer that runs inside the block takes its input *without* a sample dimension
  and returns ``[S, ...]`` (so the deterministic layers before it run once, on the plain input);
* every **later** MC layer call in the block takes an input *with* the leading sample dimension
  (its size must be ``S``, else a ``ValueError`` is raised);
* when an MC layer that already ran in the block runs again, a new forward pass has begun and the
  rule starts over: ``with sampling(S): a = model(x1); b = model(x2)`` works as two passes.

Where the samples sit is the pass's *layout*, set by its first MC layer:

* **stacked** (the first MC layer is a linear one: ``MCDropoutLinear``, ``ConcreteDropoutLinear``,
  ``SparseVDLinear``, ...): tensors carry a leading ``[S, ...]`` dimension; an MLP maps
  ``[N, in]`` to ``[S, N, out]``;
* **folded** (the first MC layer is a convolution: ``MCDropoutConv1d/2d/3d``): the samples are
  folded into the batch, sample-major, so that row ``s * N + n`` is sample ``s`` of input ``n``.
  The ordinary layers between MC layers (``nn.Conv2d``, ``BatchNorm2d``, ``MaxPool2d``,
  ``AdaptiveAvgPool2d``, ``Flatten``, activations) then work unchanged on ``[S * N, ...]``,
  and a later linear MC layer takes ``[S * N, ..., in]`` and returns ``[S * N, ..., out]``. A
  conv net maps ``[N, C, H, W]`` to ``[S * N, classes]``; :func:`unfold_samples` (or
  :meth:`SamplingState.unfold`) views that as ``[S, N, classes]``, and
  :func:`bdlkern.uncertainty.mc_predict` does it for you.

A convolution MC layer in a stacked pass takes ``[S, N, C, *spatial]`` and returns
``[S, N, C_out, *spatial_out]``.

Each MC layer call draws a fresh ``rng_state`` from torch's generator of the input's device. With
``seed``, call k of the block reads the Philox stream of that seed from block ``k * 2**40`` on: a
pure function of (seed, k), so the same seed gives the same samples whatever ran before, on every
device (the stream is bit-identical on CPU and CUDA), and under ``torch.export`` /
``torch.compile``, which have no generator state to capture. ``seed`` also forks torch's own
generators for the block and seeds them from it (the CPU generator and every CUDA device's, when
CUDA is initialised), so that layers drawing from torch's generator (``F.dropout``, ``nn.Dropout``)
are reproducible too; their state is restored when the block exits, so the block leaves torch's
random stream as it found it.

Blocks do not nest: entering ``sampling`` while another block is active on the same thread raises
a ``RuntimeError`` (see :class:`sampling`).
"""

from __future__ import annotations

import threading

import torch

from . import ops

_local = threading.local()
_CALL_STRIDE_BITS = 40  # log2 of the Philox blocks each seeded call owns


class NoStochasticLayerWarning(UserWarning):
    """Monte Carlo sampling ran but no bdlkern stochastic layer did, so every sample is the same
    output and the epistemic uncertainty is exactly zero (see :func:`bdlkern.uncertainty.mc_predict`)."""


class SamplingState:
    """The state of one ``sampling`` block (see the module docstring for the rule)."""

    def __init__(self, num_samples: int, seed: int | None):
        self.num_samples = num_samples
        self.seed = seed
        self._seeded_calls = 0  # k of the next seeded call (module docstring)
        self._seen: set[int] = set()  # ids of the MC layers that ran in the current pass
        #: MC layer calls in this block so far (0 after a pass: the model has no MC layer).
        self.mc_layer_calls = 0
        #: The current pass's layout ("stacked" or "folded", set by its first MC layer; None before)
        #: and, for a folded pass, N: the batch of its first MC layer's input.
        self.layout: str | None = None
        self.batch: int | None = None

    def next_has_sample_dim(self, layer: torch.nn.Module) -> bool:
        """Whether a call of ``layer`` now would get an input with the sample dimension (it is not
        the first MC layer of the pass). Registers nothing."""
        return bool(self._seen) and id(layer) not in self._seen

    def input_has_sample_dim(self, layer: torch.nn.Module) -> bool:
        """Registers a call of ``layer``; True when its input carries the sample dimension."""
        self.mc_layer_calls += 1
        key = id(layer)
        if key in self._seen:  # the same layer again: a new forward pass
            self._seen.clear()
        first = not self._seen
        self._seen.add(key)
        return not first

    def layer_call(
        self, layer: torch.nn.Module, x: torch.Tensor, in_features: int
    ) -> tuple[torch.Tensor, int | None, torch.Tensor, bool]:
        """Registers a call of the linear MC layer ``layer`` on ``x`` and applies the rule of this
        module.

        Returns:
            (a fresh rng_state for the call, the ``num_samples`` argument of the layer's op, the
            input as the op takes it, folded). ``num_samples`` is S when ``x`` has no sample
            dimension (the first MC layer of the pass; the pass is then stacked), None when it
            has. In a folded pass the input ``[S * N, ..., in]`` is returned viewed as
            ``[S, N, ..., in]`` and ``folded`` is True: the layer flattens its ``[S, N, ..., out]``
            result back (``y.flatten(0, 1)``).

        Raises:
            ValueError: a later MC layer of the pass got an input without the pass's samples.
        """
        rng_state = self.rng_state(x.device)
        if not self.input_has_sample_dim(layer):
            self.layout, self.batch = "stacked", None
            return rng_state, self.num_samples, x, False
        S = self.num_samples
        if self.layout == "folded":
            if x.dim() < 2 or x.shape[0] != S * self.batch:
                raise ValueError(
                    f"{type(layer).__name__}: inside sampling({S}) this layer follows a convolution MC layer, so its "
                    f"input must have the samples folded into the batch, [S * N = {S} * {self.batch}, ..., "
                    f"{in_features}], got shape {tuple(x.shape)}"
                )
            return rng_state, None, x.unflatten(0, (S, self.batch)), True
        if x.dim() < 2 or x.shape[0] != S:
            raise ValueError(
                f"{type(layer).__name__}: inside sampling({S}) this layer is not the first MC "
                f"layer of the pass, so its input must be [S={S}, ..., {in_features}], got shape "
                f"{tuple(x.shape)}"
            )
        return rng_state, None, x, False

    def conv_call(self, layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor, bool]:
        """Registers a call of the convolution MC layer ``layer`` on ``x`` (``[B, C, *spatial]``).

        Returns:
            (a fresh rng_state, whether the input carries the samples, the input as the op takes
            it, stacked). The first MC layer of a pass starts a folded pass with ``N = B``; later
            ones in a folded pass take ``[S * N, C, ...]``; in a stacked pass the input
            ``[S, N, C, ...]`` is returned flattened to ``[S * N, C, ...]`` and ``stacked`` is
            True: the layer unflattens its result (``y.unflatten(0, (S, -1))``).

        Raises:
            ValueError: a later MC layer got an input without the pass's samples.
        """
        rng_state = self.rng_state(x.device)
        if not self.input_has_sample_dim(layer):
            self.layout, self.batch = "folded", (x.shape[0] if x.dim() > 0 else 0)
            return rng_state, False, x, False
        S = self.num_samples
        name = type(layer).__name__
        if self.layout == "folded":
            if x.dim() < 1 or x.shape[0] != S * self.batch:
                raise ValueError(
                    f"{name}: inside sampling({S}) this layer is not the first MC layer of the pass, so its input "
                    f"must have the samples folded into the batch, [S * N = {S} * {self.batch}, C, ...], got shape "
                    f"{tuple(x.shape)}"
                )
            return rng_state, True, x, False
        if x.dim() < 3 or x.shape[0] != S:
            raise ValueError(
                f"{name}: inside sampling({S}) this layer follows a linear MC layer (a stacked pass), so its input "
                f"must be [S={S}, N, C, ...], got shape {tuple(x.shape)}"
            )
        return rng_state, True, x.flatten(0, 1), True

    def unfold(self, out: torch.Tensor) -> torch.Tensor:
        """The output of the last pass with the samples in front: ``[S, N, ...]`` from a folded
        ``[S * N, ...]``; a stacked output is returned as it is."""
        if self.layout != "folded":
            return out
        return unfold_samples(out, self.num_samples)

    def rng_state(self, device: torch.device) -> torch.Tensor:
        """A fresh rng_state for one MC layer call on ``device``."""
        if self.seed is None:
            return ops.new_rng_state(device=device)
        # Each call owns 2**40 Philox blocks (2**42 random words, more than any tensor a call can
        # fill), so the calls of a block never share a counter.
        k = self._seeded_calls
        self._seeded_calls += 1
        words = [self.seed % 2**64, (k << _CALL_STRIDE_BITS) % 2**64]
        return torch.tensor([w - 2**64 if w >= 2**63 else w for w in words], dtype=torch.int64, device=device)


class sampling:  # noqa: N801  (used like a function: `with bdlkern.sampling(32):`)
    """Context manager for MC inference with ``num_samples`` samples (module docstring).

    Args:
        num_samples: S >= 1.
        seed: if given, the samples of the block are reproducible from it alone: bdlkern's layers
            draw from the Philox stream of ``seed`` (a pure function of the seed and the call's
            index in the block), and torch's generators (CPU, and each CUDA device when CUDA is
            initialised) are forked and seeded from ``seed`` for the block, so ``F.dropout`` and
            other torch random ops inside it repeat too. Their previous state is restored on exit.
            Without ``seed`` nothing is forked: each MC layer call draws its ``rng_state`` from
            torch's generator, which advances it.

    Raises:
        RuntimeError: on entry, when a ``sampling`` block is already active on this thread.
            Blocks do not nest because their meaning would be ambiguous: a tensor made inside the
            outer block may already carry the outer ``[S_outer, ...]`` sample dimension, and the
            first MC layer of the inner block would take that as a batch dimension and add
            ``[S_inner, S_outer, ...]`` (or, if no outer MC layer ran yet, the inner S would
            silently replace the outer one). Finish one block before starting the next; other
            threads have their own blocks.
    """

    def __init__(self, num_samples: int, seed: int | None = None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"sampling: num_samples must be an int >= 1, got {num_samples!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"sampling: seed must be an int or None, got {type(seed).__name__}")
        self.num_samples = num_samples
        self.seed = seed
        self._saved_rng: list[tuple[torch.Generator, torch.Tensor]] | None = None

    def __enter__(self) -> SamplingState:
        outer = current_sampling()
        if outer is not None:
            raise RuntimeError(
                f"bdlkern.sampling({self.num_samples}) was entered inside an active bdlkern.sampling("
                f"{outer.num_samples}) on the same thread; sampling blocks do not nest (the inner block "
                f"would mix its S={self.num_samples} with the outer S={outer.num_samples}). Leave the "
                "outer block first, or use one block"
            )
        state = SamplingState(self.num_samples, self.seed)
        if self.seed is not None:
            self._saved_rng = _fork_and_seed_torch_generators(self.seed)
        _local.state = state
        return state

    def __exit__(self, *exc) -> None:
        _local.state = None
        saved, self._saved_rng = self._saved_rng, None
        if saved is not None:
            for generator, rng_state in saved:
                generator.set_state(rng_state)


def _torch_generators() -> list[torch.Generator]:
    """torch's default generators that a block with a seed forks: the CPU one, and every CUDA
    device's once CUDA is initialised (before that no CUDA tensor exists, and touching the CUDA
    generators would initialise CUDA)."""
    generators = [torch.default_generator]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        generators.extend(torch.cuda.default_generators)
    return generators


def _fork_and_seed_torch_generators(seed: int) -> list[tuple[torch.Generator, torch.Tensor]]:
    """Saves the state of :func:`_torch_generators` and seeds them from ``seed``; returns what
    ``sampling.__exit__`` restores."""
    saved = []
    for generator in _torch_generators():
        saved.append((generator, generator.get_state()))
        generator.manual_seed(seed % 2**64)
    return saved


def unfold_samples(out: torch.Tensor, num_samples: int) -> torch.Tensor:
    """View a folded, sample-major ``[S * N, ...]`` tensor (the output of a conv net inside
    ``sampling(S)``, see the module docstring) as ``[S, N, ...]``. No copy.

    Raises:
        ValueError: ``out``'s leading dimension is not a multiple of ``num_samples``.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"unfold_samples: num_samples must be an int >= 1, got {num_samples!r}")
    if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] % num_samples:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"unfold_samples: expected a tensor [S * N, ...] with S = num_samples = {num_samples} folded "
            f"sample-major into its leading dimension, got {shape}"
        )
    return out.unflatten(0, (num_samples, out.shape[0] // num_samples))


def current_sampling() -> SamplingState | None:
    """The active ``sampling`` block of this thread, or None."""
    return getattr(_local, "state", None)
