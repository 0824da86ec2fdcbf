"""Triton kernels of the fused gated attention pooling (``fastmil.nn.GatedAttentionPool``), forward and backward.

- ``gated_fwd_tile_kernel``  fused scores ``w . (tanh(V h + bv) * sigmoid(U h + bu)) + bw`` with ``tl.dot`` in
                             registers (the ``N x hidden`` activations never reach memory), raw scores ``[N]``,
                             tile softmax statistics and the partial pooled vector; the shared merge and
                             weight-normalisation kernels (``_tiled_softmax``) finish the forward.
- ``gated_bwd_tile_kernel``  recomputes the gated activations from ``h`` and the stored log-sum-exp (same helper,
                             same blocks as the forward: bit-identical); writes the pre-activation grads
                             ``dpre [N, 2 * HID_PAD]`` (fp32, consumed by the two GEMMs below, freed by the
                             caller), ``grad_s [N]`` and per-tile ``grad_w``.
- ``grad_h_kernel``          ``grad_h = a g_b + dpre @ [V; U]`` per tile and D block (K loop over 2 * HID_PAD).
- ``weight_grad_kernel``     ``[dV; dU] = dpre^T h`` as a split-N GEMM whose per-split partials are summed by the
                             caller in a fixed order: deterministic, no atomics.

The backward writes ``dpre`` because the V/U weight gradients are a reduction of ``dpre^T h`` over all N rows,
which no register file holds for D = 1024 (a GEMM over ``dpre``: ``8 * HID`` bytes per row). The scheme is
explained in ``docs/architecture.md`` ("Kernels").

Precision: every load is cast to fp32 before elementwise arithmetic; reductions and accumulators are fp32.
``UPCAST`` (constexpr) also casts the score GEMM's ``tl.dot`` operands to fp32 (``_launch.upcast_dots``);
otherwise (fp16/bf16 on a GPU, fp16 in the interpreter) the score GEMM runs in the input dtype with fp32
accumulation, like ``torch.autocast``, with V and U passed in that dtype. ``DOT_PRECISION`` selects the mode of
the fp32 ``tl.dot`` products (``_launch.dot_precision``): 3xTF32 for every input dtype, fp32-level, since ``dpre``
and the fp32 parameters are not TF32 numbers (plain TF32 would truncate them: a bias of ~2^-11 in every gradient);
TF32 rounded to nearest only for fp32 inputs under ``allow_tf32`` (``_dot``: ``fp32_dot`` splits only ``dpre`` when
the other operand holds fp16/bf16 values, ``dot_operand`` rounds the fp32 score GEMM's operands). ``h`` and
``grad_h`` are addressed with their own row strides.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import triton
import triton.language as tl

from ._dot import dot_operand, fp32_dot
from ._launch import AOT_DIMS, AotTiles, KernelConfig, Launch, aot_views, dot_precision, pow2_at_least, upcast_dots
from ._tiled_softmax import merge_launch, normalize_launch, tile_rows, tile_softmax_stats
from .limits import MAX_HIDDEN

__all__ = [
    "MAX_HIDDEN", "aot_launches", "gated_bwd_launch", "gated_bwd_tile_kernel", "gated_config", "gated_fwd_launch",
    "gated_fwd_tile_kernel", "grad_h_launch", "grad_h_kernel", "pad_gate_params", "rows_per_split",
    "score_weight_dtype",
    "weight_grad_launch", "weight_grad_kernel",
]


def gated_config(hidden: int, dtype: torch.dtype) -> KernelConfig:
    """Tile config of ``gated_fwd_tile_kernel`` and ``gated_bwd_tile_kernel`` for ``hidden`` (or its padded
    ``HID_PAD``) units and ``dtype`` inputs: the same blocks in both, so that the backward recompute is
    bit-identical. Two ``[block_n, HID_PAD]`` fp32 accumulators plus the pipelined ``[block_d, HID_PAD]`` weight
    tiles must fit in registers. Every tile re-reads V and U from L2, so ``block_n`` is as large as compiles
    without register spills on sm_80 and sm_90 with each checked triton release (``make aot``: the choices
    below are where ptxas stopped spilling; fp32 inputs run a 3xTF32 score GEMM, or a TF32 one whose operands are
    rounded in registers, and take smaller tiles)."""
    hid_pad = pow2_at_least(hidden)
    if dtype == torch.float32:
        if hid_pad <= 64:
            return KernelConfig(block_n=32, block_d=16, num_warps=8, num_stages=2)
        return KernelConfig(block_n=16, block_d=16, num_warps=8, num_stages=2)
    if hid_pad <= 32:
        return KernelConfig(block_n=128, block_d=16, num_warps=4, num_stages=2)
    if hid_pad <= 64:
        return KernelConfig(block_n=128, block_d=16, num_warps=8, num_stages=2)
    if hid_pad <= 128:
        return KernelConfig(block_n=64, block_d=16, num_warps=8, num_stages=2)
    return KernelConfig(block_n=32, block_d=16, num_warps=8, num_stages=2)


def gemm_block_k(hid_pad: int) -> int:
    """K block of ``grad_h_kernel``/``weight_grad_kernel`` over ``K = 2 * hid_pad`` (divides it)."""
    return min(2 * hid_pad, 64)


def grad_h_config(hidden: int, dtype: torch.dtype) -> KernelConfig:
    """Config of ``grad_h_kernel`` (``block_n`` = the tile size of the gated kernels). ``fp32_dot`` splits the
    ``[block_n, BLOCK_K]`` tile of ``dpre`` in two (3xTF32, ``kernels/_dot.py``): 128-row tiles, and 64-row tiles of
    ``K = 2 HID_PAD = 256``, take 8 warps, where 4 spill on sm_80 (triton 3.8: 104-208 B). ``hidden`` is HID_PAD."""
    fp32 = dtype == torch.float32
    block_n = gated_config(hidden, dtype).block_n
    wide = block_n >= 128 or block_n * hidden >= 8192
    return KernelConfig(block_n=block_n, block_d=32 if fp32 else 64, num_warps=8 if wide else 4, num_stages=2)


def weight_grad_config() -> KernelConfig:
    """Config of ``weight_grad_kernel`` (``block_n`` = rows per inner step; ``block_k`` from ``gemm_block_k``)."""
    return KernelConfig(block_n=32, block_d=64, num_warps=4, num_stages=2)


def score_weight_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype V and U are passed in (and rounded to) for the score GEMM of ``dtype`` inputs: the input
    dtype for fp16/bf16 on a GPU (and fp16 under the interpreter), fp32 otherwise. Every tile program re-reads
    both from L2, so half-width copies halve that traffic; the kernel would round them to this dtype anyway."""
    return torch.float32 if upcast_dots(dtype) else dtype


