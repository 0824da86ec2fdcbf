"""The zarr v3 feature store: one subgroup per slide, written atomically.

Layout (DESIGN.md section 5)::

    STORE/                       zarr group; attrs: fastmil_format, classes (label names, index = class id)
      slides/<slide_id>/         zarr group; attrs: patch_size_level0, magnification, encoder, label, source, ...
        features  [N, D]         float16/float32, chunked (chunk_rows, D) along N, full rows per chunk
        coords    [N, 2] int32   level-0 (x, y) of each patch's top-left corner (optional)
        instance_labels [N] u1   per-patch ground truth where known (synthetic slides: 1 = tumour)

Durability (every interruption leaves the old or the new version of what was written, never neither):

- A slide is staged under ``STORE/.staging/``, every file and folder of it fsynced, and renamed into
  ``slides/`` only when complete. Overwriting moves the old slide to ``STORE/.trash/`` first; if anything fails
  between the two renames the old slide is moved back, and a process killed in that window leaves the old slide
  in ``.trash``, where readers still find it and the next writable open restores it (:meth:`FeatureStore.recover`).
- A label update (class names + slide labels) is committed by one atomic write of ``STORE/labels.pending.json``;
  readers prefer it to the per-slide attributes, and applying it to those attributes is idempotent and is
  finished by the next writable open if interrupted.

Metadata (attributes) is read and updated straight from the zarr v3 ``zarr.json`` files, the latter by
write-aside-then-rename, so listing thousands of slides never touches array data.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import zarr

from .._atomic import write_text_atomic
from ..bags import Bags

if TYPE_CHECKING:
    from .cache import CohortCache

__all__ = ["FeatureStore", "StoreError", "open_store", "create_store", "validate_slide_id"]

FORMAT_VERSION = 1
DEFAULT_CHUNK_ROWS = 4096
_STAGING = ".staging"
_TRASH = ".trash"
_SLIDES = "slides"
_LABEL_JOURNAL = "labels.pending.json"
_FEATURE_DTYPES = (np.float16, np.float32)
# zarr skips chunks equal to the fill value by default; writing every chunk lets a missing chunk file mean damage.
_ALL_CHUNKS = {"write_empty_chunks": True}


class StoreError(ValueError):
    """A store-level problem (missing/corrupt slide, bad metadata); the message names the slide."""


def validate_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is usable as a directory name, else raise ``ValueError``."""
    if not isinstance(slide_id, str) or not slide_id:
        raise ValueError(f"invalid slide id {slide_id!r}: must be a non-empty string")
    if slide_id.startswith(".") or "/" in slide_id or "\\" in slide_id or "\x00" in slide_id:
        raise ValueError(f"invalid slide id {slide_id!r}: must not start with '.' or contain path separators")
    return slide_id


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def _remove_if_empty(folder: Path) -> None:
    """Remove a staging/trash folder once no other write uses it."""
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def _merge_attrs(meta_path: Path, updates: Mapping[str, Any]) -> None:
    """Merge ``updates`` into the ``attributes`` of a zarr v3 ``zarr.json``, atomically."""
    meta = _read_json(meta_path)
    meta.setdefault("attributes", {}).update(to_jsonable(dict(updates)))
    _write_json_atomic(meta_path, meta)


def to_jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays (as found in h5 attrs) into JSON-serialisable values."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    return value


