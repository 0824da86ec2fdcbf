"""Per-bag (segment) primitives shared by the torch paths of every pooling op.

A packed batch stores bag ``b`` in rows ``offsets[b]:offsets[b+1]``; these helpers reduce over those row
ranges without padding and without atomics (fp64 prefix sums), so they are deterministic on every device.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

__all__ = ["bag_grad_dot", "bag_index", "lse_grad_rows", "pool_per_bag", "rows_per_bag", "segment_softmax",
           "segment_sum"]


def bag_index(offsets: torch.Tensor, n: int) -> torch.Tensor:
    """``int64 [n]``: the bag each of the ``n`` rows belongs to."""
    sizes = offsets[1:] - offsets[:-1]
    return torch.repeat_interleave(torch.arange(sizes.numel(), device=offsets.device), sizes, output_size=n)


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-bag sums of ``values [N, ...]`` -> ``[B, ...]`` in fp32 (fp64 for fp64 input), accumulated in fp64 (no
    drift from adding thousands of small terms to a running fp32 total), deterministic on every device, and
    differentiable. On the CPU an fp64 ``index_add`` (rows added in order; measured 0.6 ms against 4.1 ms for the
    prefix sums at [10k, 40], 4.9 against 29 ms at [100k, 40]); elsewhere fp64 prefix sums instead of atomics."""
    if values.device.type == "cpu":
        bag = bag_index(offsets, values.shape[0])
        sums = values.new_zeros((offsets.numel() - 1, *values.shape[1:]), dtype=torch.float64)
        sums = sums.index_add(0, bag, values.double())  # out of place: callers differentiate through sums
        return sums if values.dtype == torch.float64 else sums.float()
    running = torch.cumsum(values.double(), 0)  # differentiable (no out=): callers differentiate through sums
    prefix = torch.cat([running.new_zeros((1, *running.shape[1:])), running])
    sums = prefix[offsets[1:]] - prefix[offsets[:-1]]
    return sums if values.dtype == torch.float64 else sums.float()


def _flush_subnormals_(t: torch.Tensor) -> torch.Tensor:
    """Set the subnormal entries of the non-negative weights ``t`` to 0 in place, in one pass (a
    ``threshold_`` at the dtype's largest subnormal: ~7x faster here than a comparison and ``masked_fill_`` at
    [10k, 40]); NaN stays NaN. Returns ``t``."""
    largest_subnormal = torch.finfo(t.dtype).tiny * (1.0 - torch.finfo(t.dtype).eps)
    return torch.nn.functional.threshold_(t, largest_subnormal, 0.0)


PER_BAG_MIN_ROWS, PER_BAG_MIN_ELEMENTS = 1024, 8192
""":func:`segment_softmax` loops over the bags on the CPU when they average at least this many rows and elements
(rows x heads). Measured here on 40k rows with 80% kept: the loop costs ~70 us per bag, the vectorised path a few
gathers per element; at [N, 40] the loop wins from ~1024 rows per bag (6.8 against 7.2 ms) and loses at 256 (16
against 7 ms); at [N, 1] it loses at 4096 rows per bag (0.86 against 0.67 ms) and wins for one bag of 10k (0.10
against 0.25 ms)."""


def _per_bag_pays(s: torch.Tensor, n_bags: int) -> bool:
    return s.shape[0] >= PER_BAG_MIN_ROWS * n_bags and s.numel() >= PER_BAG_MIN_ELEMENTS * n_bags


