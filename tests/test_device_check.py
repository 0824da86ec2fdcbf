"""benchmarks/device_check.py, the prepared run for a GPU machine, kept working where there is none: its accuracy
section through the Triton interpreter at small sizes (which proves the script, not a GPU), a deliberately broken
op caught by it, and a clear refusal of ``--device cuda`` without CUDA."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tolerance import check, rounding_bound

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "device_check.py"
OPS = {"attention_pool", "gated_attention_pool", "graph_attention", "linear_relu_dropout", "saliency_mask"}


def _fp32_bounds() -> dict[str, float]:
    """The relative error allowed to an fp32 output or gradient of each op at the script's QUICK sizes (bags of 1, 7
    and 45 rows, N = 53, D = 40, embed 24), against the fp64 reference (``extra``: the largest |ln w| = |s - lse| of
    a softmax weight, whose exp turns the absolute rounding of the score into a relative error of the weight)."""
    n, n_max, d, e = 1 + 7 + 45, 45, 40, 24
    hidden, neighbours, channels = 24, 5 * 5, 8  # the script's gated hidden width; radius-2 stencil; max(8, D // 8)
    return {
        # softmax, weighted sum and the softmax backward's sum, each over the bag; scores randn * 3: |s| <= 10.0
        "attention_pool": rounding_bound(3 * n_max + 10, extra=2 * 10.0),
        # parameter grads sum over all N rows, the bag's softmax backward, the two score GEMMs and their backward
        # (over D and hidden); a score (a dot over hidden of gated GEMMs over D) has sqrt(D + hidden) roundings at
        # the size of the terms it sums, sum_k |w_k t_k| <= 16.6, and |s| <= 6.9. This bound (3.9e-5) is above the
        # script's fp32 FLOOR (1e-5): for these rows the script's own failure rule is the sharper check
        "gated_attention_pool": rounding_bound(n + n_max + 2 * (d + hidden) + 10,
                                               extra=math.sqrt(d + hidden) * 16.6 + 2 * 6.9),
        # softmax and weighted sum over the stencil's neighbours, sums over the channels; |src + dst| <= 6.3
        "graph_attention": rounding_bound(2 * neighbours + channels + 10, extra=2 * 6.3),
        # the GEMM over D, grad_x's over the embedding, grad_weight's over the N rows
        "linear_relu_dropout": rounding_bound(n + d + e + 10),
    }


_FP32_BOUND = _fp32_bounds()


def _load():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)  # imported, not run: TRITON_INTERPRET=1 comes from conftest
    return module


def test_quick_run_through_the_interpreter_passes_and_writes_every_section(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=REPO, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "triton" in env
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    assert {r["op"] for r in rows} == OPS
    assert not any(r["failed"] for r in rows)
    # every gradient is measured, and the kernels agree with themselves bit for bit from run to run
    outputs = {(r["op"], r["output"]) for r in rows}
    assert {("gated_attention_pool", "grad_h"), ("graph_attention", "grad_dst"),
            ("linear_relu_dropout", "grad_weight"), ("attention_pool", "grad_scores")} <= outputs
    assert all(r["triton"] == 0 for r in rows if r["metric"] == "run-to-run max difference")
    fp32 = [r for r in rows if r["dtype"] == "float32" and r["torch_cpu"] is not None]
    assert fp32
    for r in fp32:
        if r["metric"] != "absolute_error":
            check(r["triton"], _FP32_BOUND[r["op"]], "device_check", f"{r['op']} {r['case']} {r['output']}")
    assert "| op | case |" in (tmp_path / "accuracy.md").read_text()


def test_a_broken_kernel_fails_the_check(monkeypatch):
    """A pooled output off by a whole bag (what a dropped block offset gives) is a failed row, not a note."""
    module = _load()
    real = module.gated_attention_pool

    def broken(h, *args, backend, **kwargs):
        pooled, *rest = real(h, *args, backend=backend, **kwargs)
        if backend == "triton":
            pooled = torch.cat([pooled[:-1], torch.zeros_like(pooled[-1:])])
        return pooled, *rest

    monkeypatch.setattr(module, "gated_attention_pool", broken)
    rows = list(module.check_gated_attention_pool(module.QUICK, "cpu"))
    failed = {(r.output, r.dtype) for r in rows if r.failed}
    assert ("pooled", "float32") in failed and ("pooled", "float16") in failed
    assert not any(r.failed for r in rows if r.output == "weights")  # untouched: only what the bug reaches fails


def test_limits_floors_and_non_finite_values_decide_a_row():
    row = _load().Row
    assert row("op", "case", "float32", "out", "m", float("nan"), 1e-7).failed
    assert row("op", "case", "float32", "set", "rows that differ", 1.0, limit=0.0).failed
    assert not row("op", "case", "float32", "set", "rows that differ", 0.0, limit=0.0).failed
    assert not row("op", "case", "float32", "out", "m", 5e-6, 1e-9).failed  # under the fp32 floor
    assert row("op", "case", "float32", "out", "m", 5e-5, 1e-7).failed  # above the floor and 20x the torch path's
    assert not row("op", "case", "float16", "out", "m", 2e-3, 2.5e-4).failed  # one fp16 rounding more
    assert row("op", "case", "float16", "out", "m", 2e-2, 2.5e-4).failed
    assert not row("op", "case", "bfloat16", "out", "m", 2e-2, 2e-3).failed


def test_every_cuda_test_is_in_the_files_the_gpu_run_collects():
    """The GPU run collects only CUDA_TEST_FILES (so that it imports only what they import): a test marked cuda
    elsewhere would never run there."""
    named = {REPO / f for f in _load().CUDA_TEST_FILES}
    needle = "@pytest.mark." + "cuda"  # not spelled whole here, or this file would match itself
    marked = {path for path in (REPO / "tests").rglob("test_*.py") if needle in path.read_text()}
    assert marked and marked <= named
    assert all(path.exists() for path in named)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_mode_without_a_gpu_says_so(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, check=False)
    assert proc.returncode == 2
    assert "needs a CUDA GPU" in proc.stderr