def rows_per_split(n: int) -> int:
    """Rows per split of the weight-grad GEMM: ~16 splits (parallelism) but never fewer than 8 blocks of rows
    per split, so the per-split ``[2 HID_PAD, D]`` fp32 partials stay a small fraction of the bytes of ``h``."""
    block_n = weight_grad_config().block_n
    per_split = triton.cdiv(triton.cdiv(n, 16), block_n) * block_n
    return max(per_split, 8 * block_n)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(x):
    # libdevice tanh is unavailable in the interpreter; this identity is exact in real arithmetic.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _gated_scores(
    h_ptr, vu_ptr, bias_ptr, w_ptr, wb_ptr, g_ptr,
    local, in_bag, D, stride_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HID_PAD: tl.constexpr,
    WITH_GH: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Gated activations of one tile whose first row is at ``h_ptr``: ``t = tanh(V h + bv)``,
    ``sg = sigmoid(U h + bu)`` ``[BLOCK_N, HID_PAD]``, raw scores ``s = (t * sg) . w + bw`` ``[BLOCK_N]``, and
    (``WITH_GH``) ``gh = h . g`` ``[BLOCK_N]`` for the vector ``g [D]`` at ``g_ptr``. The parameters are
    zero-padded to ``HID_PAD`` units (a padded unit contributes ``tanh(0) * sigmoid(0) * 0 = 0``): ``vu`` is
    ``[2, HID_PAD, D]`` (V then U), ``bias`` ``[2, HID_PAD]``, ``w`` ``[HID_PAD]``, ``wb`` ``[1]``. Forward and
    backward call this same function with the same block sizes, so the backward recompute is bit-identical."""
    hid = tl.arange(0, HID_PAD)
    pre_v = tl.zeros((BLOCK_N, HID_PAD), dtype=tl.float32)
    pre_u = tl.zeros((BLOCK_N, HID_PAD), dtype=tl.float32)
    gh = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        x_ok = in_bag[:, None] & col_ok[None, :]
        x = tl.load(h_ptr + local[:, None] * stride_h + cols[None, :], mask=x_ok, other=0.0)
        # nn.Linear weights are [HIDDEN, D]; load the transposed tiles [BLOCK_D, HID_PAD]
        w_off = hid[None, :] * D + cols[:, None]
        vt = tl.load(vu_ptr + w_off, mask=col_ok[:, None], other=0.0)
        ut = tl.load(vu_ptr + HID_PAD * D + w_off, mask=col_ok[:, None], other=0.0)
        if WITH_GH:  # from the unrounded x, before the score GEMM's operand rounding (one x tile live at a time)
            g = tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            gh += tl.sum(x.to(tl.float32) * g[None, :], axis=1)
        if UPCAST:
            x = dot_operand(x.to(tl.float32), DOT_PRECISION)
            vt = dot_operand(vt.to(tl.float32), DOT_PRECISION)
            ut = dot_operand(ut.to(tl.float32), DOT_PRECISION)
        else:
            vt = vt.to(x.dtype)
            ut = ut.to(x.dtype)
        pre_v = tl.dot(x, vt, pre_v, input_precision=DOT_PRECISION)
        pre_u = tl.dot(x, ut, pre_u, input_precision=DOT_PRECISION)
    bv = tl.load(bias_ptr + hid)
    bu = tl.load(bias_ptr + HID_PAD + hid)
    w = tl.load(w_ptr + hid)
    bw = tl.load(wb_ptr)
    t = _tanh(pre_v + bv[None, :])
    sg = tl.sigmoid(pre_u + bu[None, :])
    s = tl.sum(t * sg * w[None, :], axis=1) + bw
    return t, sg, s, gh


# ----------------------------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def gated_fwd_tile_kernel(
    h_ptr, vu_ptr, bias_ptr, w_ptr, wb_ptr, mask_ptr, tile_start_ptr, tile_end_ptr,
    scores_ptr, tile_max_ptr, tile_sum_ptr, partial_ptr,
    D, stride_h,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HID_PAD: tl.constexpr,
    HAS_MASK: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T,)``. Fused gated scores + tile softmax statistics + partial pooled vector.

    Reads ``h [N, D]`` (fp32/fp16/bf16) and the padded gate parameters (see ``_gated_scores``: ``vu`` in the
    score GEMM's dtype, the rest fp32); writes raw scores ``[N]`` fp32 (overwritten
    with weights by ``normalize_weights_kernel``), ``tile_max``/``tile_sum`` ``[T]`` and ``partial [T, D]`` fp32.
    """
    t = tl.program_id(0)
    start, local, in_bag, valid = tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t, BLOCK_N, HAS_MASK)
    h_base = h_ptr + start * stride_h
    _, _, s, _ = _gated_scores(
        h_base, vu_ptr, bias_ptr, w_ptr, wb_ptr, h_base, local, in_bag, D, stride_h,
        BLOCK_N, BLOCK_D, HID_PAD, False, UPCAST, DOT_PRECISION,
    )
    tl.store(scores_ptr + start + local, s, mask=in_bag)
    m, p, l_sum = tile_softmax_stats(s, valid)
    tl.store(tile_max_ptr + t, m)
    tl.store(tile_sum_ptr + t, l_sum)
    out_base = partial_ptr + t.to(tl.int64) * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        # second read of the tile: it was just streamed by the score GEMM, so it comes from L1/L2
        x_ok = in_bag[:, None] & col_ok[None, :]
        x = tl.load(h_base + local[:, None] * stride_h + cols[None, :], mask=x_ok, other=0.0)
        acc = tl.sum(p[:, None] * x.to(tl.float32), axis=0)
        tl.store(out_base + cols, acc, mask=col_ok)


