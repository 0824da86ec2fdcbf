"""The two-level tile merge (issue 30 item 8): a batch of few bags with many tiles merges groups of tiles in
parallel first (``merge_groups_kernel``), then the groups of each bag (``merge_tiles_kernel`` on the group table).

The production constants take the two-level path only at sizes the interpreter cannot afford (a bag of more than
8k rows), so the tests force it with a small group (``MERGE_GROUP_TILES`` 3: many groups per bag, and 40: more
than one ``BLOCK_T`` step of 32 tiles per group) and ``MERGE_MIN_GROUPS_PER_BAG`` 0, and check with a spy that it
ran. Forward and backward of attention_pool and gated_attention_pool are held to the fp64 references with the
neighbouring tests' bounds (their helpers), on one bag of many tiles, on ragged bags mixing a big bag, an empty
bag, a bag of one and an all-masked bag spanning several groups, and on N not a multiple of any block. NaN and
masking semantics are checked at the group level: an all-masked group contributes nothing, a NaN in one group
makes its bag NaN (never an empty bag), an empty or all-masked bag pools to 0 with lse = +inf (-inf returned).
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmil.kernels import _tiled_softmax as k
from fastmil.ops import attention_pool
from tests.ops import test_attention_pool as ap
from tests.ops import test_gated_attention_pool as gp
from tests.ragged import WIDE_DIM, offsets_of

ONE_BAG = [4001]
"""One bag of 126 fp32 tiles (63 fp16): 42 groups of 3, 4 of 40; 4001 rows: no block size divides it."""

RAGGED = [2500, 0, 700, 1, 65]
"""A big bag, an empty bag, a 700-row bag (all-masked in the ``all-masked-bag`` cases: 22 tiles, several groups
of 3 and one of 40), a bag of one and a bag with a ragged last tile."""


@pytest.fixture
def two_level(monkeypatch):
    """Force the two-level merge with small groups; returns ``set(group)`` and the list of first-level launches
    (group size, allocated groups, bags) the ops made."""
    launches = []
    real = k.merge_groups_launch

    def spy(*args):
        launch = real(*args)
        launches.append((launch.args["GROUP"], launch.grid[0], launch.args["B"]))
        return launch

    monkeypatch.setattr(k, "merge_groups_launch", spy)
    monkeypatch.setattr(k, "MERGE_MIN_GROUPS_PER_BAG", 0)

    def use(group):
        monkeypatch.setattr(k, "MERGE_GROUP_TILES", group)
        return launches

    return use


@pytest.mark.parametrize("group", [3, 40])
@pytest.mark.parametrize("sizes, mask_kind, heads, dtype", [
    (ONE_BAG, "none", None, torch.float32),
    (ONE_BAG, "random", 3, torch.float16),
    (RAGGED, "all-masked-bag", None, torch.float32),
    (RAGGED, "random", 3, torch.bfloat16),
])
def test_attention_pool_two_level_matches_fp64_reference(sizes, mask_kind, heads, dtype, group, two_level,
                                                         nan_filled_empty):
    """(New tensors are NaN-filled: a group row the second level read but the first never wrote would show.)"""
    launches = two_level(group)
    scores, values, offsets, mask = ap._case(sizes, 40, heads, dtype, mask_kind, seed=11)
    grads = ap._upstream(len(sizes), sum(sizes), heads, 40, seed=12)
    actual = ap._run(scores, values, offsets, mask, "triton", grads)
    assert launches and all(g == group and b == len(sizes) for g, _, b in launches), launches
    ap._check(actual, ap._reference(scores, values, offsets, mask, grads), offsets, values, mask, dtype, grads, scores)
    pooled, weights = actual[0], actual[1]
    if sizes is RAGGED:
        assert torch.all(pooled[1] == 0)  # the empty bag
    if mask_kind == "all-masked-bag":
        assert torch.all(pooled[2] == 0) and torch.all(weights[offsets[2] : offsets[3]] == 0)


def test_wide_features_and_lse_through_two_levels(two_level):
    """D = 259: three D blocks of the merge (the group partials are addressed per block, with a ragged tail); the
    returned log-sum-exp of a big bag, an empty bag (-inf) and an all-masked bag (-inf)."""
    two_level(3)
    sizes = RAGGED
    scores, values, offsets, mask = ap._case(sizes, WIDE_DIM, 3, torch.float32, "all-masked-bag", seed=13)
    grads = ap._upstream(len(sizes), sum(sizes), 3, WIDE_DIM, seed=14)
    actual = ap._run(scores, values, offsets, mask, "triton", grads)
    ap._check(actual, ap._reference(scores, values, offsets, mask, grads), offsets, values, mask, torch.float32,
              grads, scores)
    _, _, lse = attention_pool(scores, values, offsets, mask, backend="triton", return_lse=True)
    _, _, ref = attention_pool(scores.double(), values.double(), offsets, mask, backend="torch", return_lse=True)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref)) and bool((lse[[1, 2]] == float("-inf")).all())
    finite = torch.isfinite(ref)
    assert float((lse[finite].double() - ref[finite]).abs().max()) < 1e-5


def test_an_all_masked_group_contributes_nothing(two_level):
    """Rows 0..299 of the bag masked: its first groups of 3 tiles (96 rows) see nothing (max -inf, sum 0) and must
    not move the pooled vector; the single-level merge and the reference agree."""
    two_level(3)
    scores, values, offsets, _ = ap._case(ONE_BAG, 40, None, torch.float32, "none", seed=15)
    mask = torch.ones(sum(ONE_BAG), dtype=torch.bool)
    mask[:300] = False
    mask[2000:2500] = False  # a masked run in the middle too
    grads = ap._upstream(1, sum(ONE_BAG), None, 40, seed=16)
    actual = ap._run(scores, values, offsets, mask, "triton", grads)
    ap._check(actual, ap._reference(scores, values, offsets, mask, grads), offsets, values, mask, torch.float32,
              grads, scores)


@pytest.mark.parametrize("where", ["score NaN", "score +inf", "value NaN"])
def test_a_nan_in_one_group_makes_its_bag_nan_not_empty(where, two_level):
    """A corrupted row in one group of the big bag: that bag's pooled vector (and its lse for a score) is NaN, as
    on the torch path; the other bags (empty, all-masked, small) keep their values."""
    two_level(3)
    sizes = RAGGED
    scores, values, offsets, mask = ap._case(sizes, 8, None, torch.float32, "all-masked-bag", seed=17)
    row = 1234  # group 12 of bag 0 (tiles of 32 rows, groups of 3 tiles)
    mask[row] = True
    if where == "value NaN":
        values[row, 3] = float("nan")
    else:
        scores[row] = float("nan") if where == "score NaN" else float("inf")
    s, v = scores.detach().requires_grad_(), values.detach().requires_grad_()
    pooled, weights, lse = attention_pool(s, v, offsets, mask, backend="triton", return_lse=True)
    if where == "value NaN":
        assert torch.isnan(pooled[0, 3]) and torch.isfinite(weights).all() and torch.isfinite(lse[0])
    else:
        assert torch.isnan(pooled[0]).all() and not torch.isfinite(lse[0]) and torch.isnan(weights[: sizes[0]]).any()
    ref, _ = attention_pool(scores.double(), values.double(), offsets, mask, backend="torch")
    assert torch.isnan(ref[0]).any() and torch.allclose(pooled[1:].double(), ref[1:], atol=1e-6)
    assert torch.all(pooled[[1, 2]] == 0) and bool((lse[[1, 2]] == float("-inf")).all())
    pooled.sum().backward()
    assert not torch.isfinite(s.grad[: sizes[0]]).all() or not torch.isfinite(v.grad[: sizes[0]]).all()
    assert torch.isfinite(s.grad[sizes[0]:]).all() and torch.isfinite(v.grad[sizes[0]:]).all()


@pytest.mark.parametrize("sizes, mask_kind, dtype", [
    (ONE_BAG, "random", torch.float32),
    (RAGGED, "all-masked-bag", torch.float16),
])
def test_gated_attention_pool_two_level_matches_fp64_reference(sizes, mask_kind, dtype, two_level):
    launches = two_level(3)
    h, params, offsets, mask = gp._case(sizes, dtype, mask_kind, seed=18)
    grads = gp._upstream(len(sizes), sum(sizes), gp.DIM, seed=19)
    actual = gp._run(h, params, offsets, mask, "triton", grads)
    assert launches, "the two-level merge did not run"
    rounding = gp._score_rounding("triton", dtype)
    gp._check(actual, gp._reference(h, params, offsets, mask, grads, rounding), offsets, mask, dtype, h, params,
              rounding)
    if mask_kind == "all-masked-bag":
        assert torch.all(actual[0][[1, 2]] == 0) and torch.all(actual[1][offsets[2] : offsets[3]] == 0)


def test_group_table_and_group_partials():
    """``merge_groups_kernel`` alone on a synthetic tile table: ``bag_groups`` is the prefix sum of ``cdiv(tiles_b,
    group)`` (empty bags get none), and each group's (max, sum, partial) is the merge of its tiles; rows past the
    last group are never part of a bag."""
    g = torch.Generator().manual_seed(20)
    tiles_per_bag = [7, 0, 1, 3, 0, 9]
    group, heads, dim = 3, 2, 5
    bag_tiles = offsets_of(tiles_per_bag)
    n_tiles, n_bags = int(bag_tiles[-1]), len(tiles_per_bag)
    tile_max = torch.randn(n_tiles, heads, generator=g)
    tile_sum = torch.rand(n_tiles, heads, generator=g) + 0.5
    tile_max[4], tile_sum[4] = float("-inf"), 0.0  # a tile with nothing valid
    tile_max[17:20], tile_sum[17:20] = float("-inf"), 0.0  # a whole group with nothing valid (bag 5's last group)
    partial = torch.randn(n_tiles, heads, dim, generator=g)
    partial[4], partial[17:20] = 0.0, 0.0
    n_groups = k.merge_groups_bound(n_tiles, n_bags, group)
    group_max = torch.full((n_groups, heads), 7.0)
    group_sum, group_partial = torch.full_like(group_max, 7.0), torch.full((n_groups, heads, dim), 7.0)
    bag_groups = torch.full((n_bags + 1,), -1, dtype=torch.int64)
    k.merge_groups_launch(tile_max, tile_sum, partial, bag_tiles, group_max, group_sum, group_partial, bag_groups,
                          group)()
    expected = [0]
    for t in tiles_per_bag:
        expected.append(expected[-1] + -(-t // group))
    assert bag_groups.tolist() == expected and n_groups >= expected[-1]
    row = 0
    for b in range(n_bags):
        for lo in range(int(bag_tiles[b]), int(bag_tiles[b + 1]), group):
            hi = min(lo + group, int(bag_tiles[b + 1]))
            m = tile_max[lo:hi].max(0).values
            m_safe = torch.where(m == float("-inf"), 0.0, m)
            scale = torch.where(tile_sum[lo:hi] != 0, torch.exp(tile_max[lo:hi] - m_safe), 0.0)
            assert torch.equal(group_max[row], m)
            torch.testing.assert_close(group_sum[row], (scale * tile_sum[lo:hi]).sum(0))
            torch.testing.assert_close(group_partial[row], (scale[..., None] * partial[lo:hi]).sum(0))
            row += 1
    assert row == expected[-1]
    assert torch.all(group_sum[expected[-1] - 1] == 0)  # the all-masked group: contributes nothing


def test_two_levels_only_for_small_grids_of_long_bags():
    """The production choice (host integers only): one 100k-row bag with D = 512 goes from 4 merge programs to
    50 x 4 + 4; many bags, or short bags, keep the single-level merge."""
    tiles = -(-100_000 // 64)  # fp16 values, 1563 tiles of 64 rows
    assert k.merge_group_tiles(tiles, 1, 1, 512) == k.MERGE_GROUP_TILES == 32
    assert k.merge_groups_bound(tiles, 1, 32) == 50
    assert k.merge_group_tiles(tiles, 66, 1, 512) == 0  # 264 programs already
    assert k.merge_group_tiles(tiles, 1, 66, 512) == 0  # heads count too
    assert k.merge_group_tiles(100, 1, 1, 512) == 0  # 100 tiles: at most 4 steps of one level
    assert k.merge_group_tiles(0, 0, 1, 512) == 0


_NO_INTERPRETER = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}


def test_runtime_two_level_launches_are_among_the_checked_specialisations():
    """The two-level path with the production constants, on batches that take it (one bag, 4 bags, 16 bags; 1, 3,
    16 heads; D 512, 48 and 40; fp32/fp16 values, with and without a mask) with launches recorded instead of run: every
    merge specialisation Triton's binder derives is one ``make aot`` compiles (``fastmil.aot``). The tile
    kernels' launches are recorded too but not checked here (tests/test_aot.py covers them)."""
    code = """
        import torch
        import fastmil.ops._backend as backend
        from fastmil import aot
        from fastmil.kernels._launch import Launch
        import importlib
        ap_mod = importlib.import_module("fastmil.ops.attention_pool")  # the package exports the functions
        gp_mod = importlib.import_module("fastmil.ops.gated_attention_pool")
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        seen = []
        Launch.__call__ = lambda self: seen.append(self)
        ap_mod.resolve_backend = gp_mod.resolve_backend = lambda *a, **k: "triton"
        for sizes, dims in (([9000], (512, 40)), ([34000, 0, 5000, 3], (512, 40)), ([8300] * 16, (48, 40))):
            offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
            n = sum(sizes)
            for dtype in (torch.float32, torch.float16):
                for dim in dims:
                    values = torch.zeros(n, dim, dtype=dtype)
                    for mask in (None, torch.ones(n, dtype=torch.bool)):
                        for heads in (1, 3, 16):
                            scores = torch.zeros(n) if heads == 1 else torch.zeros(n, heads)
                            ap_mod.attention_pool(scores, values, offsets, mask)
                        params = [torch.zeros(24, dim), torch.zeros(24), torch.zeros(24, dim), torch.zeros(24),
                                  torch.zeros(1, 24), torch.zeros(1)]
                        gp_mod.gated_attention_pool(values, *params, offsets, mask)
        be = make_backend(GPUTarget("cuda", 90, 32))
        merges = [s for s in seen if s.name.startswith("merge_")]
        runtime = {aot.specialise(launch, be) for launch in merges}
        checked = set(aot.collect_specialisations("merge"))
        print(sum(s.name == "merge_groups_kernel" for s in merges), len(runtime), len(runtime - checked))
        for spec in list(runtime - checked)[:5]:
            print(spec.kernel, spec.label)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**_NO_INTERPRETER, "TRITON_DEFAULT_FP_FUSION": "1"}, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    two_level, distinct, missing = map(int, lines[0].split())
    assert two_level > 0 and distinct > 4, lines[0]
    assert missing == 0, "\n".join(lines)
