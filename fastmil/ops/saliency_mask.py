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
- **torch**: on the CPU with at most ``PER_BAG_MAX_BAGS`` bags, per bag one ``torch.topk`` of the smaller side
  (the k smallest composite keys ``key * 2^31 + index``, or the complement of the rest's largest): ~0.1 against
  ~1.2 ms of sorting for a 10k bag; otherwise (many bags, or CUDA tensors: no host synchronisation) one stable sort
  of ``(bag, eligible, key)`` per selection, ranks within each bag, fully vectorised.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..kernels._launch import canonical
from ._backend import resolve_backend
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


def random_keys(n: int, seed: int, device: torch.device) -> torch.Tensor:
    """int64 ``[n]`` counter-based random keys of rows ``0..n-1``: distinct, reproducible from ``seed``."""
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
"""The torch path selects bag by bag with ``torch.topk`` (on CPU tensors) up to this many bags per call; beyond, the
Python loop costs more than the one vectorised sort."""

_KEY_MAX = 2**63 - 1


def _smallest_per_bag(keys: torch.Tensor, eligible: torch.Tensor, bounds: list[int], k: list[int]) -> torch.Tensor:
    """bool ``[N]``: the same selection as :func:`_smallest_torch`, bag by bag on the host. The composite keys
    ``key * 2^31 + local index`` (keys < 2^32, bags < 2^31 rows) are distinct and order ties by index, so the ``k``
    smallest eligible rows are one ``topk``, or, when ``k`` is more than half of the ``m`` eligible rows, the
    eligible rows without the ``m - k`` largest (the smaller ``topk``)."""
    out = torch.zeros(keys.numel(), dtype=torch.bool, device=keys.device)
    for b, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        if k[b] == 0:
            continue
        elig = eligible[lo:hi]
        composite = (keys[lo:hi] << 31) | torch.arange(hi - lo, device=keys.device)
        m = int(elig.sum())
        if k[b] <= m - k[b]:
            composite = torch.where(elig, composite, _KEY_MAX)
            out[lo + torch.topk(composite, k[b], largest=False, sorted=False).indices] = True
        else:
            chosen = out[lo:hi]
            chosen.copy_(elig)
            if m > k[b]:
                composite = torch.where(elig, composite, -1)
                chosen[torch.topk(composite, m - k[b], largest=True, sorted=False).indices] = False
    return out


def _saliency_torch(scores, offsets, bounds, k_salient, random_ratio, counts, seed, mask):
    n = scores.numel()
    eligible = torch.ones(n, dtype=torch.bool, device=scores.device) if mask is None else mask
    if scores.device.type == "cpu" and len(bounds) - 1 <= PER_BAG_MAX_BAGS:
        def smallest(keys, rows, k):
            return _smallest_per_bag(keys, rows, bounds, k.tolist())
    else:
        sizes = offsets[1:] - offsets[:-1]
        bag = torch.repeat_interleave(torch.arange(sizes.numel(), device=scores.device), sizes, output_size=n)

        def smallest(keys, rows, k):
            return _smallest_torch(keys, rows, offsets, bag, k)
    salient = smallest(score_keys(scores), eligible, k_salient)
    k_random = ratio_count(counts - k_salient, random_ratio, "floor")
    rest = eligible & ~salient
    random = smallest(random_keys(n, seed, scores.device), rest, k_random)
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
    seed_t = torch.tensor([seed_mix(seed)], dtype=torch.int64, device=dev)
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
