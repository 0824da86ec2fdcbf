"""The plain ABMIL training step: fastmil's (``Stepper`` around ``method: plain``) against the plain module chain
(``baselines/abmil_chain.py``), one bag of N x D fp32, and the GEMM work of the algorithm.

Run as a script it prints the extra peak memory of one step after a warm-up step, in a fresh process:
``python benchmarks/step_cases.py {fastmil|chain} N D {cpu|cuda}``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines.abmil_chain import chain_step  # noqa: E402
from bench_common import extra_peak_after_warmup  # noqa: E402
from mhim_cases import make_step  # noqa: E402

EMBED, HIDDEN = 512, 128


def abmil_step_gflop(n: int, dim: int) -> float:
    """GEMM GFLOP of one ABMIL training step as the algorithm needs them, whatever the implementation: the embedding
    forward and its weight gradient (``2 x 2 n D E``; no input gradient), the gated attention's two ``E -> hidden``
    projections forward (``2 n E 2A``) and backward (their weight gradients and the gradient to ``h``,
    ``2 x 2 n E 2A``). Recomputation an implementation chooses is not counted."""
    return (4 * n * dim * EMBED + 12 * n * EMBED * HIDDEN) / 1e9


def make_plain_step(kind: str, n: int, dim: int, device: str = "cpu", seed: int = 0):
    if kind == "fastmil":
        return make_step("plain", n, dim, device, seed)
    torch.manual_seed(seed)
    return chain_step(torch.randn(n, dim, device=device))


if __name__ == "__main__":
    kind, n, dim, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(f"extra_peak_bytes {extra_peak_after_warmup(make_plain_step(kind, n, dim, device), device)}")
