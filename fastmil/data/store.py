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
import re
import shutil
import stat
import time
import uuid
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import google_crc32c
import numpy as np
import torch
import zarr

from .._atomic import write_text_atomic
from .._config import short_repr
from ..bags import Bags
from . import store_lock
from .labels import MAX_CLASSES

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
# a staged or trashed slide folder: "<slide id>.<uuid4 hex>" (write_slide/_commit name them so)
_ENTRY_NAME = re.compile(r"^(?P<slide_id>.+)\.(?P<tag>[0-9a-f]{32})$")
# a write-aside file of _atomic.atomic_target: ".<name>.<uuid4 hex>.tmp"
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{32}\.tmp$")
_WRITER_TEMP_NAMES = ("zarr.json", _LABEL_JOURNAL)  # written only under the write lock
MAX_SLIDE_ID_BYTES = 200  # a file name holds 255 bytes; staging adds ".<32 hex>"
_STALE_TEMP_SECONDS = 3600.0  # other write-aside files (readers' neighbour caches) older than this are litter
_CRC32C_RESIDUE = 0x48674BC7  # CRC32C of any message followed by its own CRC32C, little-endian


class StoreError(ValueError):
    """A store-level problem (missing/corrupt slide, bad metadata); the message names the slide."""


def validate_slide_id(slide_id: str) -> str:
    """Return ``slide_id`` if it is usable as a directory name, else raise ``ValueError``: a non-empty string
    without path separators, NUL or other control characters, not starting with '.' (so never '.' or '..'),
    at most ``MAX_SLIDE_ID_BYTES``. Every id that reaches a path goes through this (:meth:`FeatureStore._slide_dir`)."""
    if not isinstance(slide_id, str) or not slide_id:
        raise ValueError(f"invalid slide id {slide_id!r}: must be a non-empty string")
    if slide_id.startswith(".") or "/" in slide_id or "\\" in slide_id:
        raise ValueError(f"invalid slide id {slide_id!r}: must not start with '.' or contain path separators")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in slide_id):
        raise ValueError(f"invalid slide id {slide_id!r}: must not contain control characters")
    if len(slide_id.encode("utf-8", errors="surrogatepass")) > MAX_SLIDE_ID_BYTES:
        raise ValueError(f"invalid slide id {slide_id[:40]!r}...: longer than {MAX_SLIDE_ID_BYTES} bytes (a file "
                         "name's limit, less the staging suffix)")
    return slide_id


def _is_valid_slide_id(slide_id: object) -> bool:
    try:
        validate_slide_id(slide_id)  # type: ignore[arg-type]
    except ValueError:
        return False
    return True


