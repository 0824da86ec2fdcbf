"""attention_pool vs an independent fp64 reference, forward and backward, on ragged masked bags.

Both backends run the same cases: ``torch``, and ``triton`` through the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1`` is set by conftest.py before triton is imported). The interpreter computes every
``tl.dot`` in fp32 (it ignores ``input_precision``), so on both backends every fp32 output is expected within a
few fp32 roundings of the fp64 reference evaluated on the same (dtype-rounded) inputs; outputs in the input
dtype (grads of fp16/bf16 tensors) within one unit of that dtype's last place. The CUDA-only test at the end
checks the GPU's weighted sums against the precision contract of their ``tl.dot`` (``kernels/_launch.py:
dot_precision``; ``tests/ops/test_tf32_emulation.py`` emulates the same on the CPU): the fp32 bound plus the mode's
operand term, and, in the TF32 mode, a reference that rounds the operands to nearest as the kernel does.

Tolerances follow tests/tolerance.py (bounds derived from each case's own shapes, checked on every CPU code path):
pooled: depth 2n + 2 (the bag's softmax normaliser, then its weighted sum) times the cancellation of the weighted
sum (``pooled_condition``); weights: per element, ``sqrt(n) + |ln w| + 1`` (``softmax_weight_ratio``); grad values
(fp32): depth n + 2 per bag; grad scores: depth D + n + 4 relative to the magnitude of the two terms that cancel in
``a (u - c)``; fp16/bf16 gradients: one unit in the last place of their dtype on top. Rounding the weights to fp16
before pooling gives ~1e-4 and fails.
"""
import importlib
import inspect
import math
import re
import warnings

import pytest
import torch

from fastmil.kernels._launch import dot_precision, interpreting
from fastmil.ops import attention_pool, attention_pool_reference, resolve_backend
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
    dot_bound,
    dot_passes,
    family_of,
    half_rounding,
    lse_bound,
    max_bag,
    pooled_condition,
    rounding_bound,
    softmax_weight_ratio,
)

FAMILY = "attention_pool"
backend_module = importlib.import_module("fastmil.ops._backend")


def _pooled_bound(offsets, condition=1.0):
    """The pooled vectors' bound: the bag's softmax normaliser (n terms), its weighted sum (n terms), the division
    and the exp, scaled by the cancellation of the weighted sum."""
    return rounding_bound(2 * max_bag(offsets) + 2, condition=condition)


def _grad_bound(depth, dtype):
    """A gradient of ``depth`` fp32 roundings, stored in ``dtype`` (one more rounding of that dtype)."""
    return rounding_bound(depth) + half_rounding(dtype)


def _case(sizes, dim, heads, dtype, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    scores = (torch.randn((n,) if heads is None else (n, heads), generator=g) * 3).to(dtype)
    values = torch.randn(n, dim, generator=g).to(dtype)
    return scores, values, offsets_of(sizes), make_mask(sizes, mask_kind, g)


def _run(scores, values, offsets, mask, backend, grads):
    """Forward + backward of ``sum(pooled * gp) + sum(weights * gw)``; returns outputs and input grads."""
    s = scores.detach().requires_grad_()  # detach keeps the view's strides (clone would not)
    v = values.detach().requires_grad_()
    pooled, weights = attention_pool(s, v, offsets, mask, backend=backend)
    gp, gw = grads
    ((pooled.double() * gp).sum() + (weights.double() * gw).sum()).backward()
    return pooled, weights, s.grad, v.grad


def _reference(scores, values, offsets, mask, grads):
    s = scores.detach().double().requires_grad_()
    v = values.detach().double().requires_grad_()
    pooled, weights = attention_pool_reference(s, v, offsets, mask)
    gp, gw = grads
    ((pooled * gp).sum() + (weights * gw).sum()).backward()
    return pooled, weights, s.grad, v.grad


def _upstream(n_bags, n, heads, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape_p = (n_bags, dim) if heads is None else (n_bags, heads, dim)
    shape_w = (n,) if heads is None else (n, heads)
    f64 = dict(generator=g, dtype=torch.float64)
    return torch.randn(shape_p, **f64), torch.randn(shape_w, **f64)


def _cancellation_scale(weights, values, offsets, grads):
    """Per row, ``a_i (|u_i| + |c_b|)``: the size of the terms whose difference is ``grad_s_i = a_i (u_i - c_b)``
    (``u_i = g_b . v_i + gw_i``, ``c_b = sum_j a_j u_j``). A bag of one has an exact gradient of 0 that fp32
    reaches only up to this scale."""
    gp, gw = grads
    w = weights.detach().double()
    squeeze = w.dim() == 1
    w2, gw2 = (w[:, None], gw[:, None]) if squeeze else (w, gw)
    gp3 = gp[:, None] if squeeze else gp
    bag = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])
    u = torch.einsum("nd,nhd->nh", values.double(), gp3[bag]) + gw2
    c = torch.zeros(offsets.numel() - 1, w2.shape[1], dtype=torch.float64).index_add_(0, bag, w2 * u)
    scale = w2 * (u.abs() + c[bag].abs())
    return scale[:, 0] if squeeze else scale


