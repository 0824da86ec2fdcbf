"""The backbone training steps the backbones benchmark compares: fastmil's packed step (``method: plain`` around
``dsmil``, ``clam_sb``, ``clam_mb`` or ``transmil`` through the trainer's ``Stepper``: one step over a packed batch)
against the same model written the way its published code runs it (``baselines/backbones_published.py``: one bag
at a time, one optimiser step per bag). The batch: four bags of N/8, N/8, N/4 and N/2 instances (N in all), D
features, fp32, labels 0, 1, 0, 1.

Run as a script it prints the extra peak memory of one step (after a warm-up step) in a fresh process:
``python benchmarks/backbone_cases.py {fastmil|published} MODEL N D {cpu|cuda}``.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines.backbones_published import published_steps  # noqa: E402
from bench_common import extra_peak_after_warmup  # noqa: E402

from fastmil import Bags  # noqa: E402
from fastmil.methods import StepContext, build_method, method_config  # noqa: E402
from fastmil.nn import model_config  # noqa: E402
from fastmil.train.config import OptimConfig  # noqa: E402
from fastmil.train.step import Stepper  # noqa: E402

BACKBONES = ["dsmil", "clam_sb", "clam_mb", "transmil"]
LABELS = [0, 1, 0, 1]


def bag_sizes(n: int) -> list[int]:
    """Four ragged bags with ``n`` instances in all."""
    sizes = [n // 8, n // 8, n // 4]
    return [*sizes, n - sum(sizes)]


def make_backbone_step(kind: str, name: str, n: int, dim: int, device: str = "cpu", seed: int = 0):
    """A zero-argument callable: one training pass of ``kind`` over the four bags of :func:`bag_sizes`."""
    torch.manual_seed(seed)
    bags = [torch.randn(size, dim, device=device) for size in bag_sizes(n)]
    if kind == "published":
        if device != "cpu":
            raise ValueError("the published-style baseline runs on the CPU here")
        return published_steps(name, bags, LABELS)
    method = build_method(method_config({"name": "plain"}), model_config({"name": name}), dim, 2)
    method.to(device)
    stepper = Stepper(method, OptimConfig(), "none", torch.device(device))
    batch = Bags.from_list([b.cpu() for b in bags], labels=LABELS).to(device)
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=1, epochs=1, seed=0)
    return lambda: stepper.step(batch, ctx)


if __name__ == "__main__":
    kind, name, n, dim, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    print(f"extra_peak_bytes {extra_peak_after_warmup(make_backbone_step(kind, name, n, dim, device), device)}")
