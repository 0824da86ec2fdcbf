"""``bench_out/report.md`` and its plots from a pytest-benchmark JSON file (``make bench``).

For every group of cases (one test function with one setting of its parameters other than ``kind`` and ``n``):

- median time per implementation (``kind``) and bag size (``n``); the peak-memory twin of the group (the same
  function name ending in ``_memory`` instead of ``_time``) adds the extra peak memory;
- fastmil's implementation's ratio to every other one at the same ``n`` (time, and memory where measured);
- the share of the machine's measured GEMM rate (``test_gemm_rate`` in the same run) for cases that state their
  GEMM work (``extra_info["gflop"]``);
- a PNG per group: time (and memory) against ``n`` per implementation, log-log.

``targets``: optional ``(numerator case, denominator case, target ratio or None, what)`` rows, listed with their
measured ratio and whether each target is met.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

from .._atomic import write_text_atomic
from .results import Case, load_cases, load_run

__all__ = ["gemm_rate", "write_report"]

OURS = ("fastmil", "fused", "mhim")
"""Implementations that are fastmil's own: a group's ratios put them over every other implementation (else the
first implementation in name order over the others)."""


def gemm_rate(cases: dict[str, Case], device: str = "cpu") -> float | None:
    """The GEMM rate (GFLOP/s) measured by ``test_gemm_rate[<device>...]`` in this run, if it ran."""
    rates = [c.extra_info["gflop"] / c.median for c in cases.values()
             if c.function == "test_gemm_rate" and c.params.get("device", "cpu") == device and c.median > 0]
    return max(rates) if rates else None


def _time(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def _n_label(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def _plot(path: Path, title: str, series: dict[str, dict[int, float]], memory: dict[str, dict[int, float]]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = 2 if memory else 1
    fig = Figure(figsize=(5.5 * panels, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, data, ylabel in ((axes[0], series, "median time (s)"),
                             *(((axes[1], memory, "extra peak memory (MiB)"),) if memory else ())):
        for kind, points in sorted(data.items()):
            ns = sorted(points)
            ax.plot(ns, [points[n] for n in ns], marker="o", label=kind)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("instances per bag (n)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _group_section(function: str, params: tuple, cases: list[Case], memory_cases: list[Case], rate: float | None,
                   plots: Path, out_dir: Path) -> list[str]:
    title = function + ("" if not params else " (" + ", ".join(f"{k}={v}" for k, v in params) + ")")
    ns = sorted({c.n for c in cases if c.n is not None}) or [None]
    kinds = sorted({c.kind for c in cases})
    at = {(c.kind, c.n): c for c in cases}
    mem = {(c.kind, c.n): float(c.extra_info["extra_peak_bytes"]) for c in memory_cases}
    lines = [f"### {title}", ""]
    rows = []
    for kind in kinds:
        cells = []
        for n in ns:
            case = at.get((kind, n))
            cell = "-" if case is None else _time(case.median)
            if case is not None and (kind, n) in mem:
                cell += f", {mem[(kind, n)] / 2**20:.0f} MiB"
            if case is not None and rate and "gflop" in case.extra_info:
                cell += f", {case.extra_info['gflop'] / case.median / rate:.0%} of GEMM rate"
            cells.append(cell)
        rows.append([kind or "-", *cells])
    lines += _table(["implementation", *[f"n = {_n_label(n)}" for n in ns]], rows) + [""]
    ratio_rows = []
    numerators = [k for k in kinds if k in OURS] or kinds[:1]
    for kind in numerators:
        for base in kinds:
            if base == kind:
                continue
            cells = []
            for n in ns:
                num, den = at.get((kind, n)), at.get((base, n))
                cell = "-" if num is None or den is None else f"{num.median / den.median:.2f}x"
                if (kind, n) in mem and (base, n) in mem and mem[(base, n)] > 0:
                    cell += f" (memory {mem[(kind, n)] / mem[(base, n)]:.2f}x)"
                cells.append(cell)
            ratio_rows.append([f"{kind} / {base}", *cells])
    if ratio_rows:
        lines += _table(["ratio", *[f"n = {_n_label(n)}" for n in ns]], ratio_rows) + [""]
    if any(n is not None for n in ns):
        series = {k: {c.n: c.median for c in cases if c.kind == k and c.n is not None} for k in kinds}
        memory = {k: {n: v / 2**20 for (kk, n), v in mem.items() if kk == k and n is not None} for k in kinds}
        png = plots / f"{_slug(title)}.png"
        _plot(png, title, series, {k: v for k, v in memory.items() if v})
        lines += [f"![{title}]({png.relative_to(out_dir).as_posix()})", ""]
    return lines


def write_report(json_path: str | os.PathLike, out_dir: str | os.PathLike,
                 targets: Sequence[tuple[str, str, float | None, str]] = ()) -> Path:
    """Write ``out_dir/report.md`` and ``out_dir/plots/*.png`` (module docstring); returns the report's path."""
    run, cases = load_run(json_path), load_cases(json_path)
    out_dir = Path(out_dir)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    machine = run.get("machine_info", {})
    cpu = machine.get("cpu", {}) if isinstance(machine.get("cpu"), dict) else {}
    rate = gemm_rate(cases)
    lines = ["# fastmil benchmarks", "",
             f"Run {run.get('datetime', '?')} on {cpu.get('brand_raw') or machine.get('processor') or '?'} "
             f"({cpu.get('count', '?')} logical CPUs), Python {machine.get('python_version', '?')}; "
             f"{len(cases)} cases from `{Path(json_path).name}`. Times are medians over each case's rounds.",
             "", f"Measured GEMM rate in this run: {'not measured' if rate is None else f'{rate:.0f} GFLOP/s'} "
             "(fp32, `test_gemm_rate`); a case's share of it is its stated GEMM work over its time.", ""]
    if targets:
        rows = []
        for num, den, target, what in targets:
            if num in cases and den in cases:
                ratio = cases[num].median / cases[den].median
                verdict = "-" if target is None else ("met" if ratio <= target else "NOT met")
                rows.append([what, f"{ratio:.2f}", "-" if target is None else f"<= {target:.2f}", verdict])
        if rows:
            lines += ["## Targets", ""] + _table(["ratio", "measured", "target", ""], rows) + [""]
    groups: dict[tuple, list[Case]] = {}
    for case in cases.values():
        if not case.is_memory and case.function != "test_gemm_rate":
            groups.setdefault(case.group, []).append(case)
    memory_groups: dict[tuple, list[Case]] = {}
    for case in cases.values():
        if case.is_memory:
            memory_groups.setdefault((re.sub(r"_memory$", "_time", case.function), case.group[1]), []).append(case)
    lines += ["## Cases", ""]
    for key in sorted(groups):
        lines += _group_section(key[0], key[1], groups[key], memory_groups.get(key, []), rate, plots, out_dir)
    for (function, params), members in sorted(memory_groups.items()):
        if (function, params) in groups:
            continue
        rows = [[c.kind or "-", _n_label(c.n), f"{c.extra_info['extra_peak_bytes'] / 2**20:.1f} MiB"]
                for c in sorted(members, key=lambda c: (c.kind, c.n or 0))]
        title = members[0].function + ("" if not params else " (" + ", ".join(f"{k}={v}" for k, v in params) + ")")
        lines += [f"### {title}", ""] + _table(["implementation", "n", "extra peak memory"], rows) + [""]
    path = out_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
