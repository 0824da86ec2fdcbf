"""segment_softmax, both paths (vectorised over rows; per bag over host bounds) against a per-bag fp64 reference:
ragged bags with empty, all-masked and single-row bags, several heads, peaked scores whose tiny weights are
flushed to 0, fp32 and fp64. Tolerances follow tests/tolerance.py (``softmax_weight_ratio`` for weights; a bag's
log-sum-exp errs by its n-term sum and by the roundings of ``s - m`` and ``m + log(...)`` at the scores' size)."""
from functools import partial

import pytest
import torch

from fastmil.ops import _segments as segments
from fastmil.ops._segments import segment_softmax
from tests.ragged import offsets_of
from tests.tolerance import check, lse_bound, max_bag, rounding_bound, softmax_weight_ratio

FAMILY = "segment_softmax"

SIZES = [0, 1, 5, 0, 300, 2, 7, 16]  # 300 and 16 rows: folded column reductions with and without leftover rows


def _reference(scores, bounds, mask):
    weights = torch.zeros_like(scores, dtype=torch.float64)
    lse = torch.full((len(bounds) - 1, scores.shape[1]), float("-inf"), dtype=torch.float64)
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = torch.arange(lo, hi)[mask[lo:hi]]
        if rows.numel():
            s = scores[rows].double()
            weights[rows] = torch.softmax(s, 0)
            lse[b] = torch.logsumexp(s, 0)
    return weights, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_bag", [False, True], ids=["vectorised", "per-bag"])
def test_matches_reference_with_empty_masked_and_peaked_bags(dtype, per_bag, monkeypatch):
    if per_bag:  # these bags are too small for the loop to pay: force it
        monkeypatch.setattr(segments, "PER_BAG_MIN_ROWS", 0)
        monkeypatch.setattr(segments, "PER_BAG_MIN_ELEMENTS", 0)
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    scores = (torch.randn(n, 3, generator=g) * 4).to(dtype)
    scores[10:20, 1] += 120 if dtype == torch.float32 else 800  # peaked: most of the 300-row bag's weights in
    # head 1 fall below the dtype's smallest normal number and are flushed to 0
    offsets = offsets_of(SIZES)
    bounds = offsets.tolist()
    mask = torch.rand(n, generator=g) < 0.7
    mask[bounds[5] : bounds[6]] = False  # an all-masked bag of 2
    mask[bounds[1]] = True  # the bag of one keeps its row
    weights, lse = segment_softmax(scores, offsets, mask, bounds if per_bag else None)
    ref_w, ref_lse = _reference(scores, bounds, mask)
    assert weights.dtype == lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tiny = torch.finfo(weights.dtype).tiny
    expected = torch.where(ref_w < tiny, torch.zeros_like(ref_w), ref_w)
    lse_size = torch.where(torch.isfinite(ref_lse), ref_lse.abs(), 0)  # per bag and head: where lse_b is rounded
    check(softmax_weight_ratio(weights, expected, offsets, floor=tiny, dtype=dtype, score_max=lse_size), 1.0, FAMILY,
          f"weights {dtype}")
    assert torch.all(weights[~mask] == 0) and int((weights[:, 1] == 0).sum()) > int((~mask).sum())
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)  # -inf exactly for empty and all-masked bags
    lse_error = float((lse[finite].double() - ref_lse[finite]).abs().max())
    check(lse_error, lse_bound(max_bag(offsets), float(scores.double().abs().max()), dtype), FAMILY, f"lse {dtype}")
    assert weights[bounds[1]].tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("per_bag", [False, True], ids=["vectorised", "per-bag"])