def _check_grad_scores(grad_s, r_grad_s, scale, offsets, dim, dtype):
    """Per bag, the scores' gradient against the magnitude of the two terms that cancel in it (``scale``, from
    ``_cancellation_scale``): depth D + n + 4 (``u_i = g . v_i`` over D, ``c = sum_j a_j u_j`` over the bag)."""
    err = (grad_s.double() - r_grad_s).abs()
    bound = _grad_bound(dim + max_bag(offsets) + 4, dtype)
    bounds = offsets.tolist()
    worst = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            worst = max(worst, float(err[lo:hi].max()) / max(float(scale[lo:hi].max()), 1e-300))
    check(worst, bound, family_of(FAMILY, dtype), "grad scores")


def _check(actual, expected, offsets, values, mask, dtype, grads, scores):
    pooled, weights, grad_s, grad_v = actual
    r_pooled, r_weights, r_grad_s, r_grad_v = expected
    assert pooled.dtype == weights.dtype == torch.float32
    assert grad_s.dtype == dtype and grad_v.dtype == dtype
    condition = pooled_condition(r_weights, values, offsets, r_pooled)
    check(relative_error(pooled, r_pooled), _pooled_bound(offsets, condition), FAMILY, "pooled")
    score_max = float(scores.double().abs().max())
    check(softmax_weight_ratio(weights, r_weights, offsets, score_max=score_max), 1.0, FAMILY, "weights")
    # grad_v_i = w_i g_b (+ the weights' upstream term): the weight's error, relative to the bag's largest row
    check(per_bag_error(grad_v, r_grad_v, offsets), _grad_bound(max_bag(offsets) + 2, dtype), family_of(FAMILY, dtype),
          "grad values")
    scale = _cancellation_scale(r_weights, values, offsets, grads)
    _check_grad_scores(grad_s, r_grad_s, scale, offsets, values.shape[1], dtype)
    if mask is not None:
        assert torch.all(weights[~mask] == 0) and torch.all(grad_s[~mask] == 0) and torch.all(grad_v[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked-bag"])
@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_matches_fp64_reference(dtype, mask_kind, heads, backend):
    scores, values, offsets, mask = _case(SIZES, 40, heads, dtype, mask_kind)
    grads = _upstream(len(SIZES), sum(SIZES), heads, 40)
    actual = _run(scores, values, offsets, mask, backend, grads)
    _check(actual, _reference(scores, values, offsets, mask, grads), offsets, values, mask, dtype, grads, scores)
    if mask_kind == "all-masked-bag":
        pooled, weights = actual[0], actual[1]
        assert torch.all(pooled[2] == 0) and torch.all(weights[offsets[2] : offsets[3]] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("heads", [None, 17])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_wide_features_span_several_blocks(dtype, heads, backend):
    """D = 259: several D blocks in every kernel, 2 merge blocks and a 3-column tail; 17 heads use H_PAD 32."""
    scores, values, offsets, mask = _case(SMALL_SIZES, WIDE_DIM, heads, dtype, "random", seed=4)
    grads = _upstream(len(SMALL_SIZES), sum(SMALL_SIZES), heads, WIDE_DIM, seed=5)
    actual = _run(scores, values, offsets, mask, backend, grads)
    _check(actual, _reference(scores, values, offsets, mask, grads), offsets, values, mask, dtype, grads, scores)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_strided_inputs_and_outputs(layout, backend):
    """Values as column slices, misaligned views, row-strided and transposed matrices; scores and mask as
    non-contiguous views: the same numbers as contiguous inputs, and every gradient in its own buffer."""
    sizes, dim, heads = [1, 70, 129], STRIDED_DIM[layout], 3
    scores, values, offsets, mask = _case(sizes, dim, heads, torch.float32, "random", seed=6)
    grads = _upstream(len(sizes), sum(sizes), heads, dim, seed=7)
    score_view = torch.zeros(sum(sizes), 2 * heads)
    score_view[:, ::2] = scores
    mask_view = torch.zeros(2 * sum(sizes), dtype=torch.bool)
    mask_view[::2] = mask
    v = strided(values, layout)
    assert not v.is_contiguous()
    actual = _run(score_view[:, ::2], v, offsets, mask_view[::2], backend, grads)
    assert actual[3].shape == values.shape and torch.isfinite(actual[3]).all()
    _check(actual, _reference(scores, values, offsets, mask, grads), offsets, values, mask, torch.float32, grads,
           scores)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weights_sum_to_one_per_bag_and_zero_on_masked(backend):
    scores, values, offsets, mask = _case([5, 1, 33], 16, None, torch.float32, "random", seed=3)
    mask[5] = True  # the bag of one participates
    _, w = attention_pool(scores, values, offsets, mask, backend=backend)
    for b in range(3):
        seg = w[offsets[b] : offsets[b + 1]]
        m = mask[offsets[b] : offsets[b + 1]]
        assert torch.all(seg[~m] == 0)
        # each weight within its softmax bound (sqrt(n) + |ln w| + 1), then this sum's own n roundings
        extra = float(torch.log(seg[m].double()).abs().max())
        check(abs(float(seg.sum()) - 1.0), rounding_bound(2 * seg.numel() + 1, extra=extra), FAMILY, "sum of weights")
    assert float(w[5]) == 1.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_bags_pool_to_zero(backend):
    scores = torch.randn(4)
    values = torch.randn(4, 3)
    pooled, w = attention_pool(scores, values, torch.tensor([0, 4, 4, 4]), backend=backend)
    assert torch.all(pooled[1:] == 0) and torch.isfinite(pooled).all()
    extra = float(torch.log(w.double()).abs().max())
    check(abs(float(w.sum()) - 1.0), rounding_bound(2 * 4 + 1, extra=extra), FAMILY, "sum of weights")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_scores_stay_finite(backend):
    scores = torch.tensor([1e4, -1e4, 3e4, 0.0])
    values = torch.randn(4, 2)
    pooled, w = attention_pool(scores, values, torch.tensor([0, 2, 4]), backend=backend)
    # exp(0) = 1 and exp(-2e4) = 0 exactly: the weights are exact, so is 1 * v + 0 * v'
    assert torch.isfinite(pooled).all() and torch.equal(w, torch.tensor([1.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(pooled, values[[0, 2]], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_of_scores_only(backend):
    """Values that do not require grad (the kernel skips grad_values): the scores' gradient still matches."""
    scores, values, offsets, mask = _case([3, 70], 16, None, torch.float32, "random", seed=5)
    s = scores.clone().requires_grad_()
    pooled, _ = attention_pool(s, values, offsets, mask, backend=backend)
    pooled.sum().backward()
    s64 = scores.double().requires_grad_()
    r_pooled, r_weights = attention_pool_reference(s64, values.double(), offsets, mask)
    r_pooled.sum().backward()
    grads = (torch.ones(2, 16, dtype=torch.float64), torch.zeros(scores.shape[0], dtype=torch.float64))
    scale = _cancellation_scale(r_weights, values, offsets, grads)
    _check_grad_scores(s.grad, s64.grad, scale, offsets, 16, torch.float32)


def test_float64_torch_path_passes_gradcheck():
    scores, values, offsets, mask = _case([1, 5, 9], 4, 2, torch.float64, "random", seed=9)
    s, v = scores.requires_grad_(), values.requires_grad_()
    pooled, weights = attention_pool(s, v, offsets, mask, backend="torch")
    assert pooled.dtype == weights.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: attention_pool(a, b, offsets, mask, backend="torch"), (s, v))


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 scores for 4 values"):
        attention_pool(torch.randn(3), torch.randn(4, 2), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="mask must be bool"):
        attention_pool(torch.randn(4), torch.randn(4, 2), torch.tensor([0, 4]), torch.ones(4))
    with pytest.raises(ValueError, match="backend must be one of"):
        attention_pool(torch.randn(4), torch.randn(4, 2), torch.tensor([0, 4]), backend="cuda")
    with pytest.raises(ValueError, match="at most 32 heads"):
        attention_pool(torch.randn(4, 33), torch.randn(4, 2), torch.tensor([0, 4]), backend="triton")
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        attention_pool(torch.randn(4).double(), torch.randn(4, 2).double(), torch.tensor([0, 4]), backend="triton")
    with pytest.raises(ValueError, match="D >= 2"):
        attention_pool(torch.randn(4), torch.randn(4, 1), torch.tensor([0, 4]), backend="triton")
    for bad in ([0, 5], [1, 4], [0, 3, 2, 4]):  # past the end, not starting at 0, decreasing
        with pytest.raises(ValueError, match="offsets must start at 0"):
            attention_pool(torch.randn(4), torch.randn(4, 2), torch.tensor(bad), backend="triton")


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(backend_module, "device_capability", lambda device: (9, 0))  # an H100
    monkeypatch.delenv("FASTMIL_BACKEND", raising=False)
    assert resolve_backend("auto", "op", cpu, has_triton=True) == "torch"
    assert resolve_backend("auto", "op", cuda, has_triton=True) == "triton"
    assert resolve_backend("auto", "op", cuda, has_triton=False) == "torch"
    monkeypatch.setenv("FASTMIL_BACKEND", "torch")
    assert resolve_backend("auto", "op", cuda, has_triton=True) == "torch"
    monkeypatch.setenv("FASTMIL_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="no Triton kernel"):
        resolve_backend("auto", "op", cuda, has_triton=False)
    monkeypatch.setenv("FASTMIL_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FASTMIL_BACKEND"):
        resolve_backend("auto", "op", cpu, has_triton=True)
    monkeypatch.delenv("FASTMIL_BACKEND")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "op", cpu, has_triton=True)


@pytest.mark.parametrize("capability, expected", [((7, 5), "torch"), ((8, 0), "triton"), ((8, 6), "triton"),
                                                  ((9, 0), "triton")])
def test_auto_runs_triton_only_on_gpus_the_kernels_are_checked_for(capability, expected, monkeypatch):
    """``auto`` picks the kernels from compute capability 8.0 (the sm_80/sm_90 targets ``make aot`` checks); on an
    older GPU it runs the torch path and says so once per device; ``backend="triton"`` still forces the kernels."""
    monkeypatch.setattr(backend_module, "device_capability", lambda device: capability)
    monkeypatch.setattr(backend_module, "_warned_devices", set())
    monkeypatch.delenv("FASTMIL_BACKEND", raising=False)
    cuda = torch.device("cuda:1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_backend("auto", "op", cuda, has_triton=True) == expected
        assert resolve_backend("auto", "other op", cuda, has_triton=True) == expected
    said = [str(w.message) for w in caught if "compute capability" in str(w.message)]
    assert len(said) == (1 if expected == "torch" else 0)
    if said:
        assert "cuda:1" in said[0] and "7.5" in said[0] and "torch path" in said[0]
    assert resolve_backend("triton", "op", cuda, has_triton=True) == "triton"


def test_kernels_are_deterministic_by_construction():
    """No atomics anywhere in the kernels (the interpreter runs programs one at a time, so a race or an
    order-dependent float reduction could never show in a test): every reduction has a fixed order."""
    from fastmil.aot import kernel_modules

    for module in kernel_modules():
        source = inspect.getsource(module)
        assert not re.search(r"\btl\.atomic_\w+", source), f"{module.__name__} uses atomics"


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> TF32 (10 mantissa bits), rounding to nearest with ties away from zero (``cvt.rna.tf32.f32``)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_tile_reference(scores, values, offsets, mask, block_n):
    """What the GPU computes in the ``"tf32"`` mode (fp32 values under ``allow_tf32``): per tile of ``block_n`` rows,
    ``p = exp(s - m_tile)`` in fp32, ``p`` and the values rounded to nearest TF32 (``kernels/_dot.py``) for the
    weighted sum (exact products, fp64 sums here), then the exact merge of the tiles."""
    s = scores.float()
    pooled = []
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        parts, stats = [], []
        for t0 in range(lo, hi, block_n):
            t1 = min(t0 + block_n, hi)
            valid = mask[t0:t1]
            if not bool(valid.any()):
                continue
            m = float(s[t0:t1][valid].max())
            p = torch.where(valid, torch.exp(s[t0:t1] - m), torch.zeros(()))
            parts.append(round_to_tf32(p).double() @ round_to_tf32(values[t0:t1]).double())
            stats.append((m, float(p.double().sum())))
        if not parts:
            pooled.append(torch.zeros(values.shape[1], dtype=torch.float64))
            continue
        big_m = max(m for m, _ in stats)
        scale = [torch.exp(torch.tensor(m - big_m, dtype=torch.float64)) for m, _ in stats]
        total = sum(c * ell for c, (_, ell) in zip(scale, stats))
        pooled.append(sum(c * part for c, part in zip(scale, parts)) / total)
    return torch.stack(pooled)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                    reason="needs a CUDA GPU and compiled kernels (the interpreter computes dots in fp32)")
@pytest.mark.parametrize(("dtype", "allow_tf32"), [(torch.float16, False), (torch.bfloat16, False),
                                                   (torch.float32, False), (torch.float32, True)],
                         ids=["float16", "bfloat16", "float32", "float32-allow_tf32"])
def test_gpu_weighted_sums_hold_the_dot_precision_contract(dtype, allow_tf32, monkeypatch):
    """The tile kernel's weighted sums ``p x`` on a GPU, in the mode ``dot_precision`` picks: 3xTF32 (or, for fp32
    values under ``allow_tf32``, TF32 with operands rounded to nearest). Against the fp64 reference: the interpreter
    tests' bound (with 3xTF32's extra products in the depth) plus the mode's operand term (``dot_bound``: 2^-21 per
    inexact operand for 3xTF32, 2^-11 for TF32, times the terms' 2-norm). In the TF32 mode also against a reference
    that rounds ``p`` and ``x`` to nearest, within the fp32 bound alone: the kernel rounds (a tensor core left to
    truncate would be ~2^-11 low, an order of magnitude outside)."""
    from fastmil.kernels.attention_pool import pool_config

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    mode = dot_precision(dtype)
    scores, values, offsets, mask = _case(SIZES, WIDE_DIM, None, dtype, "random", seed=11)
    pooled, weights = attention_pool(scores.cuda(), values.cuda(), offsets.cuda(), mask.cuda(), backend="triton")
    ref, ref_w = attention_pool_reference(scores.double(), values.double(), offsets, mask)
    score_max = float(scores.double().abs().max())
    check(softmax_weight_ratio(weights.cpu(), ref_w, offsets, score_max=score_max), 1.0, FAMILY, "weights (GPU)")
    n = max_bag(offsets)
    inexact = 2 if dtype == torch.float32 else 1  # p always; x unless fp16/bf16 (exact in TF32)
    condition = pooled_condition(ref_w, values, offsets, ref)
    bound = (rounding_bound(2 * n + 2 + (dot_passes(mode) - 1) * n, condition=condition)
             + dot_bound(mode, inexact, pooled_condition(ref_w, values, offsets, ref, norm=2)))
    check(relative_error(pooled.cpu(), ref), bound, FAMILY, f"pooled (GPU {mode})")
    if mode == "tf32":
        rounded = _tf32_tile_reference(scores, values, offsets, mask, pool_config(1, dtype).block_n)
        check(relative_error(pooled.cpu(), rounded), _pooled_bound(offsets, condition), FAMILY,
              "pooled (GPU TF32, operands rounded to nearest)")


@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_log_sum_exp_output_and_its_gradient(heads, backend):
    """``return_lse``: the per-bag log-sum-exp over unmasked rows (-inf for an all-masked or empty bag), and a
    loss through it (as when pooled bags are merged with extra tokens) differentiates like the reference's."""
    sizes = [1, 7, 129, 0, 40]
    scores, values, offsets, mask = _case(sizes, 24, heads, torch.float32, "all-masked-bag", seed=13)
    s = scores.detach().requires_grad_()
    v = values.detach().requires_grad_()
    pooled, weights, lse = attention_pool(s, v, offsets, mask, backend=backend, return_lse=True)
    s64 = scores.double().requires_grad_()
    masked = s64.masked_fill(~mask[:, None] if heads else ~mask, float("-inf"))
    bounds = offsets.tolist()
    ref_lse = torch.stack([torch.logsumexp(masked[lo:hi], 0) if hi > lo else torch.full(masked.shape[1:], -math.inf,
                                                                                        dtype=torch.float64)
                           for lo, hi in zip(bounds[:-1], bounds[1:])])
    ref_pooled, _ = attention_pool_reference(s64, v.detach().double(), offsets, mask)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and bool((lse[torch.isinf(lse)] < 0).all())
    finite = torch.isfinite(ref_lse)
    # lse = m + log(sum exp(s - m)): the sum's n roundings (relative, so absolute in its log) plus the roundings
    # of s - m and of m + log(...) at the size of the scores
    lse_error = float((lse.detach()[finite].double() - ref_lse.detach()[finite]).abs().max())
    check(lse_error, lse_bound(max_bag(offsets), float(scores.detach().abs().max())), FAMILY, "lse")
    g = torch.Generator().manual_seed(3)
    gl = torch.randn(ref_lse.shape, generator=g, dtype=torch.float64)
    gp = torch.randn(ref_pooled.shape, generator=g, dtype=torch.float64)
    (torch.where(finite, lse.double() * gl, 0).sum() + (pooled.double() * gp).sum()).backward()
    (torch.where(finite, ref_lse * gl, 0).sum() + (ref_pooled * gp).sum()).backward()
    # the lse term adds a_i gl_b to the pooled term's a_i (u_i - c_b): the terms' magnitude gains a_i |gl_b|
    _, r_weights = attention_pool_reference(scores.double(), values.double(), offsets, mask)
    rows = torch.repeat_interleave(torch.arange(len(sizes)), offsets.diff())
    no_weight_grad = torch.zeros(r_weights.shape, dtype=torch.float64)
    scale = _cancellation_scale(r_weights, values, offsets, (gp, no_weight_grad))
    scale = scale + r_weights * torch.where(finite, gl, 0).abs()[rows]
    _check_grad_scores(s.grad, s64.grad, scale, offsets, 24, torch.float32)


@pytest.mark.parametrize("kind", ["weights-column-slice", "pooled-broadcast"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliced_and_broadcast_incoming_gradients(backend, kind):
    """Gradients that arrive as views: the weights' as a column slice (the output was concatenated), the pooled
    vectors' as a broadcast (summed over bags). The kernels read them as contiguous, so the op must hand them over
    as such. One loss term each (autograd would add two terms' gradients into a fresh contiguous buffer)."""
    heads, dim = 16, 32
    scores, values, offsets, mask = _case([5, 40, 1], dim, heads, torch.float32, "random", seed=21)

    def loss(pooled, weights):
        r = torch.linspace(-1, 1, weights.shape[0] * (heads + 16), dtype=weights.dtype).reshape(-1, heads + 16)
        if kind == "weights-column-slice":  # a row stride of 32: a layout the kernels would take as it is
            return (torch.cat([weights, torch.zeros_like(r[:, :16])], 1) * r).sum()
        return (pooled.sum(0) * r[:1, :dim]).sum()

    s, v = scores.detach().requires_grad_(), values.detach().requires_grad_()
    loss(*attention_pool(s, v, offsets, mask, backend=backend)).backward()
    s64, v64 = scores.double().requires_grad_(), values.double().requires_grad_()
    r_pooled, r_weights = attention_pool_reference(s64, v64, offsets, mask)
    loss(r_pooled, r_weights).backward()
    # the upstream gradients of the loss, for the cancellation scale of the scores' gradient
    p0, w0 = r_pooled.detach().requires_grad_(), r_weights.detach().requires_grad_()
    loss(p0, w0).backward()
    scale = _cancellation_scale(r_weights, values, offsets, tuple(torch.zeros_like(t) if t.grad is None else t.grad
                                                                    for t in (p0, w0)))
    _check_grad_scores(s.grad, s64.grad, scale, offsets, dim, torch.float32)
    if kind == "pooled-broadcast":
        check(per_bag_error(v.grad, v64.grad, offsets), _grad_bound(max_bag(offsets) + 2, torch.float32), FAMILY,
              "grad values")




def test_peaked_softmax_leaves_no_subnormal_weights():
    """A peaked softmax over a large bag underflows most weights; the torch path flushes the subnormal ones to 0
    (a CPU GEMM on subnormal operands runs ~100x slower) and still pools like the reference."""
    torch.manual_seed(0)
    n, dim = 4096, 64
    scores = torch.linspace(0.0, -120.0, n)[:, None].repeat(1, 2)  # weights from 1 down to e^-120: ~400 subnormal
    values = torch.randn(n, dim)
    offsets = torch.tensor([0, n])
    pooled, weights = attention_pool(scores, values, offsets, backend="torch")
    tiny = torch.finfo(torch.float32).tiny
    assert not ((weights > 0) & (weights < tiny)).any()
    assert (weights > 0).sum() > n // 2  # only the underflowing tail was flushed
    ref_pooled, ref_weights = attention_pool_reference(scores.double(), values.double(), offsets)
    condition = pooled_condition(ref_weights, values, offsets, ref_pooled)
    check(relative_error(pooled, ref_pooled), _pooled_bound(offsets, condition), FAMILY, "pooled")


@pytest.mark.parametrize("where", ["score NaN", "score +inf", "value NaN"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_non_finite_input_gives_a_non_finite_bag_not_an_empty_one(where, backend):
    """A corrupted row (NaN) or an overflowed score (+inf) makes its bag's pooled vector and gradients non-finite, as
    torch's softmax does; zeros stay reserved for empty and all-masked bags. The other bags are untouched. (The tile
    merge once tested ``l > 0``, which NaN fails: the bag came out as an empty one, zeros and lse = +inf.)"""
    scores, values, offsets, _ = _case([100, 40, 1], 8, None, torch.float32, "none", seed=31)
    if where == "value NaN":
        values[5, 3] = float("nan")
    else:
        scores[5] = float("nan") if where == "score NaN" else float("inf")
    s, v = scores.detach().requires_grad_(), values.detach().requires_grad_()
    pooled, weights, lse = attention_pool(s, v, offsets, backend=backend, return_lse=True)
    if where == "value NaN":
        assert torch.isnan(pooled[0, 3]) and torch.isfinite(weights).all()
    else:
        assert torch.isnan(pooled[0]).all() and not torch.isfinite(lse[0]) and torch.isnan(weights[:100]).any()
    assert torch.isfinite(pooled[1:]).all() and torch.isfinite(weights[100:]).all() and torch.isfinite(lse[1:]).all()
    pooled.sum().backward()
    assert not torch.isfinite(s.grad[:100]).all() or not torch.isfinite(v.grad[:100]).all()
    assert torch.isfinite(s.grad[100:]).all() and torch.isfinite(v.grad[100:]).all()


def test_host_offsets_made_in_inference_mode_work_on_the_triton_path():
    """Inference tensors keep no version counter; the tile-table cache must not ask them for one."""
    with torch.inference_mode():
        offsets = torch.tensor([0, 5, 9])
        scores, values = torch.randn(9, 1), torch.randn(9, 4)
        pooled, _ = attention_pool(scores, values, offsets, backend="triton")
    ref, _ = attention_pool(scores, values, offsets, backend="torch")
    check(relative_error(pooled, ref), rounding_bound(9), FAMILY, "pooled (inference mode)")
