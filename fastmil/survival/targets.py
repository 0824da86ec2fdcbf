"""Survival targets: the CSV, the store's copy, the time bins.

CSV: a header row with ``slide_id``, ``time`` and ``event`` columns, and optionally ``case_id`` (the patient; without
it every slide is its own patient). ``time`` is the follow-up time (any unit, >= 0); ``event`` is 1 (or true/dead)
when the event was observed at ``time`` and 0 (false/alive/censored) when the patient was last seen event-free at
``time``. The slides of one patient must agree on time and event.

A store may carry the targets too (root attribute ``survival``: ``{slide_id: [case_id, time, event]}``;
``fastmil synth --survival`` writes it, :func:`write_survival_to_store` sets it).
"""
from __future__ import annotations

import csv
import io
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._atomic import write_text_atomic

__all__ = ["SurvivalRecord", "assign_bins", "check_patients", "read_survival_csv", "survival_targets",
           "time_bin_edges", "write_survival_csv", "write_survival_to_store"]

_EVENT_WORDS = {"1": True, "1.0": True, "true": True, "dead": True, "deceased": True, "event": True,
                "0": False, "0.0": False, "false": False, "alive": False, "censored": False}


@dataclass(frozen=True)
class SurvivalRecord:
    """One slide's survival target: its patient, the follow-up time, and whether the event was observed."""

    case_id: str
    time: float
    event: bool


def _parse_time(raw: str, where: str, slide_id: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{where}: slide {slide_id!r} has time {raw!r}, not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: slide {slide_id!r} has time {value}; times must be finite and >= 0")
    return value


def _parse_event(raw: str, where: str, slide_id: str) -> bool:
    key = raw.strip().lower()
    if key not in _EVENT_WORDS:
        raise ValueError(f"{where}: slide {slide_id!r} has event {raw!r}; expected 1/0 (or true/false, "
                         "dead/alive, censored)")
    return _EVENT_WORDS[key]


def check_patients(records: Mapping[str, SurvivalRecord], source: str) -> None:
    """The slides of each patient must share time and event; errors name the patient and two of its slides."""
    first: dict[str, tuple[str, SurvivalRecord]] = {}
    for sid, rec in records.items():
        seen = first.setdefault(rec.case_id, (sid, rec))
        if (seen[1].time, seen[1].event) != (rec.time, rec.event):
            raise ValueError(f"{source}: patient {rec.case_id!r} has slides with different survival: {seen[0]!r} "
                             f"(time {seen[1].time}, event {int(seen[1].event)}) and {sid!r} (time {rec.time}, "
                             f"event {int(rec.event)})")


def read_survival_csv(path: str | os.PathLike) -> dict[str, SurvivalRecord]:
    """``{slide_id: SurvivalRecord}`` from a survival CSV (module docstring); errors name the line and slide."""
    p = Path(path)
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        missing = [c for c in ("slide_id", "time", "event") if c not in fields]
        if missing:
            raise ValueError(f"{p}: survival CSV needs columns slide_id, time, event (and optionally case_id); "
                             f"missing {missing}, found {fields}")
        reader.fieldnames = fields
        out: dict[str, SurvivalRecord] = {}
        for line_no, row in enumerate(reader, start=2):
            where = f"{p}:{line_no}"
            sid = (row.get("slide_id") or "").strip()
            if not sid:
                raise ValueError(f"{where}: empty slide_id")
            case = (row.get("case_id") or "").strip() or sid
            rec = SurvivalRecord(case, _parse_time((row.get("time") or "").strip(), where, sid),
                                 _parse_event(row.get("event") or "", where, sid))
            if out.get(sid, rec) != rec:
                raise ValueError(f"{where}: slide {sid!r} listed twice with different survival")
            out[sid] = rec
    if not out:
        raise ValueError(f"{p}: survival CSV has no rows")
    check_patients(out, str(p))
    return out


def write_survival_csv(path: str | os.PathLike, records: Mapping[str, SurvivalRecord]) -> None:
    """Write ``records`` as a survival CSV (atomically); :func:`read_survival_csv` reads it back unchanged."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["slide_id", "case_id", "time", "event"])
    for sid in sorted(records):
        rec = records[sid]
        writer.writerow([sid, rec.case_id, repr(float(rec.time)), int(rec.event)])
    write_text_atomic(path, buf.getvalue())


def _from_store(store) -> dict[str, SurvivalRecord]:
    raw = store.attrs.get("survival")
    if raw is None:
        return {}
    out = {}
    for sid, value in raw.items():
        if not (isinstance(value, list) and len(value) == 3):
            raise ValueError(f"{store.path}: damaged survival attribute for slide {sid!r}: {value!r}")
        out[sid] = SurvivalRecord(str(value[0]), _parse_time(str(value[1]), str(store.path), sid),
                                  _parse_event(str(value[2]), str(store.path), sid))
    return out


def write_survival_to_store(store, records: Mapping[str, SurvivalRecord]) -> None:
    """Record survival targets in the store (every slide must be in it; one atomic attribute update)."""
    unknown = sorted(s for s in records if s not in store)
    if unknown:
        raise ValueError(f"{store.path}: survival targets for slides not in the store: {unknown[:5]}")
    check_patients(records, str(store.path))
    store.update_attrs(survival={s: [r.case_id, float(r.time), bool(r.event)] for s, r in sorted(records.items())})


def survival_targets(store, csv_path: str | os.PathLike | None = None) -> dict[str, SurvivalRecord]:
    """The survival targets of the store's slides: from ``csv_path`` when given (slides not in the store are
    skipped), else the store's own ``survival`` attribute. Errors when no slide has one."""
    if csv_path is not None:
        given, source = read_survival_csv(csv_path), str(csv_path)
    else:
        given, source = _from_store(store), f"{store.path} (no task.survival_csv given)"
    records = {s: r for s, r in given.items() if s in store}
    if not records:
        raise ValueError(f"{source}: no survival targets for the slides of {store.path}")
    unknown, untargeted = len(given) - len(records), len(store.slide_ids) - len(records)
    if unknown or untargeted:
        warnings.warn(f"{source}: {unknown} target(s) for slides not in the store and {untargeted} store slide(s) "
                      f"without a target are left out", stacklevel=2)
    return records


