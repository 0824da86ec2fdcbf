"""Mutants the numeric op tests must kill: ``python -m tests.mutants [NAME ...]`` (from the repository root, with the
test environment's Python).

Each mutant is one small edit of the kind a real bug makes (a value rounded to fp16 on the way, a block offset
dropped, a term left out, the wrong reverse slot). The harness applies it to a copy of the repository (the checkout
is never touched, so a killed run leaves nothing mutated), runs the tests that guard the code there, and expects
them to fail on an assertion. A mutant that survives means a tolerance (tests/tolerance.py) has become too loose to
see that bug: the run exits 1 and names it. Not part of ``make test`` (each mutant reruns a slice of the suite); run
it after changing a tolerance or a bound.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
COPIED = ("fastmil", "kernels", "tests", "pyproject.toml")


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
           "_add_weight_grad(grad_w, grad_pre, x[rows], first=lo == 0)",
           "_add_weight_grad(grad_w, grad_pre, x[rows], first=lo == 0)\n"
           "                grad_w.copy_(grad_w.half())",
           ("tests/ops/test_linear_relu_dropout.py", "-k", "test_training_matches_reference")),
    Mutant("linear_relu_dropout: autocast weight gradient of the unrounded features (an fp32 GEMM)",
           "fastmil/ops/linear_relu_dropout.py",
           "        x = x.to(grad_pre.dtype)\n", "",
           ("tests/ops/test_linear_relu_dropout_triton.py", "-k", "test_autocast_weight_gradient_is_a_gemm")),
    Mutant("fp32_dot: the low part of the 3xTF32 split dropped", "kernels/_dot.py",
           "            acc = tl.dot(a - a_hi, b, acc, input_precision=\"tf32\")\n", "",
           ("tests/ops/test_tf32_emulation.py", "-k", "test_fp32_dot_computes and tf32x3 and fp32-fp16")),
    Mutant("dot_operand: fp32 operands left for the tensor core to truncate in the TF32 mode", "kernels/_dot.py",
           "        x = round_tf32(x)\n", "        pass\n",
           ("tests/ops/test_tf32_emulation.py", "-k", "test_attention_pool_kernels_round")),
    Mutant("linear_relu_dropout: the output rounded to fp16 (torch path)", "fastmil/ops/linear_relu_dropout.py",
           "        chunk = y[lo : lo + CHUNK_ROWS].relu_()\n",
           "        chunk = y[lo : lo + CHUNK_ROWS].relu_()\n        chunk.copy_(chunk.half())\n",
           ("tests/ops/test_linear_relu_dropout.py", "-k", "test_training_matches_reference")),
    Mutant("segment_softmax: weights rounded to fp16 (vectorised path)", "fastmil/ops/_segments.py",
           "    weights = e / safe[bag]\n", "    weights = (e / safe[bag]).half().float()\n",
           ("tests/ops/test_segments.py", "-k", "with_empty_masked_and_peaked_bags and vectorised")),
    Mutant("attention_pool: the softmax gradient's bag term rounded to fp16 (torch backward)",
           "fastmil/ops/attention_pool.py",
           "per_bag = segment_sum(wg, offsets)", "per_bag = segment_sum(wg, offsets).half().float()",
           ("tests/ops/test_attention_pool.py", "-k", "test_grad_of_scores_only and torch")),
    Mutant("reconstruction_loss: the cosine rounded to fp16", "fastmil/ops/reconstruction_loss.py",
           "        cos = dot / (p_norm * t_norm)\n", "        cos = (dot / (p_norm * t_norm)).half().to(acc)\n",
           ("tests/methods/test_srmil.py", "-k", "test_reconstruction_loss_equals_an_fp64_formula")),
    Mutant("DSMIL: the critical-query scores rounded to fp32 (fp64 model against the published computation)",
           "fastmil/nn/dsmil.py",
           "in enumerate(zip(edges[:-1], edges[1:]))]) * scale  # [N, C]",
           "in enumerate(zip(edges[:-1], edges[1:]))]).float().to(h.dtype) * scale  # [N, C]",
           ("tests/nn/test_backbones.py", "-k", "test_backbones_equal_the_published_computation_per_bag and dsmil")),
]


def _copy_repository(into: Path) -> None:
    """The package, its kernels and the tests, laid out as the editable install maps them (``fastmil.kernels`` is
    ``kernels/``): run from ``into``, Python imports this copy before the installed checkout."""
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, into / name)
    (into / "fastmil" / "kernels").symlink_to(Path("..") / "kernels")


def _failed_on_assertions(output: str) -> bool:
    """True if pytest's summary lists failures and every one of them is an assertion (not an import, compile or
    indexing error, which would mean the mutant broke the code rather than being caught by a check)."""
    failures = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return bool(failures) and all(line.startswith("FAILED") and "AssertionError" in line for line in failures)


def run(mutant: Mutant) -> bool:
    """Apply to a copy, test there; True if the tests failed on an assertion (the mutant was killed)."""
    original = (REPO / mutant.path).read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the text to mutate is not found exactly once in {mutant.path}")
    mutated = original.replace(mutant.old, mutant.new)
    if mutant.path.endswith(".py"):
        ast.parse(mutated, mutant.path)  # a mutant that does not parse is a broken harness entry, not a survivor
    with tempfile.TemporaryDirectory(prefix="fastmil-mutant-") as tmp:
        root = Path(tmp)
        _copy_repository(root)
        (root / mutant.path).write_text(mutated)
        env = {**os.environ, "FASTMIL_SHARED_DATA": str(REPO.parent / "shared" / "data"), "COLUMNS": "1000"}
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rfE",
                                     *mutant.tests], cwd=root, env=env, capture_output=True, text=True,
                                    timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return False
    return result.returncode == 1 and _failed_on_assertions(result.stdout)


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
