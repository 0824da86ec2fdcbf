"""The machine's fp32 GEMM rate in this run (``[8192, 1024] x [1024, 512]``, the embedding's shape): the limit the
report measures each step against (``extra_info["gflop"]`` per call; the rate is GFLOP over the median time)."""
from __future__ import annotations

import pytest
import torch
from bench_common import run_timed

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)])
def test_gemm_rate(benchmark, device):
    m, k, n = (8192, 1024, 512) if device == "cpu" else (65536, 1024, 512)
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    out = torch.empty(m, n, device=device)
    run_timed(benchmark, lambda: torch.mm(a, b, out=out), device, rounds=20)
    benchmark.extra_info["gflop"] = 2 * m * k * n / 1e9
