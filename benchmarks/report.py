"""Print the ratios the issues ask for from a pytest-benchmark JSON file, and write the run's report
(``report.md`` beside it: tables, ratios, share of the measured GEMM rate, PNG plots; ``fastmil.bench``).

Usage: python benchmarks/report.py bench_out/bench.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fastmil.bench import write_report

# (numerator, denominator, target, what): ratios of median times measured in the same run.
RATIOS = [
    ("test_read_fastmil_store", "test_read_h5py_4096_chunks", 1.5,
     "store read / h5py (4096, D) read, 100k x 1024 fp16"),
    ("test_read_fastmil_store", "test_read_fastmil_store_checksums_not_verified", None,
     "store read verifying every chunk's CRC32C / the same read unverified (what verification costs)"),
    ("test_gated_pool_time[cpu-fused-100000-1024]", "test_gated_pool_time[cpu-chain-100000-1024]", 1.0,
     "GatedAttentionPool fwd+bwd CPU time, fused / plain chain, N=100k D=1024 hidden=128"),
    ("test_gated_pool_time[cuda-fused-100000-1024]", "test_gated_pool_time[cuda-chain-100000-1024]", 1.0,
     "GatedAttentionPool fwd+bwd CUDA time, fused / plain chain, N=100k D=1024 hidden=128"),
    ("test_gated_pool_time[cuda-fused-bf16-100000-1024]", "test_gated_pool_time[cuda-chain-bf16-100000-1024]", None,
     "GatedAttentionPool fwd+bwd CUDA time, bf16 h, fused / chain under bf16 autocast, N=100k D=1024 (the "
     "comparison docs/performance.md predicts 2-3.5x for)"),
]
for _dev in ("cpu", "cuda"):
    RATIOS += [
        (f"test_saliency_mask_time[{_dev}-fastmil-100000]", f"test_saliency_mask_time[{_dev}-python_set-100000]", 0.1,
         f"saliency_mask {_dev.upper()} time / research Python-set selection, N=100k"),
    ]
    for _n in (10_000, 100_000):
        RATIOS += [
            (f"test_mhim_step_time[{_dev}-mhim-{_n}]", f"test_mhim_step_time[{_dev}-research-{_n}]", 0.5,
             f"MHIM(ABMIL) step {_dev.upper()} time / research-style step, N={_n // 1000}k D=1024"),
            (f"test_mhim_step_time[{_dev}-mhim-{_n}]", f"test_mhim_step_time[{_dev}-plain-{_n}]", 1.5,
             f"MHIM(ABMIL) step {_dev.upper()} time / fastmil plain ABMIL step, N={_n // 1000}k D=1024"),
        ]

for _dev in ("cpu", "cuda"):
    for _n in (2_000, 10_000, 100_000):
        RATIOS += [
            (f"test_abmil_step_time[{_dev}-fastmil-{_n}]", f"test_abmil_step_time[{_dev}-chain-{_n}]", 0.8,
             f"ABMIL training step {_dev.upper()} time / plain module chain, N={_n // 1000}k D=1024"),
        ]

RATIOS += [
    ("test_graph_build_time[fastmil-100000]", "test_graph_build_time[kdtree-100000]", None,
     "grid_neighbours / scipy KD-tree radius graph, 100k patches (for information)"),
    ("test_srmil_step_time[cpu-fastmil-20000]", "test_srmil_step_time[cpu-naive-20000]", 1 / 3,
     "SRMIL step CPU time / straightforward torch step, N=20k D=1024"),
]
for _dev in ("cpu", "cuda"):
    for _n in (10_000, 50_000):
        RATIOS += [
            (f"test_graph_attention_time[{_dev}-fastmil-{_n}]", f"test_graph_attention_time[{_dev}-naive-{_n}]", 0.5,
             f"graph_attention fwd+bwd {_dev.upper()} time / naive gather, N={_n // 1000}k 4x64 K=24"),
        ]

for _name in ("dsmil", "clam_sb", "clam_mb", "transmil"):
    for _n in (10_000, 100_000):
        RATIOS += [
            (f"test_backbone_step_time[cpu-fastmil-{_name}-{_n}]",
             f"test_backbone_step_time[cpu-published-{_name}-{_n}]", None,
             f"{_name} packed step CPU time / published-style per-bag steps, 4 bags, N={_n // 1000}k D=1024"),
        ]

# (numerator, denominator, target, what, count the grad_h output): ratios of extra peak memory (extra_info).
MEMORY_RATIOS = [
    ("test_gated_pool_memory[cpu-nohgrad-fused-100000-1024]", "test_gated_pool_memory[cpu-nohgrad-chain-100000-1024]",
     0.3, "GatedAttentionPool fwd+bwd CPU extra peak memory, fused / chain, h without grad", True),
    ("test_gated_pool_memory[cpu-hgrad-fused-100000-1024]", "test_gated_pool_memory[cpu-hgrad-chain-100000-1024]",
     0.3, "GatedAttentionPool fwd+bwd CPU extra peak memory beyond the N x D grad_h both return, h with grad", False),
    ("test_gated_pool_memory[cpu-hgrad-fused-100000-1024]", "test_gated_pool_memory[cpu-hgrad-chain-100000-1024]",
     None, "GatedAttentionPool fwd+bwd CPU extra peak memory including grad_h (for information)", True),
]
for _dev in ("cpu", "cuda"):
    for _n in (10_000, 100_000):
        MEMORY_RATIOS += [
            (f"test_mhim_step_memory[{_dev}-mhim-{_n}]", f"test_mhim_step_memory[{_dev}-research-{_n}]", 0.6,
             f"MHIM(ABMIL) step {_dev.upper()} extra peak memory / research-style step, N={_n // 1000}k", True),
            (f"test_mhim_step_memory[{_dev}-mhim-{_n}]", f"test_mhim_step_memory[{_dev}-plain-{_n}]", None,
             f"MHIM(ABMIL) step {_dev.upper()} extra peak memory / plain ABMIL step (for information), "
             f"N={_n // 1000}k", True),
        ]


for _dev in ("cpu", "cuda"):
    MEMORY_RATIOS += [
        (f"test_abmil_step_memory[{_dev}-fastmil-100000]", f"test_abmil_step_memory[{_dev}-chain-100000]", 0.5,
         f"ABMIL training step {_dev.upper()} extra peak memory / plain module chain, N=100k", True),
    ]
for _name in ("dsmil", "clam_sb", "clam_mb", "transmil"):
    for _n in (10_000, 100_000):
        MEMORY_RATIOS += [
            (f"test_backbone_step_memory[cpu-fastmil-{_name}-{_n}]",
             f"test_backbone_step_memory[cpu-published-{_name}-{_n}]", None,
             f"{_name} packed step CPU extra peak memory / published-style per-bag steps, N={_n // 1000}k", True),
        ]
MEMORY_RATIOS += [
    ("test_srmil_step_memory[cpu-fastmil-20000]", "test_srmil_step_memory[cpu-naive-20000]", 0.3,
     "SRMIL step CPU extra peak memory / straightforward torch step, N=20k D=1024", True),
]
for _dev in ("cpu", "cuda"):
    for _n in (10_000, 50_000):
        MEMORY_RATIOS += [
            (f"test_graph_attention_memory[{_dev}-fastmil-{_n}]", f"test_graph_attention_memory[{_dev}-naive-{_n}]",
             0.3, f"graph_attention fwd+bwd {_dev.upper()} extra peak memory / naive gather, N={_n // 1000}k", True),
        ]


def main(path: str) -> int:
    with open(path, encoding="utf-8") as fh:
        benches = {b["name"]: b for b in json.load(fh)["benchmarks"]}
    failed = False
    for num, den, target, what in RATIOS:
        if num not in benches or den not in benches:
            continue
        a, b = benches[num]["stats"]["median"], benches[den]["stats"]["median"]
        ok = target is None or a / b <= target
        failed |= not ok
        verdict = "" if target is None else f"; target <= {target:.2f}x {'OK' if ok else 'MISSED'}"
        print(f"{what}: {a / b:.2f}x (median {a * 1e3:.1f} ms vs {b * 1e3:.1f} ms{verdict})")
    for num, den, target, what, with_grad_h in MEMORY_RATIOS:
        if num not in benches or den not in benches:
            continue
        info_a, info_b = benches[num]["extra_info"], benches[den]["extra_info"]
        a, b = info_a["extra_peak_bytes"], info_b["extra_peak_bytes"]
        if not with_grad_h:
            a, b = a - info_a["grad_h_bytes"], b - info_b["grad_h_bytes"]
        verdict = "" if target is None else f"; target <= {target}x {'OK' if a / b <= target else 'MISSED'}"
        failed |= target is not None and a / b > target
        print(f"{what}: {a / b:.2f}x ({a / 2**20:.0f} MiB vs {b / 2**20:.0f} MiB{verdict})")
    report = write_report(path, Path(path).parent, [(num, den, target, what) for num, den, target, what in RATIOS])
    print(f"report: {report}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench_out/bench.json"))
