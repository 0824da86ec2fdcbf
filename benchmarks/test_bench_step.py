"""The plain ABMIL training step (1024 -> 512, gated 128, AdamW): fastmil against the plain module chain at
N in {2k, 10k, 100k}, time and extra peak memory, with the algorithm's GEMM work (``extra_info["gflop"]``) so the
report shows the step's share of the GEMM rate measured in the same run (``test_bench_gemm.py``)."""
from __future__ import annotations

from pathlib import Path

import pytest
from bench_common import DEVICES, record_extra_peak, run_timed
from step_cases import abmil_step_gflop, make_plain_step

DIM = 1024
SIZES = [2_000, 10_000, 100_000]
CASES = Path(__file__).with_name("step_cases.py")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["fastmil", "chain"])
@pytest.mark.parametrize("device", DEVICES)
def test_abmil_step_time(benchmark, device, kind, n):
    run_timed(benchmark, make_plain_step(kind, n, DIM, device), device, rounds=3 if n >= 100_000 else 10)
    benchmark.extra_info["gflop"] = abmil_step_gflop(n, DIM)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["fastmil", "chain"])
@pytest.mark.parametrize("device", DEVICES)
def test_abmil_step_memory(benchmark, device, kind, n):
    """Extra peak memory of one step after a warm-up step, in a fresh subprocess (step_cases.py)."""
    record_extra_peak(benchmark, CASES, kind, n, DIM, device)
