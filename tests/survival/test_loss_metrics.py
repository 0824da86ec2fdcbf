"""The survival NLL against an independent fp64 implementation, and the concordance index against Harrell's
definition written out pair by pair (with scikit-survival's convention for tied times)."""
import numpy as np
import pytest
import torch

from fastmil.survival import (
    assign_bins,
    concordance_index,
    group_logits,
    risk_from_logits,
    survival_nll,
    time_bin_edges,
    time_dependent_auc,
)
from fastmil.survival.targets import SurvivalRecord
from tests.tolerance import check, check_close, rounding_bound


def nll_reference(logits: torch.Tensor, bins: torch.Tensor, events: torch.Tensor, alpha: float) -> torch.Tensor:
    """Product form, one patient at a time, fp64: S_k = prod_{j<=k} (1 - h_j), each 1 - h_j formed as sigmoid(-x_j)
    (no cancellation as h_j -> 1, so the reference's own error is a few roundings relative to each term)."""
    total = torch.zeros((), dtype=torch.float64)
    for row, y, e in zip(logits.double(), bins.tolist(), events.double()):
        h = torch.sigmoid(row)
        s_before = torch.prod(torch.sigmoid(-row)[:y]) if y > 0 else torch.ones((), dtype=torch.float64)
        s_at = torch.prod(torch.sigmoid(-row)[: y + 1])
        uncensored = -e * (torch.log(s_before) + torch.log(h[y]))
        censored = -(1 - e) * torch.log(s_at)
        total = total + (1 - alpha) * (uncensored + censored) + alpha * uncensored
    return total / logits.shape[0]


@pytest.mark.parametrize("case", ["mixed", "all_censored", "no_censored"])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_nll_equals_reference(case, alpha):
    gen = torch.Generator().manual_seed(["mixed", "all_censored", "no_censored"].index(case) * 10 + int(alpha * 10))
    p, k = 37, 4
    logits = torch.randn(p, k, generator=gen, dtype=torch.float64) * 2
    bins = torch.randint(0, k, (p,), generator=gen)
    events = {"mixed": torch.rand(p, generator=gen) < 0.5, "all_censored": torch.zeros(p, dtype=torch.bool),
              "no_censored": torch.ones(p, dtype=torch.bool)}[case]
    x = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = survival_nll(x, bins, events, alpha)
    expected = nll_reference(ref, bins, events, alpha)
    loss.backward()
    expected.backward()
    # depth: logsigmoid (3 roundings), the cumsum over the k bins, the two log terms' sum, the alpha mix (3), the
    # mean over the p patients and its division; condition 1: every term -log S, -log h is >= 0 (no cancellation)
    depth = 3 + k + 1 + 3 + p + 1
    reference = expected.item()
    check(abs(loss.item() - reference) / reference, rounding_bound(depth, torch.float64), "survival", "nll fp64")
    # the gradient: the mean's 1/p, the alpha mix, the cumsum's backward over k bins, logsigmoid's backward (3);
    # each entry is +-sigmoid(+-x)/p (same-sign terms), measured against the largest entry
    check_close(x.grad, ref.grad, rounding_bound(1 + 3 + k + 3, torch.float64), "survival", "nll grad fp64")
    # fp32 input, computed in fp32: the same depth, plus the input's rounding to fp32 (one relative u per logit),
    # amplified by the loss's condition in its logits, sum |x dL/dx| / L (from the fp64 gradient above)
    condition = float((logits.abs() * ref.grad.abs()).sum()) / reference
    actual = survival_nll(logits.float(), bins, events, alpha).item()
    check(abs(actual - reference) / reference, rounding_bound(depth, extra=condition), "survival", "nll fp32")


