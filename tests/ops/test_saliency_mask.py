"""saliency_mask (Triton under the interpreter, and torch) vs an independent per-bag, sort-based reference in pure
Python: exactly the same sets on ragged batches with ties, masks, a bag of one, an empty and an all-masked bag."""
import importlib
import math

import numpy as np
import pytest
import torch

from fastmil.ops import saliency_mask
from fastmil.ops.saliency_mask import ratio_count
from tests.ragged import offsets_of

BACKENDS = ["torch", "triton"]
saliency_module = importlib.import_module("fastmil.ops.saliency_mask")  # the package exports the function


@pytest.fixture(params=["torch", "torch-sort", "triton"])
def backend(request, monkeypatch):
    """The path under test: ``torch`` (on the CPU with few bags: bag by bag with ``topk``), ``torch-sort`` (its
    vectorised sort, which many bags and CUDA tensors take), ``triton`` (through the interpreter)."""
    if request.param == "torch-sort":
        monkeypatch.setattr(saliency_module, "PER_BAG_MAX_BAGS", 0)
        return "torch"
    return request.param


def _hash32(x: int) -> int:
    """The documented key hash, written again here (plain Python ints)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _count(ratio: float, n: int, rounding) -> int:
    x = ratio * n
    if abs(x - round(x)) <= 1e-9 * max(1.0, abs(x)):
        x = round(x)
    return min(n, rounding(x))


def reference(scores, offsets, high_ratio, random_ratio, seed, mask):
    """Per bag: sort the eligible rows by (-score, index) for the salient ones, then the others by
    (random key, index) for the random ones."""
    s = [float(v) for v in scores.float()]
    s = [-math.inf if math.isnan(v) else v for v in s]
    eligible = [True] * len(s) if mask is None else mask.tolist()
    mix = _hash32(seed & 0xFFFFFFFF)
    keep, salient, random = (np.zeros(len(s), bool) for _ in range(3))
    bounds = offsets.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        rows = [i for i in range(lo, hi) if eligible[i]]
        n_salient = _count(high_ratio, len(rows), math.ceil)
        by_score = sorted(rows, key=lambda i: (-s[i], i))
        chosen = set(by_score[:n_salient])
        rest = [i for i in rows if i not in chosen]
        n_random = _count(random_ratio, len(rest), math.floor)
        by_key = sorted(rest, key=lambda i: (_hash32(_hash32(i) ^ mix), i))
        recycled = set(by_key[:n_random])
        for i in rows:
            (salient if i in chosen else random if i in recycled else keep)[i] = True
    return keep, salient, random


SIZES = [1, 7, 0, 300, 1500, 2100, 40]


def _case(kind: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(SIZES)
    if kind == "ties":
        scores = torch.randint(0, 12, (n,), generator=g).float()  # heavy ties: the index decides
    else:
        scores = torch.rand(n, generator=g)
    mask = torch.rand(n, generator=g) > 0.25
    off = offsets_of(SIZES)
    mask[off[3] : off[4]] = False  # an all-masked bag
    return scores, off, mask


@pytest.mark.parametrize("kind", ["distinct", "ties"])
@pytest.mark.parametrize("use_mask", [False, True])
@pytest.mark.parametrize("ratios", [(0.03, 0.8), (0.5, 0.5), (0.0, 0.3), (1.0, 0.9), (0.03, 0.0)])
def test_matches_the_sort_based_reference_exactly(backend, kind, use_mask, ratios):
    scores, offsets, mask = _case(kind)
    mask = mask if use_mask else None
    got = saliency_mask(scores, offsets, *ratios, seed=11, mask=mask, backend=backend)
    want = reference(scores, offsets, *ratios, 11, mask)
    for name, a, b in zip(("keep", "salient", "random"), got, want):
        assert a.dtype == torch.bool and not a.requires_grad
        assert np.array_equal(a.numpy(), b), name
    eligible = torch.ones_like(got.keep) if mask is None else mask
    assert torch.equal(got.keep | got.salient | got.random, eligible)
    assert not bool((got.keep & got.salient).any() or (got.keep & got.random).any() or (got.salient & got.random).any())


def test_nan_scores_rank_lowest_and_negative_zero_ties_with_zero(backend):
    scores = torch.tensor([float("nan"), -0.0, 0.0, -1.0, float("nan"), 0.0])
    got = saliency_mask(scores, torch.tensor([0, 6]), high_ratio=0.5, backend=backend)
    assert got.salient.tolist() == [False, True, True, False, False, True]  # the three zeros, not the NaNs
    got = saliency_mask(scores, torch.tensor([0, 6]), high_ratio=4 / 6, backend=backend)
    assert got.salient.tolist() == [False, True, True, True, False, True]
    got = saliency_mask(torch.tensor([-0.0, 0.0]), torch.tensor([0, 2]), high_ratio=0.5, backend=backend)
    assert got.salient.tolist() == [True, False]  # a tie, broken by the lower index


@pytest.mark.parametrize("ratios", [(0.3, 0.5), (0.6, 0.3), (0.03, 0.8)])
@pytest.mark.parametrize("heavy", [-math.inf, math.inf])
def test_infinite_and_nan_scores_with_masked_rows_match_the_reference(backend, ratios, heavy):
    """Scores 3/4 ``heavy`` (-inf, with NaN ranking as -inf, or +inf), the rest 0 or ``-heavy``: the threshold of a
    selection falls on an infinity, where eligible rows tie with each other and with the values that stand in for
    masked rows (high_ratio 0.3 chooses its rows directly, 0.6 as the complement of the rest); the sets must still
    be the reference's."""
    scores, offsets, mask = _case("distinct", seed=9)
    g = torch.Generator().manual_seed(9)
    values = torch.tensor([heavy] * 5 + [math.nan if heavy < 0 else heavy, 0.0, -heavy])
    scores = values[torch.randint(0, values.numel(), scores.shape, generator=g)]
    got = saliency_mask(scores, offsets, *ratios, seed=4, mask=mask, backend=backend)
    want = reference(scores, offsets, *ratios, 4, mask)
    for name, a, b in zip(("keep", "salient", "random"), got, want):
        assert np.array_equal(a.numpy(), b), name


