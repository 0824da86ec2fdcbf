"""Slide labels and splits from CSV files.

- Labels: a header row with ``slide_id`` and ``label`` columns (other columns such as CLAM's ``case_id``
  are ignored). Labels may be integers (used as class indices) or strings (mapped to class indices in
  sorted order; the names are recorded in the store as ``classes``).
- Splits: CLAM's ``splits_k.csv``: an index column, then one column per split (``train``, ``val``,
  ``test``) listing slide ids, ragged columns padded with empty cells.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

__all__ = ["MAX_CLASSES", "read_labels_csv", "encode_labels", "read_splits_csv"]

MAX_CLASSES = 10_000
"""Integer labels are class indices below this."""


def read_labels_csv(path: str | os.PathLike) -> dict[str, str]:
    """Read ``slide_id,label`` rows into ``{slide_id: raw_label}``.

    Raises ``ValueError`` on a missing column, an empty label, or a slide listed twice with different labels.
    """
    p = Path(path)
    with open(p, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "slide_id" not in fields or "label" not in fields:
            raise ValueError(f"{p}: labels CSV needs 'slide_id' and 'label' columns, found {fields}")
        reader.fieldnames = fields
        out: dict[str, str] = {}
        for line_no, row in enumerate(reader, start=2):
            sid = (row.get("slide_id") or "").strip()
            raw = (row.get("label") or "").strip()
            if not sid:
                raise ValueError(f"{p}:{line_no}: empty slide_id")
            if not raw:
                raise ValueError(f"{p}:{line_no}: slide {sid!r} has an empty label")
            if sid in out and out[sid] != raw:
                raise ValueError(f"{p}:{line_no}: slide {sid!r} listed twice with labels {out[sid]!r} and {raw!r}")
            out[sid] = raw
    if not out:
        raise ValueError(f"{p}: labels CSV has no rows")
    return out


def encode_labels(raw: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Map raw labels to class indices.

    Integer labels (all of them parse as non-negative ints) are kept as indices, classes ``["0", ..., str(max)]``.
    Otherwise the distinct strings, sorted, become the classes.
    """
    values = list(raw.values())
    if all(v.lstrip("+").isdigit() for v in values):
        ints = {sid: int(v) for sid, v in raw.items()}
        sid, top = max(ints.items(), key=lambda item: item[1])
        if top >= MAX_CLASSES:  # 100000000000 would make a class list of 10^11 names
            raise ValueError(f"slide {sid!r}: integer label {top} is not a class index below {MAX_CLASSES}; "
                             "use class indices 0..C-1 or class names")
        n_classes = top + 1
        return ints, [str(i) for i in range(n_classes)]
    classes = sorted(set(values))
    index = {name: i for i, name in enumerate(classes)}
    return {sid: index[v] for sid, v in raw.items()}, classes


def read_splits_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """Read a CLAM-style ``splits_k.csv`` into ``{"train": [...], "val": [...], "test": [...]}``.

    Any header columns other than a leading unnamed index column are taken as split names. A slide in two
    splits is an error.
    """
    p = Path(path)
    with open(p, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        raise ValueError(f"{p}: splits CSV is empty")
    header = [h.strip() for h in rows[0]]
    columns = [(j, name) for j, name in enumerate(header) if name and not (j == 0 and name.lower() in ("", "index"))]
    if not columns:
        raise ValueError(f"{p}: splits CSV has no split columns (expected e.g. train,val,test)")
    splits: dict[str, list[str]] = {name: [] for _, name in columns}
    owner: dict[str, str] = {}
    for line_no, row in enumerate(rows[1:], start=2):
        for j, name in columns:
            sid = row[j].strip() if j < len(row) else ""
            if not sid:
                continue
            if sid in owner:
                raise ValueError(f"{p}:{line_no}: slide {sid!r} is in both {owner[sid]!r} and {name!r}")
            owner[sid] = name
            splits[name].append(sid)
    return splits
