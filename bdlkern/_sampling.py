"""``bdlkern.sampling(S)``: Monte Carlo inference with an explicit sample dimension.

Inside ``with bdlkern.sampling(S):`` every bdlkern MC layer samples, in train and eval mode alike,
and the network maps an input without sample dimension to outputs with a leading dimension ``S``.

The rule that tells a sample dimension apart is explicit, never a guess from shapes: **it follows
the tensors**. Inside the block every tensor computed (through any torch operation) from the
output of an MC layer of the block *carries the samples*; the block marks them as it goes (a
``TorchFunctionMode``, :class:`_SampleTracker`). So:

* an MC layer whose input carries no samples starts a sampling: it takes the input once and
  returns all S samples (the deterministic layers before it ran once, on the plain input);
* an MC layer whose input carries the samples takes them where their layout says (below), and
  raises a ``ValueError`` if they are not there (e.g. ``y[0]`` dropped the sample dimension);
* so branches, skip connections and several heads sample correctly: two MC heads on one trunk
  output both start from it (or both take its samples, if the trunk has an MC layer), and a
  model whose first MC layer runs twice on different inputs (a siamese net, two passes
  ``a = model(x1); b = model(x2)``) starts a sampling each time.

Where the samples sit is the *layout* of a sampled tensor, set by the MC layer that started its
sampling:

* **stacked** (a linear MC layer started it: ``MCDropoutLinear``, ``ConcreteDropoutLinear``,
  ``SparseVDLinear``, ...): a leading ``[S, ...]`` dimension; an MLP maps ``[N, in]`` to
  ``[S, N, out]``. A per-input tensor ``[N, ...]`` broadcasts against ``[S, N, ...]`` in
  arithmetic (a residual connection), and is expanded in ``torch.cat`` / ``stack``;
* **folded** (a convolution MC layer, ``MCDropoutConv1d/2d/3d``, or :class:`bdlkern.nn.MCDropout`
  on an input with a batch dimension): the samples are folded into the batch, sample-major, so
  that row ``s * N + n`` is sample ``s`` of input ``n``. The ordinary layers between MC layers
  (``nn.Conv2d``, ``BatchNorm2d``, ``MaxPool2d``, ``AdaptiveAvgPool2d``, ``Flatten``, activations,
  a ``forward`` that works with dimension numbers) then work unchanged on ``[S * N, ...]``, and a
  later linear MC layer takes ``[S * N, ..., in]`` and returns ``[S * N, ..., out]``. A conv net
  maps ``[N, C, H, W]`` to ``[S * N, classes]``; :func:`unfold_samples` (or
  :meth:`SamplingState.unfold`) views that as ``[S, N, classes]``, and
  :func:`bdlkern.uncertainty.mc_predict` does it for you. A per-input activation ``[N, ...]`` of
  the same rank that meets a folded tensor in arithmetic (``+``, ``*``, ``torch.where``, ...) or
  a join (``torch.cat`` / ``stack``) is repeated to ``[S * N, ...]`` first: the skip connection
  of a residual block with dropout inside.

A convolution MC layer given a stacked input ``[S, N, C, *spatial]`` returns
``[S, N, C_out, *spatial_out]``. Under ``torch.compile`` the marks are traced like any
attribute; tensors made before the block, or in another block, carry no samples of this one.

Each MC layer call draws a fresh ``rng_state`` from torch's generator of the input's device. With
``seed``, call k of the block reads the Philox stream of that seed from block ``k * 2**40`` on: a
pure function of (seed, k), and sample ``s`` of the call from its own offset in that stream, so
that ``sampling(S, seed=..., chunk=K)`` (:meth:`SamplingState.chunks`) can run the samples K at a
time with the same result; so the same seed gives the same samples whatever ran before, on every
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

import itertools
import math

import torch
from torch.overrides import TorchFunctionMode

from . import ops

_local = threading.local()
_CALL_STRIDE_BITS = 40  # log2 of the Philox blocks each seeded call owns


class NoStochasticLayerWarning(UserWarning):
    """Monte Carlo sampling ran but no bdlkern stochastic layer did, so every sample is the same
    output and the epistemic uncertainty is exactly zero (see :func:`bdlkern.uncertainty.mc_predict`)."""


_MARK = "_bdlkern_samples"  # the tensor attribute that says which block's samples a tensor carries
_tokens = itertools.count(1)  # the marks: ints (what torch.compile can set on a traced tensor)


class SamplingState:
    """The state of one ``sampling`` block (see the module docstring for the rule)."""

    def __init__(self, num_samples: int, seed: int | None, chunk: int | None = None):
        #: S of the block, and the samples the model draws now: S, or a chunk's (see chunks()).
        self.total_samples = num_samples
        self.num_samples = num_samples
        #: The index of the current chunk's first sample (0 outside chunks()), and the chunk size.
        self.sample_base = 0
        self.chunk = chunk
        self.seed = seed
        self._seeded_calls = 0  # k of the next seeded call (module docstring)
        #: MC layer calls in this block so far (0 after a pass: the model has no MC layer).
        self.mc_layer_calls = 0
        #: The layout ("stacked" or "folded") of the last MC layer output of the block (None before
        #: any) and, for a folded one, N: its batch without the samples.
        self.layout: str | None = None
        self.batch: int | None = None
        #: The marks of this block: (layout, N) -> token and back. N, the batch of a folded
        #: tensor, is None for a stacked one, or where it is symbolic (torch.export's dynamic batch).
        self._token: dict[tuple[str, int | None], int] = {}
        self._layout_of: dict[int, tuple[str, int | None]] = {}

    # ---- which tensors carry the samples ---------------------------------------------------------
    def carries(self, x: torch.Tensor) -> str | None:
        """The layout ("stacked" or "folded") in which ``x`` carries this block's samples (it was
        computed from the output of an MC layer of this block), else None."""
        mark = self._layout_of.get(getattr(x, _MARK, None))
        return None if mark is None else mark[0]

    def _folded_batch(self, x: torch.Tensor) -> int | None:
        """N of a folded ``x``, where its mark knows it."""
        mark = self._layout_of.get(getattr(x, _MARK, None))
        return None if mark is None else mark[1]

    def output(self, y: torch.Tensor, layout: str) -> torch.Tensor:
        """Marks ``y``, the output of an MC layer, as carrying this block's samples in ``layout``
        ("stacked": ``[S, ...]``; "folded": ``[S * N, ...]``, sample-major) and returns it."""
        if layout not in ("stacked", "folded"):
            raise ValueError(f"SamplingState.output: layout must be 'stacked' or 'folded', got {layout!r}")
        batch = None
        if layout == "folded":
            batch = y.shape[0] // self.num_samples if y.dim() > 0 else 0
            batch = batch if type(batch) is int else None
        key = (layout, batch)
        token = self._token.get(key)
        if token is None:
            token = self._token[key] = next(_tokens)
            self._layout_of[token] = key
        # A fresh view, marked by a statement: what torch.compile can trace (it cannot set an
        # attribute of every tensor it tracks, nor trace setattr()).
        y = y.view_as(y)
        y._bdlkern_samples = token
        self.layout, self.batch = layout, batch
        return y

    def layer_call(
        self, layer: torch.nn.Module, x: torch.Tensor, in_features: int, *, per_row: int | None = None,
        shared: bool = False,
    ) -> tuple[torch.Tensor, int | None, torch.Tensor, bool]:
        """Registers a call of the linear MC layer ``layer`` on ``x`` and applies the rule of this
        module.

        Returns:
            (a fresh rng_state for the call, the ``num_samples`` argument of the layer's op, the
            input as the op takes it, folded). ``num_samples`` is S when ``x`` carries no samples
            (the layer starts a stacked sampling), None when it does. A folded input ``[S * N, ...,
            in]`` is returned viewed as ``[S, N, ..., in]`` and ``folded`` is True: the layer
            flattens its ``[S, N, ..., out]`` result back (``y.flatten(0, 1)``). The layer returns
            ``state.output(y, "folded" if folded else "stacked")``. ``per_row``: the random
            elements the layer's op draws per input row and sample (``in_features`` for a dropout
            mask, ``out_features`` for output noise), or per sample with ``shared`` (a mask shared
            by the rows); see :meth:`rng_state`.

        Raises:
            ValueError: an input that carries the samples does not have them where its layout says.
        """
        layout = self.carries(x)
        per_sample = None
        if per_row is not None:
            rows = 1 if shared else x.numel() // max(in_features, 1) // (self.num_samples if layout else 1)
            per_sample = rows * per_row
        rng_state = self.rng_state(x.device, per_sample)
        self.mc_layer_calls += 1
        if layout is None:
            return rng_state, self.num_samples, x, False
        S = self.num_samples
        if layout == "folded":
            batch = self._folded_batch(x)
            if x.dim() < 2 or x.shape[0] % S or (batch is not None and x.shape[0] != S * batch):
                raise ValueError(
                    f"{type(layer).__name__}: inside sampling({S}) its input carries the samples folded into the "
                    f"batch, so it must be [S * N = {S} * {batch if batch is not None else 'N'}, ..., {in_features}], "
                    f"got shape {tuple(x.shape)}"
                )
            return rng_state, None, x.unflatten(0, (S, x.shape[0] // S)), True
        if x.dim() < 2 or x.shape[0] != S:
            raise ValueError(
                f"{type(layer).__name__}: inside sampling({S}) its input carries the samples, so it must be "
                f"[S={S}, ..., {in_features}], got shape {tuple(x.shape)}"
            )
        return rng_state, None, x, False

    def conv_call(
        self, layer: torch.nn.Module, x: torch.Tensor, *, per_image: int | None = None, shared: bool = False
    ) -> tuple[torch.Tensor, bool, torch.Tensor, bool]:
        """Registers a call of the convolution MC layer ``layer`` on ``x`` (``[B, C, *spatial]``).

        Returns:
            (a fresh rng_state, whether the input carries the samples, the input as the op takes
            it, stacked). An input without samples starts a folded sampling with ``N = B``; a folded
            input is ``[S * N, C, ...]``; a stacked input ``[S, N, C, ...]`` is returned flattened
            to ``[S * N, C, ...]`` and ``stacked`` is True: the layer unflattens its result
            (``y.unflatten(0, (S, -1))``). The layer returns ``state.output(y, "stacked" if
            stacked else "folded")``. ``per_image``: the random elements the layer's op draws per
            image and sample, or per sample with ``shared`` (see :meth:`rng_state`).

        Raises:
            ValueError: an input that carries the samples does not have them where its layout says.
        """
        layout = self.carries(x)
        per_sample = None
        if per_image is not None:
            images = 1
            if not shared and x.dim() > 0:
                images = x.shape[0] // self.num_samples if layout == "folded" else x.shape[0]
                images = images * x.shape[1] if layout == "stacked" and x.dim() > 1 else images
            per_sample = images * per_image
        rng_state = self.rng_state(x.device, per_sample)
        self.mc_layer_calls += 1
        if layout is None:
            return rng_state, False, x, False
        S = self.num_samples
        name = type(layer).__name__
        if layout == "folded":
            batch = self._folded_batch(x)
            if x.dim() < 1 or x.shape[0] % S or (batch is not None and x.shape[0] != S * batch):
                raise ValueError(
                    f"{name}: inside sampling({S}) its input carries the samples folded into the batch, so it must "
                    f"be [S * N = {S} * {batch if batch is not None else 'N'}, C, ...], got shape {tuple(x.shape)}"
                )
            return rng_state, True, x, False
        if x.dim() < 3 or x.shape[0] != S:
            raise ValueError(
                f"{name}: inside sampling({S}) its input carries the samples stacked in front (it follows a "
                f"linear MC layer), so it must be [S={S}, N, C, ...], got shape {tuple(x.shape)}"
            )
        return rng_state, True, x.flatten(0, 1), True

    def tensor_call(
        self, layer: torch.nn.Module, x: torch.Tensor, *, channel: bool = False
    ) -> tuple[torch.Tensor, str | None]:
        """Registers a call of an MC layer that acts on its input elementwise
        (:class:`bdlkern.nn.MCDropout`).

        Returns:
            (a fresh rng_state, the layout in which ``x`` carries the samples, or None). An input
            without samples starts a folded sampling, ``[N, ...] -> [S * N, ...]`` (stacked,
            ``[S, ...]``, for a 0-d or 1-d input, which has no batch to fold into); the layer
            returns ``state.output(y, layout)``.
        """
        layout = self.carries(x)
        per_sample = x.numel() // (self.num_samples if layout else 1)
        if channel:  # one flag per (row, channel): drop the dimensions after the channel
            per_sample //= math.prod(x.shape[(3 if layout == "stacked" else 2):])
        rng_state = self.rng_state(x.device, per_sample)
        self.mc_layer_calls += 1
        return rng_state, layout

    def unfold(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` with the samples in front: ``[S, N, ...]`` from a folded ``[S * N, ...]``; a
        stacked output is returned as it is. Without a mark (``out`` was not computed from an MC
        layer output of this block) the layout of the block's last MC layer output decides."""
        layout = self.carries(out) or self.layout
        if layout != "folded":
            return out
        return unfold_samples(out, self.num_samples)

    def chunks(self):
        """Iterate over the block's samples in chunks of ``chunk`` (``sampling(S, chunk=K)``):
        each iteration yields ``(first sample, samples in the chunk)`` and, until the next one,
        the MC layers draw that chunk's samples only (``num_samples`` is the chunk's size). Run the
        model once per iteration and concatenate the unfolded outputs along the sample dimension::

            with bdlkern.sampling(64, seed=0, chunk=8) as block:
                y = torch.cat([block.unfold(model(x)) for _ in block.chunks()])  # [64, N, ...]

        With a seed the result equals the unchunked block's, ``model(x)`` inside
        ``sampling(64, seed=0)``: a layer's noise for sample ``s`` is a pure function of (seed, the
        call's index in the pass, s). Chunk boundaries must fall on a Philox block of every
        layer's stream: a chunk size that is a multiple of 4 always does.
        """
        if self.chunk is None:
            raise RuntimeError("SamplingState.chunks: this block has no chunk size; use sampling(S, chunk=K)")
        total = self.total_samples
        try:
            for base in range(0, total, self.chunk):
                self.sample_base, self.num_samples = base, min(self.chunk, total - base)
                self._seeded_calls = 0
                self._token, self._layout_of = {}, {}  # a chunk's tensors carry only its own samples
                self.layout = self.batch = None
                yield base, self.num_samples
        finally:
            self.sample_base, self.num_samples = 0, total

    def rng_state(self, device: torch.device, per_sample: int | None = None) -> torch.Tensor:
        """A fresh rng_state for one MC layer call on ``device``.

        Args:
            per_sample: the random elements the call draws per sample (its stream is sample-major):
                with a seed, a chunk's call starts ``sample_base * per_sample`` elements into the
                unchunked call's stream. Needed only for chunks after the first.
        """
        if self.seed is None:
            return ops.new_rng_state(device=device)
        # Each call owns 2**40 Philox blocks (2**42 random words, more than any tensor a call can
        # fill), so the calls of a block never share a counter.
        k = self._seeded_calls
        self._seeded_calls += 1
        skip = 0
        if self.sample_base:
            if per_sample is None:
                raise RuntimeError(
                    "sampling(chunk=...): an MC layer of this model does not say how many random elements it draws "
                    "per sample, so its chunks cannot reproduce the unchunked samples; run it without chunk"
                )
            elements = self.sample_base * per_sample
            if elements % 4:
                raise ValueError(
                    f"sampling(chunk={self.chunk}): sample {self.sample_base} starts {elements} elements into a "
                    f"layer's Philox stream ({per_sample} per sample), not on a block of 4; use a chunk that is a "
                    "multiple of 4"
                )
            skip = elements // 4
        words = [self.seed % 2**64, ((k << _CALL_STRIDE_BITS) + skip) % 2**64]
        return torch.tensor([w - 2**64 if w >= 2**63 else w for w in words], dtype=torch.int64, device=device)


