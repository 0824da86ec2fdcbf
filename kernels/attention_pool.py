"""Triton kernels of ``attention_pool`` with given scores (1..32 heads), forward and backward.

- ``pool_fwd_tile_kernel``  one program per tile (``_tiled_softmax`` explains tiles): tile softmax statistics
                            and the partial pooled vectors ``[T, H, D]`` via ``tl.dot``; the shared merge and
                            weight-normalisation kernels finish the forward.
- ``pool_bwd_tile_kernel``  grads of scores and values from the saved weights.

Every ``[N, *]`` input and output is addressed with its own row stride (unit column stride); the launch
functions below are the only place the arguments are assembled (``fastmil.ops.attention_pool`` runs them,
``make aot`` compiles them). Precision: loads are cast to fp32, accumulation is fp32; ``DOT_PRECISION`` picks
the mode of the fp32 ``tl.dot`` products (``_launch.dot_precision``: 3xTF32, fp32-level, for every value dtype,
since the softmax weights, ``grad_pooled`` and fp32 values are not TF32 numbers; TF32 rounded to nearest only for
fp32 values under ``allow_tf32``), run by ``_dot.fp32_dot`` (which splits only the fp32 operand when the other
is an fp16/bf16 value). No atomics: deterministic.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._dot import fp32_dot
from ._launch import AOT_DIMS, AotTiles, KernelConfig, Launch, aot_views, dot_precision, pow2_at_least
from ._tiled_softmax import merge_launch, normalize_launch, tile_rows, tile_softmax_stats
from .limits import MAX_HEADS

__all__ = ["MAX_HEADS", "aot_launches", "pool_bwd_config", "pool_bwd_launch", "pool_bwd_tile_kernel", "pool_config",
           "pool_fwd_launch", "pool_fwd_tile_kernel"]


def pool_config(heads: int, dtype: torch.dtype) -> KernelConfig:
    """Tile config of the forward tile kernel (and the tile size of the op) for ``heads`` heads of ``dtype``
    values. Every dtype's weighted sum is a 3xTF32 dot (``_launch.dot_precision``); fp32 values, whose split
    doubles the registers of the big operand too, and 17..32 heads get narrower tiles."""
    if pow2_at_least(heads) <= 16 and dtype != torch.float32:
        return KernelConfig(block_n=64, block_d=64, num_warps=4)
    return KernelConfig(block_n=32, block_d=32, num_warps=4)


def pool_bwd_config(heads: int, dtype: torch.dtype) -> KernelConfig:
    """Config of the backward tile kernel: the forward's tile size (the tile table is shared) and a narrower
    D block, since it holds two ``[BLOCK_N, BLOCK_D]`` products (``u`` and ``grad_values``) at once."""
    fwd = pool_config(heads, dtype)
    if pow2_at_least(heads) == 32:  # 3xTF32 operands (every dtype) for 32 heads: spread them
        return KernelConfig(block_n=fwd.block_n, block_d=16, num_warps=8, num_stages=fwd.num_stages)
    return KernelConfig(block_n=fwd.block_n, block_d=32, num_warps=fwd.num_warps, num_stages=fwd.num_stages)


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def pool_fwd_tile_kernel(
    scores_ptr, values_ptr, mask_ptr, tile_start_ptr, tile_end_ptr,
    tile_max_ptr, tile_sum_ptr, partial_ptr,
    D, H, stride_s, stride_v,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, H_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T,)``. Reads scores ``[N, H]`` and values ``[N, D]``; writes ``tile_max``/``tile_sum`` ``[T, H]``
    and ``partial [T, H, D]`` (fp32, contiguous: ``sum_i exp(s_i - m) v_i`` over the tile's valid rows)."""
    t = tl.program_id(0)
    start, local, in_bag, valid = tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N, HAS_MASK)
    heads = tl.arange(0, H_PAD)
    head_ok = heads < H
    ok = valid[:, None] & head_ok[None, :]
    s = tl.load(scores_ptr + start * stride_s + local[:, None] * stride_s + heads[None, :], mask=ok, other=0.0)
    m, p, l_sum = tile_softmax_stats(s.to(tl.float32), ok)
    tl.store(tile_max_ptr + t * H + heads, m, mask=head_ok)
    tl.store(tile_sum_ptr + t * H + heads, l_sum, mask=head_ok)
    p_t = tl.trans(p)  # [H_PAD, BLOCK_N]
    v_base = values_ptr + start * stride_v
    out_base = partial_ptr + t.to(tl.int64) * H * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x_ok = in_bag[:, None] & col_ok[None, :]
        x = tl.load(v_base + local[:, None] * stride_v + cols[None, :], mask=x_ok, other=0.0)
        acc = fp32_dot(p_t, x, tl.zeros((H_PAD, BLOCK_D), dtype=tl.float32), DOT_PRECISION)  # [H_PAD, BLOCK_D]
        tl.store(out_base + heads[:, None] * D + cols[None, :], acc, mask=head_ok[:, None] & col_ok[None, :])


