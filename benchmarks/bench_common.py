"""Helpers shared by the step benchmarks: a timed case (synchronised on CUDA) and the extra peak memory of one
call after a warm-up call (the optimiser state and the allocator's first blocks then exist already)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from gated_pool_cases import _tracked_peak_bytes


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
