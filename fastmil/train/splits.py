"""Train/val/test splits: from a CLAM-style CSV, or stratified at random from a seed."""
from __future__ import annotations

import csv
import io
import os

import numpy as np

from ..checkpoint import write_text_atomic
from ..data.labels import read_splits_csv
from ..data.store import FeatureStore

__all__ = ["labelled_slides", "make_group_splits", "make_splits", "load_splits", "write_splits"]

SPLITS = ("train", "val", "test")


def labelled_slides(store: FeatureStore) -> dict[str, int]:
    """``{slide_id: label}`` for the labelled slides; errors if the store cannot support training."""
    if not store.slide_ids:
        raise ValueError(f"{store.path}: the store holds no slides (fastmil ingest or fastmil synth fill it)")
    labels = {s: y for s, y in store.labels().items() if y is not None}
    if not labels:
        raise ValueError(f"{store.path}: no slide has a label (ingest with --labels CSV)")
    classes = store.classes or [str(c) for c in range(max(labels.values()) + 1)]
    present = sorted(set(labels.values()))
    if len(present) < 2:
        name = classes[present[0]] if present[0] < len(classes) else str(present[0])
        raise ValueError(
            f"{store.path}: all {len(labels)} labelled slides are of one class ({name!r}); "
            "need at least two classes to train"
        )
    return labels


def make_splits(labels: dict[str, int], val_fraction: float, test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Stratified random split; every class with >= 3 slides appears in train, val and test."""
    rng = np.random.default_rng([seed, 104729])
    out: dict[str, list[str]] = {k: [] for k in SPLITS}
    for cls in sorted(set(labels.values())):
        ids = sorted(s for s, y in labels.items() if y == cls)
        ids = [ids[i] for i in rng.permutation(len(ids))]
        n = len(ids)
        n_test = int(round(test_fraction * n)) if test_fraction > 0 else 0
        n_val = int(round(val_fraction * n)) if val_fraction > 0 else 0
        if n >= 3:
            n_test = max(n_test, 1) if test_fraction > 0 else 0
            n_val = max(n_val, 1) if val_fraction > 0 else 0
        out["test"] += ids[:n_test]
        out["val"] += ids[n_test : n_test + n_val]
        out["train"] += ids[n_test + n_val :]
    return {k: sorted(v) for k, v in out.items()}


def make_group_splits(strata: dict[str, int], groups: dict[str, str], val_fraction: float, test_fraction: float,
                      seed: int) -> dict[str, list[str]]:
    """Random split of whole groups (patients): each group's slides land in one split. Groups are stratified by
    their first slide's ``strata`` value (survival: the event indicator), and every stratum with >= 3 groups
    appears in train, val and test, as in :func:`make_splits`."""
    members: dict[str, list[str]] = {}
    for sid in sorted(strata):
        members.setdefault(groups.get(sid, f"slide:{sid}"), []).append(sid)
    by_group = {g: strata[ids[0]] for g, ids in members.items()}
    group_splits = make_splits(by_group, val_fraction, test_fraction, seed)
    return {k: sorted(s for g in group_splits[k] for s in members[g]) for k in SPLITS}


def load_splits(path: str | os.PathLike, labels: dict[str, int], store: FeatureStore) -> dict[str, list[str]]:
    """Read a CLAM-style splits CSV and check it against the store; missing slides are an error."""
    raw = read_splits_csv(path)
    if "train" not in raw:
        raise ValueError(f"{path}: splits CSV needs a 'train' column (found {sorted(raw)})")
    missing = sorted(s for ids in raw.values() for s in ids if s not in store)
    if missing:
        raise ValueError(
            f"{path}: names {len(missing)} slide(s) not in store {store.path}: "
            + ", ".join(repr(s) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        )
    unlabelled = sorted(s for ids in raw.values() for s in ids if s not in labels)
    if unlabelled:
        raise ValueError(f"{path}: slide(s) without a label (or survival target): "
                         f"{', '.join(map(repr, unlabelled[:5]))}")
    return {k: list(raw.get(k, [])) for k in SPLITS}


def write_splits(path: str | os.PathLike, splits: dict[str, list[str]]) -> None:
    """Write splits in CLAM's ``splits_k.csv`` layout (readable by :func:`load_splits`)."""
    rows = max(len(v) for v in splits.values()) if splits else 0
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["", *SPLITS])
    for i in range(rows):
        w.writerow([i, *[(splits[k][i] if i < len(splits[k]) else "") for k in SPLITS]])
    write_text_atomic(path, buf.getvalue())
