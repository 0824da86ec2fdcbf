"""gated_attention_pool (the fused op behind GatedAttentionPool) vs an independent fp64 reference.

Forward and every gradient (h, V, U, w and their biases), on ragged bags, with no mask, a random mask and an
all-masked bag, for fp32/fp16/bf16 inputs, on both backends: ``torch`` and ``triton`` through the interpreter
on CPU tensors. The reference sees the same rounded inputs as the path under test: for fp16 inputs the Triton
path runs the score GEMM with V and U rounded to fp16 (``score_weight_dtype``), so its reference rounds them
too; everything else is fp32 arithmetic in both paths (the interpreter computes dots in fp32, and under it the
bf16 score GEMM is upcast). Hence fp32-level tolerances for every fp32 output whatever the input dtype.

Tolerances follow tests/tolerance.py, from each case's shapes (D, hidden, bag sizes) and from ``score_error``: a score
is a dot over hidden units of gated activations of two GEMMs over D, so its absolute error is ``sqrt(D + hidden)``
roundings at the magnitude of the terms it sums (``_score_scale``); ``exp`` makes that a relative error of every
weight. Pooled: the bag's softmax and weighted sum (depth 2n) plus the score error, times the weighted sum's
cancellation; weights: ``softmax_weight_ratio``; grad h: per bag, depth n + 2(D + hidden) plus the score error;
parameter grads: a sum over every row (depth N) plus the same. fp16/bf16 grads add one unit of their last place.
Rounding the weights to fp16 before pooling gives ~2e-4 and fails.
"""
import importlib
import math

import pytest
import torch

from fastmil.kernels._launch import upcast_dots
from fastmil.nn import GatedAttentionPool
from fastmil.ops import attention_pool, gated_attention_pool, gated_attention_pool_reference
from tests.ragged import (
    LAYOUTS,
    SIZES,
    SMALL_SIZES,
    STRIDED_DIM,
    WIDE_DIM,
    make_mask,
    offsets_of,
    per_bag_error,
    relative_error,
    strided,
)
from tests.tolerance import (
    check,
    family_of,
    half_rounding,
    lse_bound,
    max_bag,
    pooled_condition,
    rounding_bound,
    softmax_weight_ratio,
)

gated_module = importlib.import_module("fastmil.ops.gated_attention_pool")  # the package exports the function

DIM, HIDDEN = 40, 24  # neither a power of two: exercises the padded tails of every block
PARAM_NAMES = ["v_weight", "v_bias", "u_weight", "u_bias", "w_weight", "w_bias"]
FAMILY = "gated_attention_pool"


def _case(sizes, dtype, mask_kind, seed=0, dim=DIM, hidden=HIDDEN):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    h = torch.randn(n, dim, generator=g).to(dtype)
    params = [
        torch.randn(hidden, dim, generator=g) / dim**0.5,
        torch.randn(hidden, generator=g) * 0.1,
        torch.randn(hidden, dim, generator=g) / dim**0.5,
        torch.randn(hidden, generator=g) * 0.1,
        torch.randn(1, hidden, generator=g) * 2,  # large enough for peaked (not uniform) attention
        torch.randn(1, generator=g),
    ]
    return h, params, offsets_of(sizes), make_mask(sizes, mask_kind, g)


