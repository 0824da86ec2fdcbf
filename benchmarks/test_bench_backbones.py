"""DSMIL, CLAM (sb, mb) and TransMIL: fastmil's packed training step against the published code's way (one bag at a
time, ``baselines/backbones_published.py``) over the same four ragged bags of N instances in all, N in {10k, 100k},
D = 1024: time and extra peak memory (fresh subprocess per case, ``backbone_cases.py``). CPU always; the fastmil
cases also on CUDA when present."""
from __future__ import annotations

from pathlib import Path

import pytest
from backbone_cases import BACKBONES, make_backbone_step
from bench_common import needs_cuda, record_extra_peak, run_timed

DIM = 1024
SIZES = [10_000, 100_000]
CASES = Path(__file__).with_name("backbone_cases.py")
KINDS = [pytest.param("cpu", "fastmil", id="cpu-fastmil"), pytest.param("cpu", "published", id="cpu-published"),
         pytest.param("cuda", "fastmil", id="cuda-fastmil", marks=needs_cuda)]
"""(device, kind): the published-style baseline runs on the CPU only."""


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize(("device", "kind"), KINDS)
def test_backbone_step_time(benchmark, device, kind, name, n):
    run_timed(benchmark, make_backbone_step(kind, name, n, DIM, device), device, rounds=2 if n >= 100_000 else 5)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize(("device", "kind"), KINDS)
def test_backbone_step_memory(benchmark, device, kind, name, n):
    record_extra_peak(benchmark, CASES, kind, name, n, DIM, device)
