"""The research-code-style MHIM-MIL step of the benchmarks (``benchmarks/baselines/mhim_research.py``) runs the same
algorithm as fastmil's: its Python-set selection splits a bag into the same salient set and the same numbers of
kept and recycled instances as ``saliency_mask``, and one step trains the student, moves the teacher by the EMA and
the recycle queries towards the step's tokens."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fastmil.ops import saliency_mask
from tests.tolerance import check_close, rounding_bound

BASELINE = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines" / "mhim_research.py"


@pytest.fixture(scope="module")
def research():
    spec = importlib.util.spec_from_file_location("mhim_research_baseline", BASELINE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("n", [1, 7, 100, 1234])
def test_the_selection_matches_saliency_mask_sets_and_counts(research, n):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    kept, masked, salient = research.python_set_selection(scores, 0.03, 0.8, seed=5)
    offsets = torch.tensor([0, n])
    want = saliency_mask(scores, offsets, 0.03, 0.8, seed=5)
    assert sorted(salient.tolist()) == want.salient.nonzero()[:, 0].tolist()
    assert kept.numel() == int(want.keep.sum()) and masked.numel() == int(want.random.sum())
    chosen = torch.cat([kept, masked, salient])
    assert torch.equal(chosen.sort().values, torch.arange(n))  # a partition of the bag


def test_one_step_trains_the_student_and_moves_teacher_and_queries(research):
    torch.manual_seed(0)
    model = research.ResearchMHIM(64, momentum=0.9)
    x, y = torch.randn(300, 64), torch.tensor([1])
    student = [p.detach().clone() for p in model.student.parameters()]
    teacher = [p.detach().clone() for p in model.teacher.parameters()]
    queries = model.recycle.queries.detach().clone()
    seen = {}
    attend, recycle = model.student.attend, model.recycle.forward

    def attend_spy(bag):
        seen["bag"] = bag.shape
        return attend(bag)

    def recycle_spy(masked):
        seen["masked"] = masked.shape
        return recycle(masked)

    model.student.attend, model.recycle.forward = attend_spy, recycle_spy
    loss = model.step(x, y)
    # 300 rows: 9 salient (ceil 0.03 * 300), 232 of the other 291 recycled (floor 0.8 * 291), 59 kept + 5 tokens
    assert seen == {"masked": (232, 512), "bag": (64, 512)}
    assert torch.isfinite(torch.tensor(loss))
    new_student = list(model.student.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(student, new_student))
    for before, after, s in zip(teacher, model.teacher.parameters(), new_student):
        # the baseline's mul_ then add_(alpha) against this expression: two products and a sum on each side (the
        # constants 0.9, 0.1 rounded to fp32 are two more); no cancellation (s is one step from before), so scale
        # is the largest term
        scale = float(torch.maximum(before.abs(), s.detach().abs()).max())
        check_close(after, 0.9 * before + 0.1 * s.detach(), rounding_bound(2 * 3 + 2), "train", "teacher EMA",
                    scale=scale)
    assert not torch.equal(queries, model.recycle.queries)
