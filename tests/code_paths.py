"""Run the test suite once per CPU code path torch may take, and tabulate: ``python -m tests.code_paths [--out DIR]
[PYTEST ARGS...]`` (from the repository root, with the test environment's Python; ``make test-code-paths``).

The paths (tests/tolerance.py): MKL's instruction-set branch (``MKL_CBWR``: on an AMD CPU MKL picks other kernels
than on an Intel one, and this variable forces a branch on either), ATen's vectorised kernels (``ATEN_CPU_CAPABILITY``),
the number of torch threads (``FASTMIL_TORCH_THREADS``, read by tests/conftest.py) and numpy's OpenBLAS kernels
(``OPENBLAS_CORETYPE``: the Triton interpreter's ``tl.dot`` is a numpy matmul). Each setting gets one full run; the
table lists exit code, passed / failed / errors / time and the largest error-to-bound ratio per op family.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIABLES = ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "FASTMIL_TORCH_THREADS", "OPENBLAS_CORETYPE")
"""What selects a code path: MKL's instruction-set branch, ATen's vectorised kernels, the torch thread count (read by
tests/conftest.py) and the kernels of numpy's OpenBLAS, which computes the Triton interpreter's ``tl.dot``."""

SETTINGS = [
    {},
    {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "FASTMIL_TORCH_THREADS": "1",
     "OPENBLAS_CORETYPE": "Sandybridge"},
    {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "FASTMIL_TORCH_THREADS": "2", "OPENBLAS_CORETYPE": "Haswell"},
    {"MKL_CBWR": "AVX512", "FASTMIL_TORCH_THREADS": "1", "OPENBLAS_CORETYPE": "SkylakeX"},
]
"""One full run each. ``{}`` is the machine's own path (every variable unset: MKL, ATen and OpenBLAS choose, torch
its default thread count). The others combine one value of each variable, so that every value of every variable
(``MKL_CBWR`` COMPATIBLE / AVX2 / AVX512, ``ATEN_CPU_CAPABILITY`` default / avx2, 1 and 2 threads, three OpenBLAS
kernel sets) is exercised by a full run in 4 runs rather than 10; a failure names its run, and the variables can
then be tried one at a time."""


def _label(setting: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "(native)"


def _counts(output: str) -> dict[str, int]:
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", tail)}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "code_paths")
    parser.add_argument("--skip-native", action="store_true",
                        help="leave out the machine's own path (make test runs it)")
    args, pytest_args = parser.parse_known_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], False
    for setting in SETTINGS[1:] if args.skip_native else SETTINGS:
        label = _label(setting)
        report = args.out / f"tolerance-{len(rows)}.json"
        inherited = {k: v for k, v in os.environ.items() if k not in VARIABLES}  # the caller's own choice is not one
        env = {**inherited, **setting, "FASTMIL_TOLERANCE_REPORT": str(report)}
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args],
                                cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.monotonic() - start
        (args.out / f"log-{len(rows)}.txt").write_text(result.stdout + result.stderr)
        counts = _counts(result.stdout)
        header = next((line for line in result.stdout.splitlines() if line.startswith("numeric code path")), "")
        ratios = json.loads(report.read_text())["families"] if report.exists() else {}
        rows.append({"setting": label, "exit": result.returncode, "seconds": round(seconds), "counts": counts,
                     "header": header, "ratios": {k: v["ratio"] for k, v in ratios.items()}})
        failed |= result.returncode != 0
        print(f"{label:40s} exit {result.returncode}  {counts}  {seconds:.0f} s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(rows, indent=1) + "\n")
    families = sorted({f for row in rows for f in row["ratios"]})
    lines = ["| setting | exit | passed | failed | errors | skipped | time |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['exit']} | {r['counts'].get('passed', 0)} | {r['counts'].get('failed', 0)} | "
              f"{r['counts'].get('errors', r['counts'].get('error', 0))} | {r['counts'].get('skipped', 0)} | "
              f"{r['seconds']} s |" for r in rows]
    lines += ["", "| op family | largest error / bound over all settings |", "|---|---|"]
    lines += [f"| {f} | {max(r['ratios'].get(f, 0.0) for r in rows):.3f} |" for f in families]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
