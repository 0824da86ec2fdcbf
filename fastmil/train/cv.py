"""k-fold cross-validation with patient-level splits: ``fastmil cv``.

Folds: each fold holds out one k-th of the *patients* as its test set (stratified by slide label), and a
``val_fraction`` of the remaining patients as validation; a patient's slides are always in one split
(scikit-learn's ``StratifiedGroupKFold``, groups = ``case_id``). Patients come from a CSV with ``slide_id`` and
``case_id`` columns (a CLAM labels CSV has both); without one, every slide is its own patient. Alternatively the
folds are read from a folder of CLAM split files (``splits_<k>.csv`` and/or ``splits_<k>_bool.csv``).

Output::

    OUT/splits/splits_<k>.csv, splits_<k>_bool.csv   the folds used (CLAM's two forms)
    OUT/splits/folds.json                             written last: the split set is complete (resume reads it)
    OUT/fold_<k>/                                     one run folder per fold (fastmil train's layout)
    OUT/summary.csv, OUT/summary.md                   every test metric per fold, mean and sd over folds
    OUT/km_test.png, OUT/test_risks.csv               survival (``task: survival``): Kaplan-Meier curves of the
                                                      pooled test folds, each fold's test patients split at that
                                                      fold's median predicted risk, with the log-rank p-value
                                                      (also in the summaries, as ``logrank_p_pooled``); the
                                                      patients' risks

Survival folds group slides by the patients of the survival targets and stratify by the event indicator.

Resumable per fold: a fold whose run folder holds a checkpoint continues from it (a finished fold is only
evaluated again).
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._atomic import write_text_atomic
from ..data.labels import read_splits_csv
from ..data.store import FeatureStore, open_store
from ..survival import survival_targets
from .config import TrainConfig
from .splits import SPLITS, labelled_slides, write_splits

__all__ = ["cross_validate", "draw_folds", "patient_folds", "read_case_ids", "read_split_dir", "write_splits_bool"]

SPLITS_COMPLETE = "folds.json"
"""Written (atomically) after every split file of a cross-validation: the split set is complete."""


def read_case_ids(path: str | os.PathLike) -> dict[str, str]:
    """``{slide_id: case_id}`` from a CSV with ``slide_id`` and ``case_id`` columns (e.g. a CLAM labels CSV)."""
    p = Path(path)
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "slide_id" not in fields or "case_id" not in fields:
            raise ValueError(f"{p}: patient grouping needs 'slide_id' and 'case_id' columns, found {fields}")
        reader.fieldnames = fields
        cases: dict[str, str] = {}
        for line_no, row in enumerate(reader, start=2):
            sid, case = (row.get("slide_id") or "").strip(), (row.get("case_id") or "").strip()
            if not sid or not case:
                raise ValueError(f"{p}:{line_no}: empty slide_id or case_id")
            if cases.get(sid, case) != case:
                raise ValueError(f"{p}:{line_no}: slide {sid!r} belongs to cases {cases[sid]!r} and {case!r}")
            cases[sid] = case
    return cases


def patient_folds(labels: dict[str, int], cases: dict[str, str] | None, folds: int, val_fraction: float,
                  seed: int) -> list[dict[str, list[str]]]:
    """``folds`` splits ``{"train", "val", "test"}``: the test sets partition the patients (stratified by label);
    validation is ``val_fraction`` of each fold's other patients. Slides missing from ``cases`` are their own
    patient."""
    from sklearn.model_selection import StratifiedGroupKFold

    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    slides = sorted(labels)
    group_of = {s: (cases or {}).get(s, f"slide:{s}") for s in slides}
    n_patients = len(set(group_of.values()))
    if n_patients < folds:
        raise ValueError(f"{folds} folds need at least {folds} patients; the labelled slides come from {n_patients}")
    y = np.array([labels[s] for s in slides])
    groups = np.array([group_of[s] for s in slides])
    outer = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    out = []
    for k, (rest, test) in enumerate(outer.split(np.zeros(len(slides)), y, groups)):
        val = np.array([], dtype=int)
        n_inner = round(1 / val_fraction) if val_fraction > 0 else 0
        if n_inner >= 2 and len(set(groups[rest])) >= n_inner:
            inner = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed + 1 + k)
            _, val_local = next(inner.split(np.zeros(len(rest)), y[rest], groups[rest]))
            val = rest[val_local]
        train = np.setdiff1d(rest, val)
        out.append({"train": [slides[i] for i in train], "val": [slides[i] for i in val],
                    "test": [slides[i] for i in test]})
    return out


def draw_folds(store: FeatureStore, cfg: TrainConfig, folds: int,
               cases_csv: str | os.PathLike | None = None) -> list[dict[str, list[str]]]:
    """:func:`patient_folds` for the task of ``cfg``: classification stratifies by label (patients from
    ``cases_csv``); survival by the event indicator, patients from the survival targets' ``case_id``."""
    if cfg.task.name == "survival":
        if cases_csv is not None:
            raise ValueError("--cases is for classification; a survival run's patients come from its survival "
                             "targets (case_id)")
        records = survival_targets(store, cfg.task.survival_csv)
        return patient_folds({s: int(r.event) for s, r in records.items()}, {s: r.case_id for s, r in records.items()},
                             folds, cfg.data.val_fraction, cfg.run.seed)
    cases = read_case_ids(cases_csv) if cases_csv is not None else None
    return patient_folds(labelled_slides(store), cases, folds, cfg.data.val_fraction, cfg.run.seed)


