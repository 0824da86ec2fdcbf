"""Triton kernels of ``graph_attention``: GAT aggregation over a stencil neighbour table, forward and backward.

Per row ``i`` and head ``h``: ``e_ij = LeakyReLU(dst[i, h] + src[j, h])`` over ``j`` in ``nbr[i, :]`` (slots holding
-1 are skipped) and ``i`` itself when ``SELF_LOOP``; ``alpha = softmax_j(e)``; ``out[i, h] = sum_j alpha_ij x[j, h]``.
The ``E x C`` gathered tensor never exists: each program gathers one neighbour row block at a time and folds it
into an online softmax.

- ``gat_fwd_kernel``   grid (row blocks, heads, channel blocks): ``out`` and, from channel block 0, the per-row
                       log-sum-exp ``lse [N, H]`` (all backward needs besides the inputs).
- ``gat_edge_kernel``  grid (row blocks, heads): per row ``i`` its ``delta_i = <dout_i, out_i>``, then per edge
                       ``dpre_ij = alpha_ij (<dout_i, x_j> - delta_i) LeakyReLU'(.)`` into ``dpre [N, K+1, H]``
                       (slot K = the self loop; an ``E x H`` table, not ``E x C``) and ``ddst_i = sum_j dpre_ij``.
- ``gat_pull_kernel``  grid (row blocks, heads, channel blocks): per row ``j``, the gradients it receives, pulled
                       from the rows ``i`` that attend to it. The table is a symmetric stencil (slot ``K-1-s`` is
                       the reverse of slot ``s``), so those rows are exactly ``nbr[j, :]``, and ``j`` sits in slot
                       ``K-1-s`` of ``i = nbr[j, s]``: ``dx_j = sum_i alpha_ij dout_i`` (``alpha_ij`` recomputed
                       from ``dst_i``, ``src_j``, ``lse_i``) and ``dsrc_j = sum_i dpre[i, K-1-s]``. Each output row
                       is written by one program: no atomics, deterministic.

Every load is cast to fp32 (the interpreter's bf16 arithmetic is wrong, and fp32 accumulation is wanted anyway);
outputs are cast to their tensors' dtypes on store. Row indices are int64 (``N x H x C`` passes 2^31 at scale).
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._launch import DEFAULT_NUM_STAGES, Launch

__all__ = ["aot_launches", "block_c", "gat_bwd_buffers", "gat_edge_kernel", "gat_edge_launch", "gat_fwd_buffers",
           "gat_fwd_kernel", "gat_fwd_launch", "gat_pull_kernel", "gat_pull_launch"]

BLOCK_N = 32
"""Rows per program."""
MAX_BLOCK_C = 64
"""Channels per program (wider heads are split over the grid's third axis)."""
EDGE_BLOCK_C = 32
"""Channel chunk of the edge kernel's row dot products (it loops over all C per edge; 64 spills 16 B on sm_90 for
one head of 256 channels with triton 3.9)."""
_WARPS = 4


def block_c(channels: int) -> int:
    """Channel block of a head of ``channels``: the next power of two, at most ``MAX_BLOCK_C``, at least 16."""
    return min(MAX_BLOCK_C, max(16, triton.next_power_of_2(channels)))


@triton.jit
def _row_block(n_rows, BLOCK_N: tl.constexpr):
    """This program's head (grid axis 1) and block of rows (axis 0, int64 for the address arithmetic), with the
    in-range mask: the prologue every graph kernel shares."""
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    return tl.program_id(1), rows, rows < n_rows


@triton.jit
def _channel_block(C: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's block of channels (grid axis 2) and its in-range mask."""
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _leaky(x, slope):
    return tl.where(x > 0, x, x * slope)


@triton.jit
def gat_fwd_kernel(
    x_ptr, nbr_ptr, src_ptr, dst_ptr, out_ptr, lse_ptr, n_rows, slope,
    K: tl.constexpr, HEADS: tl.constexpr, C: tl.constexpr, SELF_LOOP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    h, rows, in_rows = _row_block(n_rows, BLOCK_N)
    cols, in_cols = _channel_block(C, BLOCK_C)
    dst = tl.load(dst_ptr + rows * HEADS + h, mask=in_rows, other=0.0).to(tl.float32)
    if SELF_LOOP:
        src = tl.load(src_ptr + rows * HEADS + h, mask=in_rows, other=0.0).to(tl.float32)
        m = _leaky(dst + src, slope)
        denom = tl.full([BLOCK_N], 1.0, tl.float32)
        acc = tl.load(x_ptr + rows[:, None] * (HEADS * C) + h * C + cols[None, :],
                      mask=in_rows[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
    else:
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        denom = tl.zeros([BLOCK_N], tl.float32)
        acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    for s in range(K):
        j = tl.load(nbr_ptr + rows * K + s, mask=in_rows, other=-1).to(tl.int64)
        ok = j >= 0
        e = _leaky(dst + tl.load(src_ptr + j * HEADS + h, mask=ok, other=0.0).to(tl.float32), slope)
        e = tl.where(ok, e, float("-inf"))
        m_new = tl.maximum(m, e)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - m_ref)
        p = tl.exp(e - m_ref)
        xj = tl.load(x_ptr + j[:, None] * (HEADS * C) + h * C + cols[None, :],
                     mask=ok[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
        denom = denom * scale + p
        acc = acc * scale[:, None] + p[:, None] * xj
        m = m_new
    has_edges = denom != 0  # NaN (a NaN score or feature) propagates; only a row without edges gives zeros
    inv = tl.where(has_edges, 1.0 / tl.where(has_edges, denom, 1.0), 0.0)
    tl.store(out_ptr + rows[:, None] * (HEADS * C) + h * C + cols[None, :],
             (acc * inv[:, None]).to(out_ptr.dtype.element_ty), mask=in_rows[:, None] & in_cols[None, :])
    if tl.program_id(2) == 0:
        lse = tl.where(has_edges, m + tl.log(tl.where(has_edges, denom, 1.0)), float("-inf"))
        tl.store(lse_ptr + rows * HEADS + h, lse, mask=in_rows)


@triton.jit
def _row_dot(a_ptr, b_ptr, a_rows, b_rows, h, ok,
             HEADS: tl.constexpr, C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``<a[a_rows, h, :], b[b_rows, h, :]>`` per row, over all C channels, in fp32."""
    total = tl.zeros([BLOCK_N], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m2 = ok[:, None] & (cols < C)[None, :]
        a = tl.load(a_ptr + a_rows[:, None] * (HEADS * C) + h * C + cols[None, :], mask=m2, other=0.0)
        b = tl.load(b_ptr + b_rows[:, None] * (HEADS * C) + h * C + cols[None, :], mask=m2, other=0.0)
        total += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    return total


@triton.jit
def _edge_term(x_ptr, src_ptr, dout_ptr, dpre_ptr, rows, in_rows, j, ok, slot, dst, lse_ref, has_edges, delta, h, slope,
               HEADS: tl.constexpr, C: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``dpre`` of the edges ``rows -> j`` (0 where not ``ok``), stored in ``slot`` of ``dpre [N, K+1, H]`` and
    returned for ``ddst``. Without self loops slot K is never written (nor read)."""
    pre = dst + tl.load(src_ptr + j * HEADS + h, mask=ok, other=0.0).to(tl.float32)
    alpha = tl.where(ok & has_edges, tl.exp(_leaky(pre, slope) - lse_ref), 0.0)
    g = _row_dot(dout_ptr, x_ptr, rows, j, h, ok, HEADS, C, BLOCK_N, BLOCK_C)
    dpre = alpha * (g - delta) * tl.where(pre > 0, 1.0, slope)
    tl.store(dpre_ptr + (rows * (K + 1) + slot) * HEADS + h, dpre, mask=in_rows)
    return dpre


@triton.jit
def gat_edge_kernel(
    x_ptr, nbr_ptr, src_ptr, dst_ptr, out_ptr, lse_ptr, dout_ptr, dpre_ptr, ddst_ptr, n_rows, slope,
    K: tl.constexpr, HEADS: tl.constexpr, C: tl.constexpr, SELF_LOOP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    h, rows, in_rows = _row_block(n_rows, BLOCK_N)
    dst = tl.load(dst_ptr + rows * HEADS + h, mask=in_rows, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows * HEADS + h, mask=in_rows, other=float("-inf"))
    has_edges = lse != float("-inf")
    lse_ref = tl.where(has_edges, lse, 0.0)
    delta = _row_dot(dout_ptr, out_ptr, rows, rows, h, in_rows, HEADS, C, BLOCK_N, BLOCK_C)
    ddst = tl.zeros([BLOCK_N], tl.float32)
    if SELF_LOOP:
        ddst += _edge_term(x_ptr, src_ptr, dout_ptr, dpre_ptr, rows, in_rows, rows, in_rows, K, dst, lse_ref, has_edges,
                           delta, h, slope, HEADS, C, K, BLOCK_N, BLOCK_C)
    for s in range(K):
        j = tl.load(nbr_ptr + rows * K + s, mask=in_rows, other=-1).to(tl.int64)
        ddst += _edge_term(x_ptr, src_ptr, dout_ptr, dpre_ptr, rows, in_rows, j, j >= 0, s, dst, lse_ref, has_edges,
                           delta, h, slope, HEADS, C, K, BLOCK_N, BLOCK_C)
    tl.store(ddst_ptr + rows * HEADS + h, ddst.to(ddst_ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def _pull_term(dst_ptr, lse_ptr, dout_ptr, dpre_ptr, i, ok, back, src, cols, in_cols, h, slope, dx, dsrc,
               HEADS: tl.constexpr, C: tl.constexpr, K: tl.constexpr):
    """Add what the rows ``i`` (where ``ok``) send back along their edge to this row (their slot ``back``):
    ``alpha_i,this dout_i`` to ``dx`` and ``dpre[i, back]`` to ``dsrc``."""
    dst_i = tl.load(dst_ptr + i * HEADS + h, mask=ok, other=0.0).to(tl.float32)
    lse_i = tl.load(lse_ptr + i * HEADS + h, mask=ok, other=float("-inf"))
    live = ok & (lse_i != float("-inf"))
    alpha = tl.where(live, tl.exp(_leaky(dst_i + src, slope) - tl.where(live, lse_i, 0.0)), 0.0)
    dout_i = tl.load(dout_ptr + i[:, None] * (HEADS * C) + h * C + cols[None, :],
                     mask=ok[:, None] & in_cols[None, :], other=0.0).to(tl.float32)
    dx += alpha[:, None] * dout_i
    dsrc += tl.load(dpre_ptr + (i * (K + 1) + back) * HEADS + h, mask=ok, other=0.0)
    return dx, dsrc


@triton.jit
def gat_pull_kernel(
    nbr_ptr, src_ptr, dst_ptr, lse_ptr, dout_ptr, dpre_ptr, dx_ptr, dsrc_ptr, n_rows, slope,
    K: tl.constexpr, HEADS: tl.constexpr, C: tl.constexpr, SELF_LOOP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    h, rows, in_rows = _row_block(n_rows, BLOCK_N)
    cols, in_cols = _channel_block(C, BLOCK_C)
    src = tl.load(src_ptr + rows * HEADS + h, mask=in_rows, other=0.0).to(tl.float32)
    dx = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
    dsrc = tl.zeros([BLOCK_N], tl.float32)
    if SELF_LOOP:
        dx, dsrc = _pull_term(dst_ptr, lse_ptr, dout_ptr, dpre_ptr, rows, in_rows, K, src, cols, in_cols, h, slope,
                              dx, dsrc, HEADS, C, K)
    for s in range(K):
        i = tl.load(nbr_ptr + rows * K + s, mask=in_rows, other=-1).to(tl.int64)
        # this row sits in slot K-1-s of row i's table
        dx, dsrc = _pull_term(dst_ptr, lse_ptr, dout_ptr, dpre_ptr, i, i >= 0, K - 1 - s, src, cols, in_cols, h,
                              slope, dx, dsrc, HEADS, C, K)
    tl.store(dx_ptr + rows[:, None] * (HEADS * C) + h * C + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=in_rows[:, None] & in_cols[None, :])
    if tl.program_id(2) == 0:
        tl.store(dsrc_ptr + rows * HEADS + h, dsrc.to(dsrc_ptr.dtype.element_ty), mask=in_rows)


# ----------------------------------------------------------------------------------------------------------------
# launches (shared by fastmil.ops.graph_attention and make aot)
# ----------------------------------------------------------------------------------------------------------------
def _shape_args(x: torch.Tensor, nbr: torch.Tensor, self_loop: bool, max_block_c: int = MAX_BLOCK_C) -> dict:
    n, heads, channels = x.shape
    return dict(n_rows=n, K=nbr.shape[1], HEADS=heads, C=channels, SELF_LOOP=self_loop, BLOCK_N=BLOCK_N,
                BLOCK_C=min(max_block_c, block_c(channels)))


def _grid(x: torch.Tensor, channel_blocks: bool) -> tuple[int, int, int]:
    n, heads, channels = x.shape
    return (triton.cdiv(n, BLOCK_N), heads, triton.cdiv(channels, block_c(channels)) if channel_blocks else 1)


def gat_fwd_buffers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's outputs for ``x [N, H, C]``: ``out [N, H, C]`` in x's dtype and ``lse`` fp32 ``[N, H]``. The op
    and :func:`aot_launches` both allocate them here, so the checked pointer dtypes are the ones that run."""
    n, heads = x.shape[0], x.shape[1]
    return torch.empty_like(x), torch.empty(n, heads, dtype=torch.float32, device=x.device)


def gat_bwd_buffers(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's outputs for ``x [N, H, C]`` and ``k`` slots: ``dpre`` fp32 ``[N, k+1, H]``, the score
    gradients ``ddst``/``dsrc`` fp32 ``[N, H]`` (the op casts them to the scores' dtypes) and ``dx`` in x's dtype."""
    n, heads = x.shape[0], x.shape[1]
    dpre = torch.empty(n, k + 1, heads, dtype=torch.float32, device=x.device)
    ddst = torch.empty(n, heads, dtype=torch.float32, device=x.device)
    return dpre, ddst, torch.empty_like(ddst), torch.empty_like(x)


def gat_fwd_launch(x: torch.Tensor, nbr: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, slope: float, self_loop: bool) -> Launch:
    """Forward: writes ``out [N, H, C]`` (x's dtype) and ``lse`` fp32 ``[N, H]``."""
    return Launch(gat_fwd_kernel, _grid(x, True),
                  dict(x_ptr=x, nbr_ptr=nbr, src_ptr=src, dst_ptr=dst, out_ptr=out, lse_ptr=lse, slope=slope,
                       **_shape_args(x, nbr, self_loop)),
                  _WARPS, DEFAULT_NUM_STAGES)


def gat_edge_launch(x: torch.Tensor, nbr: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, dout: torch.Tensor, dpre: torch.Tensor, ddst: torch.Tensor, slope: float,
                    self_loop: bool) -> Launch:
    """Backward, per edge: writes ``dpre`` fp32 ``[N, K+1, H]`` and ``ddst [N, H]``."""
    return Launch(gat_edge_kernel, _grid(x, False),
                  dict(x_ptr=x, nbr_ptr=nbr, src_ptr=src, dst_ptr=dst, out_ptr=out, lse_ptr=lse, dout_ptr=dout,
                       dpre_ptr=dpre, ddst_ptr=ddst, slope=slope,
                       **_shape_args(x, nbr, self_loop, EDGE_BLOCK_C)),
                  _WARPS, DEFAULT_NUM_STAGES)


def gat_pull_launch(x: torch.Tensor, nbr: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, lse: torch.Tensor,
                    dout: torch.Tensor, dpre: torch.Tensor, dx: torch.Tensor, dsrc: torch.Tensor, slope: float,
                    self_loop: bool) -> Launch:
    """Backward, per receiving row: writes ``dx [N, H, C]`` and ``dsrc [N, H]`` (``x`` only gives the shape)."""
    return Launch(gat_pull_kernel, _grid(x, True),
                  dict(nbr_ptr=nbr, src_ptr=src, dst_ptr=dst, lse_ptr=lse, dout_ptr=dout, dpre_ptr=dpre,
                       dx_ptr=dx, dsrc_ptr=dsrc, slope=slope, **_shape_args(x, nbr, self_loop)),
                  _WARPS, DEFAULT_NUM_STAGES)


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time specialisations (discovered by fastmil.aot)
# ----------------------------------------------------------------------------------------------------------------
AOT_SHAPES = ((4, 64, 24), (1, 256, 24), (4, 64, 8), (1, 36, 24))
"""(heads, channels per head, K) fed to the launchers: SRMIL's encoder (4 x 64, radius 2), its decoder's last layer
(one head aggregating its 256-wide input before projecting back to the features: four channel blocks), a radius-1
stencil, and a width that is not a multiple of 16."""

AOT_ROWS = (64, 100, 1)
"""Row counts fed to the launchers: every class Triton specialises the runtime ``n_rows`` into (divisible by 16: a
hint; 100: none; 1, a graph of one patch: a constant). Every other argument is a constexpr, a float or a pointer
the op allocates or makes canonical (16-byte aligned)."""


def aot_launches() -> Iterator[Launch]:
    """Every dtype, self loop on and off, over :data:`AOT_SHAPES` and :data:`AOT_ROWS`, with the buffers the op
    allocates (:func:`gat_fwd_buffers`, :func:`gat_bwd_buffers`); the slope is a runtime float (one class)."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for heads, channels, k in AOT_SHAPES:
            for n in AOT_ROWS:
                x = torch.zeros(n, heads, channels, dtype=dtype)
                nbr = torch.zeros(n, k, dtype=torch.int64)
                src, dst = torch.zeros(n, heads, dtype=dtype), torch.zeros(n, heads, dtype=dtype)
                out, lse = gat_fwd_buffers(x)
                dpre, ddst, dsrc, dx = gat_bwd_buffers(x, k)
                for self_loop in (True, False):
                    yield gat_fwd_launch(x, nbr, src, dst, out, lse, 0.2, self_loop)
                    yield gat_edge_launch(x, nbr, src, dst, out, lse, x, dpre, ddst, 0.2, self_loop)
                    yield gat_pull_launch(x, nbr, src, dst, lse, x, dpre, dx, dsrc, 0.2, self_loop)
