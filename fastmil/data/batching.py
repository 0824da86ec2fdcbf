"""Packing slides into training steps, and a loader that prefetches the next step on a thread.

A step is a list of slide indices. The sampler packs bags by an instance budget
(``max_instances_per_step``) and/or a bag count (``bags_per_step``); ``bags_per_step=1`` gives the
batch-size-1 regime of the MIL papers. Order is shuffled per epoch from ``(seed, epoch)``, so runs are
reproducible and resumable at any epoch.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from ..bags import Bags
from .cache import CohortCache
from .store import FeatureStore

__all__ = ["BagBatchSampler", "BagLoader"]


class BagBatchSampler:
    """Yield lists of bag indices, one list per step.

    Args:
        sizes: instances per bag, ``[S]``.
        max_instances_per_step: pack bags until the next one would exceed this many instances
            (a single bag larger than the budget gets a step of its own).
        bags_per_step: at most this many bags per step.
        shuffle: shuffle bag order each epoch (from ``seed`` and the epoch set by :meth:`set_epoch`).
        drop_last: drop a final step that holds fewer than ``bags_per_step`` bags.
        groups: a group id per bag (``[S]``; e.g. the patient): the bags of a group are shuffled as one unit and
            always packed into one step (a group larger than the budget or ``bags_per_step`` gets a step of its
            own). None: every bag is its own group.
        rank, world: data-parallel sharding. The epoch's steps are packed as for one process (so a bag larger than
            the instance budget is still a step of its own), then grouped ``world`` consecutive steps at a time:
            a group is one global step, and this process trains on its ``rank``-th step of each group. The last
            ``len(steps) % world`` steps of an epoch (at most ``world - 1``; other bags each epoch, as the order
            is reshuffled) are left out so that every process runs the same number of steps.
    """

    def __init__(
        self,
        sizes: Sequence[int] | np.ndarray,
        *,
        max_instances_per_step: int | None = None,
        bags_per_step: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
        groups: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank {rank} of {world}")
        self.rank, self.world = rank, world
        self.sizes = np.asarray(sizes, dtype=np.int64)
        if self.sizes.ndim != 1:
            raise ValueError("sizes must be 1-D")
        if max_instances_per_step is None and bags_per_step is None:
            bags_per_step = 1
        if max_instances_per_step is not None and max_instances_per_step < 1:
            raise ValueError(f"max_instances_per_step must be >= 1, got {max_instances_per_step}")
        if bags_per_step is not None and bags_per_step < 1:
            raise ValueError(f"bags_per_step must be >= 1, got {bags_per_step}")
        self.max_instances_per_step = max_instances_per_step
        self.bags_per_step = bags_per_step
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.units = self._units(groups)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _units(self, groups) -> list[list[int]] | None:
        """The bags of each group, groups in order of first appearance (None without groups)."""
        if groups is None:
            return None
        groups = np.asarray(groups)
        if groups.shape != self.sizes.shape:
            raise ValueError(f"groups must give one group per bag ({len(self.sizes)}), got shape {groups.shape}")
        members: dict = {}
        for i, g in enumerate(groups.tolist()):
            members.setdefault(g, []).append(i)
        return list(members.values())

    def _order(self) -> list[list[int]]:
        """This epoch's units (a group's bags, or single bags) in order."""
        units = self.units if self.units is not None else [[i] for i in range(len(self.sizes))]
        if not self.shuffle:
            return units
        rng = np.random.default_rng([self.seed, self.epoch])
        return [units[i] for i in rng.permutation(len(units))]

    def steps(self) -> list[list[int]]:
        """All steps of the current epoch (this process's share of each global step)."""
        steps = self._pack()
        if self.world == 1:
            return steps
        return [steps[g + self.rank] for g in range(0, len(steps) - self.world + 1, self.world)]

    def _pack(self) -> list[list[int]]:
        out: list[list[int]] = []
        current: list[int] = []
        load = 0
        per_step, budget = self.bags_per_step, self.max_instances_per_step
        for unit in self._order():
            n = int(self.sizes[unit].sum())
            full_by_count = per_step is not None and current and len(current) + len(unit) > per_step
            full_by_budget = budget is not None and current and load + n > budget
            if full_by_count or full_by_budget:
                out.append(current)
                current, load = [], 0
            current.extend(unit)
            load += n
        if current and not (self.drop_last and per_step is not None and len(current) < per_step):
            out.append(current)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.steps())

    def __len__(self) -> int:
        return len(self.steps())


_END = object()


class BagLoader:
    """Iterate :class:`Bags` steps read from a store, prefetching the next step(s) on a background thread.

    Args:
        store: the feature store.
        slide_ids: the slides of this split; the sampler's indices refer to this list.
        sampler: a :class:`BagBatchSampler` over ``store.sizes(slide_ids)`` (built with ``bags_per_step=1``
            and ``shuffle=False`` when omitted).
        prefetch: steps read ahead (>= 1).
        dtype: cast features to this dtype on load (default: as stored).
        pin_memory: pin host memory (for asynchronous copies to a GPU).
        neighbour_radius: attach each slide's spatial stencil table of this radius (``Bags.neighbours``; built
            once per slide and cached in the store), for models that need the patch graph.
        cache: a :class:`fastmil.data.cache.CohortCache`: each slide is read from the store once, later steps
            take it from memory (a device cache packs the step on the GPU and nothing is pinned).

    Errors raised on the reader thread are re-raised in the consumer, never swallowed.
    """

    def __init__(
        self,
        store: FeatureStore,
        slide_ids: Sequence[str],
        sampler: BagBatchSampler | None = None,
        *,
        prefetch: int = 2,
        dtype: torch.dtype | None = None,
        pin_memory: bool = False,
        neighbour_radius: int | None = None,
        cache: CohortCache | None = None,
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        self.store = store
        self.slide_ids = list(slide_ids)
        self.sampler = sampler or BagBatchSampler(store.sizes(self.slide_ids), bags_per_step=1, shuffle=False)
        if len(self.sampler.sizes) != len(self.slide_ids):
            raise ValueError(f"sampler covers {len(self.sampler.sizes)} bags but {len(self.slide_ids)} slide ids given")
        self.prefetch = prefetch
        self.dtype = dtype
        self.pin_memory = pin_memory
        self.neighbour_radius = neighbour_radius
        self.cache = cache

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _load(self, step: list[int]) -> Bags:
        bags = self.store.load_bags([self.slide_ids[i] for i in step], dtype=self.dtype,
                                    neighbour_radius=self.neighbour_radius, cache=self.cache)
        return bags.pin_memory() if self.pin_memory and bags.features.device.type == "cpu" else bags

    def __iter__(self) -> Iterator[Bags]:
        steps = self.sampler.steps()
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def reader() -> None:
            try:
                for step in steps:
                    if stop.is_set():
                        return
                    q.put(self._load(step))
            except BaseException as exc:  # handed to the consumer, which re-raises it
                q.put(exc)
                return
            q.put(_END)

        thread = threading.Thread(target=reader, name="fastmil-bag-reader", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():  # unblock a reader waiting on a full queue
                try:
                    q.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)