def test_same_seed_same_sets_other_seed_other_sets(backend):
    scores, offsets, mask = _case("distinct", seed=3)
    a = saliency_mask(scores, offsets, 0.05, 0.5, seed=7, mask=mask, backend=backend)
    b = saliency_mask(scores, offsets, 0.05, 0.5, seed=7, mask=mask, backend=backend)
    c = saliency_mask(scores, offsets, 0.05, 0.5, seed=8, mask=mask, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(a.salient, c.salient) and not torch.equal(a.random, c.random)
    assert int(a.random.sum()) == int(c.random.sum())


def test_the_random_subset_is_uniform_over_seeds():
    """A bag of 20 eligible instances (of 24), 5 chosen at random per seed, 4000 seeds: each instance is chosen
    with probability 1/4 (chi-square over instances), and every pair with probability 5*4/(20*19) (chi-square
    over pairs): a uniformly random 5-subset, not merely uniform marginals."""
    scores = torch.zeros(24)
    mask = torch.ones(24, dtype=torch.bool)
    mask[[2, 9, 13, 21]] = False
    offsets = torch.tensor([0, 24])
    counts = np.zeros(24)
    pairs = np.zeros((24, 24))
    seeds = 4000
    for seed in range(seeds):
        chosen = saliency_mask(scores, offsets, 0.0, 0.25, seed=seed, mask=mask, backend="torch").random.numpy()
        assert chosen.sum() == 5 and not chosen[~mask.numpy()].any()
        counts += chosen
        pairs += np.outer(chosen, chosen)
    rows = mask.numpy()
    expected = seeds * 5 / 20
    chi2 = float((((counts[rows] - expected) ** 2) / expected).sum())
    assert chi2 < 43.8, chi2  # 19 degrees of freedom: the 0.001 quantile is 43.8
    iu = np.triu_indices(24, 1)
    valid = rows[iu[0]] & rows[iu[1]]
    observed = pairs[iu][valid]
    expected_pair = seeds * (5 * 4) / (20 * 19)
    chi2_pairs = float((((observed - expected_pair) ** 2) / expected_pair).sum())
    assert chi2_pairs < 255.0, chi2_pairs  # 189 pairs; the 0.001 quantile of chi2(189) is about 255


def test_counts_round_as_documented():
    n = torch.tensor([0, 1, 33, 100, 1000])
    assert ratio_count(n, 0.03, "ceil").tolist() == [0, 1, 1, 3, 30]  # 0.03 * 100 is 3.0000000000000004 in fp64
    assert ratio_count(n, 0.8, "floor").tolist() == [0, 0, 26, 80, 800]
    assert ratio_count(n, 1.0, "ceil").tolist() == n.tolist()


def test_half_precision_and_grad_requiring_scores(backend):
    scores, offsets, mask = _case("distinct", seed=5)
    want = saliency_mask(scores.half().float(), offsets, 0.1, 0.5, seed=1, mask=mask, backend=backend)
    got = saliency_mask(scores.half().requires_grad_(), offsets, 0.1, 0.5, seed=1, mask=mask, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(got, want))


def test_bad_inputs():
    with pytest.raises(ValueError, match="scores must be \\[N\\]"):
        saliency_mask(torch.zeros(3, 2), torch.tensor([0, 3]), 0.1)
    with pytest.raises(ValueError, match="high_ratio must be in \\[0, 1\\]"):
        saliency_mask(torch.zeros(3), torch.tensor([0, 3]), 1.5)
    with pytest.raises(ValueError, match="mask must be bool"):
        saliency_mask(torch.zeros(3), torch.tensor([0, 3]), 0.1, mask=torch.ones(3))
    with pytest.raises(TypeError, match="floating point"):
        saliency_mask(torch.zeros(3, dtype=torch.int64), torch.tensor([0, 3]), 0.1)
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="offsets must start at 0"):
            saliency_mask(torch.zeros(3), torch.tensor([0, 4]), 0.1, backend=backend)