def test_nan_propagates_from_unmasked_rows_only(per_bag, monkeypatch):
    """The subnormal flush keeps NaN: a NaN score's weight is NaN, not a silent 0 (the bag's other weights are
    not meaningful then); a masked row's NaN is ignored."""
    if per_bag:
        monkeypatch.setattr(segments, "PER_BAG_MIN_ROWS", 0)
        monkeypatch.setattr(segments, "PER_BAG_MIN_ELEMENTS", 0)
    scores = torch.randn(20, 2)
    scores[3, 0] = float("nan")  # bag 0, unmasked
    scores[15, 1] = float("nan")  # bag 1, masked
    offsets = torch.tensor([0, 10, 20])
    mask = torch.ones(20, dtype=torch.bool)
    mask[15] = False
    weights, _ = segment_softmax(scores, offsets, mask, offsets.tolist() if per_bag else None)
    assert torch.isnan(weights[3, 0])
    assert torch.isfinite(weights[:, 1]).all() and torch.isfinite(weights[10:]).all()
    kept = weights[10:, 1][mask[10:]].double()
    # each weight within its softmax bound, then this sum's own roundings
    bound = rounding_bound(2 * kept.numel(), extra=float(kept.log().abs().max()) + 1)
    check(abs(float(weights[10:, 1].sum()) - 1.0), bound, FAMILY, "sum of weights")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 300])
@pytest.mark.parametrize("heads", [1, 3])
def test_folded_column_reductions_equal_plain_ones(n, heads, dtype):
    """``_column_reduce`` (rows folded 8 into 1, then the leftover rows) gives ``amax(0)`` exactly and the fp64
    ``sum(0)`` to rounding, for every remainder of ``n`` mod 8, a column of ``-inf`` (an all-masked bag's) and a
    non-contiguous input."""
    g = torch.Generator().manual_seed(n)
    rows = (torch.randn(n, heads, generator=g) * 10).to(dtype)
    rows[:, 0] = float("-inf")
    rows[n // 2, -1] = 50.0  # the maximum in the middle; with n = 9 in the leftover row too
    rows[-1, -1] = 60.0 if n % 8 else rows[-1, -1]
    for x in (rows, torch.cat([rows, rows], 1)[:, ::2]):
        assert torch.equal(segments._column_reduce(x, torch.amax, torch.amax), x.amax(0))
        finite = x[:, 1:]
        total = segments._column_reduce(finite, partial(torch.sum, dtype=torch.float64), torch.sum)
        assert total.dtype == torch.float64
        # two fp64 sums of n terms in other orders: the pair within twice the bound at the terms' magnitude
        want = finite.double().sum(0)
        if heads > 1:  # with one head every column is the -inf one: nothing finite to sum
            magnitude = finite.double().abs().sum(0).clamp_min(1e-300)
            error = float(((total - want).abs() / magnitude).max())
            check(error, 2 * rounding_bound(n, torch.float64), FAMILY, "folded fp64 column sums")


def test_per_bag_loop_only_for_large_bags(monkeypatch):
    """The CPU loop over bags runs when the bags average >= PER_BAG_MIN_ROWS rows (and enough elements), else the
    vectorised path; both give the same weights."""
    calls = []
    loop = segments._softmax_per_bag
    monkeypatch.setattr(segments, "_softmax_per_bag", lambda s, b: calls.append(len(b) - 1) or loop(s, b))
    g = torch.Generator().manual_seed(3)
    for sizes, per_bag in (([2048, 1024], True), ([100] * 30, False), ([4000, 10], True), ([4000] + [10] * 4, False)):
        offsets = offsets_of(sizes)
        scores = torch.randn(sum(sizes), 8, generator=g)
        calls.clear()
        weights, _ = segment_softmax(scores, offsets, None, offsets.tolist())
        assert bool(calls) == per_bag, sizes
        # the two paths in other orders: each weight within twice its softmax bound of the other's
        ratio = softmax_weight_ratio(weights, segment_softmax(scores, offsets, None)[0], offsets,
                                     score_max=float(scores.abs().max()))
        check(ratio, 2.0, FAMILY, "per-bag loop vs vectorised")
