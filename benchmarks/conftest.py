"""Benchmark fixtures. Run with `make bench` (pytest-benchmark; JSON in bench_out/bench.json).

Every case runs with glibc keeping freed host memory (``fastmil.train.host_memory``), as ``fastmil train`` does by
default (``run.host_allocator: keep``): without it, each step of a large bag pays the kernel again to map and zero
its 200 MB buffers. The baselines run under the same setting, so ratios compare the code, not the allocator.
"""
from fastmil.train.host_memory import keep_freed_host_memory

keep_freed_host_memory()
