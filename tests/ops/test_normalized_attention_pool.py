"""``normalized_attention_pool`` (the recycle network's implicit keys/values) against its fp64 reference.

The reference forms the LayerNorm-ed rows and runs softmax + matmul per bag; the op never forms them and folds the
LayerNorm backward into one GEMM. Checked: outputs and the gradients of ``x`` and ``directions`` with upstream
gradients on both outputs, on ragged bags (bag of 1, empty bag, all-masked bag, sparse and dense masks), strided
views of ``x``, and ``gradcheck`` in fp64. Tolerances: the fp32 path was measured at <= 1.3e-6 (outputs) and <= 4.1e-6
(gradients) relative to the fp64 reference on these cases (over generator seeds 0-3: <= 2.2e-6 and 4.1e-6); dropping
the LayerNorm's mean term from ``grad_x`` gives ~1e-1 and fails, so does leaving out the per-bag term of its row
mean or the softmax's bag term.
"""
import pytest
import torch

from fastmil.ops import normalized_attention_pool, normalized_attention_pool_reference
from tests.ragged import SIZES, SMALL_SIZES, make_mask, offsets_of, per_bag_error, relative_error, strided

TOL_OUT = 2e-6
TOL_GRAD = 5e-6
M = 12


def _case(sizes, mask_kind, seed=0, dim=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = (torch.rand(n, dim, generator=g) * 3).relu_() + torch.randn(n, dim, generator=g)  # ReLU-like rows
    directions = torch.randn(dim, M, generator=g) / dim**0.5 * 3  # peaked attention
    return x.to(dtype), directions.to(dtype), offsets_of(sizes), make_mask(sizes, mask_kind, g)


def _upstream(n_bags, n, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_bags, M, dim, generator=g, dtype=torch.float64),
            torch.randn(n, M, generator=g, dtype=torch.float64))


def _run(fn, x, directions, offsets, mask, grads):
    x = x.detach().requires_grad_()  # keeps a view's strides
    directions = directions.detach().requires_grad_()
    pooled, weights = fn(x, directions, offsets, mask)
    gp, gw = grads
    ((pooled.double() * gp).sum() + (weights.double() * gw).sum()).backward()
    return pooled, weights, x.grad, directions.grad


def _check(x, directions, offsets, mask, grads):
    got = _run(normalized_attention_pool, x, directions, offsets, mask, grads)
    want = _run(normalized_attention_pool_reference, x.double(), directions.double(), offsets, mask, grads)
    assert got[0].dtype == got[1].dtype == torch.float32 and got[2].dtype == x.dtype
    assert relative_error(got[0], want[0]) <= TOL_OUT
    assert relative_error(got[1], want[1]) <= TOL_OUT
    assert per_bag_error(got[2], want[2], offsets) <= TOL_GRAD
    assert relative_error(got[3], want[3]) <= TOL_GRAD
    if mask is not None:
        assert torch.all(got[1][~mask] == 0) and torch.all(got[2][~mask] == 0)
    return got


@pytest.mark.parametrize("mask_kind", ["none", "random", "sparse", "all-masked-bag"])
def test_matches_fp64_reference_on_ragged_bags(mask_kind):
    x, directions, offsets, mask = _case(SIZES, mask_kind)
    got = _check(x, directions, offsets, mask, _upstream(len(SIZES), sum(SIZES), x.shape[1]))
    if mask_kind == "all-masked-bag":
        assert torch.all(got[0][2] == 0)
    assert torch.isfinite(got[2]).all()


@pytest.mark.parametrize("layout", ["column-slice", "row-stride", "transposed"])
def test_strided_views_of_x(layout):
    x, directions, offsets, mask = _case(SMALL_SIZES, "random", seed=3)
    _check(strided(x, layout), directions, offsets, mask, _upstream(len(SMALL_SIZES), sum(SMALL_SIZES), x.shape[1]))


def test_edge_bags():
    """Empty bags and a bag of one (weight 1, pooled = its normalised row)."""
    sizes = [0, 1, 5, 0]
    x, directions, offsets, _ = _case(sizes, "none", seed=5)
    pooled, weights = normalized_attention_pool(x, directions, offsets)
    assert torch.all(pooled[[0, 3]] == 0)
    assert torch.all(weights[0] == 1)
    normed = torch.nn.functional.layer_norm(x[0], (x.shape[1],))
    torch.testing.assert_close(pooled[1], normed.expand(M, -1), atol=1e-6, rtol=0)
    _check(x, directions, offsets, None, _upstream(len(sizes), sum(sizes), x.shape[1]))


def test_gradcheck_fp64():
    x, directions, offsets, mask = _case([1, 6, 4], "random", seed=2, dim=7, dtype=torch.float64)
    x.requires_grad_()
    directions.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: normalized_attention_pool(a, b, offsets, mask),
                                    (x, directions))


def test_rejects_bad_shapes():
    x, directions, offsets, _ = _case([3], "none")
    with pytest.raises(ValueError, match="directions has"):
        normalized_attention_pool(x, directions[1:], offsets)
    with pytest.raises(ValueError, match="mask must be bool"):
        normalized_attention_pool(x, directions, offsets, torch.ones(2, dtype=torch.bool))


def test_under_autocast_computes_in_fp32():
    """A caller's bf16 autocast does not reach the op's GEMMs (outputs fp32, equal to the run without autocast)."""
    x, directions, offsets, mask = _case(SMALL_SIZES, "random", seed=8)
    grads = _upstream(len(SMALL_SIZES), sum(SMALL_SIZES), x.shape[1])
    plain = _run(normalized_attention_pool, x, directions, offsets, mask, grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = _run(normalized_attention_pool, x, directions, offsets, mask, grads)
    for got, want in zip(cast, plain):
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.parametrize("frozen", ["directions", "x"])
def test_one_input_without_gradient(frozen, nan_filled_empty):
    """With only ``x`` or only ``directions`` requiring grad, backward builds what that gradient needs (its scratch
    buffers are uninitialised, read here as NaN) and equals the reference's."""
    x, directions, offsets, mask = _case(SMALL_SIZES, "random", seed=4)
    grads = _upstream(len(SMALL_SIZES), sum(SMALL_SIZES), x.shape[1])
    results = []
    for fn, dtype in ((normalized_attention_pool, torch.float32), (normalized_attention_pool_reference, torch.float64)):
        xi = x.detach().to(dtype).clone().requires_grad_(frozen != "x")
        di = directions.detach().to(dtype).clone().requires_grad_(frozen != "directions")
        pooled, weights = fn(xi, di, offsets, mask)
        ((pooled.double() * grads[0]).sum() + (weights.double() * grads[1]).sum()).backward()
        results.append(di.grad if frozen == "x" else xi.grad)
    assert torch.isfinite(results[0]).all()
    error = relative_error(results[0], results[1]) if frozen == "x" else per_bag_error(*results, offsets)
    assert error <= TOL_GRAD
