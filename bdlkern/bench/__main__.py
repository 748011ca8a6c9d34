"""``python -m bdlkern.bench``: time bdlkern's kernels against their baselines and print ratios.

Examples::

    python -m bdlkern.bench --list
    python -m bdlkern.bench --case mask                  # every case whose name contains "mask"
    python -m bdlkern.bench --quick --json results.json  # small sizes, a few seconds
    python -m bdlkern.bench --device cuda --threads 1

Exit status: 0 on success, 2 for bad arguments (unknown case, CUDA requested but absent).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Compile torch.compile baselines in-process: inductor's worker pool otherwise keeps processes
# busy after a compiled case and slows the cases timed after it on a small machine.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
from collections.abc import Sequence

import torch

from bdlkern import bench


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m bdlkern.bench",
        description="Benchmark bdlkern's fused kernels against baselines (speed-up = baseline time / bdlkern time).",
    )
    parser.add_argument(
        "--case",
        action="append",
        metavar="NAME",
        help="case to run: an exact name, or a substring of names (repeatable; default: all)",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default: cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes and short measurements (seconds in all)")
    parser.add_argument("--json", metavar="FILE", help="also write every result and the machine description as JSON")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) before running")
    parser.add_argument("--repeats", type=int, metavar="R", help="timed measurements per variant")
    parser.add_argument("--target-time", type=float, metavar="S", help="seconds one measurement should last")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--list", action="store_true", help="list the cases and their variants, then exit")
    return parser.parse_args(argv)


def list_cases(cases: Sequence[bench.Case]) -> str:
    """One block per case: name, family, description and variants with their kinds."""
    lines = []
    for c in cases:
        lines.append(f"{c.name}  [{c.family}; {'/'.join(c.devices)}]  {c.description}")
        for v in c.variant_names:
            lines.append(f"    {c.kind(v):<9} {v}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = parse_args(argv)
    try:
        cases = bench.select_cases(args.case)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.list:
        print(list_cases(cases))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print("error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if (args.repeats is not None and args.repeats < 1) or (args.target_time is not None and args.target_time <= 0):
        print("error: --repeats must be >= 1 and --target-time > 0", file=sys.stderr)
        return 2

    report = bench.run_benchmarks(
        cases,
        args.device,
        quick=args.quick,
        target_s=args.target_time,
        repeats=args.repeats,
        progress=False if args.no_progress else None,
        argv=["python", "-m", "bdlkern.bench", *(sys.argv[1:] if argv is None else argv)],
    )
    print(bench.format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
