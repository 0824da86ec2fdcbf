"""Mutants the numeric op tests must kill: ``python -m tests.mutants [NAME ...]`` (from the repository root, with the
test environment's Python).

Each mutant is one small edit of the kind a real bug makes (a value rounded to fp16 on the way, a block offset
dropped, a term left out, the wrong reverse slot). The harness applies it, runs the tests that guard the code, expects
them to fail, and restores the file whatever happens. A mutant that survives means a tolerance (tests/tolerance.py)
has become too loose to see that bug: the run exits 1 and names it. Not part of ``make test`` (each mutant reruns
a slice of the suite); run it after changing a tolerance or a bound.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = [
    Mutant("attention_pool: weights rounded to fp16 before pooling (torch path)", "fastmil/ops/attention_pool.py",
           "pooled = pool_per_bag(weights, values, offsets, bounds)",
           "pooled = pool_per_bag(weights.half().float(), values, offsets, bounds)",
           ("tests/ops/test_attention_pool.py", "-k", "test_matches_fp64_reference and torch and dtype0")),
    Mutant("attention_pool: the D block offset dropped (Triton forward tile kernel)", "kernels/attention_pool.py",
           "        cols = d0 + tl.arange(0, BLOCK_D)\n        col_ok = cols < D\n        x_ok = in_bag[:, None] & "
           "col_ok[None, :]\n        x = tl.load(v_base + local[:, None] * stride_v + cols[None, :], mask=x_ok, "
           "other=0.0)\n        acc",
           "        cols = tl.arange(0, BLOCK_D)\n        col_ok = cols < D\n        x_ok = in_bag[:, None] & "
           "col_ok[None, :]\n        x = tl.load(v_base + local[:, None] * stride_v + cols[None, :], mask=x_ok, "
           "other=0.0)\n        acc",
           ("tests/ops/test_attention_pool.py", "-k", "test_wide_features_span_several_blocks and triton")),
    Mutant("gated_attention_pool: weights rounded to fp16 before pooling (torch path)",
           "fastmil/ops/gated_attention_pool.py",
           "pooled = pool_per_bag(weights, h, offsets, bounds)[:, 0]",
           "pooled = pool_per_bag(weights.half().float(), h, offsets, bounds)[:, 0]",
           ("tests/ops/test_gated_attention_pool.py", "-k",
            "test_forward_and_all_gradients_match_fp64_reference and torch and dtype0")),
    Mutant("gated_attention_pool: score GEMM operands rounded to fp16 (Triton forward)",
           "kernels/gated_attention_pool.py",
           "pre_v = tl.dot(x, vt, pre_v, input_precision=DOT_PRECISION)",
           "pre_v = tl.dot(x.to(tl.float16).to(tl.float32), vt, pre_v, input_precision=DOT_PRECISION)",
           ("tests/ops/test_gated_attention_pool.py", "-k",
            "test_forward_and_all_gradients_match_fp64_reference and triton and dtype0 and none")),
    Mutant("graph_attention: the wrong reverse slot (Triton backward)", "kernels/graph_attention.py",
           "i, i >= 0, K - 1 - s,", "i, i >= 0, s,",
           ("tests/ops/test_graph_attention.py", "-k", "test_triton_matches_the_reference")),
    Mutant("graph_attention: the wrong reverse slot (torch backward)", "fastmil/ops/graph_attention.py",
           "reverse = torch.arange(k - 1, -1, -1, device=nbr.device)[None, :]",
           "reverse = torch.arange(k, device=nbr.device)[None, :]",
           ("tests/ops/test_graph_attention.py", "-k", "test_torch_path_fp32_and_fp64")),
    Mutant("graph_attention: attention weights rounded to fp16 (torch forward)", "fastmil/ops/graph_attention.py",
           "        alpha *= inv[:, None, :]\n",
           "        alpha *= inv[:, None, :]\n        alpha = alpha.half().float()\n",
           ("tests/ops/test_graph_attention.py", "-k", "test_torch_path_fp32_and_fp64")),
    Mutant("normalized_attention_pool: the LayerNorm's mean term left out of grad_x",
           "fastmil/ops/normalized_attention_pool.py",
           "left[:, 2 * m] = mean * c2 * inv2 - c1 * inv_sigma", "left[:, 2 * m] = mean * c2 * inv2",
           ("tests/ops/test_normalized_attention_pool.py", "-k", "test_matches_fp64_reference_on_ragged_bags")),
    Mutant("normalized_attention_pool: pooled rounded to fp16", "fastmil/ops/normalized_attention_pool.py",
           "ctx.save_for_backward(x, u, offsets, mean, inv_sigma, weights, logits, pooled)",
           "pooled = pooled.half().float()\n        ctx.save_for_backward(x, u, offsets, mean, inv_sigma, weights, "
           "logits, pooled)",
           ("tests/ops/test_normalized_attention_pool.py", "-k", "test_matches_fp64_reference_on_ragged_bags")),
    Mutant("linear_relu_dropout: the weight gradient rounded to fp16", "fastmil/ops/linear_relu_dropout.py",
           "grad_w.addmm_(grad_pre.T.to(acc), x[rows].to(acc), beta=0.0 if lo == 0 else 1.0)",
           "grad_w.addmm_(grad_pre.T.to(acc), x[rows].to(acc), beta=0.0 if lo == 0 else 1.0)\n"
           "                grad_w.copy_(grad_w.half())",
           ("tests/ops/test_linear_relu_dropout.py", "-k", "test_training_matches_reference")),
    Mutant("linear_relu_dropout: the output rounded to fp16 (torch path)", "fastmil/ops/linear_relu_dropout.py",
           "        chunk = y[lo : lo + CHUNK_ROWS].relu_()\n",
           "        chunk = y[lo : lo + CHUNK_ROWS].relu_()\n        chunk.copy_(chunk.half())\n",
           ("tests/ops/test_linear_relu_dropout.py", "-k", "test_training_matches_reference")),
    Mutant("segment_softmax: weights rounded to fp16", "fastmil/ops/attention_pool.py",
           "weights, lse = segment_softmax(scores, offsets, mask, bounds)  # [N, H], [B, H] fp32",
           "weights, lse = segment_softmax(scores, offsets, mask, bounds)  # [N, H], [B, H] fp32\n"
           "        weights = weights.half().float()",
           ("tests/ops/test_attention_pool.py", "-k", "test_grad_of_scores_only and torch")),
]


def run(mutant: Mutant) -> bool:
    """Apply, test, restore; True if the tests failed (the mutant was killed)."""
    path = REPO / mutant.path
    original = path.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to mutate is not found exactly once in {mutant.path}")
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutant.tests],
                                cwd=REPO, capture_output=True, text=True)
    finally:
        path.write_text(original)
    return result.returncode == 1


def main(names: list[str]) -> int:
    chosen = [m for m in MUTANTS if not names or any(n in m.name for n in names)]
    survivors = []
    for mutant in chosen:
        killed = run(mutant)
        print(f"{'killed  ' if killed else 'SURVIVED'} {mutant.name}", flush=True)
        if not killed:
            survivors.append(mutant.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
