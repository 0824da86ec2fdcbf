"""``normalized_attention_pool`` (the recycle network's implicit keys/values) against its fp64 reference.

The reference forms the LayerNorm-ed rows and runs softmax + matmul per bag; the op never forms them and folds the
LayerNorm backward into one GEMM. Checked: outputs and the gradients of ``x`` and ``directions`` with upstream
gradients on both outputs, on ragged bags (bag of 1, empty bag, all-masked bag, sparse and dense masks), strided
views of ``x``, and ``gradcheck`` in fp64. Tolerances follow tests/tolerance.py, from each case's shapes: a logit is
a dot over D of a LayerNorm-ed row, so its absolute error (``_logit_error``) has the dot's ``sqrt(D)`` roundings
at the size of its terms and the LayerNorm's ``sqrt(2D)`` relative ones times the condition of the op's variance
formula; ``exp`` makes it a relative error of the weight. Pooled adds the bag's softmax and weighted sum (2n),
times the sum's cancellation; the gradients add the backward's passes over the bag and over D. Dropping the
LayerNorm's mean term from ``grad_x`` gives ~1e-1 and fails, so does leaving out the per-bag term of its row mean
or the softmax's bag term.
"""
import pytest
import torch

from fastmil.ops import normalized_attention_pool, normalized_attention_pool_reference
from tests.ragged import SIZES, SMALL_SIZES, make_mask, offsets_of, per_bag_error, relative_error, strided
from tests.tolerance import check, max_bag, pooled_condition, rounding_bound, softmax_weight_ratio

FAMILY = "normalized_attention_pool"
M = 12


def _normed(x):
    return torch.nn.functional.layer_norm(x.detach().double(), (x.shape[1],))


def _layer_norm_condition(x):
    """Per row, ``1 + mean^2 / var``: the condition of the op's ``var = E[x^2] - mean^2`` (``[N]``, fp64)."""
    x64 = x.detach().double()
    return 1 + x64.mean(1).square() / x64.var(1, unbiased=False).clamp_min(1e-300)


def _logit_error(x, directions):
    """A logit's absolute rounding error in units of ``LAMBDA u``, largest over rows and directions: its dot over D
    (``sqrt(D)`` times the 2-norm of the terms ``n_id d_dm``), and the LayerNorm's relative error scaling the whole
    logit (the row's mean and variance sum D terms each, ``sqrt(2D)`` roundings, times ``_layer_norm_condition``)."""
    if not x.shape[0]:
        return 0.0
    normed, d, dim = _normed(x), directions.detach().double(), x.shape[1]
    dot = dim**0.5 * (normed.square() @ d.square()).sqrt()
    layer_norm = (2 * dim) ** 0.5 * _layer_norm_condition(x)[:, None] * (normed @ d).abs()
    return float((dot + layer_norm).max())


def _logit_max(x, directions):
    return float((_normed(x) @ directions.detach().double()).abs().max()) if x.shape[0] else 0.0


def _bounds(x, directions, offsets, r_weights, r_pooled):
    """(pooled, grad x, grad directions) bounds of one case: the bag's softmax and sums (depth), the logits' error
    (in each logit and in its bag's lse) and the normalised rows' own relative error (``extra``)."""
    dim, n, total = x.shape[1], max_bag(offsets), max(x.shape[0], 1)
    normed_error = (2 * dim) ** 0.5 * float(_layer_norm_condition(x).max()) if x.shape[0] else 0.0
    extra = 2 * _logit_error(x, directions) + normed_error
    condition = pooled_condition(r_weights, _normed(x), offsets, r_pooled)
    pooled = rounding_bound(2 * n + 4, condition=condition, extra=extra * condition)
    grad_x = rounding_bound(2 * n + 2 * dim + 2 * M + 8, extra=extra)  # the backward's passes over the bag and D
    grad_d = rounding_bound(total + 2 * n + dim + 8, extra=extra)  # summed over every row
    return pooled, grad_x, grad_d


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
    pooled_bound, grad_x_bound, grad_d_bound = _bounds(x, directions, offsets, want[1], want[0])
    check(relative_error(got[0], want[0]), pooled_bound, FAMILY, "pooled")
    weights_ratio = softmax_weight_ratio(got[1], want[1], offsets, _logit_error(x, directions),
                                         score_max=_logit_max(x, directions))
    check(weights_ratio, 1.0, FAMILY, "weights")
    check(per_bag_error(got[2], want[2], offsets), grad_x_bound, FAMILY, "grad x")
    check(relative_error(got[3], want[3]), grad_d_bound, FAMILY, "grad directions")
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
    normed = _normed(x[:1])[0]
    # a bag of one pools its normalised row with weight 1: the LayerNorm's roundings (2D) alone
    check(relative_error(pooled[1], normed.expand(M, -1)), rounding_bound(2 * x.shape[1] + 2), FAMILY,
          "bag of one pooled")
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
    with torch.no_grad():
        r_pooled, r_weights = normalized_attention_pool_reference(x.double(), directions.double(), offsets, mask)
    _, grad_x_bound, grad_d_bound = _bounds(x, directions, offsets, r_weights, r_pooled)
    if frozen == "x":
        check(relative_error(results[0], results[1]), grad_d_bound, FAMILY, "grad directions alone")
    else:
        check(per_bag_error(*results, offsets), grad_x_bound, FAMILY, "grad x alone")


def test_a_nan_feature_gives_a_nan_bag_not_an_empty_one():
    """A NaN in one row makes its bag's outputs NaN (the softmax's sum tests ``!= 0``, not ``> 0``), the other bags
    stay finite."""
    x, directions, offsets, _ = _case([30, 20, 1], "none", seed=6)
    x[5, 3] = float("nan")
    pooled, weights = normalized_attention_pool(x, directions, offsets)
    assert torch.isnan(pooled[0]).any() and torch.isfinite(pooled[1:]).all() and torch.isfinite(weights[30:]).all()