#: The torch functions through which :class:`_SampleTracker` lifts an argument without samples
#: that shares the batch of a sampled one (see its docstring): broadcasting arithmetic and joins.
_LIFTED_NAMES = (
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "maximum", "minimum", "where",
    "addcmul", "addcdiv", "lerp", "cat", "concat", "concatenate", "stack",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__",
)
_JOINS = ("cat", "concat", "concatenate", "stack")
#: In-place functions: their first argument is written, so it is never replaced by a lifted copy
#: (``out += identity`` in a residual block lifts ``identity``; ``x.add_(sampled)`` with an ``x``
#: without samples stays a shape error, as it would be outside the block).
_IN_PLACE_NAMES = ("add_", "sub_", "mul_", "div_", "__iadd__", "__isub__", "__imul__", "__itruediv__")


def _lifted_functions() -> tuple[frozenset, frozenset, frozenset]:
    found, joins, in_place = set(), set(), set()
    for name in _LIFTED_NAMES:
        for owner in (torch, torch.Tensor):
            fn = getattr(owner, name, None)
            if fn is not None:
                found.add(fn)
                if name in _JOINS:
                    joins.add(fn)
                if name in _IN_PLACE_NAMES:
                    in_place.add(fn)
    return frozenset(found), frozenset(joins), frozenset(in_place)


