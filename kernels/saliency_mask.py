"""Triton kernels of ``saliency_mask``: per bag, the k instances with the smallest 32-bit keys, by radix select.

Both selections of the op are "the k smallest keys of each bag's eligible instances, ties by lower index":

- salient: keys that order the scores from highest to lowest (``_score_key``; -0.0 counts as 0.0, NaN as -inf),
- random: counter-based keys ``hash(hash(row) ^ seed_mix)`` (``_random_key``, a bijection of the row index, so
  within a batch no two keys are equal): the k smallest form a uniformly random k-subset.

Radix select, 8 bits per pass, 4 passes, no sort and no atomics (the histogram of each tile is written to its own
row and each bag sums its tiles in a fixed order):

- ``radix_hist_kernel``    per tile: histogram of the current digit over the eligible rows whose higher digits
                           equal the bag's prefix so far -> ``hist [T, 256]``.
- ``radix_select_kernel``  per bag: sums its tiles' histograms, finds the digit where the cumulative count reaches
                           the bag's remaining k, extends the prefix and lowers k; in the last pass also writes each
                           tile's exclusive count of rows equal to the final threshold key (for the tie-break).
- ``radix_mark_kernel``    per tile: selected = key < threshold, or key == threshold and among the first k_rem such
                           rows of the bag in index order.

Bag sizes, k and the seed live in device tensors: no host synchronisation, no value-dependent specialisation.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._launch import DEFAULT_NUM_STAGES, AotTiles, Launch

__all__ = [
    "BLOCK_N", "MODE_RANDOM", "MODE_SCORE", "PASS_SHIFTS", "aot_launches", "radix_hist_kernel", "radix_hist_launch",
    "radix_mark_kernel", "radix_mark_launch", "radix_select_kernel", "radix_select_launch",
]

BLOCK_N = 1024
"""Rows per tile (one program)."""
PASS_SHIFTS = (24, 16, 8, 0)
"""Bit offset of the digit of each radix pass, most significant first."""
MODE_SCORE, MODE_RANDOM = 0, 1
_WARPS = 4


@triton.jit
def _lowbias32(x):
    """A 32-bit integer hash (bijective on [0, 2^32)), held in int64; the torch path applies the same one."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


@triton.jit
def _keys(scores_ptr, seed_ptr, start, local, in_bag, MODE: tl.constexpr):
    """int64 keys in [0, 2^32) of the tile's rows: smaller = selected first."""
    if MODE == 0:
        x = tl.load(scores_ptr + start + local, mask=in_bag, other=0.0)
        x = tl.where(x != x, float("-inf"), x)  # NaN ranks lowest
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with 0.0
        bits = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
        ascending = tl.where((bits >> 31) != 0, bits ^ 0xFFFFFFFF, bits ^ 0x80000000)
        return 0xFFFFFFFF - ascending
    rows = (start + local).to(tl.int64)
    return _lowbias32(_lowbias32(rows) ^ tl.load(seed_ptr))


@triton.jit
def _eligible(elig_ptr, excl_ptr, start, local, in_bag, HAS_ELIG: tl.constexpr, HAS_EXCL: tl.constexpr):
    ok = in_bag
    if HAS_ELIG:
        ok = ok & (tl.load(elig_ptr + start + local, mask=in_bag, other=0) != 0)
    if HAS_EXCL:
        ok = ok & (tl.load(excl_ptr + start + local, mask=in_bag, other=1) == 0)
    return ok


