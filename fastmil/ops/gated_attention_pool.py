"""``gated_attention_pool``: the fused op behind :class:`fastmil.nn.GatedAttentionPool`.

Contract::

    gated_attention_pool(h [N, D], v_weight [HID, D], v_bias [HID], u_weight [HID, D], u_bias [HID],
                         w_weight [1, HID], w_bias [1], offsets int64 [B+1], mask bool [N] | None)
        -> pooled [B, D] fp32, weights [N] fp32

    score_i = w . (tanh(V h_i + bv) * sigmoid(U h_i + bu)) + bw;   weights = per-bag softmax over unmasked rows;
    pooled_b = sum_i weights_i h_i.   All-masked or empty bags give zeros, never NaN.

Differentiable in ``h`` and all six parameters. Forward saves ``h``, the parameters, ``weights [N]`` and
``pooled [B, D]`` (plus, on Triton, the per-bag log-sum-exp). The Triton path keeps no ``N x HID`` activation:
its backward recomputes them from ``h`` (cheap on a GPU). The torch path on CPU tensors keeps ``[tanh | sigmoid]``
of the computed rows when ``h`` requires grad and they fit ``KEEP_ACTIVATIONS_BYTES`` (on a CPU the recompute GEMM
costs more time than they cost memory, next to the ``N x D`` ``grad_h`` that backward allocates anyway), and
recomputes otherwise.

- **triton** (``fastmil.kernels.gated_attention_pool``): forward = one fused tile kernel (score GEMM with ``tl.dot``,
  online softmax statistics, partial weighted sum) + a merge kernel per bag + a weight-normalisation kernel.
  Backward = one fused tile kernel (recompute from ``h`` and the log-sum-exp, pre-activation grads ``dpre``)
  + ``grad_h = a g + dpre [V; U]`` + a split-N weight-grad GEMM ``dpre^T h`` whose per-split partials are
  summed in a fixed order (deterministic, no atomics). ``dpre`` (``N x 2 HID`` fp32) lives only inside
  backward: the weight gradients are a reduction over all rows that needs it as a GEMM operand. Inputs of any
  strides are accepted (passed in a checked layout, ``kernels._launch.canonical``); outputs have their own.
- **torch** (CPU, or ``backend="torch"``): row chunks of ``CHUNK_ROWS``. V and U run as one ``[2 HID, D]`` GEMM;
  in backward, for a chunk inside one bag, ``[V; U; g_b]`` makes the recompute GEMM (when activations were not
  kept; else one ``h g_b`` product) also yield ``h . g_b`` and the ``grad_h`` GEMM also add ``a g_b``, written
  straight into ``grad_h``. Working memory is ``O(CHUNK_ROWS x (D + HID))`` beyond the outputs, ``grad_h`` and
  the kept activations. On the CPU, a mask that
  keeps under half the rows (MHIM's student) makes the score GEMMs of both passes (the recompute included) run
  over the unmasked rows only. When those ``[K, D]`` rows fit ``KEEP_ACTIVATIONS_BYTES`` (in the accumulation
  dtype), they are gathered once, the pooling runs over them too, and backward reuses them (kept while ``h``
  requires grad); otherwise each chunk gathers its own rows and the pooling spans all rows. The zero-filled
  ``grad_h`` spans all rows, or, with ``sparse_grad``, a sparse ``grad_h`` holds the gathered rows alone.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels._launch import canonical
from ..kernels.limits import MAX_HIDDEN
from ._autocast import no_autocast
from ._backend import resolve_backend
from ._segments import bag_grad_dot, bag_index, lse_grad_rows, pool_per_bag, segment_softmax
from ._tiles import build_tiles, finish_tiled_pool, host_offsets
from ._triton import HAS_TRITON, check_triton_inputs

__all__ = ["CHUNK_ROWS", "MAX_HIDDEN", "gated_attention_pool", "gated_attention_pool_reference"]

CHUNK_ROWS = 2048
"""Rows per chunk of the torch path (bounds its working memory; large enough for efficient GEMMs)."""


def _check_inputs(h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, offsets, mask) -> None:
    if h.dim() != 2:
        raise ValueError(f"gated_attention_pool: h must be [N, D], got shape {tuple(h.shape)}")
    n, dim = h.shape
    hidden = v_weight.shape[0]
    expected = {
        "v_weight": (v_weight, (hidden, dim)), "u_weight": (u_weight, (hidden, dim)),
        "v_bias": (v_bias, (hidden,)), "u_bias": (u_bias, (hidden,)),
        "w_weight": (w_weight, (1, hidden)), "w_bias": (w_bias, (1,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"gated_attention_pool: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.numel() < 2:
        raise ValueError("gated_attention_pool: offsets must be int64 [B+1] with B >= 1")
    if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (n,)):
        raise ValueError(f"gated_attention_pool: mask must be bool [N] = [{n}], got {mask.dtype} {tuple(mask.shape)}")


def gated_attention_pool_reference(
    h: torch.Tensor, v_weight: torch.Tensor, v_bias: torch.Tensor, u_weight: torch.Tensor, u_bias: torch.Tensor,
    w_weight: torch.Tensor, w_bias: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: a Python loop over bags with plain differentiable torch ops, computed in the
    dtype of ``h`` (pass fp64 tensors). Gradients come from autograd through it."""
    _check_inputs(h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, offsets, mask)
    n_bags = offsets.numel() - 1
    bounds = offsets.tolist()
    pooled_rows, weights = [], torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    for b in range(n_bags):
        lo, hi = bounds[b], bounds[b + 1]
        keep = torch.ones(hi - lo, dtype=torch.bool, device=h.device) if mask is None else mask[lo:hi]
        if not bool(keep.any()):
            pooled_rows.append(h.new_zeros(h.shape[1]))
            continue
        x = h[lo:hi][keep]
        gate = torch.tanh(x @ v_weight.T + v_bias) * torch.sigmoid(x @ u_weight.T + u_bias)
        a = torch.softmax((gate @ w_weight.T + w_bias)[:, 0], dim=0)
        pooled_rows.append(a @ x)
        weights = weights.index_put((torch.nonzero(keep).flatten() + lo,), a)
    return torch.stack(pooled_rows), weights


