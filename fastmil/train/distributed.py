"""Data parallelism inside ``fit``: which share of each step a process trains on, and the gradient average.

``fit(..., distributed=DataParallel(rank, world))`` runs the same training in every process of an initialised
``torch.distributed`` process group (gloo on CPUs, NCCL on GPUs; Ray Train's ``TorchTrainer`` sets it up, see
``ray_jobs/ddp.py``). Each global step packs ``world x bags_per_step`` bags; process ``r`` trains on bags
``r, r + world, ...`` of it (:class:`fastmil.data.BagBatchSampler` with ``rank``/``world``), so the shards are
disjoint and a pure function of (seed, epoch). After backward the gradients are averaged over the processes (one
flattened all-reduce per step), so every process applies the same update and the weights stay identical: with the
loss a mean over bags, ``world`` processes x ``b`` bags per step compute exactly the step of one process with
``world x b`` bags (up to the reduction's rounding).

Why not ``DistributedDataParallel``: DDP hooks gradient reduction into the wrapped module's ``forward``; a fastmil
step is ``method.training_step`` (teachers, several passes, recycle networks), not one ``forward``, and the
averaged all-reduce after ``backward`` is what DDP computes, without that constraint. The reduction runs on the
gradients' device (NCCL for CUDA tensors, gloo for CPU ones).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DataParallel"]


@dataclass(frozen=True)
class DataParallel:
    """This process's place in a data-parallel run: ``rank`` in ``[0, world)``; rank 0 writes the run folder."""

    rank: int
    world: int

    def __post_init__(self) -> None:
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"data parallel: need 0 <= rank < world, got rank {self.rank} of {self.world}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _dist(self):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("data parallel training needs an initialised torch.distributed process group "
                               "(fastmil train --workers N starts one through Ray Train)")
        return dist

    def _mean_in_place(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the processes: one flattened all-reduce for all of them."""
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        self._dist().all_reduce(flat)
        flat /= self.world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Replace every gradient by its mean over the processes. A parameter without a gradient on some process
        counts as zeros there; one without a gradient on every process keeps none (so AdamW skips it, as it
        would in one process)."""
        if self.world == 1:
            return
        dist = self._dist()
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
        dist.all_reduce(present, op=dist.ReduceOp.MAX)
        params = [p for p, anywhere in zip(params, present.tolist()) if anywhere]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self._mean_in_place([p.grad for p in params])

    def average_buffers(self, module: nn.Module) -> None:
        """Average the floating-point buffers of ``module`` over the processes (MHIM's recycle queries follow an
        EMA of each process's own bags; the mean of the per-process EMA steps is the EMA step of the global
        batch, and it keeps every process's state identical)."""
        if self.world > 1:
            self._mean_in_place([b for b in module.buffers() if b.is_floating_point()])

    def from_rank0(self, values: list[float]) -> list[float]:
        """Rank 0's ``values`` on every process (decisions such as early stopping must be one decision)."""
        if self.world == 1:
            return values
        dist = self._dist()
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.broadcast(tensor, src=0)
        return tensor.cpu().tolist()

    def barrier(self) -> None:
        if self.world > 1:
            self._dist().barrier()