@triton.jit
def radix_hist_kernel(
    scores_ptr, seed_ptr, elig_ptr, excl_ptr, tile_bag_ptr, tile_start_ptr, tile_end_ptr, prefix_ptr, hist_ptr,
    SHIFT: tl.constexpr, MODE: tl.constexpr, HAS_ELIG: tl.constexpr, HAS_EXCL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(T,)``. ``hist[t, d]`` = eligible rows of tile ``t`` whose key has digit ``d`` at ``SHIFT`` and whose
    higher bits equal ``prefix[bag]`` (int64 ``[B]``). ``elig`` (a participation mask) and ``excl`` (rows taken
    by an earlier selection) are contiguous bool ``[N]``."""
    t = tl.program_id(0)
    start = tl.load(tile_start_ptr + t)
    n_rows = (tl.load(tile_end_ptr + t) - start).to(tl.int32)
    local = tl.arange(0, BLOCK)
    in_bag = local < n_rows
    ok = _eligible(elig_ptr, excl_ptr, start, local, in_bag, HAS_ELIG, HAS_EXCL)
    key = _keys(scores_ptr, seed_ptr, start, local, in_bag, MODE)
    prefix = tl.load(prefix_ptr + tl.load(tile_bag_ptr + t))
    match = ok & ((key >> (SHIFT + 8)) == prefix)
    hist = tl.histogram(((key >> SHIFT) & 255).to(tl.int32), 256, mask=match)
    tl.store(hist_ptr + t.to(tl.int64) * 256 + tl.arange(0, 256), hist)


@triton.jit
def radix_select_kernel(hist_ptr, bag_tiles_ptr, prefix_ptr, krem_ptr, eq_offset_ptr, LAST: tl.constexpr):
    """Grid ``(B,)``. Sums the histograms of bag ``b``'s tiles, picks the digit where the cumulative count reaches
    ``krem[b]``: ``prefix[b] = prefix[b] * 256 + digit``, ``krem[b] -= rows below that digit``. With ``LAST``,
    ``eq_offset[t]`` = rows of the bag's earlier tiles whose key equals the final threshold ``prefix[b]``."""
    b = tl.program_id(0)
    t0 = tl.load(bag_tiles_ptr + b)
    t1 = tl.load(bag_tiles_ptr + b + 1)
    bins = tl.arange(0, 256)
    acc = tl.zeros((256,), dtype=tl.int64)
    for t in range(t0, t1):
        acc += tl.load(hist_ptr + t * 256 + bins).to(tl.int64)
    k = tl.load(krem_ptr + b)
    cum = tl.cumsum(acc, 0)
    digit = tl.minimum(tl.sum((cum < k).to(tl.int32), axis=0), 255)
    below = tl.sum(tl.where(bins < digit, acc, 0), axis=0)
    tl.store(prefix_ptr + b, tl.load(prefix_ptr + b) * 256 + digit)
    tl.store(krem_ptr + b, k - below)
    if LAST:
        running = tl.full((), 0, tl.int64)
        for t in range(t0, t1):
            tl.store(eq_offset_ptr + t, running)
            running += tl.sum(tl.where(bins == digit, tl.load(hist_ptr + t * 256 + bins), 0), axis=0).to(tl.int64)


@triton.jit
def radix_mark_kernel(
    scores_ptr, seed_ptr, elig_ptr, excl_ptr, tile_bag_ptr, tile_start_ptr, tile_end_ptr, prefix_ptr, krem_ptr,
    eq_offset_ptr, out_ptr,
    MODE: tl.constexpr, HAS_ELIG: tl.constexpr, HAS_EXCL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid ``(T,)``. ``out[i] = 1`` for the eligible rows with ``key < threshold``, and for the first ``krem``
    rows of the bag (in index order) with ``key == threshold``; ``out`` is uint8 ``[N]``."""
    t = tl.program_id(0)
    start = tl.load(tile_start_ptr + t)
    n_rows = (tl.load(tile_end_ptr + t) - start).to(tl.int32)
    local = tl.arange(0, BLOCK)
    in_bag = local < n_rows
    ok = _eligible(elig_ptr, excl_ptr, start, local, in_bag, HAS_ELIG, HAS_EXCL)
    key = _keys(scores_ptr, seed_ptr, start, local, in_bag, MODE)
    b = tl.load(tile_bag_ptr + t)
    threshold = tl.load(prefix_ptr + b)
    equal = ok & (key == threshold)
    rank = tl.load(eq_offset_ptr + t) + tl.cumsum(equal.to(tl.int64), 0) - 1
    selected = ok & ((key < threshold) | (equal & (rank < tl.load(krem_ptr + b))))
    tl.store(out_ptr + start + local, selected.to(tl.uint8), mask=in_bag)


# ----------------------------------------------------------------------------------------------------------------
# launches (shared by fastmil.ops.saliency_mask and make aot)
# ----------------------------------------------------------------------------------------------------------------
def _selection_args(scores, seed, eligible, excluded, tile_start):
    return dict(scores_ptr=scores, seed_ptr=seed, elig_ptr=tile_start if eligible is None else eligible,
                excl_ptr=tile_start if excluded is None else excluded)


def radix_hist_launch(
    scores: torch.Tensor, seed: torch.Tensor, eligible: torch.Tensor | None, excluded: torch.Tensor | None,
    tile_bag: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor, prefix: torch.Tensor,
    hist: torch.Tensor, shift: int, mode: int,
) -> Launch:
    """One histogram pass: ``scores [N]`` fp32, ``seed [1]`` int64, masks bool ``[N]`` or None, the tile table,
    ``prefix [B]`` int64 -> ``hist [T, 256]`` int32."""
    return Launch(
        radix_hist_kernel, (tile_bag.numel(),),
        dict(**_selection_args(scores, seed, eligible, excluded, tile_start), tile_bag_ptr=tile_bag,
             tile_start_ptr=tile_start, tile_end_ptr=tile_end, prefix_ptr=prefix, hist_ptr=hist,
             SHIFT=shift, MODE=mode, HAS_ELIG=eligible is not None, HAS_EXCL=excluded is not None, BLOCK=BLOCK_N),
        _WARPS, DEFAULT_NUM_STAGES,
    )


def radix_select_launch(hist: torch.Tensor, bag_tiles: torch.Tensor, prefix: torch.Tensor, krem: torch.Tensor,
                        eq_offset: torch.Tensor, last: bool) -> Launch:
    """One digit choice per bag: ``hist [T, 256]``, ``bag_tiles [B+1]`` -> updates ``prefix``/``krem`` int64
    ``[B]``; in the last pass ``eq_offset [T]`` int64."""
    return Launch(
        radix_select_kernel, (prefix.numel(),),
        dict(hist_ptr=hist, bag_tiles_ptr=bag_tiles, prefix_ptr=prefix, krem_ptr=krem, eq_offset_ptr=eq_offset,
             LAST=last),
        _WARPS, DEFAULT_NUM_STAGES,
    )


def radix_mark_launch(
    scores: torch.Tensor, seed: torch.Tensor, eligible: torch.Tensor | None, excluded: torch.Tensor | None,
    tile_bag: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor, prefix: torch.Tensor,
    krem: torch.Tensor, eq_offset: torch.Tensor, out: torch.Tensor, mode: int,
) -> Launch:
    """Writes the selection into ``out`` uint8 ``[N]``."""
    return Launch(
        radix_mark_kernel, (tile_bag.numel(),),
        dict(**_selection_args(scores, seed, eligible, excluded, tile_start), tile_bag_ptr=tile_bag,
             tile_start_ptr=tile_start, tile_end_ptr=tile_end, prefix_ptr=prefix, krem_ptr=krem,
             eq_offset_ptr=eq_offset, out_ptr=out, MODE=mode, HAS_ELIG=eligible is not None,
             HAS_EXCL=excluded is not None, BLOCK=BLOCK_N),
        _WARPS, DEFAULT_NUM_STAGES,
    )


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time specialisations (discovered by fastmil.aot)
# ----------------------------------------------------------------------------------------------------------------
def aot_launches() -> Iterator[Launch]:
    """Both selections (salient: by score, with or without a participation mask; random: excluding the salient
    rows, with or without the mask), every pass, and the select kernel with and without the last-pass output."""
    t = AotTiles()
    n, n_tiles, n_bags = t.n, t.n_tiles, t.n_bags
    tile_bag, tile_start, tile_end = t.tile_bag, t.tile_start, t.tile_end
    i64 = dict(dtype=torch.int64)
    scores, seed, out = torch.zeros(n), torch.zeros(1, **i64), torch.zeros(n, dtype=torch.uint8)
    prefix, krem, eq_offset = torch.zeros(n_bags, **i64), torch.zeros(n_bags, **i64), torch.zeros(n_tiles, **i64)
    hist = torch.zeros(n_tiles, 256, dtype=torch.int32)
    mask = torch.ones(n, dtype=torch.bool)
    for mode, excluded in ((MODE_SCORE, None), (MODE_RANDOM, mask)):
        for eligible in (None, mask):
            for shift in PASS_SHIFTS:
                yield radix_hist_launch(scores, seed, eligible, excluded, tile_bag, tile_start, tile_end, prefix,
                                        hist, shift, mode)
            yield radix_mark_launch(scores, seed, eligible, excluded, tile_bag, tile_start, tile_end, prefix, krem,
                                    eq_offset, out, mode)
    for last in (False, True):
        yield radix_select_launch(hist, t.bag_tiles, prefix, krem, eq_offset, last)