def test_nll_bad_inputs():
    with pytest.raises(ValueError, match="time bins"):
        survival_nll(torch.zeros(2, 4), torch.tensor([0, 4]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="alpha"):
        survival_nll(torch.zeros(2, 4), torch.tensor([0, 1]), torch.tensor([1, 0]), alpha=1.5)


def test_risk_orders_by_hazard_and_groups_average():
    low, high = torch.full((1, 4), -3.0), torch.full((1, 4), 3.0)
    risk = risk_from_logits(torch.cat([low, high]))
    assert risk[1] > risk[0]
    # -sum S_k written out; depth: logsigmoid (3), the cumsum over the 4 bins, exp, the sum over the 4 bins (all
    # terms > 0: condition 1); the inputs -3.0 are exact in fp32
    h = torch.sigmoid(low[0].double())
    expected = float(-torch.cumprod(1 - h, 0).sum())
    check(abs(float(risk[0]) - expected) / abs(expected), rounding_bound(3 + 4 + 1 + 4), "survival", "risk fp32")
    logits = torch.arange(12.0).view(4, 3)
    grouped = group_logits(logits, torch.tensor([1, 0, 1, 0]))
    assert torch.equal(grouped, torch.stack([(logits[1] + logits[3]) / 2, (logits[0] + logits[2]) / 2]))


def harrell(time, event, risk):
    """Pairs (i, j) with i's event first (or at the time j was censored); concordant when i's risk is higher."""
    num = den = 0.0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[i] < time[j] or (time[i] == time[j] and not event[j]):
                den += 1
                num += 1.0 if risk[i] > risk[j] else 0.5 if risk[i] == risk[j] else 0.0
    return num / den


def test_c_index_equals_harrell_with_ties():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        n = int(rng.integers(2, 40))
        time = rng.integers(1, 8, n).astype(float)  # many tied times
        event = rng.random(n) < 0.6
        risk = rng.integers(0, 5, n).astype(float)  # many tied risks
        value = concordance_index(time, event, risk)
        t_event = time[event][:, None]
        comparable = ((t_event < time[None]) | ((t_event == time[None]) & ~event[None])).any()
        if not comparable:
            assert value is None
            continue
        assert value == pytest.approx(harrell(time, event, risk), abs=1e-12)
        checked += 1
    assert checked > 150


def test_c_index_perfect_and_reversed():
    time = np.array([1.0, 2.0, 3.0, 4.0])
    event = np.array([True, True, True, False])
    assert concordance_index(time, event, -time) == 1.0
    assert concordance_index(time, event, time) == 0.0


def test_time_bins_and_td_auc():
    records = {f"s{i}": SurvivalRecord(f"p{i}", float(t), bool(e))
               for i, (t, e) in enumerate(zip(range(1, 21), [True, False] * 10))}
    edges = time_bin_edges(records, 4)
    events = sorted(r.time for r in records.values() if r.event)
    assert edges == [float(v) for v in np.quantile(events, [0.25, 0.5, 0.75])]
    bins = assign_bins(np.array([0.0, edges[0], edges[1] - 1e-9, 100.0]), edges)
    assert bins.tolist() == [0, 1, 1, 3]
    with pytest.raises(ValueError, match="at least 4 patients with an observed event"):
        time_bin_edges({"a": SurvivalRecord("a", 1.0, True)}, 4)
    rng = np.random.default_rng(1)
    t = rng.exponential(10, 200)
    e = rng.random(200) < 0.7
    times, aucs = time_dependent_auc(t, e, t, e, -t)  # risk = -time: perfect ordering
    assert len(times) >= 1 and all(a > 0.99 for a in aucs)


def test_td_auc_keeps_to_the_training_follow_up():
    """Split patients followed longer than any training patient cannot be weighted (the censoring curve is zero
    there): they are left out instead of failing the metric; a split without two events gives None."""
    rng = np.random.default_rng(2)
    train_t, train_e = rng.uniform(1, 20, 60), rng.random(60) < 0.6
    train_t[np.argmax(train_t)], train_e[np.argmax(train_t)] = 20.0, False  # longest follow-up censored
    t = np.r_[rng.uniform(1, 19, 40), 25.0, 30.0]
    e = np.r_[rng.random(40) < 0.6, True, True]  # two events after the longest training follow-up
    times, aucs = time_dependent_auc(train_t, train_e, t, e, -t)
    assert max(times) < 20.0 and all(a > 0.99 for a in aucs)
    assert time_dependent_auc(train_t, train_e, t[:5], np.zeros(5, bool), -t[:5]) is None


def test_repeated_bin_edges_are_an_error():
    records = {f"s{i}": SurvivalRecord(f"p{i}", float(t), True) for i, t in enumerate([12] * 10 + [24, 36])}
    with pytest.raises(ValueError, match="repeated edges .* use fewer task.bins"):
        time_bin_edges(records, 4)
