"""What works on a whole model: :func:`convert` (every torch dropout of any model into a layer that
samples, fusing ``dropout -> Linear / Conv`` pairs where their adjacency is provable, and
rewriting functional dropout through ``torch.fx``), and the sums to add to the loss,
:func:`regularization` (every bdlkern regulariser and KL term) and :func:`kl_divergence` (the KL
terms of the sparse VD layers)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import warnings

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .concrete import _ConcreteDropoutMixin
from .mc_dropout import (
    _TORCH_DROPOUT_KINDS,
    MCDropout,
    MCDropoutConv1d,
    MCDropoutConv2d,
    MCDropoutConv3d,
    MCDropoutLinear,
)


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """The sum of the KL terms of every sparse-VD layer (:class:`SparseVDLinear`,
    :class:`SparseVDConv2d`, ...) in ``model`` (0-dim)."""
    terms = [m.kl() for m in model.modules() if getattr(m, "_bdlkern_kl", False) and callable(getattr(m, "kl", None))]
    if not terms:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return torch.stack(terms).sum()


def regularization(model: nn.Module) -> torch.Tensor:
    """The sum of every bdlkern regulariser and KL term in ``model`` (add it to the loss).

    Returns:
        0-dim tensor (0 when the model has no such module).
    """
    total = None
    for module in model.modules():
        term = None
        if isinstance(module, _ConcreteDropoutMixin):
            term = module.regularization()
        elif callable(getattr(module, "kl", None)) and getattr(module, "_bdlkern_kl", False):
            term = module.kl()
        if term is not None:
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=param.device if param is not None else None)
    return total


#: (dropout type, layer type) -> (fused type, mask kind) of the pairs :func:`convert` fuses. The
#: channel dropouts only fuse with the convolution of their rank (``Dropout2d`` zeroes planes of a
#: 4-d input).
_FUSABLE = {
    (nn.Dropout, nn.Linear): (MCDropoutLinear, None),
    (nn.Dropout, nn.Conv1d): (MCDropoutConv1d, "element"),
    (nn.Dropout, nn.Conv2d): (MCDropoutConv2d, "element"),
    (nn.Dropout, nn.Conv3d): (MCDropoutConv3d, "element"),
    (nn.Dropout1d, nn.Conv1d): (MCDropoutConv1d, "channel"),
    (nn.Dropout2d, nn.Conv2d): (MCDropoutConv2d, "channel"),
    (nn.Dropout3d, nn.Conv3d): (MCDropoutConv3d, "channel"),
}


def _fuse(dropout: nn.Module, layer: nn.Module, shared_mask: bool) -> nn.Module | None:
    """The fused MC layer of a ``dropout -> layer`` pair, or None when the pair does not fuse."""
    target = _FUSABLE.get((type(dropout), type(layer)))
    if target is None:
        return None
    fused_type, mask = target
    if mask is None:
        return fused_type.from_linear(layer, dropout.p, shared_mask)
    if layer.padding_mode != "zeros":  # the fused op pads with zeros only
        return None
    return fused_type.from_conv(layer, dropout.p, mask=mask, shared_mask=shared_mask)


@dataclasses.dataclass
class ConvertReport:
    """What :func:`convert` did, with module paths (``""`` is the model itself).

    Attributes:
        model: the converted model (``model`` itself, or a ``torch.fx.GraphModule`` when functional
            dropout was rewritten).
        fused: ``(dropout path, layer path, fused type)``: pairs fused into one MC layer; the layer
            keeps its path (and state-dict keys), the dropout became ``nn.Identity``.
        swapped: ``(path, torch type)``: dropout modules replaced by :class:`MCDropout`.
        rewritten: ``(call, new module path)``: functional dropout calls rewritten into
            :class:`MCDropout` submodules through ``torch.fx``.
        not_converted: ``(where, what, why)``: what could not be converted.
        traced: whether ``torch.fx`` traced the model (fusion outside ``nn.Sequential`` and the
            rewriting of functional dropout need it); ``trace_error`` says why not.
    """

    model: nn.Module
    fused: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    swapped: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    rewritten: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    not_converted: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    traced: bool = False
    trace_error: str | None = None

    def __len__(self) -> int:
        """The number of dropouts converted (fused, swapped or rewritten)."""
        return len(self.fused) + len(self.swapped) + len(self.rewritten)

    def __str__(self) -> str:
        lines = [f"bdlkern.nn.convert: {len(self)} dropout(s) converted"]
        lines.append(
            "  torch.fx: traced" if self.traced else f"  torch.fx: did not trace ({self.trace_error or 'not tried'})"
        )
        for dropout, layer, new in self.fused:
            lines.append(f"  fused      {_show(dropout)} -> {_show(layer)}  into {new}")
        for path, old in self.swapped:
            lines.append(f"  swapped    {_show(path)} ({old})  into MCDropout")
        for call, path in self.rewritten:
            lines.append(f"  rewritten  {call}  into MCDropout at {_show(path)}")
        for where, what, why in self.not_converted:
            lines.append(f"  NOT converted  {_show(where)}: {what} ({why})")
        return "\n".join(lines)


def _show(path: str) -> str:
    return path or "(model)"


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    parent._modules[name] = module  # keeps the position in a Sequential / ModuleList / ModuleDict


def _fuse_sequentials(model: nn.Module, prefix: str, shared_mask: bool, report: ConvertReport) -> None:
    """Fuses the ``dropout -> layer`` pairs of every ``nn.Sequential`` under ``model``."""
    for name, child in model.named_children():
        _fuse_sequentials(child, f"{prefix}{name}.", shared_mask, report)
    if not isinstance(model, nn.Sequential):
        return
    names = list(model._modules.keys())
    fused: list[tuple[str, nn.Module]] = []
    i = 0
    while i < len(names):
        module = model._modules[names[i]]
        nxt = model._modules[names[i + 1]] if i + 1 < len(names) else None
        layer = _fuse(module, nxt, shared_mask) if nxt is not None else None
        if layer is not None:
            fused.append((names[i + 1], layer))
            report.fused.append((prefix + names[i], prefix + names[i + 1], type(layer).__name__))
            i += 2
        else:
            fused.append((names[i], module))
            i += 1
    if len(fused) != len(names):
        model._modules.clear()
        for name, module in fused:
            model._modules[name] = module


class _Tracer(torch.fx.Tracer):
    """torch's and bdlkern's modules are leaves (a bdlkern layer reads the sampling state at run
    time, which a trace must not freeze); user modules are traced through."""

    def __init__(self):
        super().__init__()
        self.record_stack_traces = True  # where a functional dropout sits, for the report

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("bdlkern.") or super().is_leaf_module(m, qualname)


#: Functional dropouts -> (mask kind, channel rank, alpha) of the MCDropout that replaces them.
_FUNCTIONAL_DROPOUTS = {
    F.dropout: ("element", None, False),
    F.dropout1d: ("channel", 1, False),
    F.dropout2d: ("channel", 2, False),
    F.dropout3d: ("channel", 3, False),
    F.alpha_dropout: ("element", None, True),
    F.feature_alpha_dropout: ("channel", None, True),
    torch.dropout: ("element", None, False),
    torch.alpha_dropout: ("element", None, True),
    torch.feature_alpha_dropout: ("channel", None, True),
}
_FUNCTIONAL_NAMES = {"dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"}


def _node_p(node: torch.fx.Node) -> float | None:
    """The constant drop probability of a functional dropout call, or None."""
    p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        return None
    return float(p)


def _fuse_in_graph(model, graph, shared_mask, report) -> None:
    """Fuses ``dropout -> layer`` module pairs whose adjacency the graph proves: the dropout's
    output goes only into the layer, as its only input, and each module runs once."""
    calls: dict[str, list[torch.fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    for path, nodes in calls.items():
        dropout = model.get_submodule(path)
        if type(dropout) not in _TORCH_DROPOUT_KINDS or len(nodes) != 1 or len(nodes[0].users) != 1:
            continue
        user = next(iter(nodes[0].users))
        if user.op != "call_module" or len(calls.get(user.target, ())) != 1:
            continue
        if tuple(user.args) != (nodes[0],) or user.kwargs:
            continue
        layer = _fuse(dropout, model.get_submodule(user.target), shared_mask)
        if layer is None:
            continue
        _set_submodule(model, user.target, layer)
        _set_submodule(model, path, nn.Identity())
        report.fused.append((path, user.target, type(layer).__name__))


def _rewrite_functional(model, graph, report) -> nn.Module:
    """Rewrites the functional dropout calls of ``graph`` into ``MCDropout`` submodules; returns
    the GraphModule (``model`` itself when there is none)."""
    targets = [n for n in graph.nodes if n.op == "call_function" and n.target in _FUNCTIONAL_DROPOUTS]
    targets += [n for n in graph.nodes if n.op == "call_method" and n.target in ("dropout", "dropout_")]
    if not targets:
        return model
    count = 0
    for node in targets:
        label = f"{getattr(node.target, '__name__', node.target)}() {_where(node)}"
        kind = _FUNCTIONAL_DROPOUTS.get(node.target, ("element", None, False))
        p = _node_p(node)
        if p is None or not 0.0 <= p <= 1.0 or (kind[2] and p >= 1.0):
            report.not_converted.append(("", label, f"its p is not a constant in range ({p!r})"))
            continue
        while hasattr(model, f"bdlkern_dropout_{count}"):
            count += 1
        name = f"bdlkern_dropout_{count}"
        layer = MCDropout(p, mask=kind[0], dims=kind[1], alpha=kind[2])
        layer.train(model.training)
        model.add_module(name, layer)
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        report.rewritten.append((label, name))
    graph.lint()
    gm = torch.fx.GraphModule(model, graph, class_name=type(model).__name__)
    gm.train(model.training)
    return gm


def _where(node: torch.fx.Node) -> str:
    """``in Class.forward (file.py:line)`` of a traced call, from its stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = [
        line.strip()
        for line in trace.splitlines()
        if line.strip().startswith("File ") and "/torch/" not in line and "/bdlkern/" not in line
    ]
    if not frames:
        return f"at graph node {node.name}"
    # 'File "/path/model.py", line 12, in forward'
    parts = frames[-1].split(",")
    file = parts[0].split('"')[1].rsplit("/", 1)[-1] if '"' in parts[0] else "?"
    line = parts[1].strip().removeprefix("line ") if len(parts) > 1 else "?"
    func = parts[2].strip().removeprefix("in ") if len(parts) > 2 else "?"
    return f"in {func} ({file}:{line})"


