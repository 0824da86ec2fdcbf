"""Importers: TRIDENT/CLAM ``.h5`` feature files and CLAM/MHIM ``pt_files/*.pt`` into a feature store.

- ``.h5`` (TRIDENT, CLAM ``h5_files``): datasets ``features [N, D]`` (CLAM sometimes ``[1, N, D]``) and
  ``coords [N, 2]``; patch geometry in the attrs of ``coords`` (TRIDENT: ``patch_size_level0``,
  ``target_magnification``; CLAM: ``patch_size``, ``patch_level``, ``downsample``). TRIDENT writes
  ``(1, D)`` chunks, which are ~10x slower to read; the store re-chunks to ``(chunk_rows, D)``.
- ``.pt`` (CLAM/MHIM ``pt_files``): a tensor ``[N, D]`` loaded with ``torch.load(weights_only=True)``,
  so no arbitrary object is ever unpickled; coordinates from ``<coords_dir>/<slide_id>.h5`` (``coords``).

Ingest is resumable and idempotent: slides already in the store from the same source file are skipped, and
each slide is written atomically, so re-running after a crash completes the rest. A slide that cannot be read or
fails validation (NaN/Inf features, coordinates that do not match the features, a truncated file, ...) is
reported with its reason and skipped, and the others are ingested; ``strict=True`` stops at the first instead.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from .._atomic import write_text_atomic
from .labels import encode_labels, read_labels_csv
from .store import DEFAULT_CHUNK_ROWS, FeatureStore, StoreError, create_store, to_jsonable, validate_slide_id

__all__ = ["SlideSource", "IngestReport", "discover_sources", "ingest", "patch_attrs_from_h5", "write_failures"]

FORMATS = ("auto", "h5", "pt")
MAX_SOURCE_ATTR_BYTES = 4096
"""A source attribute larger than this (as JSON) is not copied into the slide's metadata (its name is kept in
``source_attrs_dropped``): slide metadata is read for every slide of every listing."""
MAX_SOURCE_ATTRS_BYTES = 65536
"""All copied source attributes of one slide together stay below this."""


@dataclass(frozen=True)
class SlideSource:
    slide_id: str
    path: Path
    kind: str  # "h5" or "pt"


@dataclass
class IngestReport:
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the store from the same source file
    without_coords: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (slide id, reason), not written
    unknown_labels: list[str] = field(default_factory=list)  # labelled slides in neither the source nor the store
    labelled: int = 0
    classes: list[str] | None = None


def write_failures(path: str | os.PathLike, failed: list[tuple[str, str]]) -> None:
    """``slide_id,reason`` rows of the slides an ingest could not import (atomic write)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["slide_id", "reason"])
    writer.writerows(failed)
    write_text_atomic(path, buf.getvalue())


def _candidate_dirs(src: Path, kind: str) -> list[Path]:
    sub = src / f"{kind}_files"
    return [src, sub] if sub.is_dir() else [src]


