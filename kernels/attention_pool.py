"""Triton kernels for masked attention pooling over packed ragged bags (forward and backward).

Work decomposition (the flash-decoding pattern). Every bag is cut into *tiles* of at most ``BLOCK_N`` rows that
never cross a bag boundary; the tile table (``tile_bag``, ``tile_start``, ``tile_end``, one entry per tile) is
built by the launcher in ``fastmil.ops``. One program handles one tile, so a 100k-row bag and a few hundred
small bags fill the GPU in one launch. Each tile program produces its local softmax statistics (max ``m`` and
sum ``l`` of ``exp(s - m)``) and its unnormalised partial pooled vector; a merge program per (bag, head, D block)
combines the tiles of a bag with the usual rescaling and stores the pooled vector and the per-bag
log-sum-exp. A last small kernel turns raw scores into weights with that log-sum-exp.

Kernels here (all shapes are row-major, contiguous in the last dimension):

- ``pool_fwd_tile_kernel``    given scores ``[N, H]``: tile statistics and partial pooled ``[T, H, D]``.
- ``gated_fwd_tile_kernel``   fused gated scores ``w . (tanh(V h + bv) * sigmoid(U h + bu)) + bw`` computed with
                              ``tl.dot`` in registers (the ``N x hidden`` activations never reach memory), raw
                              scores ``[N]``, tile statistics and partial pooled ``[T, D]``.
- ``merge_tiles_kernel``      per bag: pooled ``[B, H, D]`` and log-sum-exp ``[B, H]`` (``+inf`` for a bag with
                              no unmasked instance, so its weights come out exactly 0).
- ``normalize_weights_kernel`` weights ``exp(s - lse)`` on unmasked rows, 0 elsewhere.
- ``pool_bwd_tile_kernel``    grads of scores and values for the given-scores op.
- ``gated_bwd_tile_kernel``   recomputes the gated activations from ``h`` and the stored log-sum-exp; writes the
                              pre-activation grads ``dpre [N, 2 * HID_PAD]`` (fp32, consumed by the two GEMMs
                              below and freed by the caller), the weights, ``grad_s [N]`` and per-tile ``grad_w``.
- ``grad_h_kernel``           ``grad_h = a g_b + dpre @ [V; U]`` per tile and D block (K loop over 2 * HID_PAD).
- ``weight_grad_kernel``      ``[dV; dU] = dpre^T h`` as a split-N GEMM whose per-split partials are summed by the
                              caller in a fixed order: deterministic, no atomics.

Why the backward writes ``dpre``: the V/U weight gradients are a reduction over all N rows of
``dpre^T h`` (``[2 HID, D]`` per row block), which no register file holds for D = 1024; the standard answer
is a GEMM over a materialised ``dpre`` (``8 * HID`` bytes per row, vs ``2 * D`` bytes per row of ``h``).
The forward never writes an ``N x HID`` tensor.

Precision: every load is cast to fp32 before elementwise arithmetic; reductions and accumulators are fp32.
``UPCAST`` (constexpr) also casts the score GEMM's ``tl.dot`` operands to fp32; the launcher sets it for fp32
inputs, and for bf16 under ``TRITON_INTERPRET=1`` (whose bf16 arithmetic is wrong). Otherwise (fp16/bf16 on a
GPU, fp16 in the interpreter) the gated score GEMM runs in the input dtype with fp32 accumulation, like
``torch.autocast``, with V and U passed in that dtype. ``DOT_PRECISION`` (constexpr ``"ieee"``, ``"tf32"`` or
``"tf32x3"``) selects the mode of the fp32 ``tl.dot`` products.

This file holds kernels and their launch-configuration helpers only; autograd lives in ``fastmil/ops``.
"""
from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

