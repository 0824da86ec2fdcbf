"""ClassificationRun: the classification side of the trainer's task interface (SurvivalRun is the other)."""
import pytest
import torch

from fastmil.train.classification_task import ClassificationRun, balanced_class_weight
from fastmil.train.survival_task import SurvivalRun

LABELS = {"a": 0, "b": 0, "c": 0, "d": 1, "e": 2}


def test_balanced_weights_count_each_class_as_in_a_balanced_split():
    weight = balanced_class_weight([0, 0, 0, 1], 3)
    assert weight.dtype == torch.float32
    assert weight.tolist() == pytest.approx([4 / 9, 4 / 3, 0.0])  # n / (C n_c); a class with no slide gets 0
    counts = torch.tensor([3.0, 1.0])
    assert float((weight[:2] * counts).sum()) == pytest.approx(4 * 2 / 3)  # both present classes weigh the same


def test_for_splits_checks_the_train_split_and_weights_on_the_device():
    splits = {"train": ["a", "b", "d"], "val": ["c"], "test": ["e"]}
    task = ClassificationRun.for_splits(LABELS, ["x", "y", "z"], splits, True, torch.device("cpu"))
    torch.testing.assert_close(task.class_weight, balanced_class_weight([0, 0, 1], 3))
    assert task.loss_fn is None and task.loss_name == "ce" and task.groups(["a"]) is None
    assert task.strata() == LABELS
    unweighted = ClassificationRun.for_splits(LABELS, ["x", "y", "z"], splits, False, torch.device("cpu"))
    assert unweighted.class_weight is None
    with pytest.raises(ValueError, match="one class only .'x'."):
        ClassificationRun.for_splits(LABELS, ["x", "y", "z"], {**splits, "train": ["a", "b"]}, True,
                                     torch.device("cpu"))
    with pytest.raises(ValueError, match="train split is empty"):
        ClassificationRun.for_splits(LABELS, ["x", "y", "z"], {**splits, "train": []}, True, torch.device("cpu"))
    evaluated = ClassificationRun.for_splits(LABELS, ["x", "y", "z"], {**splits, "train": ["a"]}, True,
                                             torch.device("cpu"), check=False)  # evaluate() of a finished run
    assert evaluated.class_weight.tolist() == pytest.approx([1 / 3, 0.0, 0.0])


def test_both_tasks_offer_the_interface_the_trainer_calls():
    tasks = [ClassificationRun(LABELS, ["x", "y", "z"]), SurvivalRun({}, [], 0.0)]
    for name in ("loss_name", "loss_fn", "class_weight", "groups", "split_metrics", "save", "strata"):
        assert all(hasattr(task, name) for task in tasks), name
