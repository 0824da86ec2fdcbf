"""Tile tables (every bag cut into tiles of at most ``block_n`` rows that never cross a bag boundary) and the
two launches that finish every tile-based pooling forward (merge the tiles of each bag, normalise weights).

The Triton kernels run one program per tile (``fastmil/kernels/_tiled_softmax.py`` explains the scheme). The
table is built with a handful of vectorised torch ops on the host copy of ``offsets`` (``Bags.offsets_cpu``, so no
device-to-host copy), which is also what sizes the launch grid.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from ._transfer import to_device

__all__ = ["TileTable", "build_tiles", "check_offsets", "finish_tiled_pool", "host_offsets"]


@dataclass(frozen=True)
class TileTable:
    """``tile_bag`` int32 ``[T]``, ``tile_start``/``tile_end`` int64 ``[T]`` (row range of each tile) and
    ``bag_tiles`` int64 ``[B+1]`` (tiles of bag b are ``bag_tiles[b]:bag_tiles[b+1]``), all on the op's device."""

    tile_bag: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    bag_tiles: torch.Tensor

    @property
    def n_tiles(self) -> int:
        return int(self.tile_bag.numel())


def host_offsets(offsets: torch.Tensor, offsets_cpu: torch.Tensor | None) -> torch.Tensor:
    """The host copy of ``offsets``: ``offsets_cpu`` when the caller has it (``Bags`` carries it), else one
    device-to-host copy."""
    if offsets_cpu is not None:
        if offsets_cpu.device.type != "cpu" or offsets_cpu.shape != offsets.shape:
            raise ValueError("offsets_cpu must be the host copy of offsets (a CPU tensor of the same shape)")
        return offsets_cpu
    return offsets.detach().to("cpu", torch.int64)


def check_offsets(off: torch.Tensor, n_rows: int) -> torch.Tensor:
    """The bag sizes of the host offsets ``off``; raises ValueError unless ``off`` starts at 0, never decreases
    and ends at ``n_rows`` (an O(B) check on the host: kernels address memory through these row ranges)."""
    sizes = off[1:] - off[:-1]
    if int(off[0]) != 0 or int(off[-1]) != n_rows or bool((sizes < 0).any()):
        raise ValueError(
            f"offsets must start at 0, be non-decreasing and end at N = {n_rows}; "
            f"got first {int(off[0])}, last {int(off[-1])}, {int((sizes < 0).sum())} decreasing steps"
        )
    return sizes


def build_tiles(off: torch.Tensor, n_rows: int, block_n: int, device: torch.device) -> TileTable:
    """Tile table for the host offsets ``off`` (int64 ``[B+1]``, checked by :func:`check_offsets`) over
    ``n_rows`` rows; an empty bag gets no tile.

    Built once per ``(off, n_rows, block_n, device)``: a later call with the same host offsets tensor (a batch's
    ``Bags.offsets_cpu`` reaches every op of its step, forward and backward) returns the same table, so a step
    makes one host-to-device copy per tile size, not one per op call. The cache entry lives as long as ``off`` does
    and is dropped when ``off`` is modified in place."""
    device = torch.device(device)
    tables = _tables_of(off)
    key = (n_rows, block_n, device)
    table = tables.get(key)
    if table is None:
        table = tables[key] = _build_tiles(off, n_rows, block_n, device)
    return table


_TABLES: dict[int, tuple[int, dict[tuple[int, int, torch.device], TileTable]]] = {}
"""``id(host offsets) -> (their version counter when cached, tables by (n_rows, block_n, device))``."""


def _tables_of(off: torch.Tensor) -> dict[tuple[int, int, torch.device], TileTable]:
    """The table cache of the host offsets ``off`` (emptied if ``off`` changed in place since it was filled; none
    for an inference-mode tensor, which keeps no version counter: a fresh dict, so its table is built per call).
    Writes that bypass torch (through ``off.numpy()``) are not seen: host offsets are read-only once a batch
    exists."""
    if off.is_inference():
        return {}
    entry = _TABLES.get(id(off))
    if entry is None:
        entry = _TABLES[id(off)] = (off._version, {})
        weakref.finalize(off, _TABLES.pop, id(off), None)
    elif entry[0] != off._version:
        entry = _TABLES[id(off)] = (off._version, {})
    return entry[1]


