"""``bayesianize``: turn the ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers of a trained dense model into
bdlkern layers in place (keeping their weights), and :class:`BayesianizeReport`, what it did."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterable, Union

from torch import nn
from torch.nn.utils import parametrize

from .concrete import ConcreteDropout, ConcreteDropoutLinear
from .mc_dropout import MCDropoutConv1d, MCDropoutConv2d, MCDropoutConv3d, MCDropoutLinear
from .sparse_vd import SparseVDConv1d, SparseVDConv2d, SparseVDConv3d, SparseVDLinear, _check_prior

_METHODS = ("mc_dropout", "concrete", "sparse_vd")
#: The exact types that are converted (subclasses are not: their forward may differ).
_CONVERTIBLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MC_CONV = {nn.Conv1d: MCDropoutConv1d, nn.Conv2d: MCDropoutConv2d, nn.Conv3d: MCDropoutConv3d}
_SPARSE_VD_CONV = {nn.Conv1d: SparseVDConv1d, nn.Conv2d: SparseVDConv2d, nn.Conv3d: SparseVDConv3d}
#: What ``method="concrete"`` passes on to the Concrete-dropout layers besides ``init_p``.
_CONCRETE_OPTIONS = ("weight_regularizer", "dropout_regularizer", "temperature", "per_feature", "relaxed_eval")

LayerSelection = Union[None, str, Callable[[str, nn.Module], bool], Iterable[str]]


@dataclass
class BayesianizeReport:
    """What :func:`bayesianize` did to a model.

    Attributes:
        converted: ``(path, old_type_name, new_type_name)`` of every converted layer, in module
            registration order (``path`` is the qualified name of ``model.named_modules()``).
        skipped: ``(path, type_name, reason)`` of every linear / convolution layer (and bdlkern
            layer) that was left as it is.
        method: the ``method`` argument.
        model: the model itself (changed in place), so that ``bayesianize(...).model`` chains.
        renamed_keys: ``{old state-dict key: new key}`` of the parameters that moved (a Concrete-
            dropout convolution is wrapped: ``conv.weight`` becomes ``conv.layer.weight``; a sparse-VD
            layer's weight is ``theta``), to load a checkpoint of the dense model:
            ``{report.renamed_keys.get(k, k): v for k, v in state.items()}``.
        new_keys: the state-dict keys of the parameters the conversion added (``p_logit``,
            ``log_sigma2``), which a dense checkpoint does not hold.

    ``len(report)`` is the number of converted layers; ``str(report)`` is a readable table.
    """

    converted: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    method: str = ""
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    renamed_keys: dict[str, str] = field(default_factory=dict)
    new_keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.converted)

    def __str__(self) -> str:
        header = ("status", "path", "type", "detail")
        rows = [("converted", path, old, f"-> {new}") for path, old, new in self.converted]
        rows += [("skipped", path, name, reason) for path, name, reason in self.skipped]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        lines = [f"bayesianize(method={self.method!r}): {len(self.converted)} converted, {len(self.skipped)} skipped"]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
        if self.renamed_keys:
            moved = ", ".join(f"{old} -> {new}" for old, new in self.renamed_keys.items())
            lines.append(f"state-dict keys renamed: {moved}")
        if self.new_keys:
            lines.append(f"state-dict keys added: {', '.join(self.new_keys)}")
        return "\n".join(lines)


def _is_bdlkern_layer(module: nn.Module) -> bool:
    """A module of :mod:`bdlkern.nn` (or a subclass of one): already Bayesian, never entered."""
    return any(cls.__module__.startswith("bdlkern.nn") for cls in type(module).__mro__)


def _is_layer_like(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd))


def _not_convertible_reason(module: nn.Module) -> str:
    """Why a linear / convolution module whose type is not exactly one of ``_CONVERTIBLE`` stays."""
    if parametrize.is_parametrized(module):
        return "has parametrizations (torch.nn.utils.parametrize): remove them first"
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "a lazy layer with uninitialised parameters: run one forward pass first"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed convolutions are not supported"
    base = "Linear" if isinstance(module, nn.Linear) else type(module).__mro__[1].__name__
    for conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, conv):
            base = conv.__name__
    return (
        f"a subclass of nn.{base} (its forward may differ); only exact nn.Linear / nn.Conv1d/2d/3d layers are "
        "converted"
    )


def _walk(module: nn.Module, prefix: str = ""):
    """``(path, module)`` in ``named_modules()`` order, duplicates kept (a module registered at two
    paths appears at both), not entering bdlkern layers nor linear / convolution modules."""
    for name, child in module._modules.items():
        if child is None:
            continue
        path = f"{prefix}.{name}" if prefix else name
        yield path, child
        if not _is_bdlkern_layer(child) and not _is_layer_like(child):
            yield from _walk(child, path)


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"bayesianize: {name} must be a real number, got {type(value).__name__}")
    return float(value)


def _check_options(method, p, init_p, log_sigma2_init, threshold, mask, shared_mask, concrete_kwargs,
                   prior="log_uniform") -> dict:
    """The checked options of ``method``; an option of another method raises."""
    owner = {
        "p": ("mc_dropout", p is not None),
        "mask": ("mc_dropout", not (isinstance(mask, str) and mask == "element")),
        "shared_mask": ("mc_dropout", shared_mask is not False),
        "init_p": ("concrete", init_p is not None),
        "threshold": ("sparse_vd", not (isinstance(threshold, numbers.Real) and threshold == 3.0)),
        "log_sigma2_init": ("sparse_vd", not (isinstance(log_sigma2_init, numbers.Real) and log_sigma2_init == -10.0)),
        "prior": ("sparse_vd", not (isinstance(prior, str) and prior == "log_uniform")),
    }
    for name, (method_of, given) in owner.items():
        if given and method_of != method:
            raise ValueError(f"bayesianize: {name} is an option of method={method_of!r}, not of method={method!r}")
    unknown = sorted(set(concrete_kwargs) - set(_CONCRETE_OPTIONS))
    if unknown:
        raise TypeError(
            f"bayesianize: unexpected keyword argument(s) {', '.join(unknown)} (the extra keyword arguments are the "
            f"Concrete-dropout options {', '.join(_CONCRETE_OPTIONS)})"
        )
    if concrete_kwargs and method != "concrete":
        raise ValueError(
            f"bayesianize: {', '.join(sorted(concrete_kwargs))} are options of method='concrete', not of "
            f"method={method!r}"
        )
    if method == "mc_dropout":
        if p is None:
            raise ValueError(
                "bayesianize: method='mc_dropout' needs p, the drop probability of each layer's input, in (0, 1)"
            )
        p = _real(p, "p")
        if not (0.0 < p < 1.0):
            raise ValueError(f"bayesianize: p must be in (0, 1) for method='mc_dropout', got {p}")
        if mask not in ("element", "channel"):
            raise ValueError(f"bayesianize: mask must be 'element' or 'channel', got {mask!r}")
        if not isinstance(shared_mask, bool):
            raise TypeError(f"bayesianize: shared_mask must be a bool, got {type(shared_mask).__name__}")
        return {"p": p, "mask": mask, "shared_mask": shared_mask}
    if method == "concrete":
        init_p = 0.1 if init_p is None else _real(init_p, "init_p")
        if not (0.0 < init_p < 1.0):
            raise ValueError(f"bayesianize: init_p must be in (0, 1), got {init_p}")
        return {"init_p": init_p, **concrete_kwargs}
    threshold, log_sigma2_init = _real(threshold, "threshold"), _real(log_sigma2_init, "log_sigma2_init")
    if not math.isfinite(threshold):
        raise ValueError(f"bayesianize: threshold must be finite, got {threshold}")
    if not math.isfinite(log_sigma2_init):
        raise ValueError(f"bayesianize: log_sigma2_init must be finite, got {log_sigma2_init}")
    return {"threshold": threshold, "log_sigma2_init": log_sigma2_init, "prior": _check_prior("bayesianize", prior)}


def _skip_reason_for_method(module: nn.Module, method: str) -> str | None:
    """Why the selected ``module`` cannot take ``method`` (None: it can)."""
    if type(module) is nn.Linear or module.padding_mode == "zeros":
        return None
    if method == "mc_dropout":
        return (
            f"padding_mode={module.padding_mode!r}: the MC-dropout convolutions pad with zeros only (put an "
            "nn.Dropout in front of it by hand)"
        )
    if method == "sparse_vd":
        return f"padding_mode={module.padding_mode!r}: the sparse-VD convolutions pad with zeros only"
    return None  # ConcreteDropout runs the convolution's own forward


def _convert(module: nn.Module, method: str, options: dict) -> tuple[nn.Module, dict[str, str], list[str]]:
    """The bdlkern layer for ``module``, with ``{old parameter name: new name}`` of the parameters
    that moved and the names of the parameters it added."""
    kind = type(module)
    if method == "mc_dropout":
        if kind is nn.Linear:
            return MCDropoutLinear.from_linear(module, options["p"], shared_mask=options["shared_mask"]), {}, []
        new = _MC_CONV[kind].from_conv(
            module, options["p"], mask=options["mask"], shared_mask=options["shared_mask"]
        )
        return new, {}, []
    if method == "concrete":
        kwargs = dict(options)
        init_p = kwargs.pop("init_p")
        if kind is nn.Linear:
            return ConcreteDropoutLinear.from_linear(module, init_p=init_p, **kwargs), {}, ["p_logit"]
        wrapper = ConcreteDropout(module, init_p=init_p, **kwargs)  # the conv itself, not a copy
        wrapper.train(module.training)
        moved = {"weight": "layer.weight"}
        if module.bias is not None:
            moved["bias"] = "layer.bias"
        return wrapper, moved, ["p_logit"]
    if kind is nn.Linear:
        new = SparseVDLinear.from_linear(module, **options)
    else:
        new = _SPARSE_VD_CONV[kind].from_conv(module, **options)
    return new, {"weight": "theta"}, ["log_sigma2"]


def _select(model: nn.Module, layers: LayerSelection, candidates: list[tuple[str, nn.Module]],
            skipped: list[tuple[str, str, str]]) -> set[str]:
    """The candidate paths ``layers`` selects; a named layer inside a bdlkern layer is added to
    ``skipped``."""
    if layers is None or (isinstance(layers, str) and layers == "all"):
        return {path for path, _ in candidates}
    if isinstance(layers, str):
        if layers == "last":
            return {candidates[-1][0]} if candidates else set()
        raise ValueError(
            f"bayesianize: layers must be None, 'all', 'last', a predicate (name, module) -> bool or a list of "
            f"module names, got the string {layers!r} (to select one layer by name pass [{layers!r}])"
        )
    if callable(layers):
        return {path for path, module in candidates if layers(path, module)}
    try:
        names = list(layers)
    except TypeError:
        raise TypeError(
            "bayesianize: layers must be None, 'all', 'last', a predicate (name, module) -> bool or an iterable of "
            f"module names, got {type(layers).__name__}"
        ) from None
    walked = {path for path, _ in candidates} | {path for path, _, _ in skipped}
    selected = set()
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"bayesianize: layers must hold module names (str), got a {type(name).__name__}")
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        if module is None:
            raise ValueError(f"bayesianize: layers names {name!r}, which is not a submodule of the model")
        if not (_is_layer_like(module) or _is_bdlkern_layer(module)):
            raise ValueError(
                f"bayesianize: layers names {name!r}, a {type(module).__name__}, not an nn.Linear or nn.Conv1d/2d/3d"
            )
        if name not in walked:  # inside a layer (e.g. the convolution a ConcreteDropout wraps)
            atoms = name.split(".")
            owners = [".".join(atoms[:i]) for i in range(1, len(atoms))]
            owner = next(path for path in owners if path in walked)
            kind = "bdlkern layer" if _is_bdlkern_layer(model.get_submodule(owner)) else "layer"
            skipped.append((name, type(module).__name__, f"inside the {kind} {owner!r}, which is not entered"))
            walked.add(name)
        selected.add(name)
    return selected


def bayesianize(
    model: nn.Module,
    method: str,
    *,
    layers: LayerSelection = None,
    p: float | None = None,
    init_p: float | None = None,
    log_sigma2_init: float = -10.0,
    threshold: float = 3.0,
    mask: str = "element",
    shared_mask: bool = False,
    prior: str = "log_uniform",
    **concrete_kwargs,
) -> BayesianizeReport:
    """Turn the ``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers of a trained dense model into bdlkern
    layers, in place, keeping their weights.

    Each selected layer is replaced, at the same qualified path (inside ``nn.Sequential``,
    ``nn.ModuleList``, ``nn.ModuleDict`` or as an attribute of a custom module, at any depth), by:

    * ``method="mc_dropout"``: :meth:`MCDropoutLinear.from_linear` / ``MCDropoutConvNd.from_conv``
      (with ``p``, ``mask``, ``shared_mask``). This is the one-call way to add MC dropout to a
      network trained without dropout. The dropout acts on each converted layer's *input*: for the
      first layer of the network that means dropping the raw input features (pixels, measured
      variables), which is rarely wanted, so ``layers="last"`` or a predicate is often the better
      choice. Convolutions with ``padding_mode != "zeros"`` are skipped (the fused op pads with
      zeros). For a model that already has ``nn.Dropout`` in front of its layers use
      :func:`bdlkern.nn.convert` instead (this would add a second dropout);
    * ``method="concrete"``: :meth:`ConcreteDropoutLinear.from_linear` for a linear layer (same
      state-dict keys plus ``p_logit``) and ``ConcreteDropout(conv)`` for a convolution (channel
      masks): the wrapper holds the convolution itself, so its state-dict keys move under
      ``.layer.`` (``conv.weight`` -> ``conv.layer.weight``, see ``report.renamed_keys``). The
      learnt rates start at ``init_p``; the Concrete options (``weight_regularizer``,
      ``dropout_regularizer``, ``temperature``, ``per_feature``, ``relaxed_eval``) may be passed as
      keyword arguments;
    * ``method="sparse_vd"``: :meth:`SparseVDLinear.from_linear` / ``SparseVDConvNd.from_conv``:
      ``theta`` is the trained weight and every ``log_sigma2`` starts at ``log_sigma2_init``, for
      fine-tuning a pretrained net as Molchanov et al. (2017) do (add
      ``bdlkern.nn.kl_divergence(model) / N_train`` to the loss). Convolutions with
      ``padding_mode != "zeros"`` are skipped.

    Only layers whose type is exactly ``nn.Linear`` / ``nn.Conv1d/2d/3d`` are converted:
    subclasses (their forward may differ, e.g. the ``out_proj`` of ``nn.MultiheadAttention``),
    parametrized and transposed layers are skipped, and bdlkern layers (an ``MCDropoutLinear`` is an
    ``nn.Linear`` subclass) are skipped and not entered. A module registered at several paths is
    skipped too: converting it would untie the weights, and a bdlkern layer that runs twice in one
    forward pass would begin a new pass inside ``bdlkern.sampling``. Every layer is converted
    before any is replaced, so an error leaves the model untouched.

    Each new layer keeps its old layer's device, dtype and training mode (a model in eval stays in
    eval), and the ``requires_grad`` of its weight and bias; the parameters a method adds
    (``p_logit``, ``log_sigma2``) are trainable and new objects, so create the optimizer after
    calling this. Hooks registered on a replaced layer are not carried over, and code that reads a
    converted layer's ``.weight`` directly sees a sparse-VD layer's ``theta`` under that name no more.

    Args:
        model: the model, changed in place; it must contain the layers (a bare ``nn.Linear`` or
            convolution cannot replace itself: wrap it in ``nn.Sequential``, or use the layer's
            ``from_linear`` / ``from_conv``).
        method: ``"mc_dropout"``, ``"concrete"`` or ``"sparse_vd"``.
        layers: which layers: None or ``"all"`` (every convertible layer); ``"last"`` (the last
            ``nn.Linear`` / ``nn.Conv1d/2d/3d`` in module registration order, i.e. the order of
            ``model.named_modules()``, which is the order the submodules were assigned in
            ``__init__``, not necessarily the order ``forward`` calls them); a predicate
            ``(qualified_name, module) -> bool`` called for each convertible layer; or an iterable
            of qualified module names (each must name an ``nn.Linear`` / convolution of the model).
        p: drop probability of each converted layer's input, in (0, 1) (``"mc_dropout"`` only, required).
        init_p: initial learnt drop probability in (0, 1) (``"concrete"`` only; default 0.1).
        log_sigma2_init, threshold: the sparse-VD layers' initial ``log sigma^2`` and pruning
            threshold on ``log_alpha`` (``"sparse_vd"`` only).
        prior: the sparse-VD layers' KL prior, ``"log_uniform"`` or ``"ard"`` (``"sparse_vd"`` only;
            see :class:`SparseVDLinear`).
        mask: ``"element"`` or ``"channel"`` masks for MC-dropout convolutions (``"mc_dropout"`` only).
        shared_mask: the MC-dropout layers' ``shared_mask`` (``"mc_dropout"`` only).
        **concrete_kwargs: Concrete-dropout options (``"concrete"`` only).

    Returns:
        A :class:`BayesianizeReport`: the converted and skipped layers with their paths, the
        state-dict keys that moved or were added, and ``report.model``, the model itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; an option or ``layers`` has the wrong type.
        ValueError: an unknown ``method``; an option out of range or of another method; ``model``
            is itself a linear / convolution layer; ``layers`` is an unknown string or names a
            module that does not exist or is not a linear / convolution layer; no layer was
            selected or none could be converted (never a silent no-op).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bayesianize: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"bayesianize: method must be one of {', '.join(map(repr, _METHODS))}, got {method!r}")
    options = _check_options(method, p, init_p, log_sigma2_init, threshold, mask, shared_mask, concrete_kwargs, prior)
    if type(model) in _CONVERTIBLE:
        how = "from_linear" if type(model) is nn.Linear else "from_conv (ConcreteDropout(conv) for method='concrete')"
        raise ValueError(
            f"bayesianize: model is itself an nn.{type(model).__name__}, which cannot be replaced in place; wrap it "
            f"(nn.Sequential(layer)) or convert it with the bdlkern layer's {how}"
        )
    if _is_bdlkern_layer(model):
        raise ValueError(f"bayesianize: model is already a bdlkern layer ({type(model).__name__})")

    # Survey: the convertible layers and, for the report, the other layer-like modules.
    report = BayesianizeReport(method=method, model=model)
    candidates: list[tuple[str, nn.Module]] = []
    paths_of: dict[int, list[str]] = {}
    for path, module in _walk(model):
        if _is_bdlkern_layer(module):
            report.skipped.append((path, type(module).__name__, "already a bdlkern layer"))
        elif _is_layer_like(module):
            if type(module) in _CONVERTIBLE:
                candidates.append((path, module))
                paths_of.setdefault(id(module), []).append(path)
            else:
                report.skipped.append((path, type(module).__name__, _not_convertible_reason(module)))

    selected = _select(model, layers, candidates, report.skipped)
    if not selected:
        raise ValueError(
            f"bayesianize: layers={layers!r} selected no layer of the model (nothing to convert)\n{report}"
        )

    # Convert every selected layer before replacing any, so that an error leaves the model as it was.
    planned: list[tuple[str, nn.Module, nn.Module, dict[str, str], list[str]]] = []
    for path, module in candidates:
        name = type(module).__name__
        if path not in selected:
            report.skipped.append((path, name, f"not selected by layers={layers!r}"))
            continue
        others = [other for other in paths_of[id(module)] if other != path]
        if others:
            report.skipped.append(
                (path, name, f"the same module is also registered at {', '.join(map(repr, others))}; converting it "
                             "would untie the weights")
            )
            continue
        reason = _skip_reason_for_method(module, method)
        if reason is not None:
            report.skipped.append((path, name, reason))
            continue
        new, moved, added = _convert(module, method, options)
        planned.append((path, module, new, moved, added))
    if not planned:
        raise ValueError(f"bayesianize: no layer could be converted\n{report}")

    for path, old, new, moved, added in planned:
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, new)
        for param_name in ("weight", "bias"):
            param = getattr(old, param_name)
            if param is not None:
                new.get_parameter(moved.get(param_name, param_name)).requires_grad_(param.requires_grad)
        report.converted.append((path, type(old).__name__, type(new).__name__))
        for old_key, new_key in moved.items():
            report.renamed_keys[f"{path}.{old_key}"] = f"{path}.{new_key}"
        report.new_keys.extend(f"{path}.{key}" for key in added)
    return report