def write_splits_bool(path: str | os.PathLike, splits: dict[str, list[str]]) -> None:
    """CLAM's ``splits_<k>_bool.csv``: one row per slide, a True/False column per split."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["", *SPLITS])
    for sid in sorted(s for members in splits.values() for s in members):
        writer.writerow([sid, *[str(sid in splits.get(name, ())) for name in SPLITS]])
    write_text_atomic(path, buf.getvalue())


def _read_splits_bool(path: Path) -> dict[str, list[str]]:
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{path}: empty split file")
    header = [h.strip() for h in rows[0]]
    names = [h for h in header[1:] if h]
    splits: dict[str, list[str]] = {name: [] for name in names}
    for line_no, row in enumerate(rows[1:], start=2):
        sid = row[0].strip()
        flags = [v.strip() for v in row[1 : 1 + len(names)]]
        if any(f not in ("True", "False") for f in flags):
            raise ValueError(f"{path}:{line_no}: expected True/False flags, got {flags}")
        chosen = [name for name, f in zip(names, flags) if f == "True"]
        if len(chosen) > 1:
            raise ValueError(f"{path}:{line_no}: slide {sid!r} is in {chosen}")
        for name in chosen:
            splits[name].append(sid)
    return splits


def read_split_dir(path: str | os.PathLike) -> list[dict[str, list[str]]]:
    """The folds of a folder of CLAM split files, in fold order: ``splits_<k>.csv`` or ``splits_<k>_bool.csv``
    (where both exist for a fold they must agree)."""
    root = Path(path)
    found: dict[int, dict[str, dict[str, list[str]]]] = {}
    for file in root.iterdir():
        match = re.fullmatch(r"splits_(\d+)(_bool)?\.csv", file.name)
        if match:
            form = "bool" if match.group(2) else "list"
            found.setdefault(int(match.group(1)), {})[form] = (
                _read_splits_bool(file) if form == "bool" else read_splits_csv(file))
    if not found:
        raise ValueError(f"{root}: no splits_<k>.csv or splits_<k>_bool.csv files")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{root}: fold numbers {sorted(found)} are not 0..{len(found) - 1}")
    folds = []
    for k in range(len(found)):
        forms = found[k]
        if len(forms) == 2 and _as_sets(forms["list"]) != _as_sets(forms["bool"]):
            raise ValueError(f"{root}: splits_{k}.csv and splits_{k}_bool.csv disagree")
        chosen = forms.get("list") or forms["bool"]
        folds.append({name: list(chosen.get(name, [])) for name in SPLITS})
    return folds


def _as_sets(splits: dict[str, list[str]]) -> dict[str, set[str]]:
    return {name: set(members) for name, members in splits.items() if members}


def _scalar_metrics(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and k != "n"}


def _write_summary(out: Path, per_fold: list[dict], pooled: dict[str, float | None] | None = None) -> list[dict]:
    """summary.csv and summary.md: one row per test metric (mean, sd, each fold), then one row per ``pooled``
    statistic of all folds' test slides together (its value under ``mean``, no sd or fold values)."""
    names = sorted({k for m in per_fold for k in _scalar_metrics(m)})
    rows = []
    for name in names:
        values = [_scalar_metrics(m).get(name) for m in per_fold]
        defined = [v for v in values if v is not None]
        rows.append({"metric": name, "mean": float(np.mean(defined)) if defined else None,
                     "sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
                     **{f"fold_{k}": v for k, v in enumerate(values)}})
    for name, value in (pooled or {}).items():
        rows.append({"metric": name, "mean": value, "sd": None, **{f"fold_{k}": None for k in range(len(per_fold))}})
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=["metric", "mean", "sd", *[f"fold_{k}" for k in range(len(per_fold))]])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(out / "summary.csv", buf.getvalue())
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"Test metrics over {len(per_fold)} folds (mean ± sd; n = "
             f"{', '.join(str(m['n']) for m in per_fold)} test slides)", "",
             "| metric | mean ± sd | " + " | ".join(f"fold {k}" for k in range(len(per_fold))) + " |",
             "|---|---|" + "---|" * len(per_fold)]
    for row in rows[: len(names)]:
        lines.append(f"| {row['metric']} | {fmt(row['mean'])} ± {fmt(row['sd'])} | "
                     + " | ".join(fmt(row[f"fold_{k}"]) for k in range(len(per_fold))) + " |")
    for name, value in (pooled or {}).items():
        lines += ["", f"Pooled over the test folds: {name} = {'n/a' if value is None else f'{value:.3g}'}"]
    write_text_atomic(out / "summary.md", "\n".join(lines) + "\n")
    return rows


