"""What the demo writes and prints: the results table (:func:`format_table`), ``report.json``
(:func:`build_report`) and ``report.md`` (:func:`format_markdown`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from bdlkern.demo.data import OOD_TRANSFORMS, SPLIT_SEED, TEST_FRACTION, Data
from bdlkern.demo.evaluation import ECE_BINS
from bdlkern.demo.models import (
    CONCRETE_INIT_P,
    CONCRETE_LENGTH_SCALE,
    CONCRETE_RATE_LR_SCALE,
    CONCRETE_TAU,
    CONCRETE_TEMPERATURE,
    CONV_CHANNELS,
    CONV_KERNEL,
    HIDDEN,
    IMAGE_SIDE,
    MC_DROPOUT_P,
    concrete_coefficients,
)
from bdlkern.demo.pipeline import ModelResult
from bdlkern.demo.settings import Settings

#: The version of report.json's layout (its ``schema`` field).
SCHEMA_VERSION = 1


# ---- the table ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """A column of the results table: header, minimum width (printed table), the cell of a model
    record, and whether it holds numbers (right-aligned)."""

    header: str
    width: int
    cell: Callable[[str, Mapping[str, Any]], str]
    numeric: bool = True


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def _layers_cell(record: Mapping[str, Any]) -> str:
    layers = record["layers"]
    if not layers:
        return "-"
    return f"{layers['short']} " + "/".join(f"{v:.2f}" for v in layers["values"].values())


def table_columns(ood_names: Sequence[str]) -> list[Column]:
    """The columns, two OOD AUROC columns per OOD set: by mutual information (MI) and by predictive
    entropy (H), the latter for every model (the plain one's MI is 0, its MI AUROC chance)."""
    columns = [
        Column("model", 11, lambda name, r: name, numeric=False),
        Column("acc", 6, lambda name, r: _fmt(r["metrics"]["accuracy"], ".4f")),
        Column("NLL", 6, lambda name, r: _fmt(r["metrics"]["nll"], ".4f")),
        Column("ECE", 6, lambda name, r: _fmt(r["metrics"]["ece"], ".4f")),
        Column("Brier", 6, lambda name, r: _fmt(r["metrics"]["brier"], ".4f")),
    ]
    for ood in ood_names:
        def auroc(name: str, r: Mapping[str, Any], ood: str = ood) -> str:
            return _fmt(r["metrics"]["ood"][ood]["auroc_mutual_information"], ".3f")

        def auroc_entropy(name: str, r: Mapping[str, Any], ood: str = ood) -> str:
            return _fmt(r["metrics"]["ood"][ood]["auroc_predictive_entropy"], ".3f")

        columns.append(Column(f"AUROC {ood} MI", 9, auroc))
        columns.append(Column(f"AUROC {ood} H", 9, auroc_entropy))
    columns += [
        Column("bdlkern ms", 10, lambda name, r: _fmt(r["mc_inference"]["bdlkern_s"], ".2f", 1e3)),
        Column("eager ms", 9, lambda name, r: _fmt(r["mc_inference"]["eager_s"], ".2f", 1e3)),
        Column("eager", 7, lambda name, r: r["mc_inference"]["eager_baseline"] or "-", numeric=False),
        Column("speed-up", 8, lambda name, r: _fmt(r["mc_inference"]["speedup"], ".2f")),
        Column("per layer", 16, lambda name, r: _layers_cell(r), numeric=False),
    ]
    return columns


def format_table(
    models: Mapping[str, Mapping[str, Any]], ood_names: Sequence[str], markdown: bool = False
) -> str:
    """The results table, fixed-width text or markdown, one row per model record."""
    columns = table_columns(ood_names)
    rows = [[c.cell(name, record) for c in columns] for name, record in models.items()]
    if markdown:
        lines = ["| " + " | ".join(c.header for c in columns) + " |",
                 "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(c.width, len(c.header), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(w) if c.numeric else cell.ljust(w)
                         for c, cell, w in zip(columns, cells, widths)).rstrip()

    header = line([c.header for c in columns])
    return "\n".join([header, "-" * len(header), *(line(row) for row in rows)])


# ---- report.json and report.md --------------------------------------------------------------------
def build_report(
    results: Sequence[ModelResult],
    data: Data,
    settings: Settings,
    figures: Mapping[str, str],
    argv: Sequence[str],
    wall_s: float,
) -> dict[str, Any]:
    """Everything ``report.json`` holds: settings, data, OOD sets, machine, one record per model
    (:meth:`ModelResult.to_json`) and the figures written (file -> description)."""
    from bdlkern.bench import describe_machine

    concrete = {
        "length_scale": CONCRETE_LENGTH_SCALE,
        "tau": CONCRETE_TAU,
        "init_p": CONCRETE_INIT_P,
        "temperature": CONCRETE_TEMPERATURE,
        "rate_lr_scale": CONCRETE_RATE_LR_SCALE,
        **concrete_coefficients(),
        "objective": "mean cross-entropy + bdlkern.nn.regularization(model) / N_train",
    }
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": list(argv),
        "settings": {
            **asdict(settings),
            "hidden": list(HIDDEN),
            "optimizer": "Adam",
            "ece_bins": ECE_BINS,
            "mc_dropout_p": MC_DROPOUT_P,
            "concrete": concrete,
            "conv": {
                "input": f"[N, 1, {IMAGE_SIDE}, {IMAGE_SIDE}]",
                "channels": list(CONV_CHANNELS),
                "kernel": CONV_KERNEL,
                "epochs": settings.conv_epochs,
                "lr": settings.conv_lr,
                "layers": "conv1, ReLU, 2x2 max pool, conv2, ReLU, 2x2 max pool, flatten, fc "
                f"({CONV_CHANNELS[-1]} * 2 * 2 -> 10); 3x3 convolutions, padding 1",
            },
        },
        "data": {
            "dataset": "sklearn.datasets.load_digits (8x8, pixels / 16)",
            "features": data.num_features,
            "classes": data.num_classes,
            "train": data.x_train.shape[0],
            "test": data.x_test.shape[0],
            "split": f"stratified {1 - TEST_FRACTION:.0%}/{TEST_FRACTION:.0%}, seed {SPLIT_SEED}",
        },
        "ood": {t.name: t.description for t in OOD_TRANSFORMS},
        "machine": describe_machine(settings.device),
        "wall_seconds": wall_s,
        "models": {r.method.name: r.to_json() for r in results},
        "figures": dict(figures),
    }


