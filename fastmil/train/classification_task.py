"""``task: classification`` (the default) in the trainer: slide labels, class weights, the split metrics.

The counterpart of :class:`fastmil.train.survival_task.SurvivalRun`: both give the trainer and ``evaluate`` one
task object with the same surface (``strata``, ``groups``, ``loss_fn``/``loss_name``, ``class_weight``,
``split_metrics``, ``save``), so neither branches on the task. Labels live in the store; a classification run
saves nothing of its own.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.cache import CohortCache
from ..data.store import FeatureStore
from ..methods import Method
from .validate import split_metrics

__all__ = ["ClassificationRun", "balanced_class_weight"]


def balanced_class_weight(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """``[C]`` fp32 weights ``n / (C n_c)`` (0 for a class with no slide): cross-entropy weighted so that every class
    counts as much as it would in a balanced split."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes).astype(np.float64)
    weight = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weight, dtype=torch.float32)


class ClassificationRun:
    """The labels (``{slide: class index}``), class names and optional class weights ``[C]`` of one run."""

    loss_name = "ce"
    loss_fn = None  # the methods' default: (class-weighted) cross-entropy against ``bags.labels``

    def __init__(self, labels: Mapping[str, int], classes: Sequence[str],
                 class_weight: torch.Tensor | None = None) -> None:
        self.labels, self.classes, self.class_weight = dict(labels), list(classes), class_weight

    @classmethod
    def for_splits(cls, labels: Mapping[str, int], classes: Sequence[str], splits: Mapping[str, list[str]],
                   class_weighting: bool, device: torch.device, *, check: bool = True) -> ClassificationRun:
        """The task of a run on ``splits``; class weights (on ``device``) from the training slides when
        ``class_weighting``. ``check``: refuse an empty train split or one with a single class (training)."""
        train = splits["train"]
        if check:
            if not train:
                raise ValueError("the train split is empty")
            train_classes = {labels[s] for s in train}
            if len(train_classes) < 2:
                raise ValueError(f"the train split holds one class only ({classes[next(iter(train_classes))]!r})")
        weight = (balanced_class_weight([labels[s] for s in train], len(classes)).to(device)
                  if class_weighting else None)
        return cls(labels, classes, weight)

    def save(self, run: Path) -> None:
        """Nothing to keep beside the run's config and splits (the labels are the store's)."""

    def strata(self) -> dict[str, int]:
        """``{slide: class}``: what random splits and folds stratify by."""
        return dict(self.labels)

    def groups(self, slide_ids: Sequence[str]) -> None:
        """No grouping of slides into steps (each slide is its own unit)."""
        return None

    def split_metrics(self, method: Method, store: FeatureStore, ids: Sequence[str], train_ids: Sequence[str],
                      device: torch.device, amp: str = "none", cache: CohortCache | None = None) -> dict:
        """Slide-level classification metrics of ``method`` on the slides ``ids`` (``train_ids``: unused, for the
        common task interface)."""
        return split_metrics(method, store, ids, self.labels, device, self.class_weight, amp, cache)
