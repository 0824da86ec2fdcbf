"""Survival metrics, computed by scikit-survival on patient-level risks.

- ``c_index``: Harrell's concordance index (``sksurv.metrics.concordance_index_censored``): of the patient pairs
  where the one with the shorter time had the event, the share ordered correctly by risk (ties in risk count 1/2).
- ``td_auc``: the mean over time points of the cumulative/dynamic AUC (``sksurv.metrics.cumulative_dynamic_auc``,
  censoring handled by inverse probability weights estimated on the training patients) at the 25th, 50th and 75th
  percentiles of the split's event times (those inside both follow-up ranges), over the split's patients followed
  less long than the longest training follow-up (the weights exist only there); None when no such time exists.
- ``loss``: the survival NLL of the split (``alpha`` as in training); ``n`` slides, ``n_patients``, ``n_events``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .loss import group_logits, risk_from_logits, survival_nll
from .targets import SurvivalRecord, assign_bins

__all__ = ["concordance_index", "patient_index", "patient_table", "survival_metrics", "time_dependent_auc"]


def _structured(time: np.ndarray, event: np.ndarray) -> np.ndarray:
    out = np.empty(len(time), dtype=[("event", bool), ("time", np.float64)])
    out["event"], out["time"] = np.asarray(event, bool), np.asarray(time, np.float64)
    return out


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float | None:
    """Harrell's C (scikit-survival) of ``risk`` (higher = earlier event); None without a comparable pair."""
    from sksurv.metrics import concordance_index_censored

    time, event, risk = np.asarray(time, np.float64), np.asarray(event, bool), np.asarray(risk, np.float64)
    if not event.any() or len(time) < 2:
        return None
    t_event = time[event][:, None]  # comparable: the event came first, or at the time another was censored
    if not ((t_event < time[None, :]) | ((t_event == time[None, :]) & ~event[None, :])).any():
        return None
    return float(concordance_index_censored(event, time, risk)[0])


def time_dependent_auc(
    train_time: np.ndarray, train_event: np.ndarray, time: np.ndarray, event: np.ndarray, risk: np.ndarray
) -> tuple[list[float], list[float]] | None:
    """``(times, aucs)`` of the cumulative/dynamic AUC at the quartiles of the event times (module docstring);
    None when no event time lies inside the follow-up of both the split and the training patients."""
    from sksurv.metrics import cumulative_dynamic_auc

    time, event = np.asarray(time, np.float64), np.asarray(event, bool)
    train_time, train_event = np.asarray(train_time, np.float64), np.asarray(train_event, bool)
    if not train_event.any():
        return None
    # the censoring distribution is estimated on the training patients: only split patients followed less long
    # than the longest training follow-up can be weighted (scikit-survival refuses the others)
    inside = time < train_time.max()
    time, event, risk = time[inside], event[inside], np.asarray(risk, np.float64)[inside]
    if event.sum() < 2 or len(time) < 3:
        return None
    candidates = np.quantile(time[event], [0.25, 0.5, 0.75])
    times = np.unique(candidates[(candidates >= time.min()) & (candidates < min(time.max(), train_time.max()))])
    if times.size == 0:
        return None
    # an AUC at time t needs a patient with the event by t and one still at risk after it
    times = np.array([t for t in times if (event & (time <= t)).any() and (time > t).any()])
    if times.size == 0:
        return None
    aucs, _ = cumulative_dynamic_auc(_structured(train_time, train_event), _structured(time, event), risk, times)
    return [float(t) for t in times], [float(a) for a in aucs]


def patient_index(slide_ids: Sequence[str], records: Mapping[str, SurvivalRecord]
                  ) -> tuple[list[int], list[SurvivalRecord]]:
    """``(patient index of each slide, one record per patient)``, patients in order of first appearance."""
    missing = [s for s in slide_ids if s not in records]
    if missing:
        raise ValueError(f"no survival target for slide(s) {missing[:5]}")
    index: dict[str, int] = {}
    groups = [index.setdefault(records[s].case_id, len(index)) for s in slide_ids]
    first = {records[s].case_id: records[s] for s in reversed(slide_ids)}
    return groups, [first[c] for c in index]


def patient_table(
    slide_ids: Sequence[str], logits: np.ndarray, records: Mapping[str, SurvivalRecord]
) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Group slide logits ``[S, K]`` by patient (mean): ``(case_ids, patient logits [P, K], times [P], events [P])``,
    patients in order of first appearance."""
    groups, patients = patient_index(slide_ids, records)
    patient_logits = group_logits(torch.from_numpy(np.asarray(logits, np.float64)), torch.tensor(groups),
                                  len(patients)).numpy()
    return ([p.case_id for p in patients], patient_logits, np.array([p.time for p in patients], np.float64),
            np.array([p.event for p in patients], bool))


def survival_metrics(
    slide_ids: Sequence[str], logits: np.ndarray, records: Mapping[str, SurvivalRecord], edges: Sequence[float],
    train_records: Mapping[str, SurvivalRecord], alpha: float = 0.0,
) -> dict:
    """Patient-level metrics (module docstring) of per-slide ``logits [S, K]`` for ``slide_ids``."""
    if not slide_ids:
        return {"n": 0}
    _, patient_logits, time, event = patient_table(slide_ids, logits, records)
    x = torch.from_numpy(patient_logits)
    risk = risk_from_logits(x).numpy()
    bins = torch.from_numpy(assign_bins(time, list(edges)))
    train = {r.case_id: r for r in train_records.values()}
    train_time = np.array([r.time for r in train.values()], np.float64)
    train_event = np.array([r.event for r in train.values()], bool)
    td = time_dependent_auc(train_time, train_event, time, event, risk)
    return {"n": len(slide_ids), "n_patients": len(time), "n_events": int(event.sum()),
            "c_index": concordance_index(time, event, risk),
            "td_auc": None if td is None else float(np.mean(td[1])),
            "td_auc_times": None if td is None else td[0],
            "loss": float(survival_nll(x, bins, torch.from_numpy(event), alpha))}
