"""attention_pool vs an independent fp64 reference, forward and backward, on ragged masked bags.

Both backends run the same cases: ``torch``, and ``triton`` through the Triton interpreter on CPU tensors
(``TRITON_INTERPRET=1`` is set by conftest.py before triton is imported)."""

import pytest
import torch

from fastmil.ops import attention_pool, attention_pool_reference, resolve_backend

SIZES = [1, 7, 129, 1000, 4096]


def _offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


def _inputs(sizes, d=16, heads=None, dtype=torch.float32, mask_kind="none", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    shape = (n,) if heads is None else (n, heads)
    scores = (torch.randn(shape, generator=g) * 3).to(dtype)
    values = torch.randn(n, d, generator=g).to(dtype)
    offsets = _offsets(sizes)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(n, generator=g) > 0.3
        if mask_kind == "all-masked-bag":
            mask[offsets[2] : offsets[3]] = False  # the 129-bag sees nothing
    return scores, values, offsets, mask


# tolerances per dtype: inputs are rounded to the dtype; math is fp32 in both paths vs fp64 reference
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "random", "all-masked-bag"])
@pytest.mark.parametrize("heads", [None, 3])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_backward_match_fp64_reference(dtype, mask_kind, heads, backend):
    scores, values, offsets, mask = _inputs(SIZES, heads=heads, dtype=dtype, mask_kind=mask_kind)
    s = scores.clone().requires_grad_()
    v = values.clone().requires_grad_()
    pooled, weights = attention_pool(s, v, offsets, mask, backend=backend)
    s64 = scores.double().requires_grad_()
    v64 = values.double().requires_grad_()
    ref_pooled, ref_weights = attention_pool_reference(s64, v64, offsets, mask)
    tol = TOL[dtype]
    torch.testing.assert_close(pooled.double(), ref_pooled, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.double(), ref_weights, atol=tol, rtol=tol)
    g = torch.Generator().manual_seed(1)
    gp = torch.randn(ref_pooled.shape, generator=g, dtype=torch.float64)
    gw = torch.randn(ref_weights.shape, generator=g, dtype=torch.float64)
    ((pooled.double() * gp).sum() + (weights.double() * gw).sum()).backward()
    ((ref_pooled * gp).sum() + (ref_weights * gw).sum()).backward()
    assert s.grad.dtype == dtype and v.grad.dtype == dtype
    gtol = tol * 10 if dtype != torch.float32 else 1e-4
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=gtol, rtol=gtol)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=gtol, rtol=gtol)
    if mask_kind == "all-masked-bag":
        assert torch.all(pooled[2] == 0) and torch.all(weights[offsets[2] : offsets[3]] == 0)
        assert torch.isfinite(s.grad).all() and torch.isfinite(v.grad).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_weights_sum_to_one_per_bag_and_zero_on_masked(backend):
    scores, values, offsets, mask = _inputs([5, 1, 33], mask_kind="random", seed=3)
    mask[5] = True  # the bag of one participates
    _, w = attention_pool(scores, values, offsets, mask, backend=backend)
    for b in range(3):
        seg = w[offsets[b] : offsets[b + 1]]
        m = mask[offsets[b] : offsets[b + 1]]
        assert torch.all(seg[~m] == 0)
        assert abs(float(seg.sum()) - 1.0) < 1e-6
    assert float(w[5]) == 1.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_bag_pools_to_zero(backend):
    scores = torch.randn(4)
    values = torch.randn(4, 3)
    pooled, w = attention_pool(scores, values, torch.tensor([0, 4, 4, 4]), backend=backend)
    assert torch.all(pooled[1:] == 0) and torch.isfinite(pooled).all()
    assert abs(float(w.sum()) - 1.0) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_scores_stay_finite(backend):
    scores = torch.tensor([1e4, -1e4, 3e4, 0.0])
    values = torch.randn(4, 2)
    pooled, w = attention_pool(scores, values, torch.tensor([0, 2, 4]), backend=backend)
    assert torch.isfinite(pooled).all() and torch.allclose(w, torch.tensor([1.0, 0.0, 1.0, 0.0]))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_many_heads_on_triton(dtype):
    """17 heads select the H_PAD = 32 kernels."""
    scores, values, offsets, mask = _inputs([1, 90, 40], heads=17, dtype=dtype, mask_kind="random", seed=8)
    s, v = scores.clone().requires_grad_(), values.clone().requires_grad_()
    pooled, weights = attention_pool(s, v, offsets, mask, backend="triton")
    (pooled.square().sum() + weights.sum()).backward()
    s64, v64 = scores.double().requires_grad_(), values.double().requires_grad_()
    ref_pooled, ref_weights = attention_pool_reference(s64, v64, offsets, mask)
    (ref_pooled.square().sum() + ref_weights.sum()).backward()
    tol = TOL[dtype]
    torch.testing.assert_close(pooled.double(), ref_pooled, atol=tol, rtol=tol)
    torch.testing.assert_close(weights.double(), ref_weights, atol=tol, rtol=tol)
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=10 * tol, rtol=10 * tol)
    torch.testing.assert_close(v.grad.double(), v64.grad, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grad_of_scores_only(backend):
    """Values that do not require grad: only the scores get a gradient, and it matches the reference."""
    scores, values, offsets, mask = _inputs([3, 70], mask_kind="random", seed=5)
    s = scores.clone().requires_grad_()
    pooled, _ = attention_pool(s, values, offsets, mask, backend=backend)
    pooled.sum().backward()
    s64 = scores.double().requires_grad_()
    attention_pool_reference(s64, values.double(), offsets, mask)[0].sum().backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-5, rtol=1e-5)


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
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