_LIFTED, _JOIN_FUNCTIONS, _IN_PLACE = _lifted_functions()


def _metadata_functions() -> frozenset:
    """Tensor functions that return metadata, never a tensor: the tracker passes them straight
    through (they are most of the calls a layer makes)."""
    found = set()
    for name in ("dim", "numel", "size", "stride", "is_floating_point", "is_complex", "is_contiguous", "data_ptr",
                 "element_size", "__len__", "get_device"):
        fn = getattr(torch.Tensor, name, None)
        if fn is not None:
            found.add(fn)
    for name in ("shape", "dtype", "device", "ndim", "layout", "is_cuda", "is_cpu", "is_meta", "requires_grad",
                 "grad_fn", "is_leaf", "names"):
        prop = getattr(torch.Tensor, name, None)
        getter = getattr(prop, "__get__", None)
        if getter is not None:
            found.add(getter)
    return frozenset(found)


_METADATA = _metadata_functions()


class _SampleTracker(TorchFunctionMode):
    """Follows the samples through a ``sampling`` block: every torch function whose arguments
    include a tensor that carries the block's samples marks its tensor outputs as carrying them
    too (same layout), so an MC layer knows from its input alone whether the samples are there.

    An argument *without* samples that meets one with samples in broadcasting arithmetic (``+``,
    ``*``, ``torch.where``, ...) or a join (``torch.cat`` / ``stack``) is a per-input value, shared
    by the samples; it is lifted to the samples' layout first where broadcasting would not do it:

    * folded ``[S * N, ...]``: an activation of the same rank whose leading dimension is the batch
      ``N`` (the skip connection of a residual block around a first MC layer) is repeated to
      ``[S * N, ...]``, sample-major; parameters are never lifted, nor the tensor an in-place op
      writes (``out += identity`` lifts ``identity``);
    * stacked ``[S, ...]``: in a join, a tensor of one rank less is expanded to ``[S, ...]``
      (arithmetic broadcasts it already).
    """

    def __init__(self, state: SamplingState):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func in _METADATA:
            return func(*args, **kwargs)
        state = self.state
        mark = None
        for arg in args:
            if isinstance(arg, torch.Tensor):
                found = getattr(arg, _MARK, None)
            elif isinstance(arg, (list, tuple)):
                found = next(
                    (m for m in (getattr(a, _MARK, None) for a in arg if isinstance(a, torch.Tensor)) if m is not None),
                    None,
                )
            else:
                continue
            if found is not None and found in state._layout_of:
                mark = found
                break
        if mark is None:
            for value in kwargs.values():
                found = getattr(value, _MARK, None) if isinstance(value, torch.Tensor) else None
                if found is not None and found in state._layout_of:
                    mark = found
                    break
        if mark is None:
            return func(*args, **kwargs)
        if func in _LIFTED and state.num_samples > 1:
            args = self._lift_args(func, args, mark)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            out._bdlkern_samples = mark
        elif isinstance(out, (list, tuple)):
            for item in out:
                if isinstance(item, torch.Tensor):
                    item._bdlkern_samples = mark
        return out

    def _lift_args(self, func, args, mark):
        state = self.state
        S, layout = state.num_samples, state._layout_of[mark][0]
        sampled = [
            a
            for a in (args[0] if func in _JOIN_FUNCTIONS and args and isinstance(args[0], (list, tuple)) else args)
            if isinstance(a, torch.Tensor) and state.carries(a) is not None
        ]
        if not sampled:
            return args
        rank = sampled[0].dim()
        batch = sampled[0].shape[0] // S if rank > 0 else 0

        def lift(t):
            if not isinstance(t, torch.Tensor) or isinstance(t, torch.nn.Parameter) or state.carries(t) is not None:
                return t
            if layout == "folded" and t.dim() == rank and rank > 0 and t.shape[0] == batch and batch > 0:
                return t.repeat(S, *([1] * (rank - 1)))
            if layout == "stacked" and func in _JOIN_FUNCTIONS and t.dim() == rank - 1:
                return t.expand(S, *t.shape)
            return t

        if func in _JOIN_FUNCTIONS and args and isinstance(args[0], (list, tuple)):
            return (type(args[0])(lift(t) for t in args[0]), *args[1:])
        if func in _IN_PLACE:
            return (args[0], *(lift(a) for a in args[1:]))
        return tuple(lift(a) for a in args)


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
        chunk: run the samples in chunks of this many, bounding the memory of a pass: iterate
            over :meth:`SamplingState.chunks` and call the model once per chunk (with a seed the
            result equals the unchunked block's). Without iterating, the block draws all S at once.

    Raises:
        RuntimeError: on entry, when a ``sampling`` block is already active on this thread.
            Blocks do not nest because their meaning would be ambiguous: a tensor made inside the
            outer block may already carry the outer ``[S_outer, ...]`` sample dimension, and the
            first MC layer of the inner block would take that as a batch dimension and add
            ``[S_inner, S_outer, ...]`` (or, if no outer MC layer ran yet, the inner S would
            silently replace the outer one). Finish one block before starting the next; other
            threads have their own blocks.
    """

    def __init__(self, num_samples: int, seed: int | None = None, chunk: int | None = None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"sampling: num_samples must be an int >= 1, got {num_samples!r}")
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"sampling: chunk must be an int >= 1 or None, got {chunk!r}")
        self.chunk = chunk
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"sampling: seed must be an int or None, got {type(seed).__name__}")
        self.num_samples = num_samples
        self.seed = seed
        self._saved_rng: list[tuple[torch.Generator, torch.Tensor]] | None = None
        self._tracker: _SampleTracker | None = None

    def __enter__(self) -> SamplingState:
        outer = current_sampling()
        if outer is not None:
            raise RuntimeError(
                f"bdlkern.sampling({self.num_samples}) was entered inside an active bdlkern.sampling("
                f"{outer.num_samples}) on the same thread; sampling blocks do not nest (the inner block "
                f"would mix its S={self.num_samples} with the outer S={outer.num_samples}). Leave the "
                "outer block first, or use one block"
            )
        state = SamplingState(self.num_samples, self.seed, self.chunk)
        if self.seed is not None:
            self._saved_rng = _fork_and_seed_torch_generators(self.seed)
        _local.state = state
        self._tracker = _SampleTracker(state)
        self._tracker.__enter__()
        return state

    def __exit__(self, *exc) -> None:
        tracker, self._tracker = self._tracker, None
        if tracker is not None:
            tracker.__exit__(None, None, None)
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
