"""The steps the MHIM-MIL benchmarks compare, and a one-shot peak-memory probe.

``mhim``: fastmil's MHIM-MIL step (``method: mhim`` around ABMIL 512/128, through the trainer's ``Stepper``: teacher
pass, saliency masks, student forward + backward with recycled tokens, AdamW, EMA updates). ``plain``: fastmil's
ABMIL step. ``research``: the research-code-style step of ``baselines/mhim_research.py``. One bag of N instances,
D features, fp32, on the CPU (CUDA when asked).

Run as a script it measures the extra peak memory of ONE training step (after a warm-up step that creates the
optimiser state) in a fresh process: ``python benchmarks/mhim_cases.py {mhim|plain|research} N D {cpu|cuda}``
prints ``extra_peak_bytes``.
"""
from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines.mhim_research import ResearchMHIM  # noqa: E402
from bench_common import extra_peak_after_warmup  # noqa: E402

from fastmil import Bags  # noqa: E402
from fastmil.methods import StepContext, build_method, method_config  # noqa: E402
from fastmil.nn import model_config  # noqa: E402
from fastmil.train.config import OptimConfig  # noqa: E402
from fastmil.train.step import Stepper  # noqa: E402


def make_step(kind: str, n: int, dim: int, device: str = "cpu", seed: int = 0):
    """A zero-argument callable running one training step of ``kind`` on one bag of ``n`` x ``dim``."""
    torch.manual_seed(seed)
    x = torch.randn(n, dim, device=device)
    if kind == "research":
        model = ResearchMHIM(dim)
        for module in (model.student, model.teacher, model.recycle):
            module.to(device)
        y = torch.tensor([1], device=device)
        return lambda: model.step(x, y)
    method = build_method(method_config({"name": "mhim" if kind == "mhim" else "plain"}), model_config(None), dim, 2)
    method.to(device)
    stepper = Stepper(method, OptimConfig(), "none", torch.device(device))
    bags = Bags.from_list([x.cpu()], labels=[1]).to(device)
    counter = itertools.count()

    def step():
        i = next(counter)
        stepper.step(bags, StepContext(epoch=0, step=i, steps_per_epoch=10**6, epochs=1, seed=0))

    return step


def measure_extra_peak(kind: str, n: int, dim: int, device: str) -> int:
    return extra_peak_after_warmup(make_step(kind, n, dim, device), device)


if __name__ == "__main__":
    kind, n, dim, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    print(f"extra_peak_bytes {measure_extra_peak(kind, n, dim, device)}")