def _score_rounding(backend: str, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype V and U are rounded to for the score GEMM on this path (None: kept in fp32)."""
    if backend == "triton" and not upcast_dots(dtype):
        return dtype
    return None


def _run(h, params, offsets, mask, backend, grads):
    h1 = h.detach().requires_grad_()  # detach keeps the view's strides (clone would not)
    p1 = [p.clone().requires_grad_() for p in params]
    pooled, weights = gated_attention_pool(h1, *p1, offsets, mask, backend=backend)
    gp, gw = grads
    ((pooled.double() * gp).sum() + (weights.double() * gw).sum()).backward()
    return pooled, weights, h1.grad, [p.grad for p in p1]


def _reference(h, params, offsets, mask, grads, rounding):
    h64 = h.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    used = list(p64)
    if rounding is not None:  # round V and U as the kernel's score GEMM does; gradients flow through
        used[0] = p64[0] + (p64[0].to(rounding).double() - p64[0]).detach()
        used[2] = p64[2] + (p64[2].to(rounding).double() - p64[2]).detach()
    pooled, weights = gated_attention_pool_reference(h64, *used, offsets, mask)
    gp, gw = grads
    ((pooled * gp).sum() + (weights * gw).sum()).backward()
    return pooled, weights, h64.grad, [p.grad for p in p64]


BACKENDS = ["torch", "torch/recompute", "triton"]
"""``torch/recompute``: the torch path with no activation budget, so its backward recomputes the gated activations
(the path of inputs over ``KEEP_ACTIVATIONS_BYTES``); ``torch`` keeps them (every test size fits the budget)."""


def _select(backend, monkeypatch):
    """The op's backend argument for a ``BACKENDS`` entry (setting the budget for ``torch/recompute``)."""
    if backend == "torch/recompute":
        monkeypatch.setattr(gated_module, "KEEP_ACTIVATIONS_BYTES", 0)
        return "torch"
    return backend


def _upstream(n_bags, n, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_bags, dim, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def _score_scale(h, params):
    """The size of a score's rounding error in units of ``u sqrt(D + hidden)``, largest over the rows: the 2-norm of
    the terms ``w_k g_k`` the score sums (a sum of terms of either sign errs by ~``u sqrt(K) |terms|_2``, not by
    the worst case ``u K max|term|``), plus the inner GEMMs' errors ``u sqrt(D) |V_k * h|_2`` (and U's) carried to
    the score by the slopes of the gate, ``|w_k d g_k / d a_k|``."""
    h64 = h.detach().double()
    v, bv, u, bu, w, bw = (p.detach().double() for p in params)
    a, b = h64 @ v.T + bv, h64 @ u.T + bu
    t, g = torch.tanh(a), torch.sigmoid(b)
    # |V_k * h_i|_2 for every (row, unit): sqrt(h^2 @ (V^2)^T)
    inner_v, inner_u = (h64.square() @ v.square().T).sqrt(), (h64.square() @ u.square().T).sqrt()
    carried = ((1 - t.square()) * g * inner_v).abs() + (t * g * (1 - g) * inner_u).abs()
    terms = (w[0] * t * g).square().sum(1).sqrt() + (w[0] * carried).square().sum(1).sqrt()
    return float(terms.max()) if h.shape[0] else 0.0


def _score_max(h, params):
    """The largest ``|score|`` of the rows (fp64): the size at which a bag's log-sum-exp is rounded."""
    h64 = h.detach().double()
    v, bv, u, bu, w, bw = (p.detach().double() for p in params)
    scores = (torch.tanh(h64 @ v.T + bv) * torch.sigmoid(h64 @ u.T + bu)) @ w[0] + bw
    return float(scores.abs().max()) if h.shape[0] else 0.0


def _score_error(h, params):
    """``sqrt(D + hidden) * _score_scale``: the score's absolute error in units of ``LAMBDA u`` (the ``extra`` of a
    bound), counted twice: in the score itself and in the bag's log-sum-exp."""
    dim, hidden = h.shape[1], params[0].shape[0]
    return 2 * math.sqrt(dim + hidden) * _score_scale(h, params)


def _grad_bound(depth, dtype, extra):
    """A gradient of ``depth`` fp32 roundings plus the score error, stored in ``dtype`` (one more rounding)."""
    return rounding_bound(depth, extra=extra) + half_rounding(dtype)


def _check_grads(grad_h, r_grad_h, grad_p, r_grad_p, h, params, offsets, dtype, names=PARAM_NAMES[:-1]):
    """grad h per bag (depth n + 2 (D + hidden)), each parameter gradient over every row (depth N + n + D + hidden),
    both with the score error."""
    dim, hidden, n = h.shape[1], params[0].shape[0], max_bag(offsets)
    extra = _score_error(h, params)
    if grad_h is not None:
        check(per_bag_error(grad_h, r_grad_h, offsets), _grad_bound(n + 2 * (dim + hidden) + 4, dtype, extra),
              family_of(FAMILY, dtype), "grad h")
    for name, got, ref in zip(names, grad_p, r_grad_p):
        assert got.dtype == torch.float32
        bound = _grad_bound(h.shape[0] + n + dim + hidden + 4, torch.float32, extra)
        check(relative_error(got, ref), bound, FAMILY, f"grad {name}")


def _check(actual, expected, offsets, mask, dtype, h, params, rounding=None):
    pooled, weights, grad_h, grad_p = actual
    r_pooled, r_weights, r_grad_h, r_grad_p = expected
    assert pooled.dtype == weights.dtype == torch.float32 and grad_h.dtype == dtype
    if rounding is not None:  # the reference's score GEMM sees V and U rounded as the kernel's does
        params = [p.to(rounding).float() if i in (0, 2) else p for i, p in enumerate(params)]
    extra = _score_error(h, params)
    condition = pooled_condition(r_weights, h, offsets, r_pooled)
    # the bag's softmax and weighted sum (2n roundings), and the scores' error moving every weight
    pooled_bound = rounding_bound(2 * max_bag(offsets) + 2, condition=condition, extra=extra * condition)
    check(relative_error(pooled, r_pooled), pooled_bound, FAMILY, "pooled")
    weights_ratio = softmax_weight_ratio(weights, r_weights, offsets, _score_scale(h, params),
                                         h.shape[1] + params[0].shape[0], score_max=_score_max(h, params))
    check(weights_ratio, 1.0, FAMILY, "weights")
    _check_grads(grad_h, r_grad_h, grad_p[:5], r_grad_p[:5], h, params, offsets, dtype)
    # softmax ignores a shift of every score, so the exact gradient of w_bias is 0: compare on the scale of w
    bound = _grad_bound(h.shape[0] + max_bag(offsets) + 4, torch.float32, extra)
    check(abs(float(grad_p[5])) / float(r_grad_p[4].abs().max()), bound, FAMILY, "grad w_bias")
    if mask is not None:
        assert torch.all(weights[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "random", "sparse", "all-masked-bag"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_and_all_gradients_match_fp64_reference(dtype, mask_kind, backend, monkeypatch):
    backend = _select(backend, monkeypatch)
    h, params, offsets, mask = _case(SIZES, dtype, mask_kind)
    if mask_kind == "sparse":  # every bag keeps its first row: the bag boundaries of the gathered rows matter
        mask[offsets[:-1]] = True
    grads = _upstream(len(SIZES), sum(SIZES), DIM)
    actual = _run(h, params, offsets, mask, backend, grads)
    rounding = _score_rounding(backend, dtype)
    _check(actual, _reference(h, params, offsets, mask, grads, rounding), offsets, mask, dtype, h, params, rounding)
    if mask_kind == "all-masked-bag":
        rows = slice(int(offsets[2]), int(offsets[3]))
        assert torch.all(actual[0][2] == 0) and torch.all(actual[1][rows] == 0)
        assert torch.all(actual[2][rows] == 0)
    assert torch.isfinite(actual[2]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [24, 64, 128, 256])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wide_features_and_every_hidden_pad(hidden, dtype, backend):
    """D = 259 spans several D blocks with a ragged tail in every kernel (and 2 merge blocks); hidden 24/64/128/
    256 select every tile config (HID_PAD 32..256)."""
    h, params, offsets, mask = _case(SMALL_SIZES, dtype, "random", seed=7, dim=WIDE_DIM, hidden=hidden)
    grads = _upstream(len(SMALL_SIZES), sum(SMALL_SIZES), WIDE_DIM, seed=8)
    actual = _run(h, params, offsets, mask, backend, grads)
    rounding = _score_rounding(backend, dtype)
    _check(actual, _reference(h, params, offsets, mask, grads, rounding), offsets, mask, dtype, h, params, rounding)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs_and_outputs(layout, backend):
    """h as a column slice, a misaligned view, a row-strided or a transposed matrix, and a non-contiguous mask:
    the same numbers as contiguous inputs, and grad_h in a buffer of its own (the old Triton backward stored it
    with the input's row stride, past the end of a contiguous buffer)."""
    sizes = [1, 70, 129]
    h, params, offsets, mask = _case(sizes, torch.float32, "random", seed=9, dim=STRIDED_DIM[layout], hidden=40)
    mask_view = torch.zeros(2 * sum(sizes), dtype=torch.bool)
    mask_view[1::2] = mask
    grads = _upstream(len(sizes), sum(sizes), STRIDED_DIM[layout], seed=10)
    view = strided(h, layout)
    assert not view.is_contiguous()
    actual = _run(view, params, offsets, mask_view[1::2], backend, grads)
    assert actual[2].shape == h.shape
    _check(actual, _reference(h, params, offsets, mask, grads, None), offsets, mask, torch.float32, h, params)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["sparse", "random"])
@pytest.mark.parametrize("backend", ["torch", "torch/recompute"])
def test_chunks_of_one_bag(dtype, mask_kind, backend, monkeypatch):
    """The torch path in chunks that lie inside one large bag (the single-bag GEMM path), after a bag of 3 that
    shares the first chunk: gathered rows (a mask keeping ~20%) or all rows in place (a mask keeping ~70%), with
    the activations kept (each chunk reads its own rows of them) or recomputed; fp32 and a bf16 ``grad_h`` (cast
    on write)."""
    monkeypatch.setattr(gated_module, "CHUNK_ROWS", 128)
    _select(backend, monkeypatch)
    sizes = [3, 3000]
    h, params, offsets, mask = _case(sizes, dtype, mask_kind, seed=11)
    mask[1] = True  # the bag of 3 keeps a row, so the first chunk spans two bags
    assert int(mask[3:].sum()) > 3 * 128
    grads = _upstream(len(sizes), sum(sizes), DIM)
    actual = _run(h, params, offsets, mask, "torch", grads)
    _check(actual, _reference(h, params, offsets, mask, grads, None), offsets, mask, dtype, h, params)
    assert torch.all(actual[2][~mask] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_edge_bags_and_grad_of_params_only(backend):
    """Empty bags, a bag of one, an all-masked bag of one; h without grad (features straight from the store)."""
    h, params, offsets, _ = _case([0, 1, 3, 0, 65, 1], torch.float32, "none", seed=4)
    mask = torch.ones(h.shape[0], dtype=torch.bool)
    mask[-1] = False
    p1 = [p.clone().requires_grad_() for p in params]
    pooled, weights = gated_attention_pool(h, *p1, offsets, mask, backend=backend)
    assert torch.all(pooled[[0, 3, 5]] == 0)
    torch.testing.assert_close(pooled[1], h[0], atol=0, rtol=0)  # a bag of one pools to itself with weight exactly 1
    weights = weights.detach()
    assert float(weights[0]) == 1.0 and float(weights[-1]) == 0.0
    pooled.square().sum().backward()
    p64 = [p.double().requires_grad_() for p in params]
    gated_attention_pool_reference(h.double(), *p64, offsets, mask)[0].square().sum().backward()
    _check_grads(None, None, [p.grad for p in p1[:5]], [p.grad for p in p64[:5]], h, params, offsets, torch.float32)


@pytest.mark.parametrize("backend", ["torch/recompute", "triton"])
def test_no_n_by_hidden_tensor_is_saved_for_backward(backend, monkeypatch):
    """The recompute strategy (Triton; torch over its activation budget): nothing with N x hidden elements (or
    larger, except h itself) is kept."""
    backend = _select(backend, monkeypatch)
    n, dim, hidden = 300, 16, 64  # hidden > dim, so an N x hidden activation would be the largest tensor
    h, params, offsets, _ = _case([100, 200], torch.float32, "none", dim=dim, hidden=hidden)
    h = h.requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pooled, _ = gated_attention_pool(h, *params, offsets, backend=backend)
    assert saved, "expected the Function to save tensors through the hooks"
    for shape, ptr in saved:
        numel = int(torch.Size(shape).numel())
        assert numel < n * hidden or ptr == h.data_ptr(), f"saved a {shape} tensor"
    pooled.sum().backward()


def _saved_shapes(h, params, offsets, mask):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        gated_attention_pool(h, *params, offsets, mask, backend="torch")
    return saved


def test_torch_path_keeps_activations_within_budget(monkeypatch):
    """Under the budget, with ``h`` requiring grad, the torch path saves one ``[rows, 2 hidden]`` tensor (the gathered
    rows only, for a sparse mask) instead of recomputing; at exactly the budget still, one byte below it not; for
    ``h`` without grad (pooling stored features) not."""
    sizes, hidden = [100, 200], 24
    h, params, offsets, mask = _case(sizes, torch.float32, "sparse", seed=3, hidden=hidden)
    h = h.requires_grad_()
    rows = int(mask.sum())
    assert rows < 0.5 * h.shape[0]  # the gathered path
    assert (rows, 2 * hidden) in _saved_shapes(h, params, offsets, mask)
    assert (300, 2 * hidden) in _saved_shapes(h, params, offsets, None)
    with_param_grads = [p.clone().requires_grad_() for p in params]
    assert (300, 2 * hidden) not in _saved_shapes(h.detach(), with_param_grads, offsets, None)
    monkeypatch.setattr(gated_module, "KEEP_ACTIVATIONS_BYTES", 300 * 2 * hidden * 4)
    assert (300, 2 * hidden) in _saved_shapes(h, params, offsets, None)
    monkeypatch.setattr(gated_module, "KEEP_ACTIVATIONS_BYTES", 300 * 2 * hidden * 4 - 1)
    assert (300, 2 * hidden) not in _saved_shapes(h, params, offsets, None)


def _backward_addmm_count(monkeypatch, budget):
    """``aten.addmm`` calls in the backward of one fused pooling (the recompute is one per chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(gated_module, "KEEP_ACTIVATIONS_BYTES", budget)
    h, params, offsets, _ = _case([100, 200], torch.float32, "none", seed=3)
    pooled, _ = gated_attention_pool(h.requires_grad_(), *params, offsets, backend="torch")
    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.addmm.default:
                calls.append(func)
            return func(*args, **(kwargs or {}))

    with Count():
        pooled.sum().backward()
    return len(calls)


def test_kept_activations_are_not_recomputed(monkeypatch):
    assert _backward_addmm_count(monkeypatch, 0) >= 1  # the recompute GEMM
    assert _backward_addmm_count(monkeypatch, 2**30) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk_rows", [gated_module.CHUNK_ROWS, 7])  # one chunk, and many crossing the bags
@pytest.mark.parametrize("budget", ["default", 0])  # 0: nothing kept, each chunk gathers its own rows
def test_sparse_grad_is_the_dense_gradient_over_the_unmasked_rows(dtype, chunk_rows, budget, monkeypatch):
    """``sparse_grad=True`` with a mask that keeps under half the rows: ``grad_h`` comes back as a coalesced sparse
    tensor holding exactly the unmasked rows, equal (bitwise) to the dense gradient's; with a dense mask it stays a
    dense tensor. Added to a dense gradient from another use of ``h`` it gives the dense sum; the parameters'
    gradients do not change."""
    monkeypatch.setattr(gated_module, "CHUNK_ROWS", chunk_rows)
    if budget == 0:
        monkeypatch.setattr(gated_module, "KEEP_ACTIVATIONS_BYTES", 0)
    h, params, offsets, mask = _case(SIZES, dtype, "sparse", seed=21)
    assert int(mask.sum()) < gated_module.COMPACT_BELOW * mask.numel()
    grads = _upstream(len(SIZES), h.shape[0], DIM)
    _, _, dense_h, dense_p = _run(h, params, offsets, mask, "torch", grads)
    assert dense_h.layout == torch.strided

    def run(sparse_grad, other_use):
        h1 = h.detach().requires_grad_()
        p1 = [p.clone().requires_grad_() for p in params]
        pooled, weights = gated_attention_pool(h1, *p1, offsets, mask, backend="torch", sparse_grad=sparse_grad)
        gp, gw = grads
        loss = (pooled.double() * gp).sum() + (weights.double() * gw).sum()
        if other_use:
            loss = loss + (h1.double() * 3).sum()  # a dense gradient of 3 for every entry of h
        grad_h, *grad_p = torch.autograd.grad(loss, [h1, *p1])  # as autograd hands it upstream (no .grad copy)
        return grad_h, grad_p

    sparse_h, sparse_p = run(True, False)
    assert sparse_h.layout == torch.sparse_coo and sparse_h.is_coalesced() and sparse_h.dtype == dtype
    assert torch.equal(sparse_h.indices()[0], mask.nonzero()[:, 0])
    assert torch.equal(sparse_h.to_dense(), dense_h)
    assert all(torch.equal(a, b) for a, b in zip(sparse_p, dense_p))
    summed_h, _ = run(True, True)
    assert summed_h.layout == torch.strided
    assert torch.equal(summed_h, run(False, True)[0])
    dense_mask = torch.ones_like(mask)
    h2 = h.detach().requires_grad_()
    pooled, _ = gated_attention_pool(h2, *params, offsets, dense_mask, backend="torch", sparse_grad=True)
    pooled.sum().backward()
    assert h2.grad.layout == torch.strided


def test_torch_path_under_cpu_autocast_computes_in_fp32():
    """Under a caller's CPU bf16 autocast the op's own GEMMs still run in fp32 (no mixed-dtype error), with the
    numbers of the fp32 run."""
    h, params, offsets, mask = _case([5, 70], torch.float32, "random", seed=13)
    grads = _upstream(2, 75, DIM)
    expected = _run(h, params, offsets, mask, "torch", grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = _run(h, params, offsets, mask, "torch", grads)
    for got, want in zip(actual[:3], expected[:3]):  # the same kernels on the same fp32 operands
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_module_matches_unfused_chain():
    """GatedAttentionPool (fused op) equals its own scores() followed by attention_pool, values and grads."""
    torch.manual_seed(0)
    pool = GatedAttentionPool(DIM, HIDDEN)
    h, _, offsets, mask = _case([5, 77, 1], torch.float32, "random", seed=6)
    fused = pool(h, offsets, mask)
    fused[0].sum().backward()
    fused_grads = [p.grad.clone() for p in pool.parameters()]
    pool.zero_grad()
    chain = attention_pool(pool.scores(h), h, offsets, mask)
    chain[0].sum().backward()
    # two fp32 computations of the same values in different orders: each within the bound, so the pair within twice
    params = [pool.V.weight, pool.V.bias, pool.U.weight, pool.U.bias, pool.w.weight, pool.w.bias]
    extra, n = _score_error(h, params), max_bag(offsets)
    condition = pooled_condition(chain[1], h, offsets, chain[0])
    pooled_bound = rounding_bound(2 * n + 2, condition=condition, extra=extra * condition)
    check(relative_error(fused[0], chain[0]), 2 * pooled_bound, FAMILY, "module vs chain: pooled")
    weights_ratio = softmax_weight_ratio(fused[1], chain[1], offsets, _score_scale(h, params), DIM + HIDDEN,
                                         score_max=_score_max(h, params))
    check(weights_ratio, 2.0, FAMILY, "module vs chain: weights")
    bound = _grad_bound(h.shape[0] + n + DIM + HIDDEN + 4, torch.float32, extra)
    for a, (name, p) in zip(fused_grads, pool.named_parameters()):
        # the exact gradient of w.bias is 0 (softmax ignores a shift): compared on the scale of w.weight's
        scale = float(pool.w.weight.grad.abs().max()) if name == "w.bias" else None
        error = float((a - p.grad).abs().max()) / scale if scale else relative_error(a, p.grad)
        check(error, 2 * bound, FAMILY, f"module vs chain: grad {name}")


def test_float64_torch_path_passes_gradcheck():
    h, params, offsets, mask = _case([1, 4, 7], torch.float64, "random", seed=12, dim=5, hidden=3)
    args = [h.requires_grad_(), *[p.double().requires_grad_() for p in params]]
    pooled, weights = gated_attention_pool(*args, offsets, mask, backend="torch")
    assert pooled.dtype == weights.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda *a: gated_attention_pool(*a, offsets, mask, backend="torch"), args)


def test_bad_inputs():
    h, params, offsets, _ = _case([4], torch.float32, "none")
    with pytest.raises(ValueError, match="v_weight must have shape"):
        gated_attention_pool(h, params[0][:, :3], *params[1:], offsets)
    with pytest.raises(ValueError, match="mask must be bool"):
        gated_attention_pool(h, *params, offsets, torch.ones(4))
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        gated_attention_pool(h.double(), *params, offsets, backend="triton")
    for bad in ([0, 5], [1, 4], [0, 3, 2, 4]):  # past the end, not starting at 0, decreasing
        with pytest.raises(ValueError, match="offsets must start at 0"):
            gated_attention_pool(h, *params, torch.tensor(bad), backend="triton")
    big = [torch.zeros(257, DIM), torch.zeros(257), torch.zeros(257, DIM), torch.zeros(257), torch.zeros(1, 257),
           torch.zeros(1)]
    with pytest.raises(ValueError, match="hidden_dim <= 256"):
        gated_attention_pool(h, *big, offsets, backend="triton")
    assert torch.isfinite(gated_attention_pool(h, *big, offsets, backend="torch")[0]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_log_sum_exp_output_and_its_gradient(backend):
    """``return_lse`` of the fused op: values and every gradient through it match the reference's log-sum-exp."""
    sizes = [1, 7, 129, 40]
    h, params, offsets, mask = _case(sizes, torch.float32, "all-masked-bag", seed=14)
    h1 = h.detach().requires_grad_()
    p1 = [p.clone().requires_grad_() for p in params]
    pooled, _, lse = gated_attention_pool(h1, *p1, offsets, mask, backend=backend, return_lse=True)
    h64 = h.double().requires_grad_()
    p64 = [p.double().requires_grad_() for p in params]
    scores = (torch.tanh(h64 @ p64[0].T + p64[1]) * torch.sigmoid(h64 @ p64[2].T + p64[3])) @ p64[4][0] + p64[5]
    scores = scores.masked_fill(~mask, float("-inf"))
    bounds = offsets.tolist()
    ref_lse = torch.stack([torch.logsumexp(scores[lo:hi], 0) for lo, hi in zip(bounds[:-1], bounds[1:])])
    finite = torch.isfinite(ref_lse)
    assert not bool(finite[2]) and float(lse[2].detach()) == float("-inf")  # the all-masked bag
    # absolute: the bag's sum (n roundings, relative, so absolute in its log), the scores' error, and the roundings
    # of s - m and m + log(...) at the size of the scores
    lse_error = float((lse.detach()[finite].double() - ref_lse.detach()[finite]).abs().max())
    bound = lse_bound(max_bag(offsets), _score_max(h, params), extra=_score_error(h, params))
    check(lse_error, bound, FAMILY, "lse")
    gl = torch.randn(len(sizes), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    torch.where(finite, lse.double() * gl, 0).sum().backward()
    torch.where(finite, ref_lse * gl, 0).sum().backward()
    _check_grads(h1.grad, h64.grad, [p.grad for p in p1[:5]], [p.grad for p in p64[:5]], h, params, offsets,
                 torch.float32)


@pytest.mark.parametrize("kind", ["column-slice", "broadcast"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliced_and_broadcast_incoming_gradients(backend, kind):
    """grad_pooled as a column slice of a wider gradient (the output was concatenated) or a broadcast (summed
    over bags): the Triton backward reads it as contiguous, so the op must hand it over as such. One loss term
    each (autograd would add two terms' gradients into a fresh contiguous buffer)."""
    h, params, offsets, mask = _case([5, 40, 1], torch.float32, "random", seed=22, dim=32, hidden=16)
    r = torch.linspace(-1, 1, 3 * 64).reshape(3, 64)

    def loss(pooled):
        r_ = r.to(pooled.dtype)
        if kind == "column-slice":  # a row stride of 64: a layout the kernels would take as it is
            return (torch.cat([pooled, torch.zeros_like(pooled)], 1) * r_).sum()
        return pooled.sum(0) @ r_[0, :32]

    h1, p1 = h.detach().requires_grad_(), [p.clone().requires_grad_() for p in params]
    loss(gated_attention_pool(h1, *p1, offsets, mask, backend=backend)[0]).backward()
    h64, p64 = h.double().requires_grad_(), [p.double().requires_grad_() for p in params]
    loss(gated_attention_pool_reference(h64, *p64, offsets, mask)[0]).backward()
    _check_grads(h1.grad, h64.grad, [p.grad for p in p1[:5]], [p.grad for p in p64[:5]], h, params, offsets,
                 torch.float32)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_non_finite_feature_gives_a_non_finite_bag_not_an_empty_one(bad, backend):
    """A NaN or an overflowed (+inf) feature in one row makes its bag's pooled vector non-finite on both paths, as
    torch's modules do, and leaves the other bags finite. On the Triton path an inf meets the zero-padded hidden
    units (hidden 24 pads to 32: inf x 0 = NaN in a score), which the tile merge once turned into an empty bag."""
    h, params, offsets, _ = _case([100, 40, 1], torch.float32, "none", seed=32)
    h[5, 3] = bad
    h1 = h.detach().requires_grad_()
    pooled, weights = gated_attention_pool(h1, *params, offsets, backend=backend)
    assert not torch.isfinite(pooled[0]).all()
    assert torch.isfinite(pooled[1:]).all() and torch.isfinite(weights[100:]).all()
    pooled[1:].sum().backward()  # the other bags' gradients reach no corrupted row
    assert torch.isfinite(h1.grad[100:]).all()