def _build_tiles(off: torch.Tensor, n_rows: int, block_n: int, device: torch.device) -> TileTable:
    """The table of :func:`build_tiles`, built on the host and copied to ``device`` as one int64 buffer (one
    asynchronous copy, :func:`._transfer.to_device`); ``tile_bag`` is narrowed to int32 on the device."""
    sizes = check_offsets(off, n_rows)
    per_bag = (sizes + block_n - 1) // block_n
    bag_tiles = torch.zeros(off.numel(), dtype=torch.int64)
    torch.cumsum(per_bag, 0, out=bag_tiles[1:])
    n_tiles = int(bag_tiles[-1])
    tile_bag = torch.repeat_interleave(torch.arange(sizes.numel()), per_bag, output_size=n_tiles)
    tile_in_bag = torch.arange(n_tiles) - bag_tiles[tile_bag]
    tile_start = off[tile_bag] + tile_in_bag * block_n
    tile_end = torch.minimum(tile_start + block_n, off[tile_bag + 1])
    # each part starts on a 16-byte boundary (an even number of int64s), the alignment Triton specialises pointers
    # on: the launches then get the one specialisation `make aot` compiles, whatever the tile count
    stride = n_tiles + n_tiles % 2
    packed = torch.zeros(3 * stride + bag_tiles.numel(), dtype=torch.int64)
    for i, part in enumerate((tile_bag, tile_start, tile_end)):
        packed[i * stride:i * stride + n_tiles] = part
    packed[3 * stride:] = bag_tiles
    packed = to_device(packed, device)
    return TileTable(
        tile_bag=packed[:n_tiles].to(torch.int32),
        tile_start=packed[stride:stride + n_tiles],
        tile_end=packed[2 * stride:2 * stride + n_tiles],
        bag_tiles=packed[3 * stride:],
    )


def finish_tiled_pool(
    tile_max: torch.Tensor, tile_sum: torch.Tensor, partial: torch.Tensor, tiles: TileTable, scores: torch.Tensor,
    mask: torch.Tensor | None, pooled: torch.Tensor, lse: torch.Tensor, weights: torch.Tensor, block_n: int,
) -> None:
    """The forward's last two launches, shared by every tile-based pooling op: merge the tiles of each bag into
    ``pooled [B, H, D]`` and ``lse [B, H]``, then ``weights [N, H] = exp(scores - lse)`` (``weights`` may alias
    ``scores``). ``tile_max``/``tile_sum`` are ``[T, H]``, ``partial`` is ``[T, H, D]``, all fp32; ``block_n``
    is the tile size the table was built with.

    Few bags of many tiles (a one-bag batch) would leave the merge grid ``(B, H, cdiv(D, 128))`` a handful of
    programs each walking thousands of tiles: then the merge runs in two levels (``kernels/_tiled_softmax.py``,
    ``merge_group_tiles``): groups of consecutive tiles of a bag first, in parallel, then the groups of each bag.
    The group table is derived on the device from ``tiles.bag_tiles``; only host integers pick the path."""
    from ..kernels import _tiled_softmax as k

    n_bags, heads, dim = pooled.shape
    group = k.merge_group_tiles(tiles.n_tiles, n_bags, heads, dim)
    if group:
        n_groups = k.merge_groups_bound(tiles.n_tiles, n_bags, group)
        group_max = torch.empty(n_groups, heads, dtype=torch.float32, device=pooled.device)
        group_sum = torch.empty_like(group_max)
        group_partial = torch.empty(n_groups, heads, dim, dtype=torch.float32, device=pooled.device)
        bag_groups = torch.empty_like(tiles.bag_tiles)
        k.merge_groups_launch(tile_max, tile_sum, partial, tiles.bag_tiles, group_max, group_sum, group_partial,
                              bag_groups, group)()
        k.merge_launch(group_max, group_sum, group_partial, bag_groups, pooled, lse)()
    else:
        k.merge_launch(tile_max, tile_sum, partial, tiles.bag_tiles, pooled, lse)()
    k.normalize_launch(scores, mask, tiles.tile_bag, tiles.tile_start, tiles.tile_end, lse, weights, block_n)()
