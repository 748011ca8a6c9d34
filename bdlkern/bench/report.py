"""The printed report: the machine and settings header, the results table (one row per variant,
the speed-up over each baseline in the last column) and the footnotes, from the dict that
:func:`bdlkern.bench.run_benchmarks` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

def _num(x: float) -> str:
    """Three significant digits below 100, one decimal above (no exponents for big numbers)."""
    return f"{x:#.3g}" if abs(x) < 99.95 else f"{x:.1f}"


def _ms(seconds: float) -> str:
    return _num(seconds * 1e3)


def _primary_throughput(throughput: Mapping[str, float]) -> str:
    for unit in ("GFLOP/s", "Gelem/s"):
        if unit in throughput:
            return f"{_num(throughput[unit])} {unit}"
    return "-"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f}"


def format_header(report: Mapping[str, Any]) -> str:
    """The machine, build and settings lines printed above the table."""
    m = report["machine"]
    b = m["bdlkern"]
    s = report["settings"]
    lines = [
        f"machine : {m['cpu']} ({m['cpu_capability']}), {m['usable_cpus']}/{m['logical_cpus']} usable cpus, "
        f"torch threads {m['torch_threads']}; {m['platform']}",
        f"software: python {m['python']}, torch {m['torch']}; bdlkern {b.get('version')} "
        f"(built for torch {b.get('torch_version')}, compiler {b.get('compiler')}, {b.get('parallel_backend')}, "
        f"cuda kernels {'yes ' + str(b.get('cuda_version')) if b.get('cuda') else 'no'})",
    ]
    if "gpu" in m:
        g = m["gpu"]
        lines.append(f"gpu     : {g['name']} (sm {g['capability']}, {g['memory_bytes'] / 2**30:.0f} GiB, CUDA {g['cuda_runtime']})")
    lines.append(
        f"settings: device {s['device']}, {'quick' if s['quick'] else 'full'} sizes, "
        f"median/min of {s['repeats']} measurements of ~{s['target_s']:g} s each"
    )
    return "\n".join(lines)


def format_table(report: Mapping[str, Any]) -> str:
    """The results as a fixed-width table, one row per variant.

    The last column is the speed-up of the case's bdlkern variant over the baseline of that row
    (baseline median / bdlkern median), so a case may have any number of baselines. The headline
    ratio (:func:`headline_speedup`: over the fastest library, reference or compiled baseline) is
    marked with ``*``.
    """
    header = ["case", "variant", "kind", "median ms", "min ms", "throughput", "GB/s", "peak MiB", "extra MiB", "bdlkern speed-up"]
    rows = []
    for c in report["cases"]:
        headline = (c.get("headline") or {}).get("baseline")
        for i, (name, v) in enumerate(c["variants"].items()):
            if name == c["subject"]:
                ratio = "(subject)"
            else:
                ratio = ("* " if name == headline else "") + f"{c['speedup'][name]['median']:.2f}x"
            gbs = v["throughput"].get("GB/s")
            rows.append(
                [
                    c["name"] if i == 0 else "",
                    name,
                    v["kind"],
                    _ms(v["median_s"]),
                    _ms(v["min_s"]),
                    _primary_throughput(v["throughput"]),
                    _num(gbs) if gbs is not None else "-",
                    _mib(v["memory"]["bytes"]),
                    _mib(v["memory"]["extra_bytes"]),
                    ratio,
                ]
            )
    right = {3, 4, 5, 6, 7, 8, 9}
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(cell).rjust(w) if i in right else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for r in rows:
        if r[0] and previous is not None:
            out.append("")
        out.append(line(r))
        previous = r
    return "\n".join(out)


def format_notes(report: Mapping[str, Any]) -> str:
    """Footnotes: case descriptions and sizes, what the memory column measures, skipped cases."""
    cuda = report["settings"]["device"].startswith("cuda")
    lines = []
    for c in report["cases"]:
        params = ", ".join(f"{k}={v}" for k, v in c["params"].items())
        lines.append(f"{c['name']}: {c['description']}" + (f" [{params}]" if params else ""))
    lines.append(
        "throughput: G elements/s (or GFLOP/s); GB/s: minimum traffic (each tensor read/written once) / median; "
        + "peak MiB: "
        + ("torch.cuda.max_memory_allocated" if cuda else "torch CPU allocations (profiler records)")
        + " during one call, above the level before it; extra MiB: peak beyond the returned tensors."
    )
    lines.append(
        "bdlkern speed-up: baseline median / bdlkern median (>1: bdlkern faster); * marks the headline: the "
        "fastest baseline a user could pick instead (library, reference or compiled; not a limit proxy or a variant)."
    )
    for s in report.get("skipped", []):
        lines.append(f"skipped {s['name']}: {s['reason']}")
    return "\n".join(lines)


def format_report(report: Mapping[str, Any]) -> str:
    """Header, table and notes: what the CLI prints."""
    return "\n\n".join([format_header(report), format_table(report), format_notes(report)])
