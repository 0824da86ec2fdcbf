"""SRMIL: graph building (``grid_neighbours`` vs a scipy KD-tree radius graph), ``graph_attention`` forward +
backward vs the naive gather version, and the full SRMIL training step vs a straightforward torch implementation
(``baselines/srmil_naive.py``). Cases and the memory probe: ``srmil_cases.py``; ratios: ``report.py``.

The naive SRMIL step is run at 20k only: at 100k its decoder's ``E x D`` messages alone (2.5M edges x 1024 x 4 B,
kept for backward) exceed this machine's memory.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bench_common import DEVICES, record_extra_peak, run_timed
from srmil_cases import layout, make_gat, make_step

from fastmil.ops import grid_neighbours

CASES = Path(__file__).with_name("srmil_cases.py")


@pytest.mark.parametrize("n", [17_729, 100_000])
@pytest.mark.parametrize("kind", ["fastmil", "kdtree"])
def test_graph_build_time(benchmark, kind, n):
    """The radius-2 neighbourhoods of one slide (17.7k: the largest real CLAM file; 100k: it tiled)."""
    coords = layout(n)
    if kind == "fastmil":
        c, off = torch.from_numpy(coords), torch.tensor([0, n])
        fn = lambda: grid_neighbours(c, off, radius=2)  # noqa: E731  (stride inferred, as without store attrs)
    else:
        from scipy.spatial import cKDTree

        # the same 5 x 5 window as a radius graph: Chebyshev distance <= 2 steps
        fn = lambda: cKDTree(coords).query_pairs(2 * 512 + 1, p=np.inf, output_type="ndarray")  # noqa: E731
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("n", [10_000, 50_000])
@pytest.mark.parametrize("kind", ["fastmil", "naive"])
@pytest.mark.parametrize("device", DEVICES)
def test_graph_attention_time(benchmark, device, kind, n):
    """Forward + backward, 4 heads x 64 channels, K = 24 (radius 2), fp32."""
    run_timed(benchmark, make_gat(kind, n, device), device, rounds=5)


@pytest.mark.parametrize("n", [10_000, 50_000])
@pytest.mark.parametrize("kind", ["fastmil", "naive"])
@pytest.mark.parametrize("device", DEVICES)
def test_graph_attention_memory(benchmark, device, kind, n):
    record_extra_peak(benchmark, CASES, "gat", kind, n, device)


STEP_CASES = [("fastmil", 20_000), ("naive", 20_000), ("fastmil", 100_000)]


@pytest.mark.parametrize(("kind", "n"), STEP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_srmil_step_time(benchmark, device, kind, n):
    """One SRMIL training step on one bag of n x 1024: both streams, forward + backward, AdamW."""
    run_timed(benchmark, make_step(kind, n, device=device), device, rounds=2 if n >= 100_000 else 3)


@pytest.mark.parametrize(("kind", "n"), STEP_CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_srmil_step_memory(benchmark, device, kind, n):
    record_extra_peak(benchmark, CASES, "step", kind, n, device)
