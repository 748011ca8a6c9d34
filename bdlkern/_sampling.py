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

Each MC layer call draws a fresh ``rng_state`` from torch's generator of the input's device. With
``seed``, call k of the block reads the Philox stream of that seed from block ``k * 2**40`` on: a
pure function of (seed, k), so the same seed gives the same samples whatever ran before, on every
device (the stream is bit-identical on CPU and CUDA), and under ``torch.export`` /
``torch.compile``, which have no generator state to capture.
"""

from __future__ import annotations

import threading

import torch

from . import ops

_local = threading.local()
_CALL_STRIDE_BITS = 40  # log2 of the Philox blocks each seeded call owns


class SamplingState:
    """The state of one ``sampling`` block (see the module docstring for the rule)."""

    def __init__(self, num_samples: int, seed: int | None):
        self.num_samples = num_samples
        self.seed = seed
        self._seeded_calls = 0  # k of the next seeded call (module docstring)
        self._seen: set[int] = set()  # ids of the MC layers that ran in the current pass
        #: MC layer calls in this block so far (0 after a pass: the model has no MC layer).
        self.mc_layer_calls = 0

    def input_has_sample_dim(self, layer: torch.nn.Module) -> bool:
        """Registers a call of ``layer``; True when its input carries the sample dimension."""
        self.mc_layer_calls += 1
        key = id(layer)
        if key in self._seen:  # the same layer again: a new forward pass
            self._seen.clear()
        first = not self._seen
        self._seen.add(key)
        return not first

    def layer_call(self, layer: torch.nn.Module, x: torch.Tensor, in_features: int) -> tuple[torch.Tensor, int | None]:
        """Registers a call of MC layer ``layer`` on ``x`` and applies the rule of this module.

        Returns:
            (a fresh rng_state for the call, the ``num_samples`` argument of the layer's op): S
            when ``x`` has no sample dimension (the first MC layer of the pass), None when it has.

        Raises:
            ValueError: a later MC layer of the pass got an input without the leading ``[S, ...]``.
        """
        rng_state = self.rng_state(x.device)
        if not self.input_has_sample_dim(layer):
            return rng_state, self.num_samples
        if x.dim() < 2 or x.shape[0] != self.num_samples:
            raise ValueError(
                f"{type(layer).__name__}: inside sampling({self.num_samples}) this layer is not the first MC "
                f"layer of the pass, so its input must be [S={self.num_samples}, ..., {in_features}], got shape "
                f"{tuple(x.shape)}"
            )
        return rng_state, None

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
        seed: if given, the samples of the block are reproducible from it alone.
    """

    def __init__(self, num_samples: int, seed: int | None = None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"sampling: num_samples must be an int >= 1, got {num_samples!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"sampling: seed must be an int or None, got {type(seed).__name__}")
        self.num_samples = num_samples
        self.seed = seed

    def __enter__(self) -> SamplingState:
        state = SamplingState(self.num_samples, self.seed)
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(state)
        return state

    def __exit__(self, *exc) -> None:
        _local.stack.pop()


def current_sampling() -> SamplingState | None:
    """The innermost active ``sampling`` block of this thread, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None