class FeatureStore:
    """A fastmil feature store on local disk. Use :func:`open_store` / :func:`create_store`.

    Reading never needs write access; ``mode="a"`` enables :meth:`write_slide` and label updates.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        root_meta = self.path / "zarr.json"
        if not root_meta.is_file():
            raise StoreError(f"{self.path}: not a fastmil store (no zarr.json); create one with create_store()")
        attrs = _read_json(root_meta).get("attributes", {})
        if attrs.get("fastmil_format") != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: not a fastmil store of format {FORMAT_VERSION} "
                f"(fastmil_format={attrs.get('fastmil_format')!r})"
            )
        self._slide_meta: dict[str, dict] = {}
        self._orphans: dict[str, Path] = {}
        self._journal: dict | None = None
        if mode == "a":
            self.recover()
        self._orphans = self._find_orphans()
        self._journal = self._read_label_journal()

    # ------------------------------------------------------------------ store level
    @property
    def attrs(self) -> dict:
        """The store's root attributes (a copy)."""
        return dict(_read_json(self.path / "zarr.json").get("attributes", {}))

    def update_attrs(self, **updates: Any) -> None:
        """Merge ``updates`` into the store's root attributes (atomic rewrite of its zarr.json)."""
        self._require_writable()
        _merge_attrs(self.path / "zarr.json", updates)

    @property
    def classes(self) -> list[str] | None:
        """Class names (index = class id), or None if the store carries no labels."""
        if self._journal is not None:
            return list(self._journal["classes"])
        return self.attrs.get("classes")

    @property
    def slide_ids(self) -> list[str]:
        """Sorted ids of the complete slides in the store."""
        slides = self.path / _SLIDES
        ids = set(self._orphans)
        if slides.is_dir():
            ids.update(p.name for p in slides.iterdir() if not p.name.startswith(".") and (p / "zarr.json").is_file())
        return sorted(ids)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: object) -> bool:
        return isinstance(slide_id, str) and (self._slide_dir(slide_id) / "zarr.json").is_file()

    # ------------------------------------------------------------------ crash recovery
    def _find_orphans(self) -> dict[str, Path]:
        """Old versions of slides left in ``.trash`` by a process killed mid-overwrite, whose ``slides/`` entry
        is missing: ``{slide_id: trash_dir}``. Readers serve them; :meth:`recover` moves them back."""
        trash = self.path / _TRASH
        if not trash.is_dir():
            return {}
        found = {}
        for entry in trash.iterdir():
            sid = entry.name.rsplit(".", 1)[0]
            if (entry / "zarr.json").is_file() and not (self.path / _SLIDES / sid / "zarr.json").is_file():
                found[sid] = entry
        return found

    def recover(self) -> None:
        """Finish or roll back what an interrupted process left (run by every ``mode="a"`` open): restore old
        slides whose overwrite was cut between its two renames, drop superseded old versions and partial
        stagings, and finish applying a committed label update."""
        self._require_writable()
        trash = self.path / _TRASH
        if trash.is_dir():
            for entry in sorted(trash.iterdir()):
                final = self.path / _SLIDES / entry.name.rsplit(".", 1)[0]
                if (entry / "zarr.json").is_file() and not (final / "zarr.json").is_file():
                    if final.exists():  # not a slide (no metadata): nothing a complete write leaves
                        shutil.rmtree(final)
                    os.rename(entry, final)  # the new version never arrived: the old one is the slide
                    _fsync_dir(final.parent)
                else:
                    shutil.rmtree(entry)  # superseded by a complete new version
            _remove_if_empty(trash)
        staging = self.path / _STAGING
        if staging.exists():
            shutil.rmtree(staging)  # never renamed into place: the old version (or no slide) stands
        self._journal = self._read_label_journal()
        if self._journal is not None:
            self._apply_label_journal()
        self._orphans = {}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, slides={len(self)}, mode={self.mode!r})"

    # ------------------------------------------------------------------ per-slide metadata
    def _slide_dir(self, slide_id: str) -> Path:
        orphan = self._orphans.get(slide_id)
        final = self.path / _SLIDES / slide_id
        if orphan is not None and not (final / "zarr.json").is_file() and (orphan / "zarr.json").is_file():
            return orphan
        return final

    def _meta(self, slide_id: str) -> dict:
        """Cached metadata of one slide: attrs, n (instances), dim, dtype, chunk_rows, has_coords."""
        cached = self._slide_meta.get(slide_id)
        if cached is not None:
            return cached
        sdir = self._slide_dir(slide_id)
        if not (sdir / "zarr.json").is_file():
            raise StoreError(f"slide {slide_id!r}: not in store {self.path}")
        try:
            attrs = _read_json(sdir / "zarr.json").get("attributes", {})
            fmeta = _read_json(sdir / "features" / "zarr.json")
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"slide {slide_id!r}: corrupt metadata in {sdir}: {exc}") from exc
        shape = fmeta["shape"]
        chunk_rows = fmeta["chunk_grid"]["configuration"]["chunk_shape"][0]
        meta = {
            "attrs": attrs,
            "n": int(shape[0]),
            "dim": int(shape[1]),
            "dtype": fmeta["data_type"],
            "chunk_rows": int(chunk_rows),
            "has_coords": (sdir / "coords" / "zarr.json").is_file(),
            "has_instance_labels": (sdir / "instance_labels" / "zarr.json").is_file(),
        }
        self._slide_meta[slide_id] = meta
        return meta

    def slide_attrs(self, slide_id: str) -> dict:
        """Attributes of one slide (patch_size_level0, magnification, encoder, label, source, ...)."""
        return dict(self._meta(slide_id)["attrs"])

    def n_instances(self, slide_id: str) -> int:
        return self._meta(slide_id)["n"]

    def feature_nbytes(self, slide_id: str) -> int:
        """Bytes of the slide's ``[N, D]`` features in their stored dtype (what reading them allocates)."""
        meta = self._meta(slide_id)
        return meta["n"] * meta["dim"] * np.dtype(meta["dtype"]).itemsize

    def sizes(self, slide_ids: Sequence[str] | None = None) -> np.ndarray:
        """``int64 [S]`` instance counts of ``slide_ids`` (default: all slides)."""
        ids = self.slide_ids if slide_ids is None else slide_ids
        return np.array([self.n_instances(s) for s in ids], dtype=np.int64)

    @property
    def dim(self) -> int:
        """Feature dimension D shared by every slide (error if the store mixes dims)."""
        dims = {self._meta(s)["dim"] for s in self.slide_ids}
        if not dims:
            raise StoreError(f"{self.path}: store is empty")
        if len(dims) > 1:
            raise StoreError(f"{self.path}: slides have different feature dims {sorted(dims)}")
        return dims.pop()

    def label(self, slide_id: str) -> int | None:
        if self._journal is not None and slide_id in self._journal["labels"]:
            return int(self._journal["labels"][slide_id])
        value = self._meta(slide_id)["attrs"].get("label")
        return None if value is None else int(value)

    def labels(self, slide_ids: Iterable[str] | None = None) -> dict[str, int | None]:
        ids = self.slide_ids if slide_ids is None else slide_ids
        return {s: self.label(s) for s in ids}

    # ------------------------------------------------------------------ reading
    def read(self, slide_id: str, dtype: np.dtype | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Read one slide: ``(features [N, D] float16/float32, coords [N, 2] int32 or None)``.

        Raises ``StoreError`` naming the slide when chunks are missing, truncated or unreadable.
        """
        meta = self._meta(slide_id)
        sdir = self._slide_dir(slide_id)
        feats = self._read_array(slide_id, sdir / "features")
        if feats.shape != (meta["n"], meta["dim"]):
            raise StoreError(
                f"slide {slide_id!r}: features have shape {feats.shape}, metadata says {(meta['n'], meta['dim'])}"
            )
        coords = self._read_array(slide_id, sdir / "coords") if meta["has_coords"] else None
        if dtype is not None:
            feats = feats.astype(dtype, copy=False)
        return feats, coords

    def _read_array(self, slide_id: str, array_dir: Path) -> np.ndarray:
        """Read a whole array chunked along axis 0.

        Uncompressed arrays (the default) are read chunk file by chunk file straight into one preallocated
        buffer (``readinto``: one copy from the page cache, no per-chunk temporaries); compressed ones through
        zarr. Both paths reject missing or short chunk files.
        """
        try:
            ameta = _read_json(array_dir / "zarr.json")
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"slide {slide_id!r}: corrupt array metadata in {array_dir}: {exc}") from exc
        shape = tuple(ameta["shape"])
        chunk_rows = int(ameta["chunk_grid"]["configuration"]["chunk_shape"][0])
        if _is_raw_layout(ameta):
            return _read_raw_chunks(slide_id, array_dir, shape, np.dtype(ameta["data_type"]), chunk_rows)
        self._check_chunks_present(slide_id, array_dir, shape[0], chunk_rows)
        try:
            return zarr.open_array(str(array_dir), mode="r")[:]
        except Exception as exc:  # zarr/numcodecs raise many types; re-raise with the slide named
            raise StoreError(f"slide {slide_id!r}: cannot read {array_dir.name} from {array_dir}: {exc}") from exc

    def has_coords(self, slide_id: str) -> bool:
        """Whether the slide carries patch coordinates (metadata only, no array read)."""
        return bool(self._meta(slide_id)["has_coords"])

    def read_coords(self, slide_id: str) -> np.ndarray | None:
        """Only the coordinates ``int32 [N, 2]`` of one slide (None if it has none)."""
        if not self._meta(slide_id)["has_coords"]:
            return None
        return self._read_array(slide_id, self._slide_dir(slide_id) / "coords")

    def read_instance_labels(self, slide_id: str) -> np.ndarray | None:
        """Per-instance ground truth ``uint8 [N]`` (synthetic slides: 1 = tumour), or None if unknown.
        Missing or truncated chunks are an error naming the slide, as for features."""
        if not self._meta(slide_id)["has_instance_labels"]:
            return None
        return self._read_array(slide_id, self._slide_dir(slide_id) / "instance_labels")

    def _check_chunks_present(self, slide_id: str, array_dir: Path, n_rows: int, chunk_rows: int) -> None:
        """zarr silently returns fill values for missing chunk files; a missing chunk here means damage."""
        expected = math.ceil(n_rows / chunk_rows) if n_rows else 0
        chunk_dir = array_dir / "c"
        found = sum(1 for p in chunk_dir.rglob("*") if p.is_file()) if chunk_dir.is_dir() else 0
        if found != expected:
            raise StoreError(
                f"slide {slide_id!r}: {array_dir.name} has {found} of {expected} chunk files in {chunk_dir} "
                "(store damaged or written by an interrupted copy); re-ingest this slide"
            )

    def load_bags(
        self,
        slide_ids: Sequence[str],
        *,
        dtype: torch.dtype | None = None,
        with_coords: bool = True,
        with_labels: bool = True,
        neighbour_radius: int | None = None,
        cache: CohortCache | None = None,
    ) -> Bags:
        """Read ``slide_ids`` and pack them into one :class:`Bags` (CPU tensors; on the GPU from a device cache).

        Labels are attached only when every slide in the batch has one. ``neighbour_radius``: also attach each
        slide's spatial stencil table of that radius (cached in the store, :mod:`fastmil.data.neighbours`); a
        slide without coordinates is then an error naming it. ``cache``: take slides from the cohort cache, which
        reads each slide from the store once (:mod:`fastmil.data.cache`).
        """
        from .neighbours import slide_neighbours

        feats, coords, labels, nbrs = [], [], [], []
        for sid in slide_ids:
            if cache is not None:
                t, c_t, nbr = cache.get(self, sid, neighbour_radius)
            else:
                f, c = self.read(sid)
                t, c_t = torch.from_numpy(f), None if c is None else torch.from_numpy(c)
                nbr = (None if neighbour_radius is None
                       else torch.from_numpy(slide_neighbours(self, sid, neighbour_radius, c)))
            feats.append(t if dtype is None else t.to(dtype))
            coords.append(c_t)
            labels.append(self.label(sid))
            if neighbour_radius is not None:
                nbrs.append(nbr)
        use_coords = with_coords and all(c is not None for c in coords)
        use_labels = with_labels and all(y is not None for y in labels)
        classes = self.classes
        return Bags.from_list(
            feats,
            coords=coords if use_coords else None,
            labels=labels if use_labels else None,
            ids=list(slide_ids),
            n_classes=len(classes) if (use_labels and classes) else None,
            neighbours=nbrs if neighbour_radius is not None else None,
        )

    # ------------------------------------------------------------------ writing
    def _require_writable(self) -> None:
        if self.mode != "a":
            raise StoreError(f"{self.path}: store opened read-only; open it with mode='a' to write")

    def write_slide(
        self,
        slide_id: str,
        features: Any,
        coords: Any | None = None,
        attrs: Mapping[str, Any] | None = None,
        instance_labels: Any | None = None,
        *,
        chunk_rows: int = DEFAULT_CHUNK_ROWS,
        dtype: np.dtype | str | None = None,
        compression: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write one slide atomically.

        Args:
            features: ``[N, D]`` float array-like supporting row slicing (numpy array, h5py dataset, tensor);
                streamed ``chunk_rows`` rows at a time, each block checked for NaN/Inf.
            coords: optional ``[N, 2]`` integer level-0 coordinates; duplicates are rejected.
            attrs: slide attributes (patch_size_level0, magnification, encoder, label, ...).
            instance_labels: optional ``[N]`` per-instance ground truth (stored as uint8).
            dtype: stored feature dtype (default: float16 stays float16, everything else becomes float32).
            compression: None (default, fastest reads) or "zstd".
            overwrite: replace an existing slide (otherwise an existing slide is an error).

        Raises:
            ValueError naming the slide on bad input; nothing is left in the store in that case.
        """
        self._require_writable()
        validate_slide_id(slide_id)
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        final_dir = self._slide_dir(slide_id)
        if (final_dir / "zarr.json").is_file() and not overwrite:
            raise StoreError(f"slide {slide_id!r}: already in store {self.path} (pass overwrite=True to replace)")
        shape = tuple(features.shape)
        if len(shape) != 2:
            raise ValueError(f"slide {slide_id!r}: features must be [N, D], got shape {shape}")
        n_rows, dim = shape
        if n_rows == 0:
            raise ValueError(f"slide {slide_id!r}: empty bag (0 instances)")
        if dim == 0:
            raise ValueError(f"slide {slide_id!r}: features have D = 0")
        out_dtype = _choose_dtype(slide_id, features, dtype)
        coords_np = None if coords is None else _check_coords(slide_id, coords, n_rows)
        inst_np = None
        if instance_labels is not None:
            inst_np = _as_numpy(instance_labels).reshape(-1)
            if inst_np.shape[0] != n_rows:
                raise ValueError(
                    f"slide {slide_id!r}: instance_labels length {inst_np.shape[0]} != {n_rows} instances"
                )
            inst_np = inst_np.astype(np.uint8)

        if compression not in (None, "zstd"):
            raise ValueError(f"unknown compression {compression!r} (None or 'zstd')")
        compressors = None if compression is None else zarr.codecs.ZstdCodec(level=3)

        staging = self.path / _STAGING / f"{slide_id}.{uuid.uuid4().hex}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            group = zarr.open_group(str(staging), mode="w", zarr_format=3)
            rows = min(chunk_rows, n_rows)
            farr = group.create_array(
                "features", shape=(n_rows, dim), chunks=(rows, dim), dtype=out_dtype, compressors=compressors,
                config=_ALL_CHUNKS,
            )
            for start in range(0, n_rows, rows):
                block = _as_numpy(features[start : start + rows]).astype(out_dtype, copy=False)
                if not np.isfinite(block).all():
                    bad = start + int(np.nonzero(~np.isfinite(block).all(axis=1))[0][0])
                    raise ValueError(f"slide {slide_id!r}: features contain NaN/Inf (instance {bad})")
                farr[start : start + block.shape[0]] = block
            if coords_np is not None:
                carr = group.create_array(
                    "coords", shape=coords_np.shape, chunks=(min(65536, n_rows), 2), dtype=np.int32, config=_ALL_CHUNKS
                )
                carr[:] = coords_np
            if inst_np is not None:
                iarr = group.create_array(
                    "instance_labels", shape=inst_np.shape, chunks=(min(65536, n_rows),), dtype=np.uint8,
                    config=_ALL_CHUNKS,
                )
                iarr[:] = inst_np
            group.attrs.update(to_jsonable(dict(attrs or {})))
            _fsync_tree(staging)
            self._commit(staging, final_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_if_empty(staging.parent)
            raise
        finally:
            self._slide_meta.pop(slide_id, None)
            self._orphans.pop(slide_id, None)

    def _commit(self, staging: Path, final_dir: Path) -> None:
        """Move a complete, fsynced staged slide into place. An old version is first moved to ``.trash``; if the
        second rename fails it is moved back, so the old or the new slide is always in place (a kill between
        the renames leaves the old one in ``.trash``: readers find it there, :meth:`recover` restores it)."""
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        if not final_dir.exists():
            os.rename(staging, final_dir)
            _fsync_dir(final_dir.parent)
            _remove_if_empty(staging.parent)
            return
        trash = self.path / _TRASH / f"{final_dir.name}.{uuid.uuid4().hex}"
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.rename(final_dir, trash)
        try:
            _fsync_dir(trash.parent)
            os.rename(staging, final_dir)
            _fsync_dir(final_dir.parent)
        except BaseException:
            if not final_dir.exists() and trash.exists():
                os.rename(trash, final_dir)
            raise
        shutil.rmtree(trash)
        _remove_if_empty(trash.parent)
        _remove_if_empty(staging.parent)

    def update_slide_attrs(self, slide_id: str, **updates: Any) -> None:
        """Merge ``updates`` into one slide's attributes (atomic rewrite of its zarr.json)."""
        self._require_writable()
        meta_path = self._slide_dir(slide_id) / "zarr.json"
        if not meta_path.is_file():
            raise StoreError(f"slide {slide_id!r}: not in store {self.path}")
        _merge_attrs(meta_path, updates)
        self._slide_meta.pop(slide_id, None)

    def set_labels(self, labels: Mapping[str, int], classes: Sequence[str]) -> None:
        """Record slide labels (class indices into ``classes``) and the class names, as one atomic step.

        Every slide id must be in the store and every label in ``[0, len(classes))``; checked before any write.
        The update is committed by one atomic write of ``labels.pending.json`` (readers see the old labels
        before it and the new ones after it), then applied to the store and slide attributes and the journal
        removed; an interruption while applying is finished by the next writable open.
        """
        self._require_writable()
        unknown = sorted(s for s in labels if s not in self)
        if unknown:
            shown = ", ".join(repr(s) for s in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise StoreError(f"labels name {len(unknown)} slide(s) not in store {self.path}: {shown}{more}")
        for sid, y in labels.items():
            if not 0 <= int(y) < len(classes):
                raise ValueError(f"slide {sid!r}: label {y} out of range [0, {len(classes)})")
        journal = {"classes": list(classes), "labels": {sid: int(y) for sid, y in labels.items()}}
        _write_json_atomic(self.path / _LABEL_JOURNAL, journal)  # the commit point
        self._journal = journal
        self._apply_label_journal()

    def _read_label_journal(self) -> dict | None:
        path = self.path / _LABEL_JOURNAL
        if not path.is_file():
            return None
        try:
            journal = _read_json(path)
        except (OSError, json.JSONDecodeError) as exc:  # written atomically, so this is damage, not a crash
            raise StoreError(f"{path}: unreadable label update journal: {exc}") from exc
        if not isinstance(journal.get("classes"), list) or not isinstance(journal.get("labels"), dict):
            raise StoreError(f"{path}: not a fastmil label journal")
        return journal

    def _apply_label_journal(self) -> None:
        """Write the committed label update into the attributes (idempotent), then drop the journal."""
        journal = self._journal
        _merge_attrs(self.path / "zarr.json", {"classes": journal["classes"]})
        for sid, y in journal["labels"].items():
            meta_path = self._slide_dir(sid) / "zarr.json"
            if meta_path.is_file():  # a slide deleted by hand since is simply skipped
                _merge_attrs(meta_path, {"label": int(y)})
            self._slide_meta.pop(sid, None)
        (self.path / _LABEL_JOURNAL).unlink()
        _fsync_dir(self.path)
        self._journal = None

    def summary(self) -> dict:
        """Counts for ``fastmil info``: slides, instances (total/min/median/max), dims, dtypes, labels."""
        ids = self.slide_ids
        sizes = self.sizes(ids)
        classes = self.classes
        label_counts: dict[str, int] = {}
        dims, dtypes = set(), set()
        with_coords = 0
        for sid in ids:
            meta = self._meta(sid)
            dims.add(meta["dim"])
            dtypes.add(meta["dtype"])
            with_coords += int(meta["has_coords"])
            y = self.label(sid)  # the committed labels, whether or not a label update is still being applied
            key = "unlabelled" if y is None else (classes[int(y)] if classes and int(y) < len(classes) else str(y))
            label_counts[key] = label_counts.get(key, 0) + 1
        return {
            "path": str(self.path),
            "slides": len(ids),
            "instances_total": int(sizes.sum()) if len(ids) else 0,
            "instances_min": int(sizes.min()) if len(ids) else 0,
            "instances_median": float(np.median(sizes)) if len(ids) else 0.0,
            "instances_max": int(sizes.max()) if len(ids) else 0,
            "dims": sorted(dims),
            "dtypes": sorted(dtypes),
            "slides_with_coords": with_coords,
            "classes": classes,
            "label_counts": label_counts,
        }


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file, then every folder (deepest first) under ``root``, so that a rename of ``root`` can
    never become durable before its content."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(folder))


def _is_raw_layout(ameta: Mapping[str, Any]) -> bool:
    """True for an uncompressed little-endian array with default '/' chunk keys, chunked along axis 0 only."""
    codecs = ameta.get("codecs", [])
    chunk_shape = ameta["chunk_grid"]["configuration"]["chunk_shape"]
    return (
        len(codecs) == 1
        and codecs[0].get("name") == "bytes"
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
        and ameta.get("chunk_key_encoding", {}).get("name") == "default"
        and ameta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
        and list(chunk_shape[1:]) == list(ameta["shape"][1:])
        and not ameta.get("storage_transformers")
    )


def _read_raw_chunks(slide_id: str, array_dir: Path, shape: tuple, dtype: np.dtype, chunk_rows: int) -> np.ndarray:
    out = np.empty(shape, dtype=dtype.newbyteorder("<"))
    tail = "/".join("0" for _ in shape[1:])
    n_rows = shape[0]
    for index, start in enumerate(range(0, n_rows, chunk_rows)):
        stop = min(n_rows, start + chunk_rows)
        path = array_dir / "c" / str(index) / tail if tail else array_dir / "c" / str(index)
        view = memoryview(out[start:stop]).cast("B")
        expected = chunk_rows * (out[start:stop].nbytes // (stop - start))  # edge chunks are stored full size
        try:
            with open(path, "rb") as fh:
                got = fh.readinto(view)
                rest = len(fh.read())
        except FileNotFoundError as exc:
            raise StoreError(
                f"slide {slide_id!r}: {array_dir.name} chunk {index} is missing ({path}); store damaged, re-ingest"
            ) from exc
        if got != view.nbytes or got + rest != expected:
            raise StoreError(
                f"slide {slide_id!r}: cannot read {array_dir.name} chunk {index} ({path}): "
                f"{got + rest} bytes, expected {expected} (truncated file)"
            )
    return out


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(x)


def _choose_dtype(slide_id: str, features: Any, dtype: np.dtype | str | None) -> np.dtype:
    if dtype is not None:
        out = np.dtype(dtype)
        if out.type not in _FEATURE_DTYPES:
            raise ValueError(f"slide {slide_id!r}: store dtype must be float16 or float32, got {out}")
        return out
    src = features.dtype
    if isinstance(src, torch.dtype):
        if not src.is_floating_point:
            raise ValueError(f"slide {slide_id!r}: features must be floating point, got {src}")
        return np.dtype(np.float16) if src == torch.float16 else np.dtype(np.float32)
    src = np.dtype(src)
    if src.kind != "f":
        raise ValueError(f"slide {slide_id!r}: features must be floating point, got {src}")
    return np.dtype(np.float16) if src == np.float16 else np.dtype(np.float32)


def _check_coords(slide_id: str, coords: Any, n_rows: int) -> np.ndarray:
    c = _as_numpy(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"slide {slide_id!r}: coords must be [N, 2], got shape {c.shape}")
    if c.shape[0] != n_rows:
        raise ValueError(
            f"slide {slide_id!r}: coords/features length mismatch ({c.shape[0]} coords, {n_rows} features)"
        )
    if c.dtype.kind == "f":
        if not np.isfinite(c).all() or not np.array_equal(c, np.round(c)):
            raise ValueError(f"slide {slide_id!r}: coords must be integer pixel positions")
    elif c.dtype.kind not in "iu":
        raise ValueError(f"slide {slide_id!r}: coords must be integers, got {c.dtype}")
    if c.size and (c.min() < np.iinfo(np.int32).min or c.max() > np.iinfo(np.int32).max):
        raise ValueError(f"slide {slide_id!r}: coords exceed the int32 range")
    c32 = c.astype(np.int32)
    uniq = np.unique(c32, axis=0)
    if uniq.shape[0] != n_rows:
        view = c32.view([("x", np.int32), ("y", np.int32)]).reshape(-1)
        _, first, counts = np.unique(view, return_index=True, return_counts=True)
        dup = int(first[np.argmax(counts > 1)])
        raise ValueError(
            f"slide {slide_id!r}: duplicate coordinates ({n_rows - uniq.shape[0]} repeated, e.g. "
            f"({c32[dup, 0]}, {c32[dup, 1]}))"
        )
    return c32


def create_store(path: str | os.PathLike, *, exist_ok: bool = True) -> FeatureStore:
    """Create (or, with ``exist_ok``, open for appending) a fastmil store at ``path``."""
    p = Path(path)
    if (p / "zarr.json").is_file():
        if not exist_ok:
            raise StoreError(f"{p}: store already exists")
        return FeatureStore(p, mode="a")
    if p.exists() and any(p.iterdir()):
        raise StoreError(f"{p}: exists and is not a fastmil store; refusing to write into it")
    group = zarr.open_group(str(p), mode="w", zarr_format=3)
    group.attrs.update({"fastmil_format": FORMAT_VERSION})
    (p / _SLIDES).mkdir(exist_ok=True)
    return FeatureStore(p, mode="a")


def open_store(path: str | os.PathLike, mode: str = "r") -> FeatureStore:
    """Open an existing store for reading (``mode="r"``) or appending (``mode="a"``)."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such store")
    return FeatureStore(p, mode=mode)