@triton.jit
def gated_bwd_tile_kernel(
    h_ptr, vu_ptr, bias_ptr, w_ptr, wb_ptr, mask_ptr,
    tile_bag_ptr, tile_start_ptr, tile_end_ptr,
    lse_ptr, grad_pooled_ptr, bag_dot_ptr, grad_weights_ptr,
    dpre_ptr, grad_s_ptr, grad_w_partial_ptr,
    D, stride_h,
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
    start, local, in_bag, valid = tile_rows(tile_start_ptr, tile_end_ptr, mask_ptr, t_id, BLOCK_N, HAS_MASK)
    b = tl.load(tile_bag_ptr + t_id).to(tl.int64)
    h_base = h_ptr + start * stride_h
    t, sg, s, gh = _gated_scores(
        h_base, vu_ptr, bias_ptr, w_ptr, wb_ptr, grad_pooled_ptr + b * D, local, in_bag,
        D, stride_h, BLOCK_N, BLOCK_D, HID_PAD, True, UPCAST, DOT_PRECISION,
    )
    a = tl.where(valid, tl.exp(s - tl.load(lse_ptr + b)), 0.0)
    u = gh
    if HAS_GRAD_WEIGHTS:
        u += tl.load(grad_weights_ptr + start + local, mask=in_bag, other=0.0).to(tl.float32)
    ds = a * (u - tl.load(bag_dot_ptr + b))
    hid = tl.arange(0, HID_PAD)
    w = tl.load(w_ptr + hid)
    dz = ds[:, None] * w[None, :]
    tl.store(grad_s_ptr + start + local, ds, mask=in_bag)
    tl.store(grad_w_partial_ptr + t_id.to(tl.int64) * HID_PAD + hid, tl.sum(ds[:, None] * t * sg, axis=0))
    dpre_base = dpre_ptr + start * (2 * HID_PAD) + local[:, None] * (2 * HID_PAD) + hid[None, :]
    tl.store(dpre_base, dz * sg * (1.0 - t * t), mask=in_bag[:, None])
    tl.store(dpre_base + HID_PAD, dz * t * sg * (1.0 - sg), mask=in_bag[:, None])


@triton.jit
def grad_h_kernel(
    dpre_ptr, w2_ptr, weights_ptr, grad_pooled_ptr, tile_bag_ptr, tile_start_ptr, tile_end_ptr, grad_h_ptr,
    D, stride_gh,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, K: tl.constexpr,
    W2_ROUNDED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid ``(T, cdiv(D, BLOCK_D))``. ``grad_h[rows, cols] = a_i g_b[cols] + dpre[rows] @ w2[:, cols]`` for the
    rows of tile ``t`` (bag ``b``), with ``a = weights [N]`` fp32 (the forward's), ``dpre [N, K]`` fp32 and
    ``w2 = [V; U]`` zero-padded to ``[K, D]`` fp32 (``W2_ROUNDED``: holding values of ``grad_h``'s dtype, fp16/bf16),
    ``K = 2 * HID_PAD``; ``grad_h`` has its own row stride ``stride_gh``. A plain GEMM with a K loop: register
    use does not grow with the hidden size."""
    t = tl.program_id(0)
    pid_d = tl.program_id(1)
    start, local, in_bag, _ = tile_rows(tile_start_ptr, tile_end_ptr, tile_start_ptr, t, BLOCK_N, False)
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
        if W2_ROUNDED:  # fp16/bf16 values held in fp32: converted back exactly, fp32_dot then splits dpre only
            w2 = w2.to(grad_h_ptr.dtype.element_ty)
        acc = fp32_dot(dp, w2, acc, DOT_PRECISION)
    tl.store(
        grad_h_ptr + start * stride_gh + local[:, None] * stride_gh + cols[None, :],
        acc.to(grad_h_ptr.dtype.element_ty), mask=in_bag[:, None] & col_ok[None, :],
    )


@triton.jit
def weight_grad_kernel(
    dpre_ptr, h_ptr, partial_ptr,
    N, D, rows_in_split, stride_h,
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
    row0 = split.to(tl.int64) * rows_in_split
    n_rows = (tl.minimum(row0 + rows_in_split, N) - row0).to(tl.int32)
    dp_base = dpre_ptr + row0 * K
    h_base = h_ptr + row0 * stride_h
    local = tl.arange(0, BLOCK_N)
    for r0 in range(0, n_rows, BLOCK_N):
        rows = r0 + local
        row_ok = rows < n_rows
        dp = tl.load(dp_base + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
        x_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(h_base + rows[:, None] * stride_h + cols[None, :], mask=x_ok, other=0.0)
        acc = fp32_dot(tl.trans(dp), x, acc, DOT_PRECISION)
    out = partial_ptr + (split.to(tl.int64) * K + ks[:, None]) * D + cols[None, :]
    tl.store(out, acc, mask=col_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# launches (shared by fastmil.ops.gated_attention_pool and make aot)
# ----------------------------------------------------------------------------------------------------------------
def pad_gate_params(
    v_weight: torch.Tensor, v_bias: torch.Tensor, u_weight: torch.Tensor, u_bias: torch.Tensor,
    w_weight: torch.Tensor, w_bias: torch.Tensor, dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gate parameters as the tile kernels read them, zero-padded to ``HID_PAD = pow2_at_least(hidden)``
    units: ``vu [2, HID_PAD, D]`` in ``score_weight_dtype(dtype)`` (V then U), ``bias [2, HID_PAD]``,
    ``w [HID_PAD]`` and ``wb [1]`` fp32. Padding is what lets the kernels drop every hidden-size mask and be
    specialised on ``HID_PAD`` alone (fewer variants to check, no runtime width)."""
    hidden, dim = v_weight.shape
    hid_pad = pow2_at_least(hidden)
    dev = v_weight.device
    vu = torch.zeros(2, hid_pad, dim, dtype=score_weight_dtype(dtype), device=dev)
    vu[0, :hidden], vu[1, :hidden] = v_weight.detach(), u_weight.detach()
    bias = torch.zeros(2, hid_pad, dtype=torch.float32, device=dev)
    bias[0, :hidden], bias[1, :hidden] = v_bias.detach(), u_bias.detach()
    w = torch.zeros(hid_pad, dtype=torch.float32, device=dev)
    w[:hidden] = w_weight.detach()[0]
    return vu, bias, w, w_bias.detach().float().reshape(1)


def gated_fwd_launch(
    h: torch.Tensor, vu: torch.Tensor, bias: torch.Tensor, w: torch.Tensor, wb: torch.Tensor,
    mask: torch.Tensor | None, tile_start: torch.Tensor, tile_end: torch.Tensor,
    scores: torch.Tensor, tile_max: torch.Tensor, tile_sum: torch.Tensor, partial: torch.Tensor,
) -> Launch:
    """Fused forward tile kernel. ``h [N, D]``, the parameters from ``pad_gate_params``, ``mask`` bool ``[N]``
    or None -> raw ``scores [N]``, ``tile_max``/``tile_sum`` ``[T]``, ``partial [T, D]`` (fp32)."""
    hid_pad, dim = vu.shape[1], h.shape[1]
    cfg = gated_config(hid_pad, h.dtype)
    return Launch(
        gated_fwd_tile_kernel, (tile_start.numel(),),
        dict(h_ptr=h, vu_ptr=vu, bias_ptr=bias, w_ptr=w, wb_ptr=wb, mask_ptr=tile_start if mask is None else mask,
             tile_start_ptr=tile_start, tile_end_ptr=tile_end, scores_ptr=scores, tile_max_ptr=tile_max,
             tile_sum_ptr=tile_sum, partial_ptr=partial, D=dim, stride_h=h.stride(0),
             BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, HID_PAD=hid_pad, HAS_MASK=mask is not None,
             UPCAST=upcast_dots(h.dtype), DOT_PRECISION=dot_precision(h.dtype)),
        cfg.num_warps, cfg.num_stages, strided=("h_ptr",),
    )


def gated_bwd_launch(
    h: torch.Tensor, vu: torch.Tensor, bias: torch.Tensor, w: torch.Tensor, wb: torch.Tensor,
    mask: torch.Tensor | None, tile_bag: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor,
    lse: torch.Tensor, grad_pooled: torch.Tensor, bag_dot: torch.Tensor, grad_weights: torch.Tensor | None,
    dpre: torch.Tensor, grad_s: torch.Tensor, grad_w_partial: torch.Tensor,
) -> Launch:
    """Fused backward tile kernel (recompute + softmax backward + pre-activation grads); arguments as in
    ``gated_fwd_launch``, plus ``lse [B]``, ``grad_pooled [B, D]``, ``bag_dot [B]``, ``grad_weights [N]`` or
    None (fp32) -> ``dpre [N, 2 HID_PAD]``, ``grad_s [N]``, ``grad_w_partial [T, HID_PAD]`` (fp32)."""
    hid_pad, dim = vu.shape[1], h.shape[1]
    cfg = gated_config(hid_pad, h.dtype)
    return Launch(
        gated_bwd_tile_kernel, (tile_bag.numel(),),
        dict(h_ptr=h, vu_ptr=vu, bias_ptr=bias, w_ptr=w, wb_ptr=wb, mask_ptr=tile_start if mask is None else mask,
             tile_bag_ptr=tile_bag, tile_start_ptr=tile_start, tile_end_ptr=tile_end, lse_ptr=lse,
             grad_pooled_ptr=grad_pooled, bag_dot_ptr=bag_dot,
             grad_weights_ptr=grad_s if grad_weights is None else grad_weights,
             dpre_ptr=dpre, grad_s_ptr=grad_s, grad_w_partial_ptr=grad_w_partial, D=dim, stride_h=h.stride(0),
             BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, HID_PAD=hid_pad, HAS_MASK=mask is not None,
             HAS_GRAD_WEIGHTS=grad_weights is not None, UPCAST=upcast_dots(h.dtype),
             DOT_PRECISION=dot_precision(h.dtype)),
        cfg.num_warps, cfg.num_stages, strided=("h_ptr",),
    )


def grad_h_launch(
    dpre: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, grad_pooled: torch.Tensor,
    tile_bag: torch.Tensor, tile_start: torch.Tensor, tile_end: torch.Tensor, grad_h: torch.Tensor,
) -> Launch:
    """``grad_h = a g_b + dpre [V; U]``: ``dpre [N, K]``, ``w2 [K, D]`` (``[V; U]`` zero-padded to
    ``K = 2 HID_PAD`` rows, rounded to ``score_weight_dtype(h.dtype)`` as the score GEMM used them), ``weights [N]``,
    ``grad_pooled [B, D]`` fp32 -> ``grad_h [N, D]`` in the dtype of ``h``. The tile table is the gated kernels'
    (``gated_config(HID_PAD, h.dtype).block_n`` rows per tile)."""
    k_dim, dim = w2.shape
    cfg = grad_h_config(k_dim // 2, grad_h.dtype)
    return Launch(
        grad_h_kernel, (tile_bag.numel(), triton.cdiv(dim, cfg.block_d)),
        dict(dpre_ptr=dpre, w2_ptr=w2, weights_ptr=weights, grad_pooled_ptr=grad_pooled, tile_bag_ptr=tile_bag,
             tile_start_ptr=tile_start, tile_end_ptr=tile_end, grad_h_ptr=grad_h, D=dim, stride_gh=grad_h.stride(0),
             BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_K=gemm_block_k(k_dim // 2), K=k_dim,
             W2_ROUNDED=score_weight_dtype(grad_h.dtype) != torch.float32, DOT_PRECISION=dot_precision(grad_h.dtype)),
        cfg.num_warps, cfg.num_stages, strided=("grad_h_ptr",),
    )


def weight_grad_launch(dpre: torch.Tensor, h: torch.Tensor, partial: torch.Tensor) -> Launch:
    """``partial[split] = dpre[rows]^T h[rows]`` over ``rows_per_split(N)`` rows per split: ``dpre [N, K]``
    fp32, ``h [N, D]`` (its row stride) -> ``partial [n_splits, K, D]`` fp32 (summed by the caller in order)."""
    n, k_dim = dpre.shape
    dim = h.shape[1]
    cfg = weight_grad_config()
    block_k = gemm_block_k(k_dim // 2)
    return Launch(
        weight_grad_kernel, (triton.cdiv(dim, cfg.block_d), k_dim // block_k, partial.shape[0]),
        dict(dpre_ptr=dpre, h_ptr=h, partial_ptr=partial, N=n, D=dim, rows_in_split=rows_per_split(n),
             stride_h=h.stride(0), BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, BLOCK_K=block_k, K=k_dim,
             DOT_PRECISION=dot_precision(h.dtype)),
        cfg.num_warps, cfg.num_stages, strided=("h_ptr",),
    )


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time specialisations (discovered by fastmil.aot)
# ----------------------------------------------------------------------------------------------------------------
AOT_HID_PADS = (16, 32, 64, 128, 256)
"""Padded hidden sizes fed to the launchers (``hidden_dim`` only reaches the kernels through ``HID_PAD``)."""


def aot_launches() -> Iterator[Launch]:
    """Every launch of this op over representative arguments: input dtypes, padded hidden sizes, masks,
    gradient flags, feature widths and canonical row layouts of ``h``, and the row counts that change the
    weight-grad GEMM's specialisation."""
    t = AotTiles()
    n, n_tiles, n_bags = t.n, t.n_tiles, t.n_bags
    tile_bag, tile_start, tile_end, bag_tiles = t.tile_bag, t.tile_start, t.tile_end, t.bag_tiles
    f32 = lambda *shape: torch.zeros(*shape)  # noqa: E731
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for dim in AOT_DIMS:
            for h in aot_views(n, dim, dt):
                for hid_pad in AOT_HID_PADS:
                    vu = torch.zeros(2, hid_pad, dim, dtype=score_weight_dtype(dt))
                    params = (vu, f32(2, hid_pad), f32(hid_pad), f32(1))
                    block_n = gated_config(hid_pad, dt).block_n
                    for mask in (None, torch.ones(n, dtype=torch.bool)):
                        scores = f32(n)
                        yield gated_fwd_launch(h, *params, mask, tile_start, tile_end, scores, f32(n_tiles),
                                               f32(n_tiles), f32(n_tiles, dim))
                        yield normalize_launch(scores[:, None], mask, tile_bag, tile_start, tile_end, f32(n_bags, 1),
                                               scores[:, None], block_n)
                        for grad_weights in (None, f32(n)):
                            yield gated_bwd_launch(h, *params, mask, tile_bag, tile_start, tile_end, f32(n_bags),
                                                   f32(n_bags, dim), f32(n_bags), grad_weights, f32(n, 2 * hid_pad),
                                                   f32(n), f32(n_tiles, hid_pad))
                    yield merge_launch(f32(n_tiles, 1), f32(n_tiles, 1), f32(n_tiles, 1, dim), bag_tiles,
                                       f32(n_bags, 1, dim), f32(n_bags, 1))
                    yield grad_h_launch(f32(n, 2 * hid_pad), f32(2 * hid_pad, dim), f32(n), f32(n_bags, dim),
                                        tile_bag, tile_start, tile_end, torch.zeros(n, dim, dtype=dt))
                    # N = 1 is specialised to a constant and 4096 gets a divisibility hint (only N, the dtype, row
                    # stride and alignment of h reach the compiler, so h keeps its 64 rows here)
                    for rows in (1, 100, 4096):
                        yield weight_grad_launch(f32(rows, 2 * hid_pad), h, f32(1, 2 * hid_pad, dim))
