"""Tiled per-bag softmax pooling, the part every attention-pooling op shares (the scheme is explained once, in
``docs/architecture.md``, "Kernels").

- ``merge_tiles_kernel``        per (bag, head, D block): pooled ``[B, H, D]`` and the per-bag log-sum-exp
                                ``[B, H]`` (``+inf`` for a bag with no unmasked instance, so its weights are 0).
- ``normalize_weights_kernel``  weights ``exp(s - lse)`` on unmasked rows, 0 elsewhere.
- ``tile_rows`` / ``tile_softmax_stats``  ``@triton.jit`` helpers of the ops' tile kernels.

Loads are cast to fp32; statistics and accumulators are fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import DEFAULT_NUM_STAGES, KernelConfig, Launch, pow2_at_least

__all__ = [
    "merge_config", "merge_launch", "merge_tiles_kernel", "normalize_launch", "normalize_weights_kernel",
    "tile_rows", "tile_softmax_stats",
]


def merge_config() -> KernelConfig:
    """Config of ``merge_tiles_kernel`` (``block_n`` = tiles merged per step)."""
    return KernelConfig(block_n=32, block_d=128, num_warps=4)


NORMALIZE_WARPS = 4


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
    contiguous (allocated by the launcher)."""
    b = tl.program_id(0)
    head = tl.program_id(1)
    pid_d = tl.program_id(2)
    t0 = tl.load(bag_tiles_ptr + b)
    t1 = tl.load(bag_tiles_ptr + b + 1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    big_m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    for start in range(t0, t1, BLOCK_T):
        ts = start + tl.arange(0, BLOCK_T)
        big_m = tl.maximum(big_m, tl.load(tile_max_ptr + ts * H + head, mask=ts < t1, other=float("-inf")))
    m_all = tl.max(big_m, axis=0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
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
    total = tl.sum(l_acc, axis=0)
    pooled = tl.where(total != 0, acc / tl.where(total != 0, total, 1.0), 0.0)
    tl.store(pooled_ptr + (b.to(tl.int64) * H + head) * D + cols, pooled, mask=col_ok)
    if pid_d == 0:
        lse = tl.where(total != 0, m_safe + tl.log(tl.where(total != 0, total, 1.0)), float("inf"))
        tl.store(lse_ptr + b * H + head, lse)


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
