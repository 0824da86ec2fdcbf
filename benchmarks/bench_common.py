"""Helpers shared by the step benchmarks: the devices, a timed case (synchronised on CUDA), the extra peak memory of
one call after a warm-up call (the optimiser state and the allocator's first blocks then exist already), and that
measurement run in a fresh process."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from gated_pool_cases import _tracked_peak_bytes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]
"""The devices a case runs on: the CPU always, CUDA when present."""


def probe_extra_peak(script: Path, *args: object) -> int:
    """Run ``script *args`` in a fresh Python process and return the ``extra_peak_bytes`` it prints (a clean
    allocator per case); its stderr is shown when it fails."""
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe failed ({script.name} {' '.join(map(str, args))}):\n{proc.stderr[-3000:]}")
    return int(proc.stdout.split("extra_peak_bytes")[1])


def record_extra_peak(benchmark, script: Path, *args: object) -> int:
    """A memory case: :func:`probe_extra_peak` run once under ``benchmark``, its bytes stored as
    ``extra_info["extra_peak_bytes"]`` (with ``grad_h_bytes`` 0: a training step returns no input gradient)."""
    result = {}
    benchmark.pedantic(lambda: result.setdefault("bytes", probe_extra_peak(script, *args)), rounds=1)
    benchmark.extra_info["extra_peak_bytes"] = result["bytes"]
    benchmark.extra_info["grad_h_bytes"] = 0
    assert result["bytes"] > 0
    return result["bytes"]


def run_timed(benchmark, fn: Callable[[], None], device: str, rounds: int) -> None:
    """``benchmark.pedantic`` over ``fn`` (20 rounds on CUDA, ``rounds`` on the CPU), one warm-up round."""
    def once():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(once, rounds=20 if device == "cuda" else rounds, warmup_rounds=1)


def extra_peak_after_warmup(fn: Callable[[], None], device: str) -> int:
    """Peak bytes ``fn()`` allocates beyond what is live before it, measured on its second call."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _tracked_peak_bytes(fn)
