"""The cases of a pytest-benchmark JSON file, with the parameters fastmil's benchmarks use.

fastmil's benchmarks are parametrised by ``kind`` (the implementation: ``fastmil``, ``chain``, ``research``...),
``n`` (instances) and ``device``, sometimes more (``dim``); memory benchmarks (names ending in ``_memory``) store
``extra_info["extra_peak_bytes"]``, and a case may state its floating-point work as ``extra_info["gflop"]`` (the
algorithm's GEMM FLOPs per call, for the share of the machine's measured GEMM rate).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Case", "load_cases", "load_run"]


@dataclass(frozen=True)
class Case:
    """One benchmark case: its full ``name`` (``test_fn[params]``), the test ``function``, ``params``, the median
    and spread of its rounds (seconds), and ``extra_info``."""

    name: str
    function: str
    params: dict[str, Any]
    median: float
    q1: float
    q3: float
    rounds: int
    extra_info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return str(self.params.get("kind", ""))

    @property
    def n(self) -> int | None:
        n = self.params.get("n")
        return int(n) if isinstance(n, (int, float)) else None

    @property
    def is_memory(self) -> bool:
        return "extra_peak_bytes" in self.extra_info

    @property
    def group(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """What a table or plot collects: the function and every parameter but ``kind`` and ``n``."""
        rest = tuple(sorted((k, str(v)) for k, v in self.params.items() if k not in ("kind", "n")))
        return self.function, rest

    @property
    def relative_spread(self) -> float:
        """Interquartile range of the rounds over the median (0 for a single round)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 and self.rounds > 1 else 0.0


def load_run(path: str | os.PathLike) -> dict[str, Any]:
    """The parsed JSON of a pytest-benchmark run; a clear error for a file that is not one."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{p}: not a readable pytest-benchmark JSON file ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{p}: not a pytest-benchmark JSON file (no 'benchmarks' list)")
    return data


def load_cases(path: str | os.PathLike) -> dict[str, Case]:
    """``{name: Case}`` of a pytest-benchmark JSON file (``--benchmark-json``)."""
    cases = {}
    for entry in load_run(path)["benchmarks"]:
        stats = entry["stats"]
        name = entry["name"]
        cases[name] = Case(name, name.split("[")[0], dict(entry.get("params") or {}), float(stats["median"]),
                           float(stats.get("q1", stats["median"])), float(stats.get("q3", stats["median"])),
                           int(stats.get("rounds", 1)), dict(entry.get("extra_info") or {}))
    return cases