def segment_softmax(
    scores: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None, bounds: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bag softmax of ``scores [N, H]`` over unmasked rows, in fp32 (fp64 for fp64 scores); 0 on masked
    rows and in all-masked or empty bags. Also returns the per-bag log-sum-exp ``[B, H]`` (``-inf`` for a bag
    with no unmasked row). ``bounds`` (``offsets`` as a host list): on the CPU, a loop over the bags' row ranges
    when the bags are large enough to pay for it (:data:`PER_BAG_MIN_ROWS`; a few passes over each bag, no per-row
    gathers of per-bag values).

    Weights below the dtype's smallest normal number are flushed to 0. A peaked softmax over a large bag has many
    subnormal weights (any row more than ~87 below its bag's maximum in fp32), and a CPU GEMM reading subnormal
    operands runs ~100x slower (measured: a [512, 10k] x [10k, 40] product at 250 ms instead of 2.4 ms);
    ``torch.set_flush_denormal`` does not reach the BLAS worker threads. The flushed mass is below
    ``N * 1.2e-38`` per bag."""
    s = scores.double() if scores.dtype == torch.float64 else scores.float()
    if mask is not None:  # a where runs ~1.3x faster here than masked_fill with the [N, 1] mask broadcast
        s = torch.where(mask[:, None], s, float("-inf"))
    if bounds is not None and s.device.type == "cpu" and _per_bag_pays(s, len(bounds) - 1):
        return _softmax_per_bag(s, bounds)
    n, heads = s.shape
    n_bags = offsets.numel() - 1
    bag = bag_index(offsets, n)
    bag_h = bag[:, None].expand(n, heads)
    bag_max = s.new_full((n_bags, heads), float("-inf")).scatter_reduce(0, bag_h, s, reduce="amax", include_self=True)
    bag_max = torch.where(torch.isfinite(bag_max), bag_max, torch.zeros_like(bag_max))
    e = torch.exp(s - bag_max[bag])  # exp(-inf) = 0 on masked rows
    denom = segment_sum(e, offsets)
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))  # != 0: a NaN sum propagates, only 0 is empty
    lse = torch.where(denom != 0, bag_max + torch.log(safe), torch.full_like(denom, float("-inf")))
    weights = e / safe[bag]
    return _flush_subnormals_(weights), lse


FOLD_ROWS = 8
"""Rows folded into one by :func:`_column_reduce`."""


def _column_reduce(rows: torch.Tensor, reduce: Callable, combine: Callable) -> torch.Tensor:
    """``reduce(rows, 0)`` of ``rows [n, H]`` -> ``[H]``, with ``FOLD_ROWS`` rows folded into one first: torch's
    CPU reductions over the outer dimension of a narrow matrix are slow (measured at [10k, 40] fp32: ``amax`` 0.29
    against 0.03 ms over the [1250, 320] fold, an fp64 ``sum`` 0.21 against 0.16 ms). ``reduce`` gives the
    ``[FOLD_ROWS * H]`` partial results, ``combine`` (``amax`` or ``sum``) merges them and the leftover rows'."""
    n, h = rows.shape
    body = n - n % FOLD_ROWS
    if body == 0 or h == 1:  # one column: already a contiguous reduction
        return reduce(rows, 0)
    out = combine(reduce(rows[:body].reshape(body // FOLD_ROWS, FOLD_ROWS * h), 0).view(FOLD_ROWS, h), 0)
    if body == n:
        return out
    return combine(torch.stack([out, reduce(rows[body:], 0)]), 0)


def _softmax_per_bag(s: torch.Tensor, bounds: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`segment_softmax` of ``s [N, H]`` (masked rows already ``-inf``) bag by bag over host ``bounds``; the
    sum of each bag's exponentials accumulates in fp64, as :func:`segment_sum` does."""
    weights = torch.empty_like(s)
    lse = s.new_full((len(bounds) - 1, s.shape[1]), float("-inf"))
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if hi == lo:
            continue
        rows = s[lo:hi]
        top = _column_reduce(rows, torch.amax, torch.amax)
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all masked: exp(-inf - 0) = 0
        e = torch.sub(rows, top, out=weights[lo:hi]).exp_()
        denom = _column_reduce(e, partial(torch.sum, dtype=torch.float64), torch.sum)
        e.div_(torch.where(denom != 0, denom, torch.ones_like(denom)).to(s.dtype))
        lse[b] = torch.where(denom != 0, top + torch.log(denom).to(s.dtype), lse[b])
    return _flush_subnormals_(weights), lse


def pool_per_bag(weights: torch.Tensor, values: torch.Tensor, offsets: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """``pooled[b] = weights[bag b].T @ values[bag b]`` -> ``[B, H, D]`` in the dtype of ``weights``, one GEMM
    per bag. ``bounds`` is ``offsets`` as a host list (the batch carries it: no device sync here)."""
    n_bags, heads, dim = offsets.numel() - 1, weights.shape[1], values.shape[1]
    pooled = weights.new_zeros(n_bags, heads, dim)
    for b in range(n_bags):
        lo, hi = bounds[b], bounds[b + 1]
        if hi > lo:
            torch.matmul(weights[lo:hi].T, values[lo:hi].to(weights.dtype), out=pooled[b])
    return pooled


def lse_grad_rows(grad_weights: torch.Tensor | None, grad_lse: torch.Tensor | None, offsets: torch.Tensor,
                  n: int) -> torch.Tensor | None:
    """The gradient of the returned log-sum-exp folded into the weights' gradient rows. Since
    ``d lse_b / d s_i = a_i``, the score gradient ``a_i (u_i - c_b)`` gains ``a_i gl_b``: adding ``gl_b`` to
    ``grad_weights_i`` does that, provided ``c_b`` (``bag_grad_dot``) is computed from the original
    ``grad_weights``. ``[N]`` or ``[N, H]``, or None when neither gradient exists."""
    if grad_lse is None:
        return grad_weights
    rows = grad_lse[bag_index(offsets, n)]
    return rows if grad_weights is None else grad_weights + rows


def bag_grad_dot(
    g: torch.Tensor, pooled: torch.Tensor, weights: torch.Tensor, grad_weights: torch.Tensor | None,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """``c_b = sum_i a_i u_i`` of the softmax backward ``grad_s_i = a_i (u_i - c_b)``, where
    ``u_i = g_b . v_i (+ grad_weights_i)``: ``g_b . pooled_b (+ sum_i a_i grad_weights_i)``, ``[B]`` or
    ``[B, H]`` for ``g``/``pooled`` ``[B, (H,) D]`` and ``weights [N, (H)]``, in the dtype of ``pooled``."""
    c = (g.to(pooled.dtype) * pooled).sum(-1)
    if grad_weights is not None:
        c = c + segment_sum(weights * grad_weights.to(weights.dtype), offsets)
    return c


def rows_per_bag(mask: torch.Tensor | None, bounds: list[int], device: torch.device) -> list[torch.Tensor]:
    """Each bag's unmasked row numbers (int64, ascending, absolute): ``bounds`` are the host offsets. Two host
    synchronisations for the whole batch when there is a mask (the kept rows and the per-bag counts), none without."""
    if mask is None:
        return [torch.arange(lo, hi, device=device) for lo, hi in zip(bounds[:-1], bounds[1:])]
    kept = torch.nonzero(mask)[:, 0]
    ends = torch.searchsorted(kept, torch.tensor(bounds, device=kept.device)).tolist()
    return [kept[a:b] for a, b in zip(ends[:-1], ends[1:])]
