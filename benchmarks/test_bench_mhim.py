"""MHIM-MIL: ``saliency_mask`` against research-code Python-set selection, and the full MHIM(ABMIL) training step
against a research-code-style step (``baselines/mhim_research.py``) and fastmil's plain ABMIL step.

One bag, D = 1024, fp32, N in {10k, 100k}. CPU runs always; the CUDA variants run when a GPU is present (pedantic
mode, synchronised). Peak memory of one step is measured in a fresh subprocess per case (``mhim_cases.py``) and
stored in the memory benchmark's ``extra_info``; ``report.py`` prints the ratios the MHIM issue asks for.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from baselines.mhim_research import python_set_selection
from bench_common import DEVICES, record_extra_peak, run_timed
from mhim_cases import make_step

from fastmil.ops import saliency_mask

DIM = 1024
SIZES = [10_000, 100_000]
HIGH_RATIO, RANDOM_RATIO = 0.03, 0.8
CASES = Path(__file__).with_name("mhim_cases.py")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["fastmil", "python_set"])
@pytest.mark.parametrize("device", DEVICES)
def test_saliency_mask_time(benchmark, device, kind, n):
    """Masks for one bag from teacher scores (fastmil: no host sync; research code: topk().tolist(), sets)."""
    scores = torch.rand(n, device=device)
    offsets = torch.tensor([0, n], device=device)
    seeds = iter(range(10**6))
    if kind == "fastmil":
        offsets_cpu = offsets.cpu()
        fn = lambda: saliency_mask(scores, offsets, HIGH_RATIO, RANDOM_RATIO, seed=next(seeds),  # noqa: E731
                                   offsets_cpu=offsets_cpu)
    else:
        fn = lambda: python_set_selection(scores, HIGH_RATIO, RANDOM_RATIO, seed=next(seeds))  # noqa: E731
    run_timed(benchmark, fn, device, rounds=10)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["mhim", "research", "plain"])
@pytest.mark.parametrize("device", DEVICES)
def test_mhim_step_time(benchmark, device, kind, n):
    """One training step: teacher pass, masking, student forward + backward, AdamW, EMA (plain: ABMIL alone)."""
    run_timed(benchmark, make_step(kind, n, DIM, device), device, rounds=3 if n >= 100_000 else 8)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["mhim", "research", "plain"])
@pytest.mark.parametrize("device", DEVICES)
def test_mhim_step_memory(benchmark, device, kind, n):
    """Extra peak memory of one training step after a warm-up step, in a fresh subprocess (mhim_cases.py)."""
    record_extra_peak(benchmark, CASES, kind, n, DIM, device)