def _vmap_notes(report: Mapping[str, Any]) -> list[str]:
    """One line of report.md per stochastic model that ``torch.func.vmap`` could not run (its eager
    baseline is then the faster of the loop and the batched replication), saying why."""
    return [
        f"- **{name}**: vmap could not run its plain-PyTorch equivalent "
        f"({record['mc_inference']['eager_vmap_error']}); its eager baseline is the faster of `loop` and `batched`."
        for name, record in report["models"].items()
        if record["stochastic"] and record["mc_inference"].get("eager_vmap_error")
    ]


def observations(report: Mapping[str, Any]) -> list[str]:
    """What the OOD numbers say, per OOD set and stochastic model (lines of report.md)."""
    models = {name: r for name, r in report["models"].items() if r["stochastic"]}
    lines = []
    for ood in report["ood"]:
        parts = []
        for name, record in models.items():
            o, test = record["metrics"]["ood"][ood], record["metrics"]
            parts.append(
                f"{name} has AUROC {o['auroc_mutual_information']:.3f} (mean mutual information "
                f"{o['mean_mutual_information']:.3g} vs {test['mean_mutual_information']:.3g} on the test digits), "
                f"predicts class {o['most_predicted_class']} for {o['most_predicted_fraction']:.1%} of them with mean "
                f"confidence {o['mean_confidence']:.2f} (test digits: {test['mean_confidence']:.2f})"
            )
        lines.append(f"- `{ood}`: " + "; ".join(parts) + ".")
        by_entropy = ", ".join(
            f"{name} {record['metrics']['ood'][ood]['auroc_predictive_entropy']:.3f}"
            for name, record in report["models"].items()
        )
        lines.append(f"- `{ood}` by predictive entropy, every model (the plain one included): AUROC {by_entropy}.")
    aurocs = [r["metrics"]["ood"][ood]["auroc_mutual_information"] for r in models.values() for ood in report["ood"]]
    if any(auroc < 0.5 for auroc in aurocs):
        lines.append(
            "- An AUROC below 0.5 means the set gets *less* mutual information than the test digits: the "
            "network extrapolates to it confidently and the dropout samples agree, so dropout uncertainty "
            "does not flag that shift."
        )
    return lines


