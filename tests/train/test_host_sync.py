"""A training step never waits for the GPU (DESIGN.md's contract; issue 30 item 3).

On a GPU a step is sync-free when it reads nothing back from the device (no ``.item()``, ``int(t)``, ``bool(t)``,
boolean indexing, ``nonzero``) and copies host data only asynchronously. Two checks:

- everywhere (CPU, Triton interpreter): one step of every method on the Triton path under a dispatch mode that
  records each aten op that would read a device value back to the host, and a spy on the ops' one host-to-device
  copy point (:func:`fastmil.ops._transfer.to_device`). Ops on the host copy of the offsets (building and checking
  tile tables) are host work, not synchronisation: they are allowed by name.
- on a GPU (marked ``cuda``; ``benchmarks/device_check.py`` runs it): the same step under
  ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising CUDA call.
"""
from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastmil.ops._tiles as tiles_module
from fastmil.bags import Bags
from fastmil.methods import StepContext, build_method, method_config
from fastmil.nn import model_config
from fastmil.ops import grid_neighbours
from fastmil.ops._backend import interpreting
from fastmil.train import TrainConfig
from fastmil.train.step import Stepper
from tests.methods.test_srmil import _bags as srmil_bags

ABMIL = {"embed_dim": 16, "attn_dim": 8, "dropout": 0.0}
GRAPH = {"name": "graphmil", "heads": 2, "head_dim": 8, "radius": 1, "head_hidden": 8, "dropout": 0.0}
CASES = {"plain": ABMIL, "mhim": ABMIL, "srmil": GRAPH, "mhim+srmil": GRAPH}

READS_BACK = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
              "aten.unique.default", "aten._unique2.default", "aten.item.default", "aten.is_nonzero.default"}
"""Ops whose result size or value the host needs: on a device tensor each is a synchronisation."""
HOST_SIDE = {"check_offsets", "_build_tiles", "host_offsets", "check_neighbour_rows"}
"""Functions that read host data only: the host copy of the offsets (``Bags.offsets_cpu``), and
``check_neighbour_rows``, which reads a CPU table only (on a GPU it asserts with ``torch._assert_async``, without a
read; ``tests/ops/test_graph_attention.py`` checks that branch on the meta device)."""


class SyncProbe(TorchDispatchMode):
    """Records ``(op, fastmil call site)`` for every op that reads a device value back, outside :data:`HOST_SIDE`
    and outside the Triton interpreter's own bookkeeping; boolean indexing counts as a read back."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name in READS_BACK or boolean_index:
            stack = traceback.extract_stack()
            ours = [f for f in stack if f"{os.sep}fastmil{os.sep}" in f.filename]
            if not any(f"{os.sep}triton{os.sep}" in f.filename for f in stack) and not (
                    ours and ours[-1].name in HOST_SIDE):
                site = f"{ours[-1].filename.split('fastmil' + os.sep)[-1]}:{ours[-1].lineno}" if ours else "?"
                self.reads.append((name, site))
        return func(*args, **(kwargs or {}))


def _batch(seed=0, radius=None) -> Bags:
    """The SRMIL tests' ragged batch (a bag of one among them) on a 10 x 10 patch grid, with its stencil table."""
    bags = srmil_bags(seed=seed)
    if radius is not None:  # as the store's loader does: the table comes with the batch
        bags.neighbours = grid_neighbours(bags.coords, bags.offsets, radius, offsets_cpu=bags.offsets_cpu)
    return bags


def _stepper(name: str, amp: str, device: torch.device) -> tuple[Stepper, Bags]:
    torch.manual_seed(0)
    model = CASES[name]
    method = build_method(method_config({"name": name}), model_config(model), 6, 2).to(device)
    bags = _batch(radius=model.get("radius")).to(device)
    return Stepper(method, TrainConfig().optim, amp, device), bags


def _ctx(step: int = 0) -> StepContext:
    return StepContext(epoch=0, step=step, steps_per_epoch=4, epochs=2, seed=7, class_weight=None)


@pytest.mark.parametrize("amp", ["none", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_training_step_reads_nothing_back_and_copies_each_tile_table_once(name, amp, monkeypatch):
    monkeypatch.setenv("FASTMIL_BACKEND", "triton")
    copies = []
    real = tiles_module.to_device
    monkeypatch.setattr(tiles_module, "to_device",
                        lambda host, device: copies.append(host.numel()) or real(host, device))
    built = []
    real_build = tiles_module._build_tiles
    monkeypatch.setattr(tiles_module, "_build_tiles",
                        lambda off, n, block_n, device: built.append(block_n) or real_build(off, n, block_n, device))
    stepper, bags = _stepper(name, amp, torch.device("cpu"))
    with SyncProbe() as probe:
        terms = stepper.step(bags, _ctx())
    assert probe.reads == [], f"{name} step reads device values back at {probe.reads}"
    # one table per tile size, built once however many ops (forward, backward, teacher, student) use it
    assert len(built) == len(set(built)) and len(copies) == len(built)
    if name != "srmil":  # the graph model pools with the supernode readout, not the tiled pool
        assert built, "the Triton path builds tile tables"
    assert bool(torch.isfinite(terms["loss"]))
    # the same batch again: the cached tables, no copy at all
    stepper.step(bags, _ctx(1))
    assert len(copies) == len(built)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                    reason="needs a CUDA GPU and compiled kernels")
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_training_step_under_sync_debug_mode_error(name, amp):
    """Every CUDA call that synchronises raises under ``set_sync_debug_mode("error")``. The first step compiles
    the kernels (and may synchronise doing so); the second, on a fresh batch, is the one checked."""
    device = torch.device("cuda")
    stepper, bags = _stepper(name, amp, device)
    stepper.step(bags, _ctx())
    fresh = _batch(seed=1, radius=CASES[name].get("radius")).pin_memory().to(device, non_blocking=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        terms = stepper.step(fresh, _ctx(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(terms["loss"]))
