"""The command line of ``python -m bdlkern.demo`` (:func:`main`): parse and check the arguments,
run the methods of :data:`~bdlkern.demo.models.METHODS` that ``--methods`` picks, write the figures and the reports in
``--out`` and print the table. Exit status: 0 on success, 2 for bad arguments."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

import bdlkern
from bdlkern.demo.data import load_data
from bdlkern.demo.figures import write_figures
from bdlkern.demo.models import METHODS
from bdlkern.demo.pipeline import run_method
from bdlkern.demo.report import build_report, format_markdown, format_table
from bdlkern.demo.settings import QUICK, Settings


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (bad values exit with status 2 and a usage message)."""
    parser = argparse.ArgumentParser(
        prog="python -m bdlkern.demo",
        description="Train plain, MC-dropout, Concrete-dropout and sparse-VD MLPs, and MC-dropout, Concrete and "
        "sparse-VD conv nets, on scikit-learn's digits; report accuracy, calibration, OOD detection and "
        "MC-inference speed (bdlkern vs the fastest of an eager PyTorch loop, batch replication and "
        "torch.func.vmap).",
    )
    add = parser.add_argument
    add("--out", default="results", metavar="DIR", help="output folder, created if missing (default: results)")
    add("--quick", action="store_true", help=f"a short run for tests: {QUICK}")
    add("--device", choices=["cpu", "cuda"], default="cpu", help="where to train and run (default: cpu)")
    add("--samples", type=_int_at_least(1), metavar="S",
        help=f"Monte Carlo samples (default {Settings.samples}, quick {QUICK['samples']})")
    add("--epochs", type=_int_at_least(1), metavar="E",
        help=f"training epochs per MLP (default {Settings.epochs}, quick {QUICK['epochs']})")
    add("--conv-epochs", type=_int_at_least(1), metavar="E",
        help=f"training epochs per conv net (default {Settings.conv_epochs}, quick {QUICK['conv_epochs']})")
    add("--seed", type=_int_at_least(0), default=0, help="seed of the weights, batches and masks (default 0)")
    add("--threads", type=_int_at_least(1), metavar="N", help="torch.set_num_threads(N) (default: torch's)")
    names = [m.name for m in METHODS]
    add("--methods", nargs="+", metavar="NAME", choices=[*names, "all", "default"],
        help="the methods to run, in the report's order whatever the order given: any of "
        f"{', '.join(names)}; 'default' (the default: {', '.join(m.name for m in METHODS if m.default)}) "
        "or 'all'")
    return parser.parse_args(argv)


def selected_methods(names: Sequence[str] | None) -> list:
    """The :data:`METHODS` that ``--methods`` names, in :data:`METHODS` order (the default ones for
    None or ``default``, every one for ``all``)."""
    wanted = set(names or ["default"])
    return [
        m for m in METHODS
        if m.name in wanted or "all" in wanted or ("default" in wanted and m.default)
    ]


def settings_from_args(args: argparse.Namespace) -> Settings:
    """:class:`Settings` from the parsed command line (quick defaults, then explicit values)."""
    settings = Settings(seed=args.seed, device=args.device, quick=args.quick)
    if args.quick:
        settings = replace(settings, **QUICK)
    if args.samples is not None:
        settings = replace(settings, samples=args.samples)
    if args.epochs is not None:
        settings = replace(settings, epochs=args.epochs)
    if args.conv_epochs is not None:
        settings = replace(settings, conv_epochs=args.conv_epochs)
    return settings


def _check_environment(args: argparse.Namespace) -> str | None:
    """The reason the run cannot start, or None."""
    if args.device == "cuda":
        if not torch.cuda.is_available():
            return "--device cuda, but torch sees no CUDA device"
        if not bdlkern.build_info()["cuda"]:
            return "--device cuda, but this bdlkern was built without its CUDA kernels (BDLKERN_CUDA=0)"
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return f"--out {out}: exists and is not a folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns the exit status (0, or 2 for bad arguments)."""
    args = parse_args(argv)
    problem = _check_environment(args)
    out = Path(args.out)
    if problem is None:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            problem = f"--out {out}: cannot create it ({e.strerror})"
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)

    start = time.perf_counter()
    data = load_data(settings.device)
    print(
        f"bdlkern demo: digits, {data.x_train.shape[0]} train / {data.x_test.shape[0]} test, "
        f"{settings.epochs} epochs (conv nets {settings.conv_epochs}), S = {settings.samples}, device {settings.device}, "
        f"{torch.get_num_threads()} threads{', quick' if settings.quick else ''}"
    )
    results = []
    for method in selected_methods(args.methods):
        result = run_method(method, data, settings)
        print(
            f"  {method.name:<15} trained in {result.history.seconds:5.1f} s, "
            f"test accuracy {result.evaluation.accuracy:.4f}"
        )
        results.append(result)
    figures = write_figures(results, data, out)
    argv = ["python", "-m", "bdlkern.demo", *(sys.argv[1:] if argv is None else argv)]
    report = build_report(results, data, settings, figures, argv, time.perf_counter() - start)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(format_markdown(report) + "\n")

    print()
    print(format_table(report["models"], list(report["ood"])))
    print()
    print("OOD sets: " + "; ".join(f"{name}: {text}" for name, text in report["ood"].items()))
    print(
        f"AUROC: OOD detection by mutual information (MI) and by predictive entropy (H). Times: MC inference "
        f"with S = {settings.samples} on the {data.x_test.shape[0]} test digits; eager: the fastest plain-PyTorch "
        "way (loop: S passes; batched: one pass on the input replicated S times; vmap: torch.func.vmap over the "
        "S samples, randomness='different'); speed-up = eager / bdlkern. torch.compile of the replicated model: "
        "python -m bdlkern.bench --case models only (compiling every demo model would add minutes). "
        "conv_*: conv nets on the 8x8 images."
    )
    for name, record in report["models"].items():
        error = record["mc_inference"].get("eager_vmap_error")
        if record["stochastic"] and error:
            print(f"vmap could not run {name} (its eager baseline: loop or batched): {error}")
    print(f"wrote {out / 'report.json'}, {out / 'report.md'} and {len(figures)} figures "
          f"in {report['wall_seconds']:.1f} s")
    return 0
