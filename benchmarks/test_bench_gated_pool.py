"""GatedAttentionPool forward+backward: fused op vs the plain torch module chain (time and peak memory).

N in {1k, 10k, 100k}, D in {512, 1024}, hidden 128, fp32, one bag. CPU runs always; the CUDA variants run when a
GPU is present (pedantic mode, synchronised), and add bf16 ``h`` for both (the chain under bf16 autocast). Peak
memory is measured in a fresh subprocess per case (``gated_pool_cases.py``) and stored in each memory benchmark's
``extra_info``; ``report.py`` prints the ratios.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gated_pool_cases import BF16_KINDS, STEPS, make_case

HIDDEN = 128
SIZES = [1_000, 10_000, 100_000]
DIMS = [512, 1024]
CASES = Path(__file__).with_name("gated_pool_cases.py")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _extra_peak(kind: str, n: int, dim: int, device: str, h_grad: bool) -> int:
    proc = subprocess.run(
        [sys.executable, str(CASES), kind, str(n), str(dim), str(HIDDEN), device, "1" if h_grad else "0"],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({kind} {n} x {dim} on {device}):\n{proc.stderr[-3000:]}")
    return int(proc.stdout.split("extra_peak_bytes")[1])


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]


def _cuda_only_bf16(device: str, kind: str) -> None:
    if kind in BF16_KINDS and device != "cuda":
        pytest.skip("bf16 cases run on CUDA only (no bf16 GEMM on these CPUs)")


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize("device", DEVICES)
def test_gated_pool_time(benchmark, device, kind, n, dim):
    """One forward+backward; on CUDA pedantic rounds end with a synchronise so the time is the GPU's."""
    _cuda_only_bf16(device, kind)
    pool, h, offsets = make_case(n, dim, HIDDEN, device, kind=kind)

    def step():
        h.grad = None
        pool.zero_grad(set_to_none=True)
        STEPS[kind](pool, h, offsets)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        benchmark.pedantic(step, rounds=20, warmup_rounds=3)
    else:
        benchmark.pedantic(step, rounds=3 if n >= 100_000 else 10, warmup_rounds=1)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", list(STEPS))
@pytest.mark.parametrize("h_grad", [True, False], ids=["hgrad", "nohgrad"])
@pytest.mark.parametrize("device", DEVICES)
def test_gated_pool_memory(benchmark, device, kind, n, dim, h_grad):
    """Extra peak memory of one forward+backward, measured in a fresh subprocess (see gated_pool_cases.py)."""
    _cuda_only_bf16(device, kind)
    result = {}

    def probe():
        result["bytes"] = _extra_peak(kind, n, dim, device, h_grad)

    benchmark.pedantic(probe, rounds=1)
    benchmark.extra_info["extra_peak_bytes"] = result["bytes"]
    # the h gradient that both variants must return, counted inside extra_peak_bytes when h requires grad
    benchmark.extra_info["grad_h_bytes"] = n * dim * (2 if kind in BF16_KINDS else 4) if h_grad else 0
    assert result["bytes"] > 0
