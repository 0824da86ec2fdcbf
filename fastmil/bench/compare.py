"""``fastmil bench compare A.json B.json``: the per-case change from run A to run B, with regressions flagged only
beyond the noise the two runs measured.

Time cases: the change is ``median_B / median_A - 1``; the noise is the larger relative interquartile range of the
two cases' rounds. A case is a regression when it slowed by more than ``max(min_change, noise_factor * noise)``
(an improvement likewise). Memory cases (``extra_peak_bytes``, one deterministic measurement each) use
``min_change`` alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from .results import load_cases

__all__ = ["Change", "compare_runs", "format_changes"]


@dataclass(frozen=True)
class Change:
    """One case present in both runs: its values in A and B (seconds or bytes), the relative change, the threshold
    it was judged against, and ``status``: ``regression``, ``improvement`` or ``same``."""

    name: str
    unit: str
    a: float
    b: float
    change: float
    threshold: float
    status: str


def compare_runs(path_a: str | os.PathLike, path_b: str | os.PathLike, *, noise_factor: float = 3.0,
                 min_change: float = 0.05) -> tuple[list[Change], list[str], list[str]]:
    """Compare two pytest-benchmark JSON files: ``(changes of the common cases, names only in A, names only in
    B)``."""
    if noise_factor < 0 or min_change < 0:
        raise ValueError("noise_factor and min_change must be >= 0")
    a, b = load_cases(path_a), load_cases(path_b)
    changes = []
    for name in sorted(set(a) & set(b)):
        ca, cb = a[name], b[name]
        if ca.is_memory and cb.is_memory:
            unit, va, vb = "bytes", float(ca.extra_info["extra_peak_bytes"]), float(cb.extra_info["extra_peak_bytes"])
            threshold = min_change
        else:
            unit, va, vb = "s", ca.median, cb.median
            threshold = max(min_change, noise_factor * max(ca.relative_spread, cb.relative_spread))
        change = vb / va - 1.0 if va > 0 else 0.0
        status = "regression" if change > threshold else "improvement" if change < -threshold else "same"
        changes.append(Change(name, unit, va, vb, change, threshold, status))
    return changes, sorted(set(a) - set(b)), sorted(set(b) - set(a))


def _value(v: float, unit: str) -> str:
    if unit == "bytes":
        return f"{v / 2**20:.1f} MiB"
    return f"{v * 1000:.2f} ms" if v < 10 else f"{v:.2f} s"


def format_changes(changes: list[Change], only_a: list[str], only_b: list[str]) -> str:
    """A plain-text table of the changes (regressions first), then the cases found in one run only."""
    order = {"regression": 0, "improvement": 1, "same": 2}
    rows = sorted(changes, key=lambda c: (order[c.status], -abs(c.change)))
    width = max([len(c.name) for c in rows] + [4])
    lines = [f"{'case':<{width}}  {'A':>12}  {'B':>12}  {'change':>8}  {'limit':>7}  status"]
    for c in rows:
        flag = {"regression": "REGRESSION", "improvement": "improved", "same": "-"}[c.status]
        lines.append(f"{c.name:<{width}}  {_value(c.a, c.unit):>12}  {_value(c.b, c.unit):>12}  "
                     f"{c.change:>+8.1%}  {c.threshold:>7.1%}  {flag}")
    regressions = sum(c.status == "regression" for c in rows)
    lines.append(f"{len(rows)} case(s) compared: {regressions} regression(s), "
                 f"{sum(c.status == 'improvement' for c in rows)} improvement(s)")
    for label, names in (("only in A", only_a), ("only in B", only_b)):
        if names:
            lines.append(f"{label}: {', '.join(names)}")
    return "\n".join(lines)
