"""The implementations the gated-pooling benchmarks compare, and a one-shot peak-memory probe.

``fused``: :class:`fastmil.nn.GatedAttentionPool` (the fused op: Triton on CUDA, the chunked torch path on CPU).
``chain``: the plain torch module chain as ABMIL code usually writes it: ``Linear -> tanh``, ``Linear -> sigmoid``,
product, ``Linear`` to a score, ``softmax`` over the bag, weighted sum ``a @ h``; autograd keeps every
intermediate. ``fused-bf16`` and ``chain-bf16`` (CUDA only: ``BF16_KINDS``): ``h`` in bf16, the chain under
``torch.autocast(bfloat16)``, the comparison ``docs/performance.md`` predicts for. All see one bag of N instances.
``h`` requires grad (as after an embedding layer, where both must return an ``N x D`` gradient) or not (pooling
straight over stored features).

Run as a script it measures the extra peak memory of ONE forward+backward in a fresh process, so that nothing
else shares the peak: ``python benchmarks/gated_pool_cases.py KIND N D HIDDEN {cpu|cuda} {1|0}``
(last: whether h requires grad) prints
``extra_peak_bytes``: CPU, the peak of live tensor bytes allocated during the step, from torch's allocator
events (``torch.profiler`` with ``profile_memory=True``); CUDA, ``torch.cuda.max_memory_allocated`` above the
allocation before the step. Both count the gradient buffers the step creates (``grad_h`` when ``h`` requires
grad, parameter grads).
"""
from __future__ import annotations

import sys

import torch

from fastmil.nn import GatedAttentionPool

BF16_KINDS = ("fused-bf16", "chain-bf16")
"""Cases run on CUDA only (the CPUs these benchmarks run on have no bf16 GEMM)."""


def make_case(n: int, dim: int, hidden: int, device: str = "cpu", seed: int = 0, h_grad: bool = True,
              kind: str = "fused"):
    """``(pool module, h [n, dim], offsets [0, n])`` on ``device``; ``h`` in bf16 for ``BF16_KINDS``, else fp32,
    requiring grad if ``h_grad``."""
    torch.manual_seed(seed)
    pool = GatedAttentionPool(dim, hidden).to(device)
    dtype = torch.bfloat16 if kind in BF16_KINDS else torch.float32
    h = torch.randn(n, dim, device=device).to(dtype).requires_grad_(h_grad)
    offsets = torch.tensor([0, n], device=device)
    return pool, h, offsets


def step_fused(pool: GatedAttentionPool, h: torch.Tensor, offsets: torch.Tensor) -> None:
    pooled, _ = pool(h, offsets)
    pooled.sum().backward()


def step_chain(pool: GatedAttentionPool, h: torch.Tensor, offsets: torch.Tensor) -> None:
    scores = pool.w(torch.tanh(pool.V(h)) * torch.sigmoid(pool.U(h))).squeeze(-1)
    pooled = torch.softmax(scores, dim=0) @ h
    pooled.sum().backward()


def step_chain_bf16(pool: GatedAttentionPool, h: torch.Tensor, offsets: torch.Tensor) -> None:
    with torch.autocast(h.device.type, dtype=torch.bfloat16):
        step_chain(pool, h, offsets)


STEPS = {"fused": step_fused, "chain": step_chain, "fused-bf16": step_fused, "chain-bf16": step_chain_bf16}


def _tracked_peak_bytes(step) -> int:
    """Peak of live tensor bytes allocated by ``step()`` on the CPU, from the allocator events that
    ``torch.profiler`` records with ``profile_memory=True`` (a tracked allocator: exact tensor bytes, no
    library start-up or allocator caching noise)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    if not events:
        raise RuntimeError("the profiler recorded no allocator events")
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def measure_extra_peak(kind: str, n: int, dim: int, hidden: int, device: str, h_grad: bool) -> int:
    """Extra peak bytes of one forward+backward (see the module docstring)."""
    pool, h, offsets = make_case(n, dim, hidden, device, h_grad=h_grad, kind=kind)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        STEPS[kind](pool, h, offsets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _tracked_peak_bytes(lambda: STEPS[kind](pool, h, offsets))


if __name__ == "__main__":
    kind, n, dim, hidden, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    h_grad = sys.argv[6] == "1"
    print(f"extra_peak_bytes {measure_extra_peak(kind, n, dim, hidden, device, h_grad)}")