@triton.jit
def pool_bwd_tile_kernel(
    values_ptr, weights_ptr, grad_pooled_ptr, bag_dot_ptr, grad_weights_ptr,
    tile_bag_ptr, tile_start_ptr, tile_end_ptr,
    grad_scores_ptr, grad_values_ptr,
    D, H, stride_v, stride_gv,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, H_PAD: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, NEED_GRAD_VALUES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T,)``. With ``a = weights [N, H]`` (saved, 0 on masked rows), ``g = grad_pooled [B, H, D]``:
    ``u_ih = g_bh . v_i (+ grad_weights_ih)``, ``grad_scores_ih = a_ih (u_ih - c_bh)`` where
    ``c_bh = bag_dot[b, h] = g_bh . pooled_bh (+ sum_i a_ih grad_weights_ih)``; ``grad_values_i = sum_h a_ih g_bh``.
    ``values`` has row stride ``stride_v``, ``grad_values`` its own ``stride_gv``; ``weights``,
    ``grad_weights`` and ``grad_scores`` are contiguous ``[N, H]`` fp32."""
    t = tl.program_id(0)
    start, local, in_bag, _ = tile_rows(tile_start_ptr, tile_end_ptr, tile_start_ptr, t, BLOCK_N, False)
    b = tl.load(tile_bag_ptr + t).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    head_ok = heads < H
    row_head = in_bag[:, None] & head_ok[None, :]
    rh_off = start * H + local[:, None] * H + heads[None, :]
    a = tl.load(weights_ptr + rh_off, mask=row_head, other=0.0)
    u = tl.zeros((BLOCK_N, H_PAD), dtype=tl.float32)
    g_base = grad_pooled_ptr + b * H * D
    v_base = values_ptr + start * stride_v
    gv_base = grad_values_ptr + start * stride_gv
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x_ok = in_bag[:, None] & col_ok[None, :]
        x = tl.load(v_base + local[:, None] * stride_v + cols[None, :], mask=x_ok, other=0.0)
        g = tl.load(g_base + heads[:, None] * D + cols[None, :], mask=head_ok[:, None] & col_ok[None, :], other=0.0)
        u = fp32_dot(x, tl.trans(g), u, DOT_PRECISION)
        if NEED_GRAD_VALUES:
            gv = fp32_dot(a, g, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
            tl.store(gv_base + local[:, None] * stride_gv + cols[None, :], gv.to(grad_values_ptr.dtype.element_ty),
                     mask=x_ok)
    if HAS_GRAD_WEIGHTS:
        u += tl.load(grad_weights_ptr + rh_off, mask=row_head, other=0.0).to(tl.float32)
    c = tl.load(bag_dot_ptr + b * H + heads, mask=head_ok, other=0.0)
    ds = a * (u - c[None, :])
    tl.store(grad_scores_ptr + rh_off, ds, mask=row_head)


# ----------------------------------------------------------------------------------------------------------------
# launches (shared by fastmil.ops.attention_pool and make aot)
# ----------------------------------------------------------------------------------------------------------------
def pool_fwd_launch(
    scores: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
    tile_start: torch.Tensor, tile_end: torch.Tensor,
    tile_max: torch.Tensor, tile_sum: torch.Tensor, partial: torch.Tensor,
) -> Launch:
    """Tile kernel of the forward: ``scores [N, H]``, ``values [N, D]`` (unit column strides), ``mask`` bool
    ``[N]`` contiguous or None -> ``tile_max``/``tile_sum`` ``[T, H]``, ``partial [T, H, D]`` fp32."""
    heads, dim = scores.shape[1], values.shape[1]
    cfg = pool_config(heads, values.dtype)
    return Launch(
        pool_fwd_tile_kernel, (tile_start.numel(),),
        dict(scores_ptr=scores, values_ptr=values, mask_ptr=tile_start if mask is None else mask,
             tile_start_ptr=tile_start, tile_end_ptr=tile_end, tile_max_ptr=tile_max, tile_sum_ptr=tile_sum,
             partial_ptr=partial, D=dim, H=heads, stride_s=scores.stride(0), stride_v=values.stride(0),
             BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, H_PAD=pow2_at_least(heads), HAS_MASK=mask is not None,
             DOT_PRECISION=dot_precision(values.dtype)),
        cfg.num_warps, cfg.num_stages, strided=("scores_ptr", "values_ptr"),
    )


def pool_bwd_launch(
    values: torch.Tensor, weights: torch.Tensor, grad_pooled: torch.Tensor, bag_dot: torch.Tensor,
    grad_weights: torch.Tensor | None, tile_bag: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor,
    grad_scores: torch.Tensor, grad_values: torch.Tensor | None,
) -> Launch:
    """Backward tile kernel: ``grad_scores [N, H]`` fp32 and, when ``grad_values`` is given, ``grad_values
    [N, D]`` (its own row stride, the dtype of ``values``)."""
    heads, dim = weights.shape[1], values.shape[1]
    cfg = pool_bwd_config(heads, values.dtype)
    gv = values if grad_values is None else grad_values  # never written when NEED_GRAD_VALUES is False
    return Launch(
        pool_bwd_tile_kernel, (tile_bag.numel(),),
        dict(values_ptr=values, weights_ptr=weights, grad_pooled_ptr=grad_pooled, bag_dot_ptr=bag_dot,
             grad_weights_ptr=weights if grad_weights is None else grad_weights, tile_bag_ptr=tile_bag,
             tile_start_ptr=tile_start, tile_end_ptr=tile_end, grad_scores_ptr=grad_scores, grad_values_ptr=gv,
             D=dim, H=heads, stride_v=values.stride(0), stride_gv=gv.stride(0),
             BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, H_PAD=pow2_at_least(heads),
             HAS_GRAD_WEIGHTS=grad_weights is not None, NEED_GRAD_VALUES=grad_values is not None,
             DOT_PRECISION=dot_precision(values.dtype)),
        cfg.num_warps, cfg.num_stages, strided=("values_ptr", "grad_values_ptr"),
    )


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time specialisations (discovered by fastmil.aot)
# ----------------------------------------------------------------------------------------------------------------
AOT_HEADS = (1, 4, 16, 17, 32)
"""Head counts fed to the launchers: every class Triton specialises an integer into, for both ``H_PAD``
values: 1 (a constant), 4 and 17 (no hint), 16 and 32 (divisible by 16)."""


def aot_launches() -> Iterator[Launch]:
    """Every launch of this op over representative arguments: value dtypes (and both fp32 dot precisions, via
    ``fastmil.aot``), heads, masks, gradient flags, feature widths and canonical row layouts. Scores reach the
    kernels as fp32 (the op converts them: the kernels read them once, in fp32)."""
    t = AotTiles()
    n, n_tiles, n_bags = t.n, t.n_tiles, t.n_bags
    tile_bag, tile_start, tile_end, bag_tiles = t.tile_bag, t.tile_start, t.tile_end, t.bag_tiles
    f32 = lambda *shape: torch.zeros(*shape)  # noqa: E731
    for vdt in (torch.float32, torch.float16, torch.bfloat16):
        for dim in AOT_DIMS:
            for values in aot_views(n, dim, vdt):
                for heads in AOT_HEADS:
                    stats, partial, scores = f32(n_tiles, heads), f32(n_tiles, heads, dim), f32(n, heads)
                    for mask in (None, torch.ones(n, dtype=torch.bool)):
                        yield pool_fwd_launch(scores, values, mask, tile_start, tile_end, stats, stats, partial)
                        yield normalize_launch(scores, mask, tile_bag, tile_start, tile_end, f32(n_bags, heads),
                                               f32(n, heads), pool_config(heads, vdt).block_n)
                    yield merge_launch(stats, stats, partial, bag_tiles, f32(n_bags, heads, dim), f32(n_bags, heads))
                    weights = f32(n, heads)
                    for grad_weights in (None, weights):
                        for grad_values in (None, torch.zeros(n, dim, dtype=vdt)):  # the op allocates it
                            yield pool_bwd_launch(values, weights, f32(n_bags, heads, dim), f32(n_bags, heads),
                                                  grad_weights, tile_bag, tile_start, tile_end, weights, grad_values)