__all__ = [
    "MAX_HEADS",
    "MAX_HIDDEN",
    "KernelConfig",
    "gated_bwd_config",
    "gated_bwd_tile_kernel",
    "gated_fwd_config",
    "gated_fwd_tile_kernel",
    "gemm_block_k",
    "grad_h_config",
    "grad_h_kernel",
    "merge_config",
    "merge_tiles_kernel",
    "normalize_weights_kernel",
    "pool_bwd_tile_kernel",
    "pool_config",
    "pool_fwd_tile_kernel",
    "pow2_at_least",
    "weight_grad_config",
    "weight_grad_kernel",
]

MAX_HEADS = 32
"""Largest number of heads the given-scores kernels support (``H_PAD`` is 16 or 32)."""
MAX_HIDDEN = 256
"""Largest ``hidden_dim`` of the fused gated kernels (``HID_PAD`` in 16..256)."""


# ----------------------------------------------------------------------------------------------------------------
# launch configurations (shared by the launchers in fastmil.ops and the ahead-of-time checks in fastmil.aot)
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelConfig:
    """Block sizes (constexprs) and launch options of one kernel specialisation."""

    block_n: int
    block_d: int
    num_warps: int
    num_stages: int = 2


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Smallest power of two ``>= max(n, floor)`` (``tl.dot`` needs every dimension >= 16)."""
    p = floor
    while p < n:
        p *= 2
    return p


def pool_config(h_pad: int, fp32: bool) -> KernelConfig:
    """Tile config of the given-scores kernels (forward, weights, backward) for ``H_PAD`` heads. ``fp32``:
    fp32 inputs, whose 3xTF32 dots hold three operand copies in registers, get narrower tiles."""
    if h_pad <= 16 and not fp32:
        return KernelConfig(block_n=64, block_d=64, num_warps=4)
    return KernelConfig(block_n=32, block_d=32, num_warps=4)


def gated_fwd_config(hid_pad: int, fp32: bool) -> KernelConfig:
    """Tile config of ``gated_fwd_tile_kernel``. Two ``[block_n, hid_pad]`` fp32 accumulators plus the pipelined
    ``[block_d, hid_pad]`` weight tiles must fit in registers; these choices compile without spills for sm_80
    and sm_90 (``make aot`` checks every one). Every tile re-reads V and U from L2, so ``block_n`` is as large
    as registers allow: 2 * hid_pad * D weight elements per block_n rows. fp32 inputs (3xTF32 score GEMM, fp32
    weight tiles) take smaller tiles."""
    if fp32:
        if hid_pad <= 32:
            return KernelConfig(block_n=32, block_d=32, num_warps=8)
        return KernelConfig(block_n=32, block_d=16, num_warps=8)
    if hid_pad <= 64:
        return KernelConfig(block_n=128, block_d=16, num_warps=8)
    if hid_pad <= 128:
        return KernelConfig(block_n=64, block_d=16, num_warps=8)
    return KernelConfig(block_n=32, block_d=16, num_warps=8)


def gated_bwd_config(hid_pad: int, fp32: bool) -> KernelConfig:
    """Tile config of ``gated_bwd_tile_kernel``: the forward's blocks, so that the recompute is bit-identical."""
    return gated_fwd_config(hid_pad, fp32)


def merge_config() -> KernelConfig:
    """Config of ``merge_tiles_kernel`` (``block_n`` = tiles merged per step)."""
    return KernelConfig(block_n=32, block_d=128, num_warps=4)


def gemm_block_k(hid_pad: int) -> int:
    """K block of ``grad_h_kernel``/``weight_grad_kernel`` over ``K = 2 * hid_pad`` (divides it)."""
    return min(2 * hid_pad, 64)


def grad_h_config(hid_pad: int, fp32: bool) -> KernelConfig:
    """Config of ``grad_h_kernel`` (``block_n`` = the tile size of the gated kernels)."""
    return KernelConfig(block_n=gated_fwd_config(hid_pad, fp32).block_n, block_d=32 if fp32 else 64, num_warps=4)