# ----------------------------------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------------------------------
class _GatedPoolTorch(torch.autograd.Function):
    """Chunked torch path (activations kept or recomputed); see the module docstring. Computes in fp32 (fp64 for
    fp64 ``h``). ``keep``: backward will run and return ``grad_h`` (grad enabled and ``h`` requires grad)."""

    @staticmethod
    @no_autocast
    def forward(ctx, h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, offsets, mask, offsets_cpu, keep,
                sparse_grad):
        hidden = v_weight.shape[0]
        acc = _accumulation_dtype(h)
        w2 = torch.cat([v_weight, u_weight]).to(acc)  # [2 HID, D]
        b2 = torch.cat([v_bias, u_bias]).to(acc)
        w_vec, bw = w_weight[0].to(acc), w_bias.to(acc)
        rows = _compact_rows(h, mask)
        n_rows = h.shape[0] if rows is None else rows.numel()
        # the unmasked rows gathered once when compacting and they fit the budget: for the scores, the pooling and
        # backward (else each chunk gathers its own rows, in both passes)
        gathered = None
        if rows is not None and n_rows * h.shape[1] * torch.finfo(acc).bits // 8 <= KEEP_ACTIVATIONS_BYTES:
            gathered = h.index_select(0, rows).to(acc)  # ~1.6x faster here than h[rows]
        # [tanh | sigmoid] of the computed rows, in chunk order, when backward will need them and they fit
        acts = None
        if keep and n_rows * 2 * hidden * torch.finfo(acc).bits // 8 <= KEEP_ACTIVATIONS_BYTES:
            acts = torch.empty(n_rows, 2 * hidden, dtype=acc, device=h.device)
        scores = torch.zeros(h.shape[0], dtype=acc, device=h.device)  # rows left out are masked
        for i, part in enumerate(_row_chunks(h.shape[0], rows)):
            x = h[part].to(acc) if gathered is None else gathered[i * CHUNK_ROWS : (i + 1) * CHUNK_ROWS]
            pre = torch.addmm(b2, x, w2.T)
            if acts is None:
                gate = torch.tanh(pre[:, :hidden]).mul_(torch.sigmoid(pre[:, hidden:]))
            else:
                chunk = acts[i * CHUNK_ROWS : i * CHUNK_ROWS + pre.shape[0]]
                t, sg = torch.tanh(pre[:, :hidden], out=chunk[:, :hidden]), torch.sigmoid(pre[:, hidden:],
                                                                                        out=chunk[:, hidden:])
                gate = torch.mul(t, sg, out=pre[:, :hidden])
            scores[part] = torch.addmv(bw, gate, w_vec)
        bounds = offsets_cpu.tolist()
        weights, lse = segment_softmax(scores[:, None], offsets, mask, bounds)  # [N, 1], [B, 1]
        if gathered is None:
            pooled = pool_per_bag(weights, h, offsets, bounds)[:, 0]  # [B, D]
        else:  # over the gathered rows alone (rows is sorted: each bag's rows are contiguous in it)
            compact = torch.searchsorted(rows, offsets_cpu.to(rows.device))
            pooled = pool_per_bag(weights[rows], gathered, compact, compact.tolist())[:, 0]
        weights = weights[:, 0]
        ctx.save_for_backward(h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, weights, pooled, offsets, acts,
                              gathered if keep else None)
        ctx.rows = rows
        ctx.sparse_grad = sparse_grad and rows is not None  # grad_h as a sparse tensor over the computed rows
        ctx.set_materialize_grads(False)
        return pooled, weights, lse[:, 0]

    @staticmethod
    @no_autocast
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad_pooled, grad_weights, grad_lse):
        (h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, weights, pooled, offsets, acts,
         gathered) = ctx.saved_tensors
        need = ctx.needs_input_grad
        hidden = v_weight.shape[0]
        k2 = 2 * hidden
        acc = _accumulation_dtype(h)
        # w3 = [V; U; g_b] and b3 = [bv; bu; 0]: for a chunk inside one bag, one GEMM x @ w3^T gives both
        # pre-activations and u = h . g_b, and with the last column replaced by the weights a, one GEMM
        # [dpre | a] @ w3 gives grad_h = dpre [V; U] + a g_b: no separate passes over x or grad_h.
        w3 = torch.zeros(k2 + 1, h.shape[1], dtype=acc, device=h.device)
        w3[:hidden], w3[hidden:k2] = v_weight, u_weight
        w2 = w3[:k2]
        b3 = torch.cat([v_bias.to(acc), u_bias.to(acc), v_bias.new_zeros(1, dtype=acc)])
        w_vec = w_weight[0].to(acc)
        g = torch.zeros_like(pooled) if grad_pooled is None else grad_pooled.to(acc)
        bag_dot = bag_grad_dot(g, pooled, weights, grad_weights, offsets)
        grad_weights = lse_grad_rows(grad_weights, grad_lse, offsets, h.shape[0])
        bag = bag_index(offsets, h.shape[0])
        rows, sparse = ctx.rows, ctx.sparse_grad
        grad_h = grad_rows = None
        if need[0] and sparse:  # the computed rows' gradients alone, in chunk order
            grad_rows = torch.empty(rows.numel(), h.shape[1], dtype=acc, device=h.device)
        elif need[0]:
            new_grad_h = torch.empty if rows is None else torch.zeros  # rows left out (masked) get no gradient
            grad_h = new_grad_h(h.shape, dtype=h.dtype, device=h.device)
        grad_w2 = torch.zeros_like(w2)
        grad_b2 = torch.zeros(k2, dtype=acc, device=h.device)
        grad_wv = torch.zeros_like(w_vec)
        grad_bw = torch.zeros(1, dtype=acc, device=h.device)
        one = torch.ones((), dtype=acc, device=h.device)
        row_bag = -1  # the bag whose g is in w3's last row
        for i, part in enumerate(_row_chunks(h.shape[0], rows)):
            x = h[part].to(acc) if gathered is None else gathered[i * CHUNK_ROWS : (i + 1) * CHUNK_ROWS]
            part_bag = bag[part]
            first, last = int(part_bag[0]), int(part_bag[-1])
            single_bag = first == last  # the common case; small bags share chunks and take the gather path
            if single_bag and first != row_bag:
                w3[k2], row_bag = g[first], first
            g_rows = None if single_bag else g[part_bag]
            if acts is None:  # recompute
                pre = torch.addmm(b3, x, w3.T)  # [chunk, 2H + 1]
                t, sg = torch.tanh(pre[:, :hidden]), torch.sigmoid(pre[:, hidden:k2])
                u = pre[:, k2] if single_bag else torch.einsum("nd,nd->n", x, g_rows)
            else:  # kept by forward: only u = x . g_b is new
                chunk = acts[i * CHUNK_ROWS : i * CHUNK_ROWS + x.shape[0]]
                t, sg = chunk[:, :hidden], chunk[:, hidden:]
                pre = torch.empty(x.shape[0], k2 + 1, dtype=acc, device=h.device)
                u = torch.mv(x, g[first]) if single_bag else torch.einsum("nd,nd->n", x, g_rows)
            a = weights[part]
            if grad_weights is not None:
                u = u + grad_weights[part].to(acc)
            ds = a * (u - bag_dot[part_bag])
            dz = ds[:, None] * w_vec[None, :]
            # reuse `pre` as the buffer of [dpre_v | dpre_u | a], three in-place passes per half:
            # dpre_v = dz sg (1 - t^2), dpre_u = dz t sg (1 - sg)
            torch.addcmul(one, t, t, value=-1, out=pre[:, :hidden]).mul_(sg).mul_(dz)
            torch.addcmul(sg, sg, sg, value=-1, out=pre[:, hidden:k2]).mul_(t).mul_(dz)
            pre[:, k2] = a
            dpre = pre[:, :k2]
            grad_w2.addmm_(dpre.T, x)
            grad_b2 += dpre.sum(0)
            grad_wv += (t * sg).T @ ds
            grad_bw += ds.sum()
            if need[0]:
                direct = sparse or (isinstance(part, slice) and grad_h.dtype == acc)  # written in place
                if sparse:
                    dh = grad_rows[i * CHUNK_ROWS : i * CHUNK_ROWS + x.shape[0]]
                else:
                    dh = grad_h[part] if direct else torch.empty_like(x)
                if single_bag:
                    torch.mm(pre, w3, out=dh)
                else:
                    torch.mul(g_rows, a[:, None], out=dh)
                    dh.addmm_(dpre, w2)
                if not direct:
                    grad_h[part] = dh.to(grad_h.dtype)
        if grad_rows is not None:  # rows is sorted and unique: a coalesced [N, D] tensor with K dense rows
            grad_h = torch.sparse_coo_tensor(rows[None], grad_rows.to(h.dtype), h.shape, is_coalesced=True,
                                             check_invariants=False)
        return (
            grad_h,
            grad_w2[:hidden].to(v_weight.dtype) if need[1] else None,
            grad_b2[:hidden].to(v_bias.dtype) if need[2] else None,
            grad_w2[hidden:].to(u_weight.dtype) if need[3] else None,
            grad_b2[hidden:].to(u_bias.dtype) if need[4] else None,
            grad_wv[None].to(w_weight.dtype) if need[5] else None,
            grad_bw.to(w_bias.dtype) if need[6] else None,
            None,
            None,
            None,
            None,
            None,
        )