def _entry_slide_id(entry: Path) -> str | None:
    """The slide id of a staging/trash entry ``<slide id>.<uuid4 hex>`` that is a real folder (not a link), or
    None for anything else (which recovery never removes or renames)."""
    match = _ENTRY_NAME.match(entry.name)
    if match is None or entry.is_symlink() or not entry.is_dir() or not _is_valid_slide_id(match["slide_id"]):
        return None
    return match["slide_id"]


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path``, all links resolved, lies inside ``root`` (links resolved too)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


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

    Reading never needs write access; ``mode="a"`` enables :meth:`write_slide` and label updates. A writable
    store holds the store's write lock (:mod:`fastmil.data.store_lock`: one writer process at a time, waiting up to
    ``lock_timeout`` seconds for another) until :meth:`close` (also on ``with`` exit and garbage collection).
    Chunks written with a checksum (the default) are verified on every read; ``verify_checksums=False`` skips
    that for uncompressed features (zarr always verifies compressed ones).
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r", *, lock_timeout: float = 0.0,
                 verify_checksums: bool = True) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode must be 'r' or 'a', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self.verify_checksums = verify_checksums
        self._locked = False
        root_meta = self.path / "zarr.json"
        if not root_meta.is_file():
            raise StoreError(f"{self.path}: not a fastmil store (no zarr.json); create one with create_store()")
        attrs = _read_json(root_meta).get("attributes", {})
        if attrs.get("fastmil_format") != FORMAT_VERSION:
            raise StoreError(
                f"{self.path}: not a fastmil store of format {FORMAT_VERSION} "
                f"(fastmil_format={attrs.get('fastmil_format')!r})"
            )
        _check_own_folders(self.path)
        self._slide_meta: dict[str, dict] = {}
        self._orphans: dict[str, Path] = {}
        self._journal: dict | None = None
        self._classes_seen: tuple[tuple[int, int, int], list[str] | None] | None = None  # (root stamp, classes)
        if mode == "a":
            try:
                self._lock_key = store_lock.acquire(self.path, lock_timeout)
            except store_lock.StoreBusyError as exc:
                raise StoreError(str(exc)) from None
            except OSError as exc:
                raise StoreError(f"{self.path}: cannot open the store for writing: {exc.strerror or exc} "
                                 f"({exc.filename or self.path})") from None
            self._locked = True
            self.recover()
        self._orphans = self._find_orphans()
        self._journal = self._read_label_journal()

    def close(self) -> None:
        """Release the write lock (a no-op for a read-only or closed store); the store then reads only."""
        if self._locked:
            self._locked = False
            self.mode = "r"
            store_lock.release(self._lock_key)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_locked", False):
            self.close()

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
        root = self.path / "zarr.json"
        info = root.stat()  # a label check per slide must not parse the root metadata per slide
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)  # atomic rewrites make a new inode
        if self._classes_seen is None or self._classes_seen[0] != stamp:
            classes = _read_json(root).get("attributes", {}).get("classes")
            if classes is not None and (not isinstance(classes, list) or not classes
                                        or not all(isinstance(c, str) for c in classes)):
                raise StoreError(f"{self.path}: store attribute 'classes' must be a non-empty list of class names, "
                                 f"got {short_repr(classes)}")
            self._classes_seen = (stamp, classes)
        classes = self._classes_seen[1]
        return None if classes is None else list(classes)

    @property
    def slide_ids(self) -> list[str]:
        """Sorted ids of the complete slides in the store."""
        slides = self.path / _SLIDES
        ids = set(self._orphans)
        if slides.is_dir():
            ids.update(p.name for p in slides.iterdir()
                       if _is_valid_slide_id(p.name) and not p.is_symlink() and (p / "zarr.json").is_file())
        return sorted(ids)

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __contains__(self, slide_id: object) -> bool:
        """Whether ``slide_id`` names a complete slide of this store; an invalid id (a path, '..') never does."""
        if not _is_valid_slide_id(slide_id):
            return False
        try:
            return (self._slide_dir(slide_id) / "zarr.json").is_file()  # type: ignore[arg-type]
        except StoreError:  # a folder that escapes the store is no slide of it
            return False

    # ------------------------------------------------------------------ crash recovery
    def _find_orphans(self) -> dict[str, Path]:
        """Old versions of slides left in ``.trash`` by a process killed mid-overwrite, whose ``slides/`` entry
        is missing: ``{slide_id: trash_dir}``. Readers serve them; :meth:`recover` moves them back."""
        trash = self.path / _TRASH
        if not trash.is_dir():
            return {}
        found = {}
        for entry in trash.iterdir():
            sid = _entry_slide_id(entry)
            if sid is None or not (entry / "zarr.json").is_file():
                continue
            final = self.path / _SLIDES / sid
            if not final.is_symlink() and not (final / "zarr.json").is_file():
                found[sid] = entry
        return found

    def recover(self) -> None:
        """Finish or roll back what an interrupted process left (run by every ``mode="a"`` open): restore old
        slides whose overwrite was cut between its two renames, drop superseded old versions and partial
        stagings, and finish applying a committed label update."""
        self._require_writable()
        trash = self.path / _TRASH
        if trash.is_dir() and not trash.is_symlink():
            for entry in sorted(trash.iterdir()):
                sid = _entry_slide_id(entry)
                final = None if sid is None else self.path / _SLIDES / sid
                if final is None or final.is_symlink():
                    _leave_alone(entry, "not a slide folder this store wrote")
                elif (entry / "zarr.json").is_file() and not (final / "zarr.json").is_file():
                    if final.exists():  # a real folder without metadata: nothing a complete write leaves
                        shutil.rmtree(final)
                    os.rename(entry, final)  # the new version never arrived: the old one is the slide
                    _fsync_dir(final.parent)
                else:
                    shutil.rmtree(entry)  # superseded by a complete new version
            _remove_if_empty(trash)
        staging = self.path / _STAGING
        if staging.is_dir() and not staging.is_symlink():
            for entry in sorted(staging.iterdir()):  # we hold the write lock: no live writer stages anything
                if _entry_slide_id(entry) is None:
                    _leave_alone(entry, "not a slide folder this store staged")
                else:
                    shutil.rmtree(entry)  # never renamed into place: the old version (or no slide) stands
            _remove_if_empty(staging)
        self._remove_stale_temp_files()
        self._journal = self._read_label_journal()
        if self._journal is not None:
            self._apply_label_journal()
        self._orphans = {}

    def _remove_stale_temp_files(self) -> None:
        """Write-aside files a killed process left (``.<name>.<hex>.tmp``, :mod:`fastmil._atomic`) in the store's
        root and slide folders: those of files only a lock holder writes at once, others once they are an hour
        old (a reader may be writing its neighbour cache right now)."""
        folders = [self.path]
        slides = self.path / _SLIDES
        if slides.is_dir():
            folders += [p for p in slides.iterdir() if _is_valid_slide_id(p.name) and not p.is_symlink()]
        now = time.time()
        for folder in folders:
            try:
                names = os.listdir(folder)
            except (NotADirectoryError, FileNotFoundError):
                continue
            for name in names:
                match = _TEMP_NAME.match(name)
                if match is None:
                    continue
                path = folder / name
                info = path.lstat()
                if not stat.S_ISREG(info.st_mode):
                    continue
                if match["name"] in _WRITER_TEMP_NAMES or now - info.st_mtime > _STALE_TEMP_SECONDS:
                    path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, slides={len(self)}, mode={self.mode!r})"

    # ------------------------------------------------------------------ per-slide metadata
    def _slide_dir(self, slide_id: str) -> Path:
        """The folder of ``slide_id``: the one place ids become paths. Raises StoreError for an invalid id (it
        names no slide of this store) and for a folder that leads out of the store (a symbolic link)."""
        if not _is_valid_slide_id(slide_id):
            raise StoreError(f"slide {slide_id!r}: not in store {self.path} (not a valid slide id)")
        orphan = self._orphans.get(slide_id)
        final = self.path / _SLIDES / slide_id
        if orphan is not None and not (final / "zarr.json").is_file() and (orphan / "zarr.json").is_file():
            final = orphan
        if final.is_symlink() or (final.exists() and not _inside(final, self.path)):
            raise StoreError(f"slide {slide_id!r}: its folder {final} is a link out of store {self.path}; refusing "
                             "to read or write through it")
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
        shape, chunk_rows = _checked_layout(slide_id, sdir / "features", fmeta, 2)
        if fmeta.get("data_type") not in ("float16", "float32"):
            raise StoreError(f"slide {slide_id!r}: features of data type {short_repr(fmeta.get('data_type'))}; a "
                             "store holds float16 or float32")
        meta = {
            "attrs": attrs,
            "n": shape[0],
            "dim": shape[1],
            "dtype": fmeta["data_type"],
            "chunk_rows": chunk_rows,
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
        """The slide's class index, or None; StoreError naming the slide unless it is an integer in
        ``[0, len(classes))`` (``[0, MAX_CLASSES)`` without class names): 1.7 is no class, nor is [1] or 1e12."""
        if self._journal is not None and slide_id in self._journal["labels"]:
            value = self._journal["labels"][slide_id]
        else:
            value = self._meta(slide_id)["attrs"].get("label")
        if value is None:
            return None
        classes = self.classes
        limit = len(classes) if classes else MAX_CLASSES
        if isinstance(value, float) and value.is_integer():  # 1.0 (a JSON writer's float) is class 1
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
            raise StoreError(f"slide {slide_id!r}: label {short_repr(value)} is not a class index in [0, {limit})"
                             f"{' (classes ' + short_repr(classes) + ')' if classes else ''}")
        return value

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
        if array_dir.is_symlink() or (array_dir / "c").is_symlink():
            raise StoreError(f"slide {slide_id!r}: {array_dir.name} is a link; a slide's arrays must be its own "
                             "folders (store tampered with, re-ingest)")
        try:
            ameta = _read_json(array_dir / "zarr.json")
        except (OSError, json.JSONDecodeError) as exc:
            raise StoreError(f"slide {slide_id!r}: corrupt array metadata in {array_dir}: {exc}") from exc
        shape, chunk_rows = _checked_layout(slide_id, array_dir, ameta, None)
        self._check_chunks_present(slide_id, array_dir, shape[0], chunk_rows, len(shape))  # before allocating
        if _is_raw_layout(ameta):
            return _read_raw_chunks(slide_id, array_dir, shape, np.dtype(ameta["data_type"]), chunk_rows,
                                    _has_checksum(ameta), self.verify_checksums)
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

    def _check_chunks_present(self, slide_id: str, array_dir: Path, n_rows: int, chunk_rows: int,
                              n_dims: int = 2) -> None:
        """zarr silently returns fill values for missing chunk files; a missing chunk here means damage."""
        expected = math.ceil(n_rows / chunk_rows) if n_rows else 0
        chunk_dir = array_dir / "c"
        found = sum(1 for p in chunk_dir.rglob("*") if p.is_file()) if chunk_dir.is_dir() else 0
        odd = [p for p in chunk_dir.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())] \
            if chunk_dir.is_dir() else []
        if odd:
            raise StoreError(f"slide {slide_id!r}: {array_dir.name} chunk {odd[0]} is not a regular file (a link, "
                             "FIFO or device); store damaged or tampered with, re-ingest this slide")
        if found != expected:
            missing = ""
            if found < expected:  # the first absent chunk is among the first found + 1 (checked in order)
                tail = [] if n_dims == 1 else ["0"] * (n_dims - 1)
                for index in range(found + 1):
                    path = chunk_dir.joinpath(str(index), *tail)
                    if not path.is_file():
                        missing = f"; chunk {index} is missing ({path})"
                        break
            raise StoreError(
                f"slide {slide_id!r}: {array_dir.name} has {found} of {expected} chunk files in {chunk_dir}{missing} "
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
        checksum: bool = True,
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
            checksum: end every chunk with its CRC32C (zarr v3's ``crc32c`` codec; default), so that a flipped
                bit is an error on read, not a silently different feature.
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
        # every chunk ends in its CRC32C (zarr's crc32c codec), checked on every read (verify_checksums)
        crc = [zarr.codecs.Crc32cCodec()] if checksum else []
        compressors = crc if compression is None else [zarr.codecs.ZstdCodec(level=3), *crc]
        small = [zarr.codecs.ZstdCodec(level=0), *crc]  # coordinates and instance labels

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
                try:
                    block = _as_numpy(features[start : start + rows]).astype(out_dtype, copy=False)
                except OSError as exc:  # the source (an h5 dataset read lazily), not the store
                    raise ValueError(f"slide {slide_id!r}: cannot read feature rows {start}..{start + rows} from "
                                     f"its source (truncated or corrupt file?): {exc}") from exc
                if not np.isfinite(block).all():
                    bad = start + int(np.nonzero(~np.isfinite(block).all(axis=1))[0][0])
                    raise ValueError(f"slide {slide_id!r}: features contain NaN/Inf (instance {bad})")
                farr[start : start + block.shape[0]] = block
            if coords_np is not None:
                carr = group.create_array(
                    "coords", shape=coords_np.shape, chunks=(min(65536, n_rows), 2), dtype=np.int32,
                    compressors=small, config=_ALL_CHUNKS,
                )
                carr[:] = coords_np
            if inst_np is not None:
                iarr = group.create_array(
                    "instance_labels", shape=inst_np.shape, chunks=(min(65536, n_rows),), dtype=np.uint8,
                    compressors=small, config=_ALL_CHUNKS,
                )
                iarr[:] = inst_np
            group.attrs.update(to_jsonable(dict(attrs or {})))
            _fsync_tree(staging)
            self._commit(staging, final_dir)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_if_empty(staging.parent)
            if isinstance(exc, OSError):  # the store's disk: full, read-only, gone
                raise StoreError(f"slide {slide_id!r}: cannot write to store {self.path}: "
                                 f"{exc.strerror or exc} ({exc.filename or staging}); nothing of it was kept") from exc
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
        try:  # the new slide is in place: the old one's removal is cleanup, which the next writable open finishes
            shutil.rmtree(trash)
            _remove_if_empty(trash.parent)
            _remove_if_empty(staging.parent)
        except OSError as exc:
            warnings.warn(f"{trash}: the replaced slide could not be removed ({exc.strerror}); the next writable "
                          "open removes it", RuntimeWarning, stacklevel=3)

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
            whole = isinstance(y, (int, np.integer)) and not isinstance(y, bool) or \
                isinstance(y, (float, np.floating)) and float(y).is_integer()
            if not whole or not 0 <= int(y) < len(classes):
                raise ValueError(f"slide {sid!r}: label {short_repr(y)} is not a class index in [0, {len(classes)})")
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
        classes, labels = journal.get("classes"), journal.get("labels")
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes) or \
                not isinstance(labels, dict):
            raise StoreError(f"{path}: not a fastmil label journal (classes: a list of names, labels: a mapping)")
        return journal

    def _apply_label_journal(self) -> None:
        """Write the committed label update into the attributes (idempotent), then drop the journal."""
        journal = self._journal
        _merge_attrs(self.path / "zarr.json", {"classes": journal["classes"]})
        for sid, y in journal["labels"].items():
            if sid not in self:  # a slide deleted by hand since, or an id that names no slide: skipped
                continue
            _merge_attrs(self._slide_dir(sid) / "zarr.json", {"label": int(y)})
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


def _checked_layout(slide_id: str, array_dir: Path, ameta: Mapping[str, Any], ndim: int | None
                    ) -> tuple[tuple[int, ...], int]:
    """``(shape, chunk_rows)`` of an array's zarr.json, or StoreError naming the slide: positive integer extents
    (1 to 2^31 rows; at most 2^20 columns) and a chunk of 1 to 2^31 rows covering whole rows. Metadata is
    checked before it sizes an allocation: ``[1e12, D]`` must not ask for 58 TiB, ``chunk_shape [-1, D]`` must
    not return uninitialised memory."""
    where = f"slide {slide_id!r}: {array_dir.name} metadata ({array_dir / 'zarr.json'})"
    try:
        shape = ameta["shape"]
        chunks = ameta["chunk_grid"]["configuration"]["chunk_shape"]
    except (KeyError, TypeError) as exc:
        raise StoreError(f"{where}: missing {exc}; store damaged, re-ingest") from None

    def whole(v: Any, lo: int, hi: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi

    if not isinstance(shape, list) or not shape or (ndim is not None and len(shape) != ndim) or not (
            whole(shape[0], 1, 1 << 31) and all(whole(v, 1, 1 << 20) for v in shape[1:])):
        raise StoreError(f"{where}: shape {short_repr(shape)} is not one of positive integer extents")
    if not isinstance(chunks, list) or len(chunks) != len(shape) or not whole(chunks[0], 1, 1 << 31) or \
            list(chunks[1:]) != list(shape[1:]):
        raise StoreError(f"{where}: chunk shape {short_repr(chunks)} does not cut whole rows of shape {shape}")
    return tuple(shape), chunks[0]


def _check_own_folders(root: Path) -> None:
    """``slides/``, ``.staging/`` and ``.trash/`` must be real folders of the store (or absent): a link there
    would make recovery remove, and writes create, folders outside it."""
    for name in (_SLIDES, _STAGING, _TRASH):
        folder = root / name
        if folder.is_symlink() or (folder.exists() and (not folder.is_dir() or not _inside(folder, root))):
            raise StoreError(f"{root}: {name} is not a folder of the store itself (a link?); refusing to read or "
                             "write through it")


def _leave_alone(entry: Path, why: str) -> None:
    warnings.warn(f"{entry}: {why}; recovery leaves it alone (remove it by hand if it is litter)", RuntimeWarning,
                  stacklevel=3)


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


def _has_checksum(ameta: Mapping[str, Any]) -> bool:
    """Whether the array's chunks end in a CRC32C (its last codec is ``crc32c``)."""
    codecs = ameta.get("codecs", [])
    return bool(codecs) and codecs[-1].get("name") == "crc32c"


def _is_raw_layout(ameta: Mapping[str, Any]) -> bool:
    """True for an uncompressed little-endian array (optionally checksummed: ``bytes`` then ``crc32c``) with
    default '/' chunk keys, chunked along axis 0 only."""
    codecs = ameta.get("codecs", [])
    chunk_shape = ameta["chunk_grid"]["configuration"]["chunk_shape"]
    return (
        len(codecs) == 1 + int(_has_checksum(ameta))
        and codecs[0].get("name") == "bytes"
        and codecs[0].get("configuration", {}).get("endian", "little") == "little"
        and ameta.get("chunk_key_encoding", {}).get("name") == "default"
        and ameta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") == "/"
        and list(chunk_shape[1:]) == list(ameta["shape"][1:])
        and not ameta.get("storage_transformers")
    )


def _read_raw_chunks(slide_id: str, array_dir: Path, shape: tuple, dtype: np.dtype, chunk_rows: int,
                     has_checksum: bool = False, verify: bool = True) -> np.ndarray:
    """Read an uncompressed array chunk file by chunk file into one buffer (``readinto``: one copy from the page
    cache). ``has_checksum``: each file ends in the CRC32C of its data (4 bytes, little-endian), checked here when
    ``verify`` (google-crc32c's C code, ~10 GB/s, over the rows in place)."""
    checksum = has_checksum and verify
    out = np.empty(shape, dtype=dtype.newbyteorder("<"))
    tail = "/".join("0" for _ in shape[1:])
    n_rows = shape[0]
    for index, start in enumerate(range(0, n_rows, chunk_rows)):
        stop = min(n_rows, start + chunk_rows)
        path = array_dir / "c" / str(index) / tail if tail else array_dir / "c" / str(index)
        view = memoryview(out[start:stop]).cast("B")
        data_bytes = chunk_rows * (out[start:stop].nbytes // (stop - start))  # edge chunks are stored full size
        expected = data_bytes + (4 if has_checksum else 0)
        try:
            # no link followed, no FIFO waited on: a chunk must be a regular file of this store
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise StoreError(
                f"slide {slide_id!r}: {array_dir.name} chunk {index} is missing ({path}); store damaged, re-ingest"
            ) from exc
        except OSError as exc:  # ELOOP: a symbolic link
            raise StoreError(f"slide {slide_id!r}: cannot open {array_dir.name} chunk {index} ({path}): "
                             f"{exc.strerror} (a link? chunks must be regular files); re-ingest") from exc
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StoreError(f"slide {slide_id!r}: {array_dir.name} chunk {index} ({path}) is not a regular "
                                 "file (a FIFO or device); store damaged or tampered with, re-ingest")
            got = fh.readinto(view)
            rest_bytes = fh.read(expected + 1)  # bounded: a huge file is not read whole to learn it is too long
            rest = len(rest_bytes)
        if got != view.nbytes or got + rest != expected:
            raise StoreError(
                f"slide {slide_id!r}: cannot read {array_dir.name} chunk {index} ({path}): "
                f"{got + rest} bytes, expected {expected} (truncated file)"
            )
        if checksum:
            # google-crc32c takes read-only buffers: a read-only view of the rows just read (no copy), then the
            # rest of the file (an edge chunk's padding, the stored CRC): data + its own CRC gives a constant
            rows = out[start:stop].view(np.uint8)
            rows.flags.writeable = False
            if google_crc32c.extend(google_crc32c.value(rows), rest_bytes) != _CRC32C_RESIDUE:
                raise StoreError(f"slide {slide_id!r}: {array_dir.name} chunk {index} ({path}) fails its CRC32C "
                                 "checksum (a flipped bit on disk or in a copy); re-ingest this slide")
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


def create_store(path: str | os.PathLike, *, exist_ok: bool = True, lock_timeout: float = 0.0) -> FeatureStore:
    """Create (or, with ``exist_ok``, open for appending) a fastmil store at ``path``; the returned store holds
    the write lock (``lock_timeout``: seconds to wait for another writer). Creation itself runs under the lock,
    so two processes creating one store at once get one store."""
    p = Path(path)
    if (p / "zarr.json").is_file():
        if not exist_ok:
            raise StoreError(f"{p}: store already exists")
        return FeatureStore(p, mode="a", lock_timeout=lock_timeout)
    if p.exists() and any(entry.name != store_lock.LOCK_NAME for entry in p.iterdir()):
        raise StoreError(f"{p}: exists and is not a fastmil store; refusing to write into it")
    p.mkdir(parents=True, exist_ok=True)
    try:
        key = store_lock.acquire(p, lock_timeout)
    except store_lock.StoreBusyError as exc:
        raise StoreError(str(exc)) from None
    try:
        if not (p / "zarr.json").is_file():  # another creator may have finished while we waited
            group = zarr.open_group(str(p), mode="a", zarr_format=3)  # "a": never clears the folder (the .lock)
            group.attrs.update({"fastmil_format": FORMAT_VERSION})
            (p / _SLIDES).mkdir(exist_ok=True)
        return FeatureStore(p, mode="a", lock_timeout=lock_timeout)  # a second hold of our lock
    finally:
        store_lock.release(key)


def open_store(path: str | os.PathLike, mode: str = "r", *, lock_timeout: float = 0.0,
               verify_checksums: bool = True) -> FeatureStore:
    """Open an existing store for reading (``mode="r"``) or appending (``mode="a"``: takes the write lock,
    waiting up to ``lock_timeout`` seconds for another writer); see :class:`FeatureStore`."""
    p = Path(path)
    if not p.exists():
        raise StoreError(f"{p}: no such store")
    return FeatureStore(p, mode=mode, lock_timeout=lock_timeout, verify_checksums=verify_checksums)
