"""``task: survival`` in the trainer: the run's targets and time bins, the step loss, the split metrics.

A survival run keeps its own copy of what it was trained against, so evaluation and prediction later do not
depend on the store's (or a CSV's) current contents::

    RUN/survival.csv    slide_id, case_id, time, event of every slide in the run's splits
    RUN/survival.json   {"edges": inner time-bin edges (from the training patients), "alpha": NLL weight}

Patients: the sampler keeps a patient's slides in one step (:class:`fastmil.data.BagBatchSampler` ``groups``);
the step loss averages each patient's slide logits before the NLL, as the metrics do.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from .._atomic import write_text_atomic
from ..bags import Bags
from ..data.store import FeatureStore
from ..methods import Method
from ..survival import (
    SurvivalRecord,
    assign_bins,
    group_logits,
    read_survival_csv,
    survival_metrics,
    survival_nll,
    time_bin_edges,
    write_survival_csv,
)
from .config import TaskConfig
from .validate import predict_slides

__all__ = ["SurvivalRun"]


class SurvivalRun:
    """The survival targets (``records``: slide -> :class:`SurvivalRecord`), time-bin ``edges`` and NLL ``alpha``
    of one run."""

    def __init__(self, records: Mapping[str, SurvivalRecord], edges: Sequence[float], alpha: float) -> None:
        self.records, self.edges, self.alpha = dict(records), [float(e) for e in edges], float(alpha)

    # --------------------------------------------------------------------------------------------- construction
    @classmethod
    def for_splits(cls, records: Mapping[str, SurvivalRecord], splits: Mapping[str, list[str]],
                   task: TaskConfig) -> SurvivalRun:
        """Targets of the slides in ``splits`` (each must have one); bins from the training patients."""
        members = [s for ids in splits.values() for s in ids]
        missing = [s for s in members if s not in records]
        if missing:
            raise ValueError(f"{len(missing)} slide(s) of the splits have no survival target: {missing[:5]}")
        if not splits["train"]:
            raise ValueError("the train split is empty")
        edges = time_bin_edges({s: records[s] for s in splits["train"]}, task.bins)
        return cls({s: records[s] for s in members}, edges, task.alpha)

    def save(self, run: Path) -> None:
        write_survival_csv(run / "survival.csv", self.records)
        write_text_atomic(run / "survival.json", json.dumps({"edges": self.edges, "alpha": self.alpha}, indent=2))

    @classmethod
    def load(cls, run: str | Path) -> SurvivalRun:
        run = Path(run)
        meta_path = run / "survival.json"
        if not meta_path.is_file() or not (run / "survival.csv").is_file():
            raise ValueError(f"{run}: a survival run folder needs survival.csv and survival.json")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        return cls(read_survival_csv(run / "survival.csv"), meta["edges"], meta["alpha"])

    # --------------------------------------------------------------------------------------------- training
    def strata(self) -> dict[str, int]:
        """``{slide: event (0/1)}``: what random splits and folds stratify by."""
        return {s: int(r.event) for s, r in self.records.items()}

    def cases(self) -> dict[str, str]:
        return {s: r.case_id for s, r in self.records.items()}

    def groups(self, slide_ids: Sequence[str]) -> list[int]:
        """Patient index of each slide (for the sampler: a patient's slides go into one step)."""
        index: dict[str, int] = {}
        return [index.setdefault(self.records[s].case_id, len(index)) for s in slide_ids]

    def loss_fn(self, logits: torch.Tensor, bags: Bags) -> torch.Tensor:
        """The NLL of a step: slide logits ``[B, K]`` averaged per patient, then the censored NLL over them."""
        recs = [self.records[s] for s in bags.ids]
        index: dict[str, int] = {}
        groups = torch.tensor([index.setdefault(r.case_id, len(index)) for r in recs], dtype=torch.int64)
        first = {r.case_id: r for r in recs}
        patients = [first[c] for c in index]
        bins = torch.from_numpy(assign_bins(np.array([r.time for r in patients]), self.edges))
        events = torch.tensor([r.event for r in patients])
        device = logits.device
        grouped = group_logits(logits.float(), groups.to(device), len(index))
        return survival_nll(grouped, bins.to(device), events.to(device), self.alpha)

    # --------------------------------------------------------------------------------------------- metrics
    def split_metrics(self, method: Method, store: FeatureStore, ids: Sequence[str], train_ids: Sequence[str],
                      device: torch.device, amp: str = "none") -> dict:
        """Patient-level survival metrics of ``method`` on the slides ``ids`` (:mod:`fastmil.survival.metrics`)."""
        if not ids:
            return {"n": 0}
        logits, _ = predict_slides(method, store, ids, device, amp=amp, output="logits")
        return survival_metrics(ids, logits, self.records, self.edges, {s: self.records[s] for s in train_ids},
                                self.alpha)
