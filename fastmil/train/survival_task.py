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
from ..data.cache import CohortCache
from ..data.store import FeatureStore
from ..methods import Method
from ..survival import (
    SurvivalRecord,
    assign_bins,
    group_logits,
    read_survival_csv,
    risk_from_logits,
    survival_metrics,
    survival_nll,
    time_bin_edges,
    write_survival_csv,
)
from ..survival.metrics import patient_index, patient_table
from .config import TaskConfig
from .validate import predict_slides

__all__ = ["SurvivalRun"]


class SurvivalRun:
    """The survival targets (``records``: slide -> :class:`SurvivalRecord`), time-bin ``edges`` and NLL ``alpha``
    of one run."""

    loss_name = "nll"
    class_weight = None  # (the task interface of fastmil.train.classification_task.ClassificationRun)

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
        seen: dict[str, tuple[str, str]] = {}  # patient -> (split, slide)
        for name, ids in splits.items():
            for sid in ids:
                split, first = seen.setdefault(records[sid].case_id, (name, sid))
                if split != name:
                    raise ValueError(f"patient {records[sid].case_id!r} has slides in two splits: {first!r} in "
                                     f"{split!r} and {sid!r} in {name!r}; a patient's slides must share a split")
        if not splits["train"]:
            raise ValueError("the train split is empty")
        edges = time_bin_edges({s: records[s] for s in splits["train"]}, task.bins)
        return cls({s: records[s] for s in members}, edges, task.alpha)

    def save(self, run: Path) -> None:
        """Write ``RUN/survival.csv`` and ``RUN/survival.json`` (what :meth:`load` reads)."""
        write_survival_csv(run / "survival.csv", self.records)
        write_text_atomic(run / "survival.json", json.dumps({"edges": self.edges, "alpha": self.alpha}, indent=2))

    @classmethod
    def load(cls, run: str | Path) -> SurvivalRun:
        """The targets, edges and alpha a survival run folder was trained with."""
        run = Path(run)
        meta_path = run / "survival.json"
        if not meta_path.is_file() or not (run / "survival.csv").is_file():
            raise ValueError(f"{run}: a survival run folder needs survival.csv and survival.json")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            edges, alpha = [float(e) for e in meta["edges"]], float(meta["alpha"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{meta_path}: damaged ({exc!r}); expected {{\"edges\": [...], \"alpha\": ...}}") from None
        return cls(read_survival_csv(run / "survival.csv"), edges, alpha)

    # --------------------------------------------------------------------------------------------- training
    def strata(self) -> dict[str, int]:
        """``{slide: event (0/1)}``: what random splits and folds stratify by."""
        return {s: int(r.event) for s, r in self.records.items()}

    def groups(self, slide_ids: Sequence[str]) -> list[int]:
        """Patient index of each slide (for the sampler: a patient's slides go into one step)."""
        return patient_index(slide_ids, self.records)[0]

    def loss_fn(self, logits: torch.Tensor, bags: Bags) -> torch.Tensor:
        """The NLL of a step: slide logits ``[B, K]`` averaged per patient, then the censored NLL over them."""
        groups, patients = patient_index(bags.ids, self.records)
        bins = torch.from_numpy(assign_bins(np.array([r.time for r in patients]), self.edges))
        events = torch.tensor([r.event for r in patients])
        device = logits.device
        grouped = group_logits(logits.float(), torch.tensor(groups, device=device), len(patients))
        return survival_nll(grouped, bins.to(device), events.to(device), self.alpha)

    # --------------------------------------------------------------------------------------------- metrics
    def patient_risks(self, slide_ids: Sequence[str], logits: np.ndarray
                      ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """``(case ids, times, events, risks)`` of the patients of ``slide_ids`` from their slide logits."""
        cases, patient_logits, time, event = patient_table(slide_ids, logits, self.records)
        return cases, time, event, risk_from_logits(torch.from_numpy(patient_logits)).numpy()

    def split_metrics(self, method: Method, store: FeatureStore, ids: Sequence[str], train_ids: Sequence[str],
                      device: torch.device, amp: str = "none", cache: CohortCache | None = None) -> dict:
        """Patient-level survival metrics of ``method`` on the slides ``ids`` (:mod:`fastmil.survival.metrics`)."""
        if not ids:
            return {"n": 0}
        logits, _ = predict_slides(method, store, ids, device, amp=amp, output="logits", cache=cache)
        return survival_metrics(ids, logits, self.records, self.edges, {s: self.records[s] for s in train_ids},
                                self.alpha)