def discover_sources(src_dir: str | os.PathLike, format: str = "auto") -> list[SlideSource]:
    """List the slide files in ``src_dir`` (and its CLAM-style ``h5_files/`` / ``pt_files/`` subfolders).

    Hidden files (``._x.h5``, macOS's resource forks) are not slides and are passed over. A file whose name is not
    a valid slide id is listed all the same: :func:`ingest` reports it as failed and goes on.

    Raises ``ValueError`` when two files would give the same slide id, or when nothing is found.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    src = Path(src_dir)
    if not src.is_dir():
        raise ValueError(f"{src}: not a directory")
    kinds = ("h5", "pt") if format == "auto" else (format,)
    found: dict[str, SlideSource] = {}
    for kind in kinds:
        for d in _candidate_dirs(src, kind):
            for path in sorted(d.glob(f"*.{kind}")):
                if path.name.startswith("."):
                    continue
                sid = path.stem
                if sid in found:
                    raise ValueError(
                        f"duplicate slide id {sid!r}: {found[sid].path} and {path} "
                        "(pass --format to pick one kind, or remove one file)"
                    )
                found[sid] = SlideSource(sid, path, kind)
    if not found:
        raise ValueError(f"{src}: no {'/'.join('.' + k for k in kinds)} slide files found")
    return [found[s] for s in sorted(found)]


def _bounded_attrs(attrs: Any) -> tuple[dict, list[str]]:
    """The h5 attributes as JSON values, without those over :data:`MAX_SOURCE_ATTR_BYTES` or past
    :data:`MAX_SOURCE_ATTRS_BYTES` in all (their names are returned): a 16 MB attribute must not become a 26 MB
    ``zarr.json`` that every listing parses."""
    kept, dropped, total = {}, [], 0
    for key in attrs.keys():
        name = str(key)[:200]
        stored = attrs.get_id(key).get_storage_size() if hasattr(attrs, "get_id") else 0
        if stored > MAX_SOURCE_ATTR_BYTES:  # not even read: an attribute may be gigabytes
            dropped.append(name)
            continue
        value = to_jsonable(attrs[key])
        size = len(json.dumps(value, default=str))
        if size > MAX_SOURCE_ATTR_BYTES or total + size > MAX_SOURCE_ATTRS_BYTES:
            dropped.append(name)
            continue
        kept[name] = value
        total += size
    return kept, dropped


def patch_attrs_from_h5(attrs: Any) -> dict:
    """Normalise the patch geometry attrs of a TRIDENT/CLAM ``coords`` dataset (large attributes are left out,
    :data:`MAX_SOURCE_ATTR_BYTES`)."""
    raw, dropped = _bounded_attrs(attrs)
    out: dict[str, Any] = {}
    if "patch_size_level0" in raw:
        out["patch_size_level0"] = int(raw["patch_size_level0"])
    elif "patch_size" in raw:
        down = raw.get("downsample", 1)
        factor = float(down[0]) if isinstance(down, list) else float(down)
        out["patch_size_level0"] = int(round(int(raw["patch_size"]) * factor))
    for key in ("target_magnification", "magnification"):
        if key in raw:
            out["magnification"] = raw[key]
            break
    if "level0_magnification" in raw:
        out["level0_magnification"] = raw["level0_magnification"]
    out["source_attrs"] = raw
    if dropped:
        out["source_attrs_dropped"] = dropped
    return out


def _plain_dataset(sid: str, path: Path, fh: h5py.File, name: str) -> h5py.Dataset:
    """``fh[name]`` if it is a plain dataset stored in ``fh`` itself; ValueError naming the slide otherwise. An h5
    file may point a dataset at other files of the host (external raw storage, virtual datasets, external or
    soft links): importing one would copy an arbitrary host file into the store."""
    link = fh.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise ValueError(f"slide {sid!r}: {path}: '{name}' is a {type(link).__name__} (a link elsewhere), not a "
                         "dataset of this file; refusing to follow it")
    obj = fh[name]
    if not isinstance(obj, h5py.Dataset):
        raise ValueError(f"slide {sid!r}: {path}: '{name}' is a {type(obj).__name__.lower()}, not a dataset")
    if obj.external or obj.is_virtual:
        raise ValueError(f"slide {sid!r}: {path}: '{name}' keeps its data outside this file "
                         f"({'external storage' if obj.external else 'a virtual dataset'}); refusing to read it")
    logical, stored = obj.size * obj.dtype.itemsize, obj.id.get_storage_size()
    if obj.compression is None and obj.scaleoffset is None and stored < logical:
        # unwritten chunks read as fill values: a tiny file could stand for terabytes of zeros
        raise ValueError(f"slide {sid!r}: {path}: '{name}' {obj.shape} holds {stored} of its {logical} bytes "
                         "(never written); refusing to import fill values")
    return obj


def _read_coords_h5(sid: str, path: Path) -> tuple[np.ndarray, dict]:
    try:
        with h5py.File(path, "r") as fh:
            if "coords" not in fh:
                raise ValueError(f"slide {sid!r}: {path} has no 'coords' dataset")
            ds = _plain_dataset(sid, path, fh, "coords")
            return ds[:], patch_attrs_from_h5(ds.attrs)
    except OSError as exc:
        raise ValueError(
            f"slide {sid!r}: cannot read coordinates file {path} (truncated or corrupt h5?): {exc}"
        ) from exc


def _write_h5_slide(store: FeatureStore, src: SlideSource, encoder: str | None, write_kw: dict) -> bool:
    """Import one TRIDENT/CLAM h5; returns True when coordinates were present."""
    sid, path = src.slide_id, src.path
    try:
        with h5py.File(path, "r") as fh:
            if "features" not in fh:
                hint = " (a patch-coordinates file? pair .pt features with --coords-dir)" if "coords" in fh else ""
                raise ValueError(f"slide {sid!r}: {path} has no 'features' dataset{hint}")
            feats = _plain_dataset(sid, path, fh, "features")
            if feats.ndim == 3 and feats.shape[0] == 1:  # CLAM h5_files sometimes keep a leading batch dim
                feats = feats[0]
            coords, attrs = None, {}
            if "coords" in fh:
                cds = _plain_dataset(sid, path, fh, "coords")
                coords = cds[:]
                attrs = patch_attrs_from_h5(cds.attrs)
            if encoder is not None:
                attrs["encoder"] = encoder
            elif "encoder" in fh.attrs:
                attrs["encoder"] = to_jsonable(fh.attrs["encoder"])
            attrs["source"] = path.name
            store.write_slide(sid, feats, coords, attrs, **write_kw)
            return coords is not None
    except OSError as exc:
        raise ValueError(f"slide {sid!r}: cannot read {path} (truncated or corrupt h5?): {exc}") from exc


def _load_pt_tensor(sid: str, path: Path) -> torch.Tensor:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError for damaged or unsafe files
        raise ValueError(
            f"slide {sid!r}: cannot load {path} as a tensor file (corrupt, or not weights-only): {exc}"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("features"), torch.Tensor):
        obj = obj["features"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"slide {sid!r}: {path} holds a {type(obj).__name__}, expected a [N, D] tensor")
    if obj.dim() == 3 and obj.shape[0] == 1:
        obj = obj[0]
    logical = obj.numel() * obj.element_size()
    stored = obj.untyped_storage().nbytes()
    if logical > stored:  # expand()/stride tricks: a 1.6 KB file would become a 1.2 GB slide
        raise ValueError(f"slide {sid!r}: {path} holds a tensor of {logical} bytes on {stored} bytes of storage "
                         "(repeated by zero strides); save real features (.contiguous() / .clone())")
    return obj


def _write_pt_slide(
    store: FeatureStore, src: SlideSource, coords_dir: Path | None, encoder: str | None, write_kw: dict
) -> bool:
    sid = src.slide_id
    feats = _load_pt_tensor(sid, src.path)
    coords, attrs = None, {}
    if coords_dir is not None:
        cpath = coords_dir / f"{sid}.h5"
        if not cpath.is_file():
            raise ValueError(f"slide {sid!r}: missing coordinates: no {cpath}")
        coords, attrs = _read_coords_h5(sid, cpath)
    if encoder is not None:
        attrs["encoder"] = encoder
    attrs["source"] = src.path.name
    store.write_slide(sid, feats, coords, attrs, **write_kw)
    return coords is not None


def ingest(
    src_dir: str | os.PathLike,
    store_path: str | os.PathLike,
    *,
    format: str = "auto",
    coords_dir: str | os.PathLike | None = None,
    labels_csv: str | os.PathLike | None = None,
    encoder: str | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    dtype: str | None = None,
    compression: str | None = None,
    strict: bool = False,
    progress: bool = True,
    lock_timeout: float = 0.0,
) -> IngestReport:
    """Import every slide file in ``src_dir`` into the store at ``store_path`` (created if needed).

    Every slide is tried: one that fails (unreadable or truncated file, invalid features or coordinates, a slide
    id already in the store from another file) is listed in ``report.failed`` with the reason and skipped; with
    ``strict`` the first failure raises. Labels (``labels_csv``) for slides that are neither in ``src_dir`` nor
    in the store (a cohort CSV ahead of extraction) are left out with a warning naming them (``strict``: an error
    before anything is written); labels of slides that failed are not recorded. The store's write lock is held
    throughout (``lock_timeout``: seconds to wait for another writer, else StoreError naming it).
    """
    sources = discover_sources(src_dir, format)
    cdir = Path(coords_dir) if coords_dir is not None else None
    if cdir is not None and not cdir.is_dir():
        raise ValueError(f"--coords-dir {cdir}: not a directory")
    raw_labels = read_labels_csv(labels_csv) if labels_csv is not None else None
    # classes from the whole CSV, so that a class index does not change as more of the cohort arrives; encoded
    # (and so checked) before anything is written
    encoded = encode_labels(raw_labels) if raw_labels is not None else None
    store = create_store(store_path, lock_timeout=lock_timeout)  # the write lock: one writer at a time
    report = IngestReport()
    if raw_labels is not None:
        known = {s.slide_id for s in sources} | set(store.slide_ids)
        report.unknown_labels = sorted(set(raw_labels) - known)
        if report.unknown_labels:
            shown = ", ".join(repr(s) for s in report.unknown_labels[:5])
            message = (f"{labels_csv}: labels name {len(report.unknown_labels)} slide(s) that are neither in "
                       f"{src_dir} nor in the store: {shown}{' ...' if len(report.unknown_labels) > 5 else ''}")
            if strict:
                raise ValueError(message)
            warnings.warn(message + " (left out)", stacklevel=2)

    write_kw = {"chunk_rows": chunk_rows, "dtype": dtype, "compression": compression}
    for src in tqdm(sources, desc="ingest", unit="slide", disable=None if progress else True):
        try:
            validate_slide_id(src.slide_id)
            if src.slide_id in store:
                existing = store.slide_attrs(src.slide_id).get("source")
                if existing != src.path.name:
                    raise StoreError(f"duplicate slide id {src.slide_id!r}: already in store from {existing!r}, "
                                     f"now also {src.path}")
                report.skipped.append(src.slide_id)
                continue
            if src.kind == "h5":
                has_coords = _write_h5_slide(store, src, encoder, write_kw)
            else:
                has_coords = _write_pt_slide(store, src, cdir, encoder, write_kw)
        except (ValueError, StoreError, OSError) as exc:  # bad input: report, keep going (strict: stop)
            if strict:
                raise
            report.failed.append((src.slide_id, str(exc)))
            continue
        report.written.append(src.slide_id)
        if not has_coords:
            report.without_coords.append(src.slide_id)

    if encoded is not None:
        labels, classes = encoded
        present = set(store.slide_ids)
        labels = {s: y for s, y in labels.items() if s in present}
        store.set_labels(labels, classes)
        report.labelled, report.classes = len(labels), classes
    return report