def _patients(records: Mapping[str, SurvivalRecord]) -> dict[str, SurvivalRecord]:
    return {rec.case_id: rec for rec in records.values()}


def time_bin_edges(records: Mapping[str, SurvivalRecord], n_bins: int) -> list[float]:
    """The ``n_bins - 1`` inner edges of the time bins: quantiles of the uncensored times of the patients in
    ``records`` (pass the training split), so that the observed events spread evenly over the bins."""
    if n_bins < 2:
        raise ValueError(f"survival needs at least 2 time bins, got {n_bins}")
    times = np.array([r.time for r in _patients(records).values() if r.event], dtype=np.float64)
    if times.size < n_bins:
        raise ValueError(f"{n_bins} time bins need at least {n_bins} patients with an observed event in the "
                         f"training split; it has {times.size}")
    edges = [float(v) for v in np.quantile(times, np.arange(1, n_bins) / n_bins)]
    if len(set(edges)) < len(edges):
        raise ValueError(f"{n_bins} time bins from the training patients' event times give repeated edges {edges} "
                         f"(too few distinct event times, {len(np.unique(times))}); use fewer task.bins")
    return edges


def assign_bins(times: np.ndarray, edges: list[float]) -> np.ndarray:
    """``int64`` bin of each time: the number of inner edges at or below it (bin k is ``[edge_{k-1}, edge_k)``)."""
    return np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(times, dtype=np.float64),
                           side="right").astype(np.int64)