_MC_SNIPPET = """\
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(p), nn.Linear(256, 256), nn.ReLU(),
                      nn.Dropout(p), nn.Linear(256, 10))
bdlkern.nn.convert(model)        # each nn.Dropout -> nn.Linear pair becomes one MCDropoutLinear
pred = bdlkern.uncertainty.mc_predict(model.eval(), x_test, S, seed=0)   # fused MC inference"""

_C1, _C2 = CONV_CHANNELS[0], CONV_CHANNELS[-1]
_CONV_SNIPPET = f"""\
model = nn.Sequential(nn.Conv2d(1, {_C1}, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Dropout2d(p), nn.Conv2d({_C1}, {_C2}, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Dropout(p), nn.Linear({_C2} * 2 * 2, 10))
bdlkern.nn.convert(model)        # Dropout2d -> Conv2d: MCDropoutConv2d (channel masks)
pred = bdlkern.uncertainty.mc_predict(model.eval(), images, S, seed=0)   # images [N, 1, 8, 8]
pred.samples.shape               # [S, N, 10]: the samples run folded, [S * N, ...], inside"""


def format_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the table, what it means, the models and the figures."""
    settings, models = report["settings"], report["models"]
    ood_names = list(report["ood"])
    machine = report["machine"]
    S = settings["samples"]
    conv = settings["conv"]
    lines = [
        "# bdlkern demo: Bayesian MLPs and conv nets on scikit-learn's digits",
        "",
        f"{report['data']['train']} training and {report['data']['test']} test digits "
        f"({report['data']['split']}), {settings['epochs']} epochs per MLP and {conv['epochs']} per conv net "
        f"of Adam (lr {settings['lr']}, batch "
        f"{settings['batch_size']}), seed {settings['seed']}, S = {S} Monte Carlo samples, device "
        f"{settings['device']}{' (quick run)' if settings['quick'] else ''}. Machine: {machine['cpu']}, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}. "
        f"Whole run {report['wall_seconds']:.0f} s.",
        "",
        format_table(models, ood_names, markdown=True),
        "",
        "## Columns",
        "",
        "- **acc, NLL, ECE, Brier**: of the MC predictive mean (`mc_predict(model.eval(), x_test, S, seed=0)`) "
        f"on the test digits; ECE with {settings['ece_bins']} equal-width bins.",
        "- **AUROC <set> MI**: how well the mutual information (BALD, the epistemic part of the predictive "
        "entropy) tells the out-of-distribution set from the test digits (0.5 = chance). The plain model "
        "has no epistemic uncertainty (its mutual information is 0 up to float rounding), so its MI AUROC "
        "is chance by construction.",
        "- **AUROC <set> H**: the same by the predictive entropy (total uncertainty), for every model: "
        "the score the plain network can offer, to compare the stochastic models with.",
        f"- **bdlkern ms / eager ms / eager / speed-up**: median time of MC inference on the {report['data']['test']} "
        f"test digits with S = {S}: `mc_predict` through bdlkern's fused kernels, against the fastest of three ways "
        "to write it without bdlkern (the same network in plain PyTorch, `nn.Dropout` active, same summaries): "
        "`loop`, S forward passes; `batched`, one forward pass on the input replicated S times "
        "(`x.expand(S, ...)`); or `vmap`, `torch.func.vmap(lambda _: model(x), randomness=\"different\")"
        "(torch.arange(S))`, each sample drawing its own masks in one vectorised call; the **eager** column names "
        "the fastest, which the speed-up is over (`report.json` has all three times). "
        "bdlkern also runs the layers before the first dropout once instead of S times (so does vmap, whose input "
        "is not mapped). `torch.compile` of the replicated model is measured by `python -m bdlkern.bench "
        "--case models` only: compiling every demo model would add minutes to the demo.",
        *_vmap_notes(report),
        "- **per layer**: each method's per-layer numbers, in layer order ("
        + "; ".join(f"{name}: {r['layers']['label']}" for name, r in models.items() if r["layers"])
        + "); p is the drop probability of the layer's input.",
        "",
        "## Out-of-distribution sets",
        "",
        *(f"- `{name}`: {desc}." for name, desc in report["ood"].items()),
        "",
        "What the stochastic models do with them:",
        "",
        *observations(report),
        "",
        "## Models",
        "",
        *(f"- **{name}**: {record['summary']}." for name, record in models.items()),
        "",
        *(line for name, record in models.items()
          for line in (f"<details><summary>{name}: {record['parameters']:,} parameters</summary>", "",
                       "```text", record["architecture"], "```", "", "</details>", "")),
        "The MC-dropout model is an ordinary PyTorch model converted in place:",
        "",
        "```python",
        _MC_SNIPPET,
        "```",
        "",
        f"Concrete dropout: prior length-scale l = {settings['concrete']['length_scale']}, tau = "
        f"{settings['concrete']['tau']}; the layers hold `weight_regularizer = l^2 / tau = "
        f"{settings['concrete']['weight_regularizer']:g}` and `dropout_regularizer = 2 / tau = "
        f"{settings['concrete']['dropout_regularizer']:g}`, and the objective is `mean cross-entropy + "
        "bdlkern.nn.regularization(model) / N`: the paper's `l^2 / (tau N)` and `2 / (tau N)` on a mean loss. "
        f"The dropout logits learn at {settings['concrete']['rate_lr_scale']:g} times the weights' learning rate.",
        "",
        "## Conv nets",
        "",
        f"The `conv_*` models are LeNet-style conv nets on the digits as {conv['input']} images: {conv['layers']}; "
        f"{conv['epochs']} epochs each at lr {conv['lr']} (a short run; sparse VD at its own rates, those of a run of "
        "few epochs), the same minibatches and, where the layers agree, the same initial weights. Their MC inference runs folded: the "
        "first MC layer turns the N images into S * N rows (sample-major) and the later layers run on those rows "
        "(`conv1` runs once for the MC-dropout and Concrete nets, whose first dropout is before `conv2`); "
        "`mc_predict` returns the samples as [S, N, 10]. The plain-PyTorch baselines are the same nets with "
        "`nn.Dropout2d` / `nn.Dropout` active: a loop of S passes, one pass on the images repeated "
        "(`x.repeat(S, 1, 1, 1)`, [S * N, 1, 8, 8]), or `torch.func.vmap` over the S samples (the net sees "
        "[N, 1, 8, 8], vmap batches it).",
        "",
        "```python",
        _CONV_SNIPPET,
        "```",
        "",
        "The sparse-VD conv net is pruned like the MLP: its `fc` becomes a CSR `SparseLinear`; its convolutions stay "
        "dense with the pruned weights and their variances zeroed, so the MC samples draw on the kept weights only "
        "(they keep more of their weights than the density below which the CSR convolution of "
        "`SparseVDConv2d.to_sparse()` beats the dense one).",
        "",
        "## Figures",
        "",
    ]
    for file, description in report["figures"].items():
        lines += [f"- {description}:", "", f"  ![{file}]({file})", ""]
    return "\n".join(lines)
