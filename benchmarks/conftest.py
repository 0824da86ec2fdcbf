"""Benchmark fixtures. Run with `make bench` (pytest-benchmark; JSON in bench_out/bench.json)."""