def _functional_calls_in_source(model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, 'Class.forward line N: call')`` for each functional dropout call in the
    source of the ``forward`` of the user (non-torch, non-bdlkern) modules of ``model``."""
    found, seen = [], set()
    for path, module in model.named_modules():
        cls = type(module)
        if cls in seen or cls.__module__.startswith(("torch.", "bdlkern.")):
            continue
        seen.add(cls)
        try:
            source = textwrap.dedent(inspect.getsource(cls.forward))
            _, first_line = inspect.getsourcelines(cls.forward)
        except (OSError, TypeError):
            continue
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name in _FUNCTIONAL_NAMES:
                    found.append((path, f"{cls.__name__}.forward line {first_line + node.lineno - 1}: {name}()"))
    return found


def convert(
    model: nn.Module,
    shared_mask: bool = False,
    *,
    fx: bool = True,
    verbose: bool = False,
    report: bool = False,
) -> nn.Module | ConvertReport:
    """Make the dropout of any model sample under ``bdlkern.sampling``, in place:

    1. ``dropout -> layer`` pairs are fused into one MC layer where their adjacency is provable: in
       an ``nn.Sequential`` (nested ones included), or, when the model traces with ``torch.fx``,
       anywhere in its ``forward`` (the dropout's output feeds only the layer, and each runs
       once). The pairs: ``nn.Dropout -> nn.Linear`` into :class:`MCDropoutLinear`;
       ``nn.Dropout -> nn.Conv1d/2d/3d`` into :class:`MCDropoutConv1d/2d/3d` with element masks;
       ``nn.Dropout1d/2d/3d -> nn.Conv1d/2d/3d`` (same rank) with channel masks (convolutions
       with ``padding_mode="zeros"``). The fused layer keeps the layer's path; the dropout
       becomes ``nn.Identity``.
    2. every other ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout`` and ``FeatureAlphaDropout``,
       wherever it sits (a custom ``forward`` included), is replaced by :class:`MCDropout` (same
       samples as the fused layer would draw, one extra pass over the activation).
    3. functional dropout (``F.dropout``, ``F.dropout1d/2d/3d``, ``F.alpha_dropout``, ...) in a
       ``forward`` is rewritten into :class:`MCDropout` submodules through ``torch.fx`` when the
       model traces: the result is then a ``torch.fx.GraphModule`` (use the returned model). The
       rewritten dropout follows the module's train / eval mode (the ``training=self.training``
       idiom). A model that does not trace keeps its calls, and they are listed.

    ``state_dict`` keys are unchanged (no dropout has parameters). Nothing is skipped silently:
    what could not be converted is in the report, and a ``UserWarning`` says so; a model with no
    dropout at all gets a ``UserWarning`` too.

    Args:
        model: any ``nn.Module``.
        shared_mask: fused layers share one mask per sample over the batch (see the layers).
        fx: try ``torch.fx`` (fusion outside Sequential, functional dropout). False: module swaps
            and Sequential fusion only.
        verbose: print the report.
        report: return the :class:`ConvertReport` (its ``model`` is the converted model) instead
            of the model.

    Returns:
        The converted model (``model`` itself unless functional dropout was rewritten), or the
        report with ``report=True``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    result = ConvertReport(model)
    _fuse_sequentials(model, "", shared_mask, result)
    graph = None
    if fx:
        try:
            graph = _Tracer().trace(model)
            result.traced = True
        except Exception as error:  # noqa: BLE001  (any trace failure means: no graph)
            result.trace_error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]
    if graph is not None:
        _fuse_in_graph(model, graph, shared_mask, result)
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if type(module) not in _TORCH_DROPOUT_KINDS:
            continue
        if not path:
            why = "the model itself is a dropout module: use bdlkern.nn.MCDropout.from_dropout(model)"
            result.not_converted.append(("", type(module).__name__, why))
            continue
        _set_submodule(model, path, MCDropout.from_dropout(module))
        result.swapped.append((path, type(module).__name__))
    if graph is not None:
        result.model = _rewrite_functional(model, graph, result)
    else:
        why = f"the model does not trace with torch.fx ({result.trace_error})" if fx else "fx=False"
        for path, call in _functional_calls_in_source(model):
            result.not_converted.append((path, call, f"functional dropout is not sampled; {why}"))
    if result.not_converted:
        warnings.warn(
            "bdlkern.nn.convert could not convert everything; these stay as they are and are NOT sampled:\n"
            + "\n".join(f"  {_show(w)}: {what} ({why})" for w, what, why in result.not_converted),
            UserWarning,
            stacklevel=2,
        )
    elif len(result) == 0:
        warnings.warn(
            "bdlkern.nn.convert found no dropout in the model, so nothing samples under bdlkern.sampling; to add MC "
            "dropout to a network trained without it, use bdlkern.nn.bayesianize(model, 'mc_dropout', p=...)",
            UserWarning,
            stacklevel=2,
        )
    if verbose:
        print(result)
    return result if report else result.model