def weight_grad_config(hid_pad: int) -> KernelConfig:
    """Config of ``weight_grad_kernel`` (``block_n`` = rows per inner step; ``block_k`` from ``gemm_block_k``)."""
    return KernelConfig(block_n=32, block_d=64, num_warps=4)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable in the interpreter; this identity is exact in real arithmetic.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr):
    """Tile ``t``: its first row (int64 scalar), the int32 row offsets ``[BLOCK_N]`` inside the tile, which of
    them are inside the bag, and which participate (unmasked). Addresses are formed as a 64-bit base per tile
    plus 32-bit offsets inside it, which keeps pointer arithmetic (and registers) small."""
    start = tl.load(tile_start_ptr + t).to(tl.int64)
    n_rows = (tl.load(tile_end_ptr + t).to(tl.int64) - start).to(tl.int32)
    local = tl.arange(0, BLOCK_N)
    in_bag = local < n_rows
    valid = in_bag
    if HAS_MASK:
        valid = valid & (tl.load(mask_ptr + start + local, mask=in_bag, other=0) != 0)
    return start, local, in_bag, valid


@triton.jit
def _gated_scores(
    h_ptr, vw_ptr, vb_ptr, uw_ptr, ub_ptr, ww_ptr, wb_ptr, g_ptr,
    local, in_bag, D, HIDDEN, stride_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HID_PAD: tl.constexpr,
    WITH_GH: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Gated activations of one tile whose first row is at ``h_ptr``: ``t = tanh(V h + bv)``,
    ``sg = sigmoid(U h + bu)`` ``[BLOCK_N, HID_PAD]``, raw scores ``s = (t * sg) . w + bw`` ``[BLOCK_N]``, and
    (``WITH_GH``) ``gh = h . g`` ``[BLOCK_N]`` for the vector ``g [D]`` at ``g_ptr``. Forward and backward call
    this same function with the same block sizes, so the backward recompute is bit-identical to the forward."""
    hid = tl.arange(0, HID_PAD)
    hid_ok = hid < HIDDEN
    pre_v = tl.zeros((BLOCK_N, HID_PAD), dtype=tl.float32)
    pre_u = tl.zeros((BLOCK_N, HID_PAD), dtype=tl.float32)
    gh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(h_ptr + local[:, None] * stride_h + cols[None, :], mask=in_bag[:, None] & col_ok[None, :], other=0.0)
        # nn.Linear weights are [HIDDEN, D]; load the transposed tile [BLOCK_D, HID_PAD]
        w_off = hid[None, :] * D + cols[:, None]
        w_ok = col_ok[:, None] & hid_ok[None, :]
        vt = tl.load(vw_ptr + w_off, mask=w_ok, other=0.0)
        ut = tl.load(uw_ptr + w_off, mask=w_ok, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            vt = vt.to(tl.float32)
            ut = ut.to(tl.float32)
        else:
            vt = vt.to(x.dtype)
            ut = ut.to(x.dtype)
        pre_v = tl.dot(x, vt, pre_v, input_precision=DOT_PRECISION)
        pre_u = tl.dot(x, ut, pre_u, input_precision=DOT_PRECISION)
        if WITH_GH:
            g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            gh += tl.sum(x.to(tl.float32) * g[None, :], axis=1)
    bv = tl.load(vb_ptr + hid, mask=hid_ok, other=0.0).to(tl.float32)
    bu = tl.load(ub_ptr + hid, mask=hid_ok, other=0.0).to(tl.float32)
    w = tl.load(ww_ptr + hid, mask=hid_ok, other=0.0).to(tl.float32)
    bw = tl.load(wb_ptr).to(tl.float32)
    t = _tanh(pre_v + bv[None, :])
    sg = tl.sigmoid(pre_u + bu[None, :])
    s = tl.sum(t * sg * w[None, :], axis=1) + bw
    return t, sg, s, gh


@triton.jit
def _tile_softmax_stats(s, valid):
    """Local softmax statistics of one tile along axis 0: max ``m`` (``-inf`` if nothing is valid), the weights
    ``p = exp(s - m)`` (0 where not valid) and their sum ``l``. ``s``/``valid`` are ``[BLOCK_N]`` or
    ``[BLOCK_N, H_PAD]``."""
    s = tl.where(valid, s, float("-inf"))
    m = tl.max(s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.where(valid, tl.exp(s - m_safe), 0.0)
    return m, p, tl.sum(p, axis=0)


# ----------------------------------------------------------------------------------------------------------------
# forward
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
    and ``partial [T, H, D]`` (fp32, ``sum_i exp(s_i - m) v_i`` over the tile's valid rows)."""
    t = tl.program_id(0)
    start, local, in_bag, valid = _tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N, HAS_MASK)
    heads = tl.arange(0, H_PAD)
    head_ok = heads < H
    ok = valid[:, None] & head_ok[None, :]
    s = tl.load(scores_ptr + start * stride_s + local[:, None] * stride_s + heads[None, :], mask=ok, other=0.0)
    m, p, l_sum = _tile_softmax_stats(s.to(tl.float32), ok)
    tl.store(tile_max_ptr + t * H + heads, m, mask=head_ok)
    tl.store(tile_sum_ptr + t * H + heads, l_sum, mask=head_ok)
    p_t = tl.trans(p)  # [H_PAD, BLOCK_N]
    v_base = values_ptr + start * stride_v
    out_base = partial_ptr + t.to(tl.int64) * H * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x = tl.load(v_base + local[:, None] * stride_v + cols[None, :], mask=in_bag[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(p_t, x.to(tl.float32), input_precision=DOT_PRECISION)  # [H_PAD, BLOCK_D]
        tl.store(out_base + heads[:, None] * D + cols[None, :], acc, mask=head_ok[:, None] & col_ok[None, :])


@triton.jit
def gated_fwd_tile_kernel(
    h_ptr, vw_ptr, vb_ptr, uw_ptr, ub_ptr, ww_ptr, wb_ptr, mask_ptr, tile_start_ptr, tile_end_ptr,
    scores_ptr, tile_max_ptr, tile_sum_ptr, partial_ptr,
    D, HIDDEN, stride_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HID_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T,)``. Fused gated scores + tile softmax statistics + partial pooled vector.

    Reads ``h [N, D]`` (fp32/fp16/bf16) and the gate parameters; writes raw scores ``[N]`` fp32 (overwritten
    with weights by ``normalize_weights_kernel``), ``tile_max``/``tile_sum`` ``[T]`` and ``partial [T, D]`` fp32.
    """
    t = tl.program_id(0)
    start, local, in_bag, valid = _tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N, HAS_MASK)
    h_base = h_ptr + start * stride_h
    _, _, s, _ = _gated_scores(
        h_base, vw_ptr, vb_ptr, uw_ptr, ub_ptr, ww_ptr, wb_ptr, h_base, local, in_bag, D, HIDDEN, stride_h,
        BLOCK_N, BLOCK_D, HID_PAD, False, UPCAST, DOT_PRECISION,
    )
    tl.store(scores_ptr + start + local, s, mask=in_bag)
    m, p, l_sum = _tile_softmax_stats(s, valid)
    tl.store(tile_max_ptr + t, m)
    tl.store(tile_sum_ptr + t, l_sum)
    out_base = partial_ptr + t.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        # second read of the tile: it was just streamed by the score GEMM, so it comes from L1/L2
        x = tl.load(h_base + local[:, None] * stride_h + cols[None, :], mask=in_bag[:, None] & col_ok[None, :], other=0.0)
        acc = tl.sum(p[:, None] * x.to(tl.float32), axis=0)
        tl.store(out_base + cols, acc, mask=col_ok)


@triton.jit
def merge_tiles_kernel(
    tile_max_ptr, tile_sum_ptr, partial_ptr, bag_tiles_ptr, pooled_ptr, lse_ptr,
    D, H,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid ``(B, H, cdiv(D, BLOCK_D))``. Combines the tiles ``bag_tiles[b]:bag_tiles[b+1]`` of bag ``b``:
    ``pooled[b, h] = sum_t exp(m_t - M) partial_t / L`` with ``M = max_t m_t``, ``L = sum_t exp(m_t - M) l_t``;
    stores ``lse[b, h] = M + log L`` (``+inf`` and a zero vector when ``L == 0``: empty or all-masked bag)."""
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
        scale = tl.where(t_ok & (l_t > 0), tl.exp(m_t - m_safe), 0.0)
        l_acc += scale * l_t
        part = tl.load(
            partial_ptr + (ts.to(tl.int64)[:, None] * H + head) * D + cols[None, :],
            mask=t_ok[:, None] & col_ok[None, :], other=0.0,
        )
        acc += tl.sum(scale[:, None] * part, axis=0)
    total = tl.sum(l_acc, axis=0)
    pooled = tl.where(total > 0, acc / tl.where(total > 0, total, 1.0), 0.0)
    tl.store(pooled_ptr + (b.to(tl.int64) * H + head) * D + cols, pooled, mask=col_ok)
    if pid_d == 0:
        lse = tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("inf"))
        tl.store(lse_ptr + b * H + head, lse)


@triton.jit
def normalize_weights_kernel(
    scores_ptr, mask_ptr, tile_bag_ptr, tile_start_ptr, tile_end_ptr, lse_ptr, weights_ptr,
    H, stride_s,
    BLOCK_N: tl.constexpr, H_PAD: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """Grid ``(T,)``. ``weights[i, h] = exp(s[i, h] - lse[bag(i), h])`` on valid rows, 0 on masked rows.
    ``weights`` is fp32 ``[N, H]`` contiguous and may alias ``scores`` (the gated forward does this)."""
    t = tl.program_id(0)
    start, local, in_bag, valid = _tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N, HAS_MASK)
    b = tl.load(tile_bag_ptr + t)
    heads = tl.arange(0, H_PAD)
    head_ok = heads < H
    ok = valid[:, None] & head_ok[None, :]
    s = tl.load(scores_ptr + start * stride_s + local[:, None] * stride_s + heads[None, :], mask=ok, other=0.0)
    lse = tl.load(lse_ptr + b * H + heads, mask=head_ok, other=float("inf"))
    w = tl.where(ok, tl.exp(s.to(tl.float32) - lse[None, :]), 0.0)
    tl.store(weights_ptr + start * H + local[:, None] * H + heads[None, :], w, mask=in_bag[:, None] & head_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def pool_bwd_tile_kernel(
    values_ptr, weights_ptr, grad_pooled_ptr, bag_dot_ptr, grad_weights_ptr,
    tile_bag_ptr, tile_start_ptr, tile_end_ptr,
    grad_scores_ptr, grad_values_ptr,
    D, H, stride_v,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, H_PAD: tl.constexpr,
    HAS_GRAD_WEIGHTS: tl.constexpr, NEED_GRAD_VALUES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T,)``. With ``a = weights [N, H]`` (saved, 0 on masked rows), ``g = grad_pooled [B, H, D]``:
    ``u_ih = g_bh . v_i (+ grad_weights_ih)``, ``grad_scores_ih = a_ih (u_ih - c_bh)`` where
    ``c_bh = bag_dot[b, h] = g_bh . pooled_bh (+ sum_i a_ih grad_weights_ih)``; ``grad_values_i = sum_h a_ih g_bh``."""
    t = tl.program_id(0)
    start, local, in_bag, _ = _tile_rows(tile_start_ptr, tile_end_ptr, tile_start_ptr, t, BLOCK_N, False)
    b = tl.load(tile_bag_ptr + t).to(tl.int64)
    heads = tl.arange(0, H_PAD)
    head_ok = heads < H
    row_head = in_bag[:, None] & head_ok[None, :]
    rh_off = start * H + local[:, None] * H + heads[None, :]
    a = tl.load(weights_ptr + rh_off, mask=row_head, other=0.0)
    u = tl.zeros((BLOCK_N, H_PAD), dtype=tl.float32)
    g_base = grad_pooled_ptr + b * H * D
    v_base = values_ptr + start * stride_v
    gv_base = grad_values_ptr + start * stride_v
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x_off = local[:, None] * stride_v + cols[None, :]
        x_ok = in_bag[:, None] & col_ok[None, :]
        x = tl.load(v_base + x_off, mask=x_ok, other=0.0)
        g = tl.load(g_base + heads[:, None] * D + cols[None, :], mask=head_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.dot(x.to(tl.float32), tl.trans(g), u, input_precision=DOT_PRECISION)
        if NEED_GRAD_VALUES:
            gv = tl.dot(a, g, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_D]
            tl.store(gv_base + x_off, gv.to(grad_values_ptr.dtype.element_ty), mask=x_ok)
    if HAS_GRAD_WEIGHTS:
        u += tl.load(grad_weights_ptr + rh_off, mask=row_head, other=0.0).to(tl.float32)
    c = tl.load(bag_dot_ptr + b * H + heads, mask=head_ok, other=0.0)
    ds = a * (u - c[None, :])
    tl.store(grad_scores_ptr + rh_off, ds, mask=row_head)


@triton.jit
def gated_bwd_tile_kernel(
    h_ptr, vw_ptr, vb_ptr, uw_ptr, ub_ptr, ww_ptr, wb_ptr, mask_ptr,
    tile_bag_ptr, tile_start_ptr, tile_end_ptr,
    lse_ptr, grad_pooled_ptr, bag_dot_ptr, grad_weights_ptr,
    dpre_ptr, grad_s_ptr, grad_w_partial_ptr,
    D, HIDDEN, stride_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HID_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_GRAD_WEIGHTS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T,)``. Recomputes ``t``, ``sg`` and the scores of one tile from ``h`` (same code and blocks as the
    forward), ``a = exp(s - lse_b)``; with ``g = grad_pooled [B, D]``: ``ds = a (h . g_b + grad_weights - c_b)``,
    ``dz = ds w``, ``dpre_v = dz sg (1 - t^2)``, ``dpre_u = dz t sg (1 - sg)``.

    Writes ``dpre [N, 2 * HID_PAD]`` fp32 (``[dpre_v | dpre_u]``, 0 on masked rows and padded units),
    ``grad_s [N]`` fp32 and
    ``grad_w_partial[t] = sum_i ds_i (t_i * sg_i)`` ``[T, HID_PAD]`` fp32. ``grad_h`` and the V/U weight grads
    are GEMMs over ``dpre`` (``grad_h_kernel``, ``weight_grad_kernel``)."""
    t_id = tl.program_id(0)
    start, local, in_bag, valid = _tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t_id, BLOCK_N, HAS_MASK)
    b = tl.load(tile_bag_ptr + t_id).to(tl.int64)
    h_base = h_ptr + start * stride_h
    t, sg, s, gh = _gated_scores(
        h_base, vw_ptr, vb_ptr, uw_ptr, ub_ptr, ww_ptr, wb_ptr, grad_pooled_ptr + b * D, local, in_bag,
        D, HIDDEN, stride_h, BLOCK_N, BLOCK_D, HID_PAD, True, UPCAST, DOT_PRECISION,
    )
    a = tl.where(valid, tl.exp(s - tl.load(lse_ptr + b)), 0.0)
    u = gh
    if HAS_GRAD_WEIGHTS:
        u += tl.load(grad_weights_ptr + start + local, mask=in_bag, other=0.0).to(tl.float32)
    ds = a * (u - tl.load(bag_dot_ptr + b))
    hid = tl.arange(0, HID_PAD)
    w = tl.load(ww_ptr + hid, mask=hid < HIDDEN, other=0.0).to(tl.float32)
    dz = ds[:, None] * w[None, :]
    tl.store(grad_s_ptr + start + local, ds, mask=in_bag)
    tl.store(grad_w_partial_ptr + t_id.to(tl.int64) * HID_PAD + hid, tl.sum(ds[:, None] * t * sg, axis=0))
    dpre_base = dpre_ptr + start * (2 * HID_PAD) + local[:, None] * (2 * HID_PAD) + hid[None, :]
    tl.store(dpre_base, dz * sg * (1.0 - t * t), mask=in_bag[:, None])
    tl.store(dpre_base + HID_PAD, dz * t * sg * (1.0 - sg), mask=in_bag[:, None])


@triton.jit
def grad_h_kernel(
    dpre_ptr, w2_ptr, weights_ptr, grad_pooled_ptr, tile_bag_ptr, tile_start_ptr, tile_end_ptr, grad_h_ptr,
    D, stride_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T, cdiv(D, BLOCK_D))``. ``grad_h[rows, cols] = a_i g_b[cols] + dpre[rows] @ w2[:, cols]`` for the
    rows of tile ``t`` (bag ``b``), with ``a = weights [N]`` fp32 (the forward's), ``dpre [N, K]`` fp32 and
    ``w2 = [V; U]`` zero-padded to ``[K, D]`` fp32,
    ``K = 2 * HID_PAD``. A plain GEMM with a K loop: register use does not grow with the hidden size."""
    t = tl.program_id(0)
    pid_d = tl.program_id(1)
    start, local, in_bag, _ = _tile_rows(tile_start_ptr, tile_end_ptr, tile_start_ptr, t, BLOCK_N, False)
    b = tl.load(tile_bag_ptr + t).to(tl.int64)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    a = tl.load(weights_ptr + start + local, mask=in_bag, other=0.0)
    g = tl.load(grad_pooled_ptr + b * D + cols, mask=col_ok, other=0.0)
    acc = a[:, None] * g[None, :]
    ks = tl.arange(0, BLOCK_K)
    dp_base = dpre_ptr + start * K
    for k0 in range(0, K, BLOCK_K):
        dp = tl.load(dp_base + local[:, None] * K + (k0 + ks)[None, :], mask=in_bag[:, None], other=0.0)
        w2 = tl.load(w2_ptr + (k0 + ks)[:, None] * D + cols[None, :], mask=col_ok[None, :], other=0.0)
        acc = tl.dot(dp, w2, acc, input_precision=DOT_PRECISION)
    tl.store(
        grad_h_ptr + start * stride_h + local[:, None] * stride_h + cols[None, :],
        acc.to(grad_h_ptr.dtype.element_ty), mask=in_bag[:, None] & col_ok[None, :],
    )


@triton.jit
def weight_grad_kernel(
    dpre_ptr, h_ptr, partial_ptr,
    N, D, rows_per_split, stride_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid ``(cdiv(D, BLOCK_D), K // BLOCK_K, n_splits)``. ``partial[split, k-block, cols] =
    dpre[rows, k-block]^T h[rows, cols]`` (fp32) over the split's rows, ``dpre [N, K]`` fp32 with
    ``K = 2 * HID_PAD`` (V then U). The caller sums the splits in a fixed order: deterministic, no atomics."""
    pid_d = tl.program_id(0)
    pid_k = tl.program_id(1)
    split = tl.program_id(2)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    row0 = split.to(tl.int64) * rows_per_split
    n_rows = (tl.minimum(row0 + rows_per_split, N) - row0).to(tl.int32)
    dp_base = dpre_ptr + row0 * K
    h_base = h_ptr + row0 * stride_h
    local = tl.arange(0, BLOCK_N)
    for r0 in range(0, n_rows, BLOCK_N):
        rows = r0 + local
        row_ok = rows < n_rows
        dp = tl.load(dp_base + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        x = tl.load(h_base + rows[:, None] * stride_h + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dp), x.to(tl.float32), acc, input_precision=DOT_PRECISION)
    out = partial_ptr + (split.to(tl.int64) * K + ks[:, None]) * D + cols[None, :]
    tl.store(out, acc, mask=col_ok[None, :])
