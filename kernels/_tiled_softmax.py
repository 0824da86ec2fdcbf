"""Tiled per-bag softmax pooling, the part every attention-pooling op shares (the scheme is explained once, in
``docs/architecture.md``, "Kernels").

- ``merge_tiles_kernel``        per (bag, head, D block): pooled ``[B, H, D]`` and the per-bag log-sum-exp
                                ``[B, H]`` (``+inf`` for a bag with no unmasked instance, so its weights are 0).
- ``merge_groups_kernel``       the first level of the two-level merge (few bags of many tiles): per (group of
                                ``group`` consecutive tiles of one bag, head, D block), the group's max, sum and
                                partial vector; ``merge_tiles_kernel`` then merges the groups of each bag
                                (:func:`merge_group_tiles` decides, ``finish_tiled_pool`` runs it).
- ``normalize_weights_kernel``  weights ``exp(s - lse)`` on unmasked rows, 0 elsewhere.
- ``tile_rows`` / ``tile_softmax_stats``  ``@triton.jit`` helpers of the ops' tile kernels.

Loads are cast to fp32; statistics and accumulators are fp32.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._launch import AOT_DIMS, DEFAULT_NUM_STAGES, AotTiles, KernelConfig, Launch, pow2_at_least

__all__ = [
    "MERGE_BLOCK_B", "MERGE_GROUP_TILES", "MERGE_MIN_GROUPS_PER_BAG", "MERGE_MIN_PROGRAMS", "aot_launches",
    "merge_config", "merge_group_tiles", "merge_groups_bound", "merge_groups_kernel", "merge_groups_launch",
    "merge_launch", "merge_tile_range", "merge_tiles_kernel", "normalize_launch", "normalize_weights_kernel",
    "tile_rows", "tile_softmax_stats",
]


def merge_config() -> KernelConfig:
    """Config of ``merge_tiles_kernel`` (``block_n`` = tiles merged per step)."""
    return KernelConfig(block_n=32, block_d=128, num_warps=4)


NORMALIZE_WARPS = 4

MERGE_MIN_PROGRAMS = 264
"""A single-level merge grid (``B * H * cdiv(D, 128)`` programs, each walking all the tiles of its bag serially)
below this many programs is split over tiles (two levels). 264 = 2 x 132, two programs per SM of an H100 SXM (A100:
108 SMs): below it part of the GPU idles while a few programs walk thousands of tiles (B = 1, D = 512: 4 programs
for ~1.5k tiles); from it on, every SM already has work and the extra launch and group pass would only cost."""

MERGE_GROUP_TILES = 32
"""Tiles per group of the two-level merge: one ``BLOCK_T`` step of the merge kernel, so each first-level program
is a single vectorised step and the second level walks ``cdiv(tiles, 32)`` groups, 32x fewer steps than one level
(B = 1, 100k rows of 64-row tiles: 2 steps instead of 49). A multiple of 16 (one runtime specialisation)."""

MERGE_MIN_GROUPS_PER_BAG = 4
"""Two levels only when the bags average more than this many groups (``T > 4 * 32 * B`` tiles): below it the
single-level merge takes at most a few steps per bag and a second launch would not pay for itself."""

MERGE_BLOCK_B = 128
"""Bags the first-level programs scan per step to find their group's tile range (two levels run only for fewer
than ``MERGE_MIN_PROGRAMS`` bags: at most 3 steps)."""


def merge_group_tiles(n_tiles: int, n_bags: int, heads: int, dim: int) -> int:
    """Tiles per group of the two-level merge for ``n_tiles`` tiles of ``n_bags`` bags, ``heads`` heads and
    ``dim`` features, or 0 for the single-level merge (the grid already fills the GPU, or the bags are short).
    Host integers only: no device read."""
    programs = n_bags * heads * triton.cdiv(dim, merge_config().block_d)
    group = MERGE_GROUP_TILES
    if programs >= MERGE_MIN_PROGRAMS or n_tiles <= MERGE_MIN_GROUPS_PER_BAG * group * n_bags:
        return 0
    return group


def merge_groups_bound(n_tiles: int, n_bags: int, group: int) -> int:
    """Rows to allocate for the group table: ``sum_b cdiv(tiles_b, group) <= cdiv(T, group) + B`` (and ``<= T``).
    The exact count lives on the device (``bag_groups[B]``); programs past it get an empty tile range, and their
    rows are never read."""
    return min(n_tiles, triton.cdiv(n_tiles, group) + n_bags)


@triton.jit
def tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Tile ``t``: its first row (int64 scalar), the int32 row offsets ``[BLOCK_N]`` inside the tile, which of
    them are inside the bag, and which participate (unmasked; ``mask`` is a contiguous bool ``[N]``).
    Addresses are a 64-bit base per tile plus 32-bit offsets inside it (small pointer arithmetic)."""
    start = tl.load(tile_start_ptr + t).to(tl.int64)
    n_rows = (tl.load(tile_end_ptr + t).to(tl.int64) - start).to(tl.int32)
    local = tl.arange(0, BLOCK_N)
    in_bag = local < n_rows
    valid = in_bag
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + start + local, mask=in_bag, other=0) != 0)
    return start, local, in_bag, valid