COMPACT_BELOW = 0.5
"""The torch path computes scores only for unmasked rows (gathered) when they are fewer than this share of the
batch (MHIM's student keeps ~20%); denser masks run over all rows in place."""


KEEP_ACTIVATIONS_BYTES = 256 * 2**20
"""On CPU tensors the torch path keeps the gated activations ``[rows, 2 HID]`` (tanh and sigmoid of the computed
rows) for backward when they take at most this many bytes (100k rows at HID 128 in fp32: 100 MiB), instead of
recomputing them with a ``[rows, D] x [D, 2 HID]`` GEMM: on a CPU the GEMM costs more time than the memory costs
(measured: ~8% of an ABMIL step at every bag size). Only when ``h`` requires grad: then backward allocates the
``N x D`` ``grad_h`` anyway, of which the kept floats are ``2 HID / D`` (half for ABMIL's 512-wide embeddings at
HID 128). Larger inputs, ``h`` without grad (pooling stored features) and GPU tensors recompute, so memory stays
``O(CHUNK_ROWS x (D + HID))`` beyond the outputs, plus the gathered rows of a sparse mask, which this budget also
bounds (``[K, D]``, see the module docstring)."""


def _compact_rows(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The unmasked row indices ``int64 [K]`` when the mask drops enough rows to make gathering them worth it, else
    None (every row is computed). Host-side decision: only on the CPU, where it costs no device synchronisation."""
    if mask is None or h.device.type != "cpu":
        return None
    rows = mask.nonzero()[:, 0]
    return rows if rows.numel() < COMPACT_BELOW * mask.numel() else None


def _row_chunks(n: int, rows: torch.Tensor | None) -> list[slice] | list[torch.Tensor]:
    """Chunks of at most ``CHUNK_ROWS`` rows: slices of ``range(n)``, or index tensors of ``rows``."""
    if rows is None:
        return [slice(lo, min(lo + CHUNK_ROWS, n)) for lo in range(0, n, CHUNK_ROWS)]
    return [rows[lo : lo + CHUNK_ROWS] for lo in range(0, rows.numel(), CHUNK_ROWS)]


def _accumulation_dtype(h: torch.Tensor) -> torch.dtype:
    """fp32 for fp32/fp16/bf16 ``h``; fp64 for fp64 (references, ``gradcheck``)."""
    return torch.float64 if h.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------------------------
class _GatedPoolTriton(torch.autograd.Function):
    """Fused Triton kernels; see the module docstring. The gate parameters reach the kernels zero-padded to
    ``HID_PAD`` units (``pad_gate_params``, a few hundred KiB), which fixes their specialisation."""

    @staticmethod
    def forward(ctx, h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, offsets, mask, offsets_cpu):
        from ..kernels import gated_attention_pool as k

        n, dim = h.shape
        hidden = v_weight.shape[0]
        dev = h.device
        h = canonical(h, strided=True)
        mask = None if mask is None else canonical(mask)
        params = k.pad_gate_params(v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, h.dtype)
        cfg = k.gated_config(hidden, h.dtype)
        tiles = build_tiles(offsets_cpu, n, cfg.block_n, dev)
        n_bags = offsets.numel() - 1
        pooled = torch.zeros(n_bags, dim, dtype=torch.float32, device=dev)
        lse = torch.full((n_bags,), float("inf"), dtype=torch.float32, device=dev)
        weights = torch.zeros(n, dtype=torch.float32, device=dev)  # raw scores first, then weights in place
        if tiles.n_tiles > 0:
            tile_max = torch.empty(tiles.n_tiles, dtype=torch.float32, device=dev)
            tile_sum = torch.empty_like(tile_max)
            partial = torch.empty(tiles.n_tiles, dim, dtype=torch.float32, device=dev)
            k.gated_fwd_launch(h, *params, mask, tiles.tile_start, tiles.tile_end, weights, tile_max, tile_sum,
                               partial)()
            finish_tiled_pool(tile_max[:, None], tile_sum[:, None], partial[:, None], tiles, weights[:, None], mask,
                              pooled[:, None], lse[:, None], weights[:, None], cfg.block_n)
        ctx.save_for_backward(h, *params, weights, pooled, lse, offsets, mask if mask is not None else lse,
                              tiles.tile_bag, tiles.tile_start, tiles.tile_end)
        ctx.has_mask, ctx.hidden = mask is not None, hidden
        ctx.param_dtypes = [p.dtype for p in (v_weight, v_bias, u_weight, u_bias, w_weight, w_bias)]
        ctx.set_materialize_grads(False)
        return pooled, weights, torch.where(torch.isposinf(lse), -lse, lse)  # log 0 = -inf for empty bags

    @staticmethod
    @once_differentiable  # a second derivative raises: this backward builds no (correct) graph of its own
    def backward(ctx, grad_pooled, grad_weights, grad_lse):
        from ..kernels import gated_attention_pool as k

        (h, vu, bias, w, wb, weights, pooled, lse, offsets, mask, tile_bag, tile_start, tile_end) = ctx.saved_tensors
        mask = mask if ctx.has_mask else None
        need = ctx.needs_input_grad
        n, dim = h.shape
        hidden, hid_pad = ctx.hidden, vu.shape[1]
        dev = h.device
        g = canonical(torch.zeros_like(pooled) if grad_pooled is None else grad_pooled.float())
        bag_dot = bag_grad_dot(g, pooled, weights, grad_weights, offsets)
        grad_weights = lse_grad_rows(grad_weights, grad_lse, offsets, n)
        if grad_weights is not None:
            grad_weights = canonical(grad_weights.float())
        dpre = torch.zeros(n, 2 * hid_pad, dtype=torch.float32, device=dev)  # [dpre_v | dpre_u]
        grad_s = torch.zeros(n, dtype=torch.float32, device=dev)
        grad_w_partial = torch.zeros(max(tile_bag.numel(), 1), hid_pad, dtype=torch.float32, device=dev)
        k.gated_bwd_launch(h, vu, bias, w, wb, mask, tile_bag, tile_start, tile_end, lse, g, bag_dot, grad_weights,
                           dpre, grad_s, grad_w_partial)()
        grad_h = None
        if need[0]:
            grad_h = torch.empty(h.shape, dtype=h.dtype, device=dev)  # every row belongs to a tile
            w2 = vu.reshape(2 * hid_pad, dim).float()  # [V; U] padded, fp32 (a view for fp32 inputs)
            k.grad_h_launch(dpre, w2, weights, g, tile_bag, tile_start, tile_end, grad_h)()
        grad_w2 = None
        if need[1] or need[3]:
            n_splits = max(1, -(-n // k.rows_per_split(n)))
            partial = torch.zeros(n_splits, 2 * hid_pad, dim, dtype=torch.float32, device=dev)
            k.weight_grad_launch(dpre, h, partial)()
            grad_w2 = partial.sum(0)  # fixed-order reduction over splits: deterministic
        dt = ctx.param_dtypes
        return (
            grad_h,
            grad_w2[:hidden].to(dt[0]) if need[1] else None,
            dpre[:, :hidden].sum(0).to(dt[1]) if need[2] else None,
            grad_w2[hid_pad : hid_pad + hidden].to(dt[2]) if need[3] else None,
            dpre[:, hid_pad : hid_pad + hidden].sum(0).to(dt[3]) if need[4] else None,
            grad_w_partial.sum(0)[None, :hidden].to(dt[4]) if need[5] else None,
            grad_s.sum().reshape(1).to(dt[5]) if need[6] else None,
            None,
            None,
            None,
        )


def gated_attention_pool(
    h: torch.Tensor,
    v_weight: torch.Tensor,
    v_bias: torch.Tensor,
    u_weight: torch.Tensor,
    u_bias: torch.Tensor,
    w_weight: torch.Tensor,
    w_bias: torch.Tensor,
    offsets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    offsets_cpu: torch.Tensor | None = None,
    return_lse: bool = False,
    sparse_grad: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Fused gated attention pooling over packed ragged bags (contract in the module docstring).

    ``backend``: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``; ``FASTMIL_BACKEND``
    overrides ``"auto"``. The Triton path supports ``hidden_dim <= MAX_HIDDEN`` and ``D >= 2``.
    ``offsets_cpu``: the host copy of ``offsets`` (``Bags.offsets_cpu``), which saves a device-to-host copy.
    ``return_lse``: also return the per-bag log-sum-exp of the scores ``[B]`` (differentiable; ``-inf`` for a bag
    with nothing unmasked), to merge this pooling with extra tokens without concatenating the bag.
    ``sparse_grad``: where the torch path computes over the unmasked rows only (CPU tensors, a mask keeping under
    ``COMPACT_BELOW`` of the rows), return ``grad_h`` as a sparse COO tensor over those rows instead of a
    zero-filled ``[N, D]`` one (as ``nn.Embedding(sparse=True)`` does). Autograd adds it into a dense gradient
    that another consumer of ``h`` returns by writing the rows alone: no ``N x D`` zero fill and no ``N x D``
    addition. Only for callers that know such a dense gradient meets it (MHIM-MIL: the recycle network reads every
    row): the op upstream of ``h`` may not accept a sparse gradient. Elsewhere ``grad_h`` is dense.
    """
    _check_inputs(h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, offsets, mask)
    args = (h, v_weight, v_bias, u_weight, u_bias, w_weight, w_bias, offsets, mask, host_offsets(offsets, offsets_cpu))
    if resolve_backend(backend, "gated_attention_pool", h.device, has_triton=HAS_TRITON) == "triton":
        check_triton_inputs("gated_attention_pool", h.dtype, h.shape[1], *args[:-1])  # offsets_cpu is on the host
        if v_weight.shape[0] > MAX_HIDDEN:
            raise ValueError(
                f"gated_attention_pool: the Triton kernels support hidden_dim <= {MAX_HIDDEN}, "
                f"got {v_weight.shape[0]}; use backend='torch'"
            )
        pooled, weights, lse = _GatedPoolTriton.apply(*args)
    else:
        # keep the activations only on the CPU (KEEP_ACTIVATIONS_BYTES) and when backward will run and return grad_h
        # (the forward itself runs with grad disabled): its N x D buffer dwarfs the N x 2 HID kept floats, while
        # pooling stored features (no grad_h) would otherwise hold almost nothing beyond its outputs
        keep = torch.is_grad_enabled() and h.requires_grad and h.device.type == "cpu"
        pooled, weights, lse = _GatedPoolTorch.apply(*args, keep, sparse_grad)
    return (pooled, weights, lse) if return_lse else (pooled, weights)
