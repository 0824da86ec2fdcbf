"""``saliency_mask``: per bag, the most salient instances, a random share of the rest, and what remains.

Contract (DESIGN.md section 3)::

    saliency_mask(scores [N], offsets int64 [B+1], high_ratio, random_ratio=0.0, seed=0, mask=None)
        -> SaliencyMask(keep, salient, random), three disjoint bool [N] tensors

Per bag with ``n`` eligible instances (``mask`` True; all when ``mask`` is None): ``salient`` = the
``ceil(high_ratio * n)`` highest scores (ties by lower index; -0.0 equals 0.0; NaN ranks lowest); ``random`` =
exactly ``floor(random_ratio * (n - n_salient))`` of the other eligible instances, a uniformly random subset
reproducible from ``seed`` (the same on both backends, whatever the launch configuration); ``keep`` = the rest of
the eligible instances. Ineligible instances are in no set. No gradient; on CUDA no host synchronisation.

Both selections are "the k smallest 32-bit keys of each bag, ties by lower index": score keys that order the
scores from high to low, and random keys ``hash(hash(row) ^ hash(seed))`` (a bijection of the row index, so
all distinct). ``ceil``/``floor`` of ``ratio * n`` snap to the nearest integer within 1e-9 first, so that
``0.03 * 100`` counts as 3, not 4.

- **triton** (``fastmil.kernels.saliency_mask``): radix select, 4 passes of 8 bits, per-tile histograms summed
  per bag in a fixed order (no sort, no atomics), one marking pass per selection.
- **torch**: on the CPU with at most ``PER_BAG_MAX_BAGS`` bags, bag by bag on the smaller side (the k best rows,
  or the complement of the rest's worst): one ``np.partition`` finds the k-th value, the rows beyond it are
  chosen and ties at it go by index; scores are compared as floats, random keys are distinct. Both selections of a
  100k bag take ~1.7-1.9 ms here (~4 ms with ``torch.topk`` on composite keys ``key * 2^31 + index``: on a 100k bag
  ``topk`` takes ~0.8 ms, ``np.partition`` ~0.1 ms). Otherwise (many bags, or CUDA tensors: no host
  synchronisation) one stable sort of ``(bag, eligible, key)`` per selection, ranks within each bag, fully
  vectorised.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..kernels._launch import canonical
from ._backend import resolve_backend
from ._segments import bag_index
from ._tiles import build_tiles, check_offsets, host_offsets
from ._triton import HAS_TRITON

__all__ = ["SaliencyMask", "random_keys", "ratio_count", "saliency_mask", "score_keys"]

_U32 = 0xFFFFFFFF


class SaliencyMask(NamedTuple):
    """Three disjoint bool ``[N]`` masks: ``keep`` (use as is), ``salient`` (dropped), ``random`` (recycled)."""

    keep: torch.Tensor
    salient: torch.Tensor
    random: torch.Tensor


def _lowbias32(x: torch.Tensor | int) -> torch.Tensor | int:
    """The 32-bit hash of the kernels (int64 arithmetic, results in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


def seed_mix(seed: int) -> int:
    """The per-call constant of the random keys, from the user's seed (any Python int)."""
    return int(_lowbias32(int(seed) & _U32))


def score_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 ``[N]`` keys in [0, 2^32) that order ``scores`` from highest (smallest key) to lowest."""
    x = scores.float()
    x = torch.where(torch.isnan(x), torch.full_like(x, float("-inf")), x)
    x = torch.where(x == 0, torch.zeros_like(x), x)
    bits = x.view(torch.int32).to(torch.int64) & _U32
    ascending = torch.where((bits >> 31) != 0, bits ^ _U32, bits ^ 0x80000000)
    return _U32 - ascending


def _lowbias32_numpy(x: np.ndarray) -> np.ndarray:
    """:func:`_lowbias32` in place on uint32 (numpy's uint32 products wrap and its shifts are logical, so no masks:
    half the passes of the int64 form)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def random_keys(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """int64 ``[n]`` counter-based random keys of rows ``0..n-1``: distinct, reproducible from ``seed``. On the CPU
    computed in numpy's uint32 (0.26 against 0.52 ms at 100k here), elsewhere in int64; the same keys."""
    if torch.device(device).type == "cpu" and n <= 2**32:
        keys = _lowbias32_numpy(np.arange(n, dtype=np.uint32))
        keys ^= np.uint32(seed_mix(seed))
        return torch.from_numpy(_lowbias32_numpy(keys).astype(np.int64))
    rows = torch.arange(n, dtype=torch.int64, device=device)
    return _lowbias32(_lowbias32(rows) ^ seed_mix(seed))


def ratio_count(n: torch.Tensor, ratio: float, rounding: str) -> torch.Tensor:
    """``ceil`` or ``floor`` of ``ratio * n`` (int64 tensor), after snapping values within 1e-9 (relative) of an
    integer to it: fp64 makes ``0.03 * 100 = 3.0000000000000004``, which must count as 3."""
    x = n.double() * ratio
    nearest = torch.round(x)
    x = torch.where((x - nearest).abs() <= 1e-9 * torch.clamp(x.abs(), min=1.0), nearest, x)
    out = torch.ceil(x) if rounding == "ceil" else torch.floor(x)
    return torch.minimum(out.to(torch.int64), n)


def _bag_counts(eligible: torch.Tensor | None, offsets: torch.Tensor) -> torch.Tensor:
    """Eligible instances per bag, int64 ``[B]`` (exact integer prefix sums; no host synchronisation)."""
    if eligible is None:
        return offsets[1:] - offsets[:-1]
    prefix = torch.zeros(eligible.numel() + 1, dtype=torch.int64, device=eligible.device)
    torch.cumsum(eligible.to(torch.int64), 0, out=prefix[1:])
    return prefix[offsets[1:]] - prefix[offsets[:-1]]


def _check_inputs(scores, offsets, high_ratio, random_ratio, mask) -> None:
    if scores.dim() != 1:
        raise ValueError(f"saliency_mask: scores must be [N], got shape {tuple(scores.shape)}")
    if not scores.is_floating_point():
        raise TypeError(f"saliency_mask: scores must be floating point, got {scores.dtype}")
    if offsets.dim() != 1 or offsets.dtype != torch.int64 or offsets.numel() < 2:
        raise ValueError("saliency_mask: offsets must be int64 [B+1] with B >= 1")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != scores.shape):
        raise ValueError(f"saliency_mask: mask must be bool [N] = [{scores.shape[0]}], got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    for name, ratio in (("high_ratio", high_ratio), ("random_ratio", random_ratio)):
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"saliency_mask: {name} must be in [0, 1], got {ratio}")


# ----------------------------------------------------------------------------------------------------------------
# torch path
# ----------------------------------------------------------------------------------------------------------------
def _smallest_torch(keys: torch.Tensor, eligible: torch.Tensor, offsets: torch.Tensor, bag: torch.Tensor,
                    k: torch.Tensor) -> torch.Tensor:
    """bool ``[N]``: per bag, the ``k[b]`` eligible rows with the smallest keys (ties by index), from one stable
    sort of the composite key ``(bag, not eligible, key)``. Bags are contiguous, so the sort leaves bag ``b`` in
    positions ``offsets[b]:offsets[b+1]`` with its eligible rows first; as ``k[b]`` never exceeds them, the chosen
    rows are the sorted positions below ``offsets[b] + k[b]`` (no gather of the sorted bag or eligibility)."""
    composite = (bag << 33) | ((~eligible).to(torch.int64) << 32) | keys
    order = torch.sort(composite, stable=True).indices
    chosen = torch.arange(keys.numel(), device=keys.device) < (offsets[:-1] + k)[bag]
    out = torch.empty_like(chosen)
    out[order] = chosen
    return out


PER_BAG_MAX_BAGS = 64
"""The torch path selects bag by bag (on CPU tensors, :func:`_best_per_bag`) up to this many bags per call; beyond,
the Python loop costs more than the one vectorised sort."""


_KEY_LIMIT = 2**32
"""Above every 32-bit key: the fill of ineligible rows when the smallest keys are chosen."""


def _best_rows(values: torch.Tensor, eligible: torch.Tensor, j: int, largest: bool, low_index_first: bool,
               worst_fill: float | int) -> torch.Tensor:
    """bool: the ``j`` (<= eligible count) eligible rows with the largest (``largest``) or smallest ``values``; among
    equal values the lower (``low_index_first``) or the higher indices first. A selection (``np.partition``: CPU
    tensors only) finds the ``j``-th value ``t``; the rows strictly beyond ``t`` are all chosen, the rest come from
    the eligible rows equal to ``t`` in index order. ``worst_fill`` (nothing is strictly worse) stands in for the
    ineligible rows."""
    filled = torch.where(eligible, values, worst_fill)
    at = filled.numel() - j if largest else j - 1  # the j-th value's place in ascending order
    threshold = np.partition(filled.numpy(), at)[at].item()  # introselect: ~10x faster here than torch.topk
    chosen = filled > threshold if largest else filled < threshold
    need = j - int(chosen.sum())
    ties = (filled == threshold) & eligible
    if int(ties.sum()) == need:  # the usual case: no tie straddles the threshold
        return chosen.logical_or_(ties)
    tied = ties.nonzero()[:, 0]
    chosen[tied[:need] if low_index_first else tied[tied.numel() - need :]] = True
    return chosen


def _best_per_bag(values: torch.Tensor, eligible: torch.Tensor, bounds: list[int], k: list[int],
                  largest: bool) -> torch.Tensor:
    """bool ``[N]``: per bag, the ``k[b]`` eligible rows with the largest (``largest``) or smallest ``values``, ties
    by lower index: the selection of :func:`_smallest_torch`, bag by bag on the host (``values`` float, or int64 keys
    in [0, 2^32)). It takes the smaller side: the ``k`` best rows, or, when ``k`` is more than half of the ``m``
    eligible rows, the eligible rows without the ``m - k`` worst (whose ties go to the higher indices)."""
    out = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if values.is_floating_point():
        worst, best = (-math.inf, math.inf) if largest else (math.inf, -math.inf)
    else:
        worst, best = (-1, _KEY_LIMIT) if largest else (_KEY_LIMIT, -1)
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if k[b] == 0:
            continue
        elig, chosen = eligible[lo:hi], out[lo:hi]
        m = int(elig.sum())
        if k[b] >= m:
            chosen.copy_(elig)
        elif k[b] <= m - k[b]:
            chosen.copy_(_best_rows(values[lo:hi], elig, k[b], largest, True, worst))
        else:
            worst_rows = _best_rows(values[lo:hi], elig, m - k[b], not largest, False, best)
            torch.logical_and(elig, worst_rows.logical_not_(), out=chosen)
    return out


def _saliency_torch(scores, offsets, bounds, k_salient, random_ratio, counts, seed, mask):
    n = scores.numel()
    eligible = torch.ones(n, dtype=torch.bool, device=scores.device) if mask is None else mask
    k_random = ratio_count(counts - k_salient, random_ratio, "floor")
    if scores.device.type == "cpu" and len(bounds) - 1 <= PER_BAG_MAX_BAGS:
        # scores as floats (NaN lowest: -inf; -0.0 == 0.0 ties with 0.0), random keys as they are (all distinct)
        values = torch.nan_to_num(scores.float(), nan=-math.inf, posinf=math.inf, neginf=-math.inf)
        salient = _best_per_bag(values, eligible, bounds, k_salient.tolist(), largest=True)
        rest = eligible & ~salient
        random = _best_per_bag(random_keys(n, seed, scores.device), rest, bounds, k_random.tolist(),
                               largest=False)
    else:
        bag = bag_index(offsets, n)
        salient = _smallest_torch(score_keys(scores), eligible, offsets, bag, k_salient)
        rest = eligible & ~salient
        random = _smallest_torch(random_keys(n, seed, scores.device), rest, offsets, bag, k_random)
    return rest & ~random, salient, random


# ----------------------------------------------------------------------------------------------------------------
# Triton path
# ----------------------------------------------------------------------------------------------------------------
def _smallest_triton(k, scores, seed_t, eligible, excluded, tiles, mode, kk):
    """Radix select of the ``kk[b]`` smallest keys per bag (``mode``: score or random keys) -> bool ``[N]``."""
    n_bags, dev = kk.numel(), scores.device
    prefix = torch.zeros(n_bags, dtype=torch.int64, device=dev)
    krem = kk.clone()
    hist = torch.empty(max(tiles.n_tiles, 1), 256, dtype=torch.int32, device=dev)
    eq_offset = torch.empty(max(tiles.n_tiles, 1), dtype=torch.int64, device=dev)
    out = torch.zeros(scores.numel(), dtype=torch.uint8, device=dev)
    for i, shift in enumerate(k.PASS_SHIFTS):
        k.radix_hist_launch(scores, seed_t, eligible, excluded, tiles.tile_bag, tiles.tile_start, tiles.tile_end,
                            prefix, hist, shift, mode)()
        k.radix_select_launch(hist, tiles.bag_tiles, prefix, krem, eq_offset, i == len(k.PASS_SHIFTS) - 1)()
    k.radix_mark_launch(scores, seed_t, eligible, excluded, tiles.tile_bag, tiles.tile_start, tiles.tile_end, prefix,
                        krem, eq_offset, out, mode)()
    return out.view(torch.bool)


def _saliency_triton(scores, offsets, offsets_cpu, k_salient, random_ratio, counts, seed, mask):
    from ..kernels import saliency_mask as k

    n, dev = scores.numel(), scores.device
    scores = canonical(scores.float())
    mask = None if mask is None else canonical(mask)
    tiles = build_tiles(offsets_cpu, n, k.BLOCK_N, dev)
    seed_t = torch.full((1,), seed_mix(seed), dtype=torch.int64, device=dev)  # a fill kernel: no host copy
    salient = _smallest_triton(k, scores, seed_t, mask, None, tiles, k.MODE_SCORE, k_salient)
    k_random = ratio_count(counts - k_salient, random_ratio, "floor")
    random = _smallest_triton(k, scores, seed_t, mask, salient, tiles, k.MODE_RANDOM, k_random)
    eligible = torch.ones(n, dtype=torch.bool, device=dev) if mask is None else mask
    return eligible & ~salient & ~random, salient, random


@torch.no_grad()
def saliency_mask(
    scores: torch.Tensor,
    offsets: torch.Tensor,
    high_ratio: float,
    random_ratio: float = 0.0,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    offsets_cpu: torch.Tensor | None = None,
) -> SaliencyMask:
    """Split each bag's eligible instances into salient / random / keep (see the module docstring).

    ``backend``: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``; both give identical
    sets. ``offsets_cpu``: the host copy of ``offsets`` (``Bags.offsets_cpu``; the Triton path sizes its grid
    from it)."""
    _check_inputs(scores, offsets, high_ratio, random_ratio, mask)
    chosen = resolve_backend(backend, "saliency_mask", scores.device, has_triton=HAS_TRITON)
    host = host_offsets(offsets, offsets_cpu)
    counts = _bag_counts(mask, offsets)
    k_salient = ratio_count(counts, high_ratio, "ceil")
    if chosen == "triton":
        keep, salient, random = _saliency_triton(scores, offsets, host, k_salient, random_ratio, counts, seed, mask)
    else:
        check_offsets(host, scores.numel())
        keep, salient, random = _saliency_torch(scores, offsets, host.tolist(), k_salient, random_ratio, counts,
                                                seed, mask)
    return SaliencyMask(keep, salient, random)