@triton.jit
def tile_softmax_stats(s, valid):
    """Local softmax statistics of one tile along axis 0: max ``m`` (``-inf`` if nothing is valid), the weights
    ``p = exp(s - m)`` (0 where not valid) and their sum ``l``. ``s``/``valid`` are ``[BLOCK_N]`` or
    ``[BLOCK_N, H_PAD]``."""
    s = tl.where(valid, s, float("-inf"))
    m = tl.max(s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.where(valid, tl.exp(s - m_safe), 0.0)
    return m, p, tl.sum(p, axis=0)


@triton.jit
def merge_tile_range(
    tile_max_ptr, tile_sum_ptr, partial_ptr, t0, t1, head, cols, col_ok, D, H, BLOCK_T: tl.constexpr,
):
    """Merge tiles ``t0:t1`` (head ``head``, feature columns ``cols``): ``M = max_t m_t`` (``-inf`` if no tile has
    a valid row), ``m_safe`` (``M``, 0 for ``-inf``), ``L = sum_t exp(m_t - m_safe) l_t`` and the vector ``sum_t
    exp(m_t - m_safe) partial_t``. A tile with ``l_t == 0`` (nothing valid) contributes nothing; a NaN ``l_t``
    is ``!= 0`` and reaches ``L`` and the vector (``0 * NaN`` is NaN too), never ``> 0``."""
    big_m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    for start in range(t0, t1, BLOCK_T):
        ts = start + tl.arange(0, BLOCK_T)
        big_m = tl.maximum(big_m, tl.load(tile_max_ptr + ts * H + head, mask=ts < t1, other=float("-inf")))
    m_all = tl.max(big_m, axis=0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for start in range(t0, t1, BLOCK_T):
        ts = start + tl.arange(0, BLOCK_T)
        t_ok = ts < t1
        m_t = tl.load(tile_max_ptr + ts * H + head, mask=t_ok, other=float("-inf"))
        l_t = tl.load(tile_sum_ptr + ts * H + head, mask=t_ok, other=0.0)
        scale = tl.where(t_ok & (l_t != 0), tl.exp(m_t - m_safe), 0.0)
        l_acc += scale * l_t
        part = tl.load(
            partial_ptr + (ts.to(tl.int64)[:, None] * H + head) * D + cols[None, :],
            mask=t_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc += tl.sum(scale[:, None] * part, axis=0)
    return m_all, m_safe, tl.sum(l_acc, axis=0), acc


@triton.jit
def merge_tiles_kernel(
    tile_max_ptr, tile_sum_ptr, partial_ptr, bag_tiles_ptr, pooled_ptr, lse_ptr,
    D, H,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B, H, cdiv(D, BLOCK_D))``. Combines the tiles ``bag_tiles[b]:bag_tiles[b+1]`` of bag ``b``:
    ``pooled[b, h] = sum_t exp(m_t - M) partial_t / L`` with ``M = max_t m_t``, ``L = sum_t exp(m_t - M) l_t``;
    stores ``lse[b, h] = M + log L`` (``+inf`` and a zero vector when ``L == 0``: empty or all-masked bag). A NaN
    anywhere in a bag's scores (a corrupted row, an fp16 overflow) makes some ``l_t`` NaN: the tests are ``!= 0``,
    never ``> 0``, so NaN reaches ``pooled`` and ``lse`` (as in torch) instead of turning the bag into an empty one.
    ``tile_max``/``tile_sum`` ``[T, H]``, ``partial [T, H, D]``, ``pooled [B, H, D]``, ``lse [B, H]``: fp32,
    contiguous (allocated by the launcher). The second level of the two-level merge runs this kernel on the group
    table of ``merge_groups_kernel`` (a group is a tile with the same ``m``, ``l``, partial meaning)."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    pid_d = tl.program_id(2)
    t0 = tl.load(bag_tiles_ptr + b)
    t1 = tl.load(bag_tiles_ptr + b + 1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m_all, m_safe, total, acc = merge_tile_range(
        tile_max_ptr, tile_sum_ptr, partial_ptr, t0, t1, head, cols, col_ok, D, H, BLOCK_T)
    pooled = tl.where(total != 0, acc / tl.where(total != 0, total, 1.0), 0.0)
    tl.store(pooled_ptr + (b.to(tl.int64) * H + head) * D + cols, pooled, mask=col_ok)
    if pid_d == 0:
        lse = tl.where(total != 0, m_safe + tl.log(tl.where(total != 0, total, 1.0)), float("inf"))
        tl.store(lse_ptr + b * H + head, lse)


@triton.jit
def merge_groups_kernel(
    tile_max_ptr, tile_sum_ptr, partial_ptr, bag_tiles_ptr,
    group_max_ptr, group_sum_ptr, group_partial_ptr, bag_groups_ptr,
    B, D, H, GROUP,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Grid ``(G_alloc, H, cdiv(D, BLOCK_D))``: first level of the two-level merge. Bag ``b`` is cut into
    ``cdiv(tiles_b, GROUP)`` groups of ``GROUP`` consecutive tiles (the last one shorter; an empty bag has none),
    numbered bag after bag: the groups of bag ``b`` are ``bag_groups[b]:bag_groups[b+1]``. Program ``g`` finds its
    group's tile range by a prefix sum over ``bag_tiles`` (read from the device: no host table, no sync) and
    stores the group as a tile: ``group_max[g, h] = max m_t`` (``-inf`` if nothing is valid), ``group_sum[g, h]
    = sum exp(m_t - max) l_t`` and ``group_partial[g, h] = sum exp(m_t - max) partial_t`` (:func:`merge_tile_range`:
    an all-masked group stores ``l = 0`` and contributes nothing to its bag, a NaN stays NaN). Programs past the
    last group (``G_alloc`` is an upper bound) get an empty range; their rows are never read. Program 0 also writes
    ``bag_groups [B+1]`` (same dtype as ``bag_tiles``). ``B`` bags, ``GROUP`` tiles per group; layouts as in
    ``merge_tiles_kernel``."""
    g = tl.program_id(0)
    head = tl.program_id(1)
    pid_d = tl.program_id(2)
    writes_table = (g == 0) & (head == 0) & (pid_d == 0)
    table_bags = tl.where(writes_table, B, 0)  # bags this program writes to bag_groups: all, or none
    groups_before = tl.zeros((), dtype=tl.int64)  # groups of the bags before this step's
    t0 = groups_before
    t1 = groups_before
    for b0 in range(0, B, BLOCK_B):
        bags = b0 + tl.arange(0, BLOCK_B)
        bag_ok = bags < B
        lo = tl.load(bag_tiles_ptr + bags, mask=bag_ok, other=0).to(tl.int64)
        hi = tl.load(bag_tiles_ptr + bags + 1, mask=bag_ok, other=0).to(tl.int64)
        n_groups = (hi - lo + GROUP - 1) // GROUP
        first_group = groups_before + tl.cumsum(n_groups, axis=0) - n_groups
        tl.store(bag_groups_ptr + bags, first_group, mask=bags < table_bags)
        hit = (first_group <= g) & (g < first_group + n_groups)  # one bag at most, none past the last group
        first_tile = lo + (g - first_group) * GROUP
        t0 += tl.sum(tl.where(hit, first_tile, 0), axis=0)
        t1 += tl.sum(tl.where(hit, tl.minimum(first_tile + GROUP, hi), 0), axis=0)
        groups_before += tl.sum(n_groups, axis=0)
    tl.store(bag_groups_ptr + B, groups_before, mask=writes_table)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    m_all, m_safe, total, acc = merge_tile_range(
        tile_max_ptr, tile_sum_ptr, partial_ptr, t0, t1, head, cols, col_ok, D, H, BLOCK_T)
    tl.store(group_partial_ptr + (g.to(tl.int64) * H + head) * D + cols, acc, mask=col_ok)
    if pid_d == 0:
        tl.store(group_max_ptr + g * H + head, m_all)
        tl.store(group_sum_ptr + g * H + head, total)


@triton.jit
def normalize_weights_kernel(
    scores_ptr, mask_ptr, tile_bag_ptr, tile_start_ptr, tile_end_ptr, lse_ptr, weights_ptr,
    H, stride_s, stride_w,
    BLOCK_N: tl.constexpr, H_PAD: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Grid ``(T,)``. ``weights[i, h] = exp(s[i, h] - lse[bag(i), h])`` on valid rows, 0 on masked rows.
    ``scores [N, H]`` (row stride ``stride_s``) and ``weights [N, H]`` fp32 (row stride ``stride_w``) have unit
    column stride; ``weights`` may alias ``scores`` (the gated forward does this)."""
    t = tl.program_id(0)
    start, local, in_bag, valid = tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N, HAS_MASK)
    b = tl.load(tile_bag_ptr + t)
    heads = tl.arange(0, H_PAD)
    head_ok = heads < H
    ok = valid[:, None] & head_ok[None, :]
    rows = start + local[:, None]
    s = tl.load(scores_ptr + rows * stride_s + heads[None, :], mask=ok, other=0.0)
    lse = tl.load(lse_ptr + b * H + heads, mask=head_ok, other=float("inf"))
    w = tl.where(ok, tl.exp(s.to(tl.float32) - lse[None, :]), 0.0)
    tl.store(weights_ptr + rows * stride_w + heads[None, :], w, mask=in_bag[:, None] & head_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# launches
# ----------------------------------------------------------------------------------------------------------------
def merge_launch(
    tile_max: torch.Tensor, tile_sum: torch.Tensor, partial: torch.Tensor, bag_tiles: torch.Tensor,
    pooled: torch.Tensor, lse: torch.Tensor,
) -> Launch:
    """Merge the tiles of every bag: ``tile_max``/``tile_sum`` ``[T, H]``, ``partial [T, H, D]``,
    ``bag_tiles`` int64 ``[B+1]`` -> ``pooled [B, H, D]``, ``lse [B, H]`` (fp32, contiguous)."""
    n_bags, heads, dim = pooled.shape
    cfg = merge_config()
    return Launch(
        merge_tiles_kernel, (n_bags, heads, triton.cdiv(dim, cfg.block_d)),
        dict(tile_max_ptr=tile_max, tile_sum_ptr=tile_sum, partial_ptr=partial, bag_tiles_ptr=bag_tiles,
             pooled_ptr=pooled, lse_ptr=lse, D=dim, H=heads, BLOCK_T=cfg.block_n, BLOCK_D=cfg.block_d),
        cfg.num_warps, cfg.num_stages,
    )


def merge_groups_launch(
    tile_max: torch.Tensor, tile_sum: torch.Tensor, partial: torch.Tensor, bag_tiles: torch.Tensor,
    group_max: torch.Tensor, group_sum: torch.Tensor, group_partial: torch.Tensor, bag_groups: torch.Tensor,
    group: int,
) -> Launch:
    """First level of the two-level merge: tiles (``tile_max``/``tile_sum`` ``[T, H]``, ``partial [T, H, D]``,
    ``bag_tiles [B+1]``) -> groups of ``group`` tiles (``group_max``/``group_sum`` ``[G, H]``, ``group_partial
    [G, H, D]`` with ``G = merge_groups_bound(T, B, group)`` rows, fp32, and ``bag_groups [B+1]`` in
    ``bag_tiles``' dtype). :func:`merge_launch` on the groups finishes the merge."""
    n_groups, heads, dim = group_partial.shape
    cfg = merge_config()
    return Launch(
        merge_groups_kernel, (n_groups, heads, triton.cdiv(dim, cfg.block_d)),
        dict(tile_max_ptr=tile_max, tile_sum_ptr=tile_sum, partial_ptr=partial, bag_tiles_ptr=bag_tiles,
             group_max_ptr=group_max, group_sum_ptr=group_sum, group_partial_ptr=group_partial,
             bag_groups_ptr=bag_groups, B=bag_tiles.numel() - 1, D=dim, H=heads, GROUP=group,
             BLOCK_T=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_B=MERGE_BLOCK_B),
        cfg.num_warps, cfg.num_stages,
    )


def normalize_launch(
    scores: torch.Tensor, mask: torch.Tensor | None, tile_bag: torch.Tensor, tile_start: torch.Tensor,
    tile_end: torch.Tensor, lse: torch.Tensor, weights: torch.Tensor, block_n: int,
) -> Launch:
    """``weights [N, H] = exp(scores - lse[bag])`` (0 where ``mask`` is False), one program per tile of
    ``block_n`` rows (the tile size of the op's tile kernel, which built the table)."""
    heads = scores.shape[1]
    return Launch(
        normalize_weights_kernel, (tile_bag.numel(),),
        dict(scores_ptr=scores, mask_ptr=tile_start if mask is None else mask, tile_bag_ptr=tile_bag,
             tile_start_ptr=tile_start, tile_end_ptr=tile_end, lse_ptr=lse, weights_ptr=weights,
             H=heads, stride_s=scores.stride(0), stride_w=weights.stride(0),
             BLOCK_N=block_n, H_PAD=1 if heads == 1 else pow2_at_least(heads), HAS_MASK=mask is not None),
        NORMALIZE_WARPS, DEFAULT_NUM_STAGES, strided=("scores_ptr", "weights_ptr"),
    )


def aot_launches() -> Iterator[Launch]:
    """The two-level merge over representative arguments: ``merge_groups_kernel`` and the second-level
    ``merge_tiles_kernel`` on its group table, for every runtime specialisation class of their integers (bags
    ``B``: 1, a multiple of 16, other; heads: 1, a multiple of 16, other; the feature widths of ``AOT_DIMS``;
    ``GROUP = MERGE_GROUP_TILES``). The single-level merge and the weight normalisation are yielded by the ops'
    modules with their shapes."""
    t = AotTiles()
    f32 = lambda *shape: torch.zeros(*shape)  # noqa: E731
    n_groups = 3
    for dim in AOT_DIMS:
        for heads in (1, 3, 16):
            stats, partial = f32(t.n_tiles, heads), f32(t.n_tiles, heads, dim)
            group_stats, group_partial = f32(n_groups, heads), f32(n_groups, heads, dim)
            for n_bags in (1, 2, 16):
                bag_tiles = torch.zeros(n_bags + 1, dtype=t.bag_tiles.dtype)
                bag_groups = torch.zeros_like(bag_tiles)
                yield merge_groups_launch(stats, stats, partial, bag_tiles, group_stats, group_stats, group_partial,
                                          bag_groups, MERGE_GROUP_TILES)
                yield merge_launch(group_stats, group_stats, group_partial, bag_groups, f32(n_bags, heads, dim),
                                   f32(n_bags, heads))
