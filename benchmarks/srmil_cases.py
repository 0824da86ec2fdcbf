"""The cases the SRMIL benchmarks compare, and a one-shot peak-memory probe.

- ``layout(n)``: ``n`` patch coordinates of one slide: a real CLAM layout (``../shared/data/clam_coords``) tiled
  side by side until it holds ``n`` patches (synthetic 100k slides keep real tissue shapes and holes).
- graph attention: ``fastmil`` (:func:`fastmil.ops.graph_attention`) vs ``naive`` (gather the ``[N, K+1, H, C]``
  neighbourhood, softmax, sum: ``graph_attention_reference``), 4 heads x 64, K = 24, fp32, forward + backward.
- SRMIL step: ``fastmil`` (``method: srmil`` on ``graphmil``, through the trainer's ``Stepper``) vs ``naive``
  (``baselines/srmil_naive.py``: prebuilt edge list, ``E x C`` gathers, scatter softmax); one bag, D = 1024.

Run as a script it prints ``extra_peak_bytes`` of one call in a fresh process:
``python benchmarks/srmil_cases.py {gat|step} {fastmil|naive} N {cpu|cuda}``.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baselines.srmil_naive import NaiveSRMIL, edge_list  # noqa: E402
from bench_common import extra_peak_after_warmup  # noqa: E402

from fastmil import Bags  # noqa: E402
from fastmil.methods import StepContext, build_method, method_config  # noqa: E402
from fastmil.nn import model_config  # noqa: E402
from fastmil.ops import graph_attention, graph_attention_reference, grid_neighbours  # noqa: E402
from fastmil.train.config import OptimConfig  # noqa: E402
from fastmil.train.step import Stepper  # noqa: E402

SHARED = Path(os.environ.get("FASTMIL_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
LARGEST_CLAM = "TCGA-ZS-A9CE-01Z-00-DX1.EA6A0A1F-ACFD-4A6C-A7C4-7CB19EA4BAFB.h5"  # 17.7k patches


def real_coords(name: str = LARGEST_CLAM) -> np.ndarray:
    import h5py

    with h5py.File(SHARED / "clam_coords" / name, "r") as fh:
        return fh["coords"][:].astype(np.int64)


def layout(n: int) -> np.ndarray:
    """``int64 [n, 2]``: the largest real layout, copies placed side by side (stride 512), cut to ``n``."""
    base = real_coords()
    width = int(base[:, 0].max() - base[:, 0].min()) + 512 * 4
    copies = [base + [i * width, 0] for i in range(-(-n // len(base)))]
    return np.concatenate(copies)[:n]


def neighbours(n: int, device: str = "cpu") -> torch.Tensor:
    c = torch.from_numpy(layout(n))
    return grid_neighbours(c, torch.tensor([0, n]), radius=2, step=512).to(device)


def make_gat(kind: str, n: int, device: str = "cpu", heads: int = 4, channels: int = 64):
    """A zero-argument callable: graph attention forward + backward on one bag of ``n`` patches."""
    g = torch.Generator().manual_seed(0)
    nbr = neighbours(n, device)
    x = torch.randn(n, heads, channels, generator=g).to(device).requires_grad_()
    src, dst = (torch.randn(n, heads, generator=g).to(device).requires_grad_() for _ in range(2))
    grad = torch.randn(n, heads, channels, generator=g).to(device)
    op = graph_attention if kind == "fastmil" else graph_attention_reference

    def run():
        out = op(x, nbr, src, dst)
        out.backward(grad)
        x.grad = src.grad = dst.grad = None

    return run


def make_step(kind: str, n: int, dim: int = 1024, device: str = "cpu", seed: int = 0):
    """A zero-argument callable running one SRMIL training step (forward, backward, AdamW) on one bag."""
    torch.manual_seed(seed)
    x = torch.randn(n, dim, device=device)
    nbr = neighbours(n, device)
    if kind == "naive":
        model = NaiveSRMIL(dim).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4)
        src, dst = edge_list(nbr)  # prebuilt once, as the published code does before training
        y = torch.tensor([1], device=device)

        def naive_step():
            opt.zero_grad(set_to_none=True)
            model.step(x, y, src, dst).backward()
            opt.step()

        return naive_step
    method = build_method(method_config({"name": "srmil"}), model_config({"name": "graphmil"}), dim, 2).to(device)
    stepper = Stepper(method, OptimConfig(), "none", torch.device(device))
    bags = Bags.from_list([x.cpu()], coords=[torch.from_numpy(layout(n))], labels=[1],
                          neighbours=[nbr.cpu()]).to(device)
    counter = itertools.count()

    def step():
        stepper.step(bags, StepContext(epoch=0, step=next(counter), steps_per_epoch=10**6, epochs=1, seed=0))

    return step


def measure_extra_peak(what: str, kind: str, n: int, device: str) -> int:
    fn = make_gat(kind, n, device) if what == "gat" else make_step(kind, n, device=device)
    return extra_peak_after_warmup(fn, device)


if __name__ == "__main__":
    what, kind, n, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    print(f"extra_peak_bytes {measure_extra_peak(what, kind, n, device)}")
