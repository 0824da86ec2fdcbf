"""Print the ratios the issues ask for from a pytest-benchmark JSON file.

Usage: python benchmarks/report.py bench_out/bench.json
"""
from __future__ import annotations

import json
import sys

# (numerator, denominator, target, what): ratios of median times measured in the same run.
RATIOS = [
    ("test_read_fastmil_store", "test_read_h5py_4096_chunks", 1.5,
     "store read / h5py (4096, D) read, 100k x 1024 fp16"),
]


def main(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        benches = {b["name"]: b["stats"] for b in json.load(fh)["benchmarks"]}
    failed = False
    for num, den, target, what in RATIOS:
        if num not in benches or den not in benches:
            continue
        ratio = benches[num]["median"] / benches[den]["median"]
        ok = ratio <= target
        failed |= not ok
        print(f"{what}: {ratio:.2f}x (median {benches[num]['median'] * 1e3:.1f} ms vs "
              f"{benches[den]['median'] * 1e3:.1f} ms; target <= {target}x) {'OK' if ok else 'MISSED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/bench.json"))
