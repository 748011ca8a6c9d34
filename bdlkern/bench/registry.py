"""The case registry: what a benchmark case is and where the cases are kept.

A :class:`Case` names the bdlkern subject and its baselines (each of a kind in
:data:`BASELINE_KINDS`) and builds a :class:`Workload`, the callables to time plus the work they
do. The case modules in ``bdlkern/bench/cases/`` register their cases here with :func:`case` on
import; :data:`CASES` is the registry that the CLI and the pytest-benchmark suites read, and
:func:`select_cases` is how ``--case`` picks from it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: What a baseline stands for; printed in the ``kind`` column. The subject's kind is ``"bdlkern"``.
BASELINE_KINDS = (
    "library",  # the closest path through torch or another library (torch.bernoulli_, torch.sparse)
    "reference",  # the eager PyTorch a user writes without bdlkern (bdlkern.bench.baselines)
    "compiled",  # torch.compile of that eager code
    "limit",  # a physical-limit proxy: a plain GEMM or copy of the same shape
    "variant",  # another configuration of the bdlkern op (per-element vs shared masks)
)


@dataclass
class Workload:
    """What a case's ``setup`` returns: the callables to time and the work they do.

    Attributes:
        variants: variant name -> zero-argument callable that runs it once on pre-built inputs.
            The names must be exactly the case's subject and baselines.
        params: the sizes and settings of this workload (shapes, p, dtype), reported as-is.
        elements: logical elements produced per call (same for every variant), for G elements/s.
        bytes: minimum memory traffic per call, reads plus writes of each tensor once; an int for
            all variants or a mapping variant -> int where they differ (a bool mask writes 1 byte
            per element, a float32 tensor 4). Gives GB/s.
        flops: floating-point operations per call, an int or a mapping like ``bytes``. Gives
            GFLOP/s; when set it is the primary throughput instead of elements.
        check: optional sanity check run once before timing (raise on failure), so a benchmark
            never times a broken kernel.
    """

    variants: dict[str, Callable[[], Any]]
    params: dict[str, Any] = field(default_factory=dict)
    elements: int | None = None
    bytes: int | Mapping[str, int] | None = None
    flops: int | Mapping[str, int] | None = None
    check: Callable[[], None] | None = None

    def work(self, variant: str) -> dict[str, int | None]:
        """Elements, bytes and flops of one call of ``variant``."""

        def pick(metric):
            if isinstance(metric, Mapping):
                return metric.get(variant)
            return metric

        return {"elements": self.elements, "bytes": pick(self.bytes), "flops": pick(self.flops)}


@dataclass(frozen=True)
class Case:
    """One benchmark case: a bdlkern variant against its baselines on one workload.

    Attributes:
        name: unique, dotted by family (``"rng.dropout_mask"``); ``--case`` matches it.
        family: the case family (``"rng"``, ``"mc_dropout"``, ...), one module in ``cases/``.
        description: one line saying what is computed and at what size.
        subject: name of the bdlkern variant.
        baselines: baseline name -> kind (one of :data:`BASELINE_KINDS`), in report order. Any
            number is allowed; each gets a speed-up ratio.
        setup: ``setup(device, quick) -> Workload``; builds inputs on ``device`` (a
            ``torch.device``) at full size, or at a small size when ``quick`` is true.
        devices: device types the case can run on.
    """

    name: str
    family: str
    description: str
    subject: str
    baselines: Mapping[str, str]
    setup: Callable[[torch.device, bool], Workload]
    devices: tuple[str, ...] = ("cpu", "cuda")

    def __post_init__(self):
        for name, kind in self.baselines.items():
            if kind not in BASELINE_KINDS:
                raise ValueError(f"case {self.name}: baseline {name!r} has kind {kind!r}, expected one of {BASELINE_KINDS}")
        if self.subject in self.baselines:
            raise ValueError(f"case {self.name}: subject {self.subject!r} is also listed as a baseline")

    @property
    def variant_names(self) -> list[str]:
        """The subject followed by the baselines: the order variants are run and reported in."""
        return [self.subject, *self.baselines]

    def kind(self, variant: str) -> str:
        """``"bdlkern"`` for the subject, else the baseline's kind."""
        return "bdlkern" if variant == self.subject else self.baselines[variant]

    def build(self, device: torch.device | str, quick: bool = False) -> Workload:
        """Run ``setup`` and check that it returned exactly the declared variants."""
        workload = self.setup(torch.device(device), quick)
        if list(workload.variants) != self.variant_names:
            raise RuntimeError(
                f"case {self.name}: setup returned variants {list(workload.variants)}, "
                f"declared {self.variant_names}"
            )
        return workload


#: The registry: case name -> :class:`Case`, in registration order.
CASES: dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Add ``case`` to :data:`CASES` (names must be unique) and return it."""
    if case.name in CASES:
        raise ValueError(f"benchmark case {case.name!r} is registered twice")
    CASES[case.name] = case
    return case


def case(
    name: str,
    *,
    family: str,
    description: str,
    subject: str,
    baselines: Mapping[str, str],
    devices: tuple[str, ...] = ("cpu", "cuda"),
) -> Callable[[Callable[[torch.device, bool], Workload]], Case]:
    """Decorator form of :func:`register_case`: decorates the ``setup`` function.

    Example::

        @case("rng.uniform", family="rng", description="...", subject="bdlkern.uniform",
              baselines={"torch.rand": "library"})
        def _uniform(device, quick):
            ...
            return Workload(variants={...}, elements=n, bytes=4 * n)
    """

    def wrap(setup: Callable[[torch.device, bool], Workload]) -> Case:
        return register_case(
            Case(name, family, description, subject, dict(baselines), setup, tuple(devices))
        )

    return wrap


def select_cases(patterns: Sequence[str] | None = None, *, family: str | None = None) -> list[Case]:
    """Cases chosen by ``--case`` patterns, in registry order.

    A pattern that equals a case name selects that case only; otherwise it selects every case whose
    name contains it. No patterns selects all cases. ``family`` further restricts the result.

    Raises:
        KeyError: a pattern matches no case.
    """
    chosen: set[str] = set()
    for pattern in patterns or []:
        if pattern in CASES:
            chosen.add(pattern)
            continue
        hits = [name for name in CASES if pattern in name]
        if not hits:
            raise KeyError(f"no benchmark case matches {pattern!r}; cases: {', '.join(CASES)}")
        chosen.update(hits)
    return [
        c
        for name, c in CASES.items()
        if (not patterns or name in chosen) and (family is None or c.family == family)
    ]