def cross_validate(
    store: FeatureStore | str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    folds: int = 5,
    split_dir: str | os.PathLike | None = None,
    cases_csv: str | os.PathLike | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train one run per fold into ``out/fold_<k>`` and summarise the test metrics (see the module docstring).
    Returns the summary rows (``metric``, ``mean``, ``sd``, ``fold_<k>``)."""
    from .loop import fit

    store = store if isinstance(store, FeatureStore) else open_store(store)
    cfg = config or TrainConfig()
    out = Path(out)
    split_files = out / "splits"
    if split_dir is not None:
        fold_splits = read_split_dir(split_dir)
    elif (split_files / SPLITS_COMPLETE).exists():  # a resumed cv keeps the folds it drew
        fold_splits = read_split_dir(split_files)
        if len(fold_splits) != folds:
            raise ValueError(f"{out} holds a {len(fold_splits)}-fold cross-validation; resume it with --folds "
                             f"{len(fold_splits)} or choose another --out")
    else:  # first run, or one killed while writing the split files: draw (deterministic from the seed) again
        fold_splits = draw_folds(store, cfg, folds, cases_csv)
    split_files.mkdir(parents=True, exist_ok=True)
    for k, splits in enumerate(fold_splits):
        write_splits(split_files / f"splits_{k}.csv", splits)
        write_splits_bool(split_files / f"splits_{k}_bool.csv", splits)
    # the completion marker, written last: without it a resume treats the split files as unfinished
    write_text_atomic(split_files / SPLITS_COMPLETE, json.dumps({"folds": len(fold_splits)}) + "\n")
    per_fold = []
    for k in tqdm(range(len(fold_splits)), desc="cv", unit="fold", disable=None if progress else True):
        fold_dir = out / f"fold_{k}"
        resume = (fold_dir / "last.pt").exists()
        result = fit(store, fold_dir, None if resume else cfg, split_csv=split_files / f"splits_{k}.csv",
                     resume=resume, progress=progress)
        per_fold.append(result.metrics["test"])
    pooled = None
    if cfg.task.name == "survival":
        pooled = {"logrank_p_pooled": _pooled_test_km(out, store, [out / f"fold_{k}" for k in range(len(fold_splits))])}
    return _write_summary(out, per_fold, pooled)


def _pooled_test_km(out: Path, store: FeatureStore, fold_dirs: list[Path]) -> float | None:
    """Kaplan-Meier plot (km_test.png) and patients' risks (test_risks.csv) of the pooled test folds (module
    docstring); returns the log-rank p (None when no fold has test patients or the p is undefined)."""
    from ..survival import save_km_plot
    from .loop import load_method
    from .survival_task import SurvivalRun
    from .validate import predict_slides

    rows = []
    for k, fold_dir in enumerate(fold_dirs):
        method, cfg, _ = load_method(fold_dir, store)
        survival = SurvivalRun.load(fold_dir)
        test = _run_splits(fold_dir / "splits.csv")["test"]
        if not test:
            continue
        logits, _ = predict_slides(method, store, test, next(method.parameters()).device, amp=cfg.run.amp,
                                   output="logits")
        cases, time, event, risk = survival.patient_risks(test, logits)
        high = risk > np.median(risk)
        rows += [(k, c, t, int(e), float(r), bool(h)) for c, t, e, r, h in zip(cases, time, event, risk, high)]
    if not rows:
        return None
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["fold", "case_id", "time", "event", "risk", "high_risk"])
    writer.writerows(rows)
    write_text_atomic(out / "test_risks.csv", buf.getvalue())
    time, event = np.array([r[2] for r in rows]), np.array([r[3] for r in rows], bool)
    p = save_km_plot(out / "km_test.png", time, event, np.array([r[5] for r in rows]),
                     f"{len(fold_dirs)} test folds pooled: {len(rows)} patients, split at each fold's median risk")
    return p


def _run_splits(path: Path) -> dict[str, list[str]]:
    """One fold's ``splits.csv`` (the run folder's copy)."""
    return {name: list(read_splits_csv(path).get(name, [])) for name in SPLITS}
