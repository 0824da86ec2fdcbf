"""Crafted stores and hostile ids (issue 29): a store's own folders are the only thing it reads, writes, renames or
removes; one writer at a time; what a killed writer leaves is cleaned up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from fastmil.data import StoreError, create_store, open_store
from fastmil.data.neighbours import slide_neighbours
from tests.files import grid_coords

REPO = Path(__file__).resolve().parents[2]


def _store(path: Path, n_slides: int = 4, n: int = 40):
    store = create_store(path)
    rng = np.random.default_rng(0)
    for i in range(n_slides):
        store.write_slide(f"s{i}", rng.standard_normal((n, 8)).astype(np.float32), grid_coords(n),
                          {"patch_size_level0": 256, "label": i % 2})
    store.close()
    return path


def _victim(tmp_path: Path) -> Path:
    """A folder outside the store that looks like a slide (what an attacker points links at)."""
    victim = tmp_path / "victim"
    _store(victim, n_slides=1)
    return victim / "slides" / "s0"


def _tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- item 1: trash ids
@pytest.mark.parametrize("name", [".." + uuid.uuid4().hex, "." + uuid.uuid4().hex, uuid.uuid4().hex,
                                  "s0." + "z" * 32, "a/b"])
def test_a_crafted_trash_entry_deletes_nothing(tmp_path, name):
    """``.trash/..<hex>`` used to parse to slide id '.', and recovery removed ``slides/.`` = every slide."""
    root = _store(tmp_path / "s")
    before = _tree(root / "slides")
    entry = root / ".trash" / name.split("/")[0]
    entry.mkdir(parents=True)
    (entry / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    with pytest.warns(RuntimeWarning, match="leaves it alone"):
        store = open_store(root, mode="a")
    assert store.slide_ids == ["s0", "s1", "s2", "s3"] and _tree(root / "slides") == before
    assert entry.is_dir()  # not ours: left where it is


def test_a_trash_or_staging_link_is_left_alone_and_its_target_untouched(tmp_path):
    root = _store(tmp_path / "s")
    target = _victim(tmp_path)
    before = _tree(target)
    (root / ".trash").mkdir()
    (root / ".trash" / f"s9.{uuid.uuid4().hex}").symlink_to(target)
    (root / ".staging").mkdir()
    (root / ".staging" / f"s8.{uuid.uuid4().hex}").symlink_to(target)
    with pytest.warns(RuntimeWarning, match="leaves it alone"):
        store = open_store(root, mode="a")
    assert _tree(target) == before and "s9" not in store and "s8" not in store


def test_a_real_orphan_is_still_restored(tmp_path):
    """The recovery the validation must keep: a slide killed between its two renames comes back."""
    root = _store(tmp_path / "s")
    os.rename(root / "slides" / "s1", _mkdir(root / ".trash") / f"s1.{uuid.uuid4().hex}")
    assert "s1" in open_store(root)  # readers serve it from the trash
    store = open_store(root, mode="a")
    assert (root / "slides" / "s1" / "zarr.json").is_file() and store.read("s1")[0].shape == (40, 8)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------- item 2: one writer at a time
HOLD = textwrap.dedent("""
    import sys, time
    from fastmil.data import open_store
    store = open_store(sys.argv[1], mode="a")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _holder(root: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()


def test_a_second_writer_is_refused_with_the_holders_pid_and_a_live_staging_survives(tmp_path):
    root = _store(tmp_path / "s")
    proc = _holder(root, 30)
    live = _mkdir(root / ".staging" / f"s7.{uuid.uuid4().hex}")  # what the holder, mid-slide, has staged
    try:
        with pytest.raises(StoreError, match=rf"being written by pid {proc.pid}"):
            open_store(root, mode="a")
        assert live.is_dir()  # the refused open recovered nothing
        assert open_store(root).slide_ids == ["s0", "s1", "s2", "s3"]  # readers take no lock
    finally:
        _stop(proc)
    store = open_store(root, mode="a")  # the kernel dropped the dead holder's lock
    assert not live.exists()
    store.close()


def test_a_writer_waits_for_the_lock_with_a_timeout(tmp_path):
    root = _store(tmp_path / "s")
    proc = _holder(root, 1.5)
    try:
        start = time.monotonic()
        store = open_store(root, mode="a", lock_timeout=60)
        assert time.monotonic() - start > 0.5 and store.mode == "a"
    finally:
        _stop(proc)


def test_one_process_may_open_its_store_twice_and_close_releases(tmp_path):
    root = _store(tmp_path / "s")
    first = open_store(root, mode="a")
    second = open_store(root, mode="a")
    first.close()
    second.write_slide("s5", np.ones((3, 8), np.float32))  # still held by the second
    second.close()
    with pytest.raises(StoreError, match="read-only"):
        second.write_slide("s6", np.ones((3, 8), np.float32))
    _stop(_holder(root, 0))  # released: another process takes it at once


INGEST = textwrap.dedent("""
    import sys
    import numpy as np
    from fastmil.data import StoreError, create_store
    tag = sys.argv[2]
    try:
        store = create_store(sys.argv[1], lock_timeout=float(sys.argv[3]))
    except StoreError as exc:
        print("refused", exc, flush=True)
        sys.exit(3)
    for i in range(6):
        store.write_slide(f"{tag}{i}", np.full((50, 4), i, np.float32))
        print("written", f"{tag}{i}", flush=True)
""")


@pytest.mark.parametrize("timeout", [0.0, 60.0])
def test_two_concurrent_writers_lose_no_slide(tmp_path, timeout):
    """Every slide a writer reports written is in the store whole; a refused writer says so and writes nothing."""
    root = tmp_path / "s"
    create_store(root).close()
    procs = [subprocess.Popen([sys.executable, "-c", INGEST, str(root), tag, str(timeout)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for tag in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    written = [line.split()[1] for out, _ in outs for line in out.splitlines() if line.startswith("written")]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode in (0, 3), err
        assert proc.returncode == 0 or out.startswith("refused") and "being written by pid" in out
    store = open_store(root)
    assert sorted(store.slide_ids) == sorted(written) and written
    for sid in written:
        assert np.array_equal(store.read(sid)[0], np.full((50, 4), int(sid[1:]), np.float32))
    if timeout:
        assert len(written) == 12  # the second writer waited its turn


# ------------------------------------------------------------------------------------- item 3: ids are not paths
TRAVERSALS = ["../../victim/slides/s0", "../victim", "..", ".", "s0/../s1", "/etc", "s0\x00", ".trash"]


@pytest.mark.parametrize("sid", TRAVERSALS)
def test_a_path_as_slide_id_names_no_slide(tmp_path, sid):
    root = _store(tmp_path / "s")
    target = _victim(tmp_path)
    before = _tree(target)
    store = open_store(root, mode="a")
    assert sid not in store
    for call in (lambda: store.read(sid), lambda: store.slide_attrs(sid),
                 lambda: store.update_slide_attrs(sid, label=1),
                 lambda: store.set_labels({sid: 1}, ["a", "b"])):
        with pytest.raises(StoreError, match="not in store"):
            call()
    assert _tree(target) == before


def test_a_journal_naming_a_path_is_applied_to_slides_only(tmp_path):
    root = _store(tmp_path / "s")
    target = _victim(tmp_path)
    before = _tree(target)
    journal = {"classes": ["a", "b"], "labels": {"s0": 1, "../../victim/slides/s0": 0}}
    (root / "labels.pending.json").write_text(json.dumps(journal))
    store = open_store(root, mode="a")
    assert _tree(target) == before and store.label("s0") == 1


# ------------------------------------------------------------------------------ item 4: links out of the store
def test_a_symlinked_slide_folder_is_no_slide_and_nothing_is_written_through_it(tmp_path):
    root = _store(tmp_path / "s")
    target = _victim(tmp_path)
    before = _tree(target)
    (root / "slides" / "evil").symlink_to(target, target_is_directory=True)
    for mode in ("r", "a"):
        store = open_store(root, mode=mode)
        assert "evil" not in store.slide_ids and "evil" not in store
        with pytest.raises(StoreError, match="link out of store"):
            store.read("evil")
        with pytest.raises(StoreError, match="link out of store"):
            slide_neighbours(store, "evil", 1)
        if mode == "a":
            with pytest.raises(StoreError):
                store.update_slide_attrs("evil", label=0)
            with pytest.raises(StoreError, match="not in store"):
                store.set_labels({"evil": 0}, ["a", "b"])
        store.close()
    assert _tree(target) == before


@pytest.mark.parametrize("kind", ["link", "fifo"])
@pytest.mark.parametrize("compression", [None, "zstd"])
def test_a_chunk_that_is_a_link_or_fifo_is_an_error_not_a_read_of_the_host(tmp_path, kind, compression):
    root = tmp_path / "s"
    store = create_store(root)
    store.write_slide("x", np.ones((10, 4), np.float32), compression=compression)
    store.close()
    chunk = root / "slides" / "x" / "features" / "c" / "0" / "0"
    chunk.unlink()
    if kind == "link":
        chunk.symlink_to("/dev/zero")
    else:
        os.mkfifo(chunk)
    with pytest.raises(StoreError, match=r"slide 'x'.*(link|FIFO|regular file)"):
        open_store(root).read("x")  # returns (no hang on the FIFO, no endless read of /dev/zero)


# ------------------------------------------------------------------------------------ item 15: stale temp files
def test_a_writable_open_removes_what_killed_writers_left_and_spares_a_live_reader(tmp_path):
    root = _store(tmp_path / "s")
    hexes = [uuid.uuid4().hex for _ in range(4)]
    stale = [root / f".zarr.json.{hexes[0]}.tmp", root / "slides" / "s1" / f".zarr.json.{hexes[1]}.tmp",
             root / f".labels.pending.json.{hexes[2]}.tmp"]
    for path in stale:
        path.write_text("{")
    young = root / "slides" / "s1" / f".neighbours_r2.npz.{hexes[3]}.tmp"  # a reader writing its cache now
    young.write_bytes(b"x")
    old = root / "slides" / "s2" / f".neighbours_r1.npz.{uuid.uuid4().hex}.tmp"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    open_store(root, mode="a").close()
    assert not any(p.exists() for p in [*stale, old]) and young.exists()


# ------------------------------------------------------------------------- item 5: h5 files that read the host
def _h5_with(path: Path, how: str, secret: Path) -> Path:
    import h5py

    n, d = 8, 4
    with h5py.File(path, "w") as fh:
        if how == "external storage":
            fh.create_dataset("features", shape=(n, d), dtype=np.float32,
                              external=[(str(secret), 0, h5py.h5f.UNLIMITED)])
        elif how == "external link":
            with h5py.File(secret.with_suffix(".h5"), "w") as other:
                other["features"] = np.ones((n, d), np.float32)
            fh["features"] = h5py.ExternalLink(str(secret.with_suffix(".h5")), "features")
        elif how == "soft link":
            fh["real"] = np.ones((n, d), np.float32)
            fh["features"] = h5py.SoftLink("/real")
        elif how == "virtual":
            layout = h5py.VirtualLayout(shape=(n, d), dtype=np.float32)
            layout[:] = h5py.VirtualSource(str(secret.with_suffix(".h5")), "features", shape=(n, d))
            with h5py.File(secret.with_suffix(".h5"), "w") as other:
                other["features"] = np.ones((n, d), np.float32)
            fh.create_virtual_dataset("features", layout)
        elif how == "group":
            fh.create_group("features")
        fh["coords"] = grid_coords(n)
    return path


@pytest.mark.parametrize("how", ["external storage", "external link", "soft link", "virtual", "group"])
def test_an_h5_whose_features_live_elsewhere_is_refused_and_the_rest_ingested(tmp_path, how):
    from fastmil.data import ingest
    from tests.files import write_trident_h5

    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(32, dtype=np.float32).tobytes())  # stands in for /etc/passwd
    src = _mkdir(tmp_path / "src")
    _h5_with(src / "evil.h5", how, secret)
    write_trident_h5(src / "good.h5", np.ones((5, 4), np.float32), grid_coords(5))
    (src / "._good.h5").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")  # item 8: a dotfile is no slide
    report = ingest(src, tmp_path / "store", progress=False)
    assert report.written == ["good"] and [sid for sid, _ in report.failed] == ["evil"]
    reason = dict(report.failed)["evil"]
    assert "slide 'evil'" in reason and ("link" in reason or "outside this file" in reason or "group" in reason)
    assert open_store(tmp_path / "store").slide_ids == ["good"]


# --------------------------------------------------------------------------------------- item 6: amplification
def test_a_zero_stride_tensor_file_is_refused_not_blown_up(tmp_path):
    import torch

    from fastmil.data import ingest

    src = _mkdir(tmp_path / "src")
    torch.save(torch.ones(1, 64).expand(100_000, 64), src / "bomb.pt")
    torch.save(torch.ones(10, 64), src / "fine.pt")
    assert (src / "bomb.pt").stat().st_size < 4096
    report = ingest(src, tmp_path / "store", progress=False)
    assert report.written == ["fine"] and "zero strides" in dict(report.failed)["bomb"]


def test_huge_source_attributes_are_not_copied_into_slide_metadata(tmp_path):
    import h5py

    from fastmil.data import ingest

    src = _mkdir(tmp_path / "src")
    with h5py.File(src / "s.h5", "w") as fh:
        fh["features"] = np.ones((6, 4), np.float32)
        fh["coords"] = grid_coords(6)
        fh["coords"].attrs["patch_size_level0"] = 256
        fh["coords"].attrs["notes"] = "x" * 2_000_000
    report = ingest(src, tmp_path / "store", progress=False)
    assert report.written == ["s"]
    meta = tmp_path / "store" / "slides" / "s" / "zarr.json"
    assert meta.stat().st_size < 20_000
    attrs = open_store(tmp_path / "store").slide_attrs("s")
    assert attrs["patch_size_level0"] == 256 and attrs["source_attrs_dropped"] == ["notes"]


def test_a_file_name_that_is_no_slide_id_is_reported_and_the_rest_ingested(tmp_path):
    import torch

    from fastmil.data import ingest

    src = _mkdir(tmp_path / "src")
    torch.save(torch.ones(3, 4), src / "bad\x07id.pt")
    torch.save(torch.ones(3, 4), src / "ok.pt")
    report = ingest(src, tmp_path / "store", progress=False)
    assert report.written == ["ok"] and "control characters" in dict(report.failed)["bad\x07id"]


# ------------------------------------------------------------------------- item 10: damaged neighbour caches
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_neighbour_cache_is_rebuilt(tmp_path, damage):
    root = _store(tmp_path / "s", n_slides=1)
    store = open_store(root)
    table = slide_neighbours(store, "s0", 2)
    cached = root / "slides" / "s0" / "neighbours_r2.npz"
    data = cached.read_bytes()
    cached.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"PK\x03\x04" + b"\x00" * 64,
                        "empty": b""}[damage])
    from fastmil.data import neighbours

    neighbours._memory.clear()
    again = slide_neighbours(open_store(root), "s0", 2)
    assert np.array_equal(again, table) and cached.read_bytes() == data  # rebuilt and rewritten whole


# --------------------------------------------------------------------------- item 12: unvalidated store metadata
def _edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[-1, 8]), "chunk shape"),
    (lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[4, 3]), "chunk shape"),
    (lambda m: m.update(shape=[10**12, 8]), "shape"),
    (lambda m: m.update(shape=[40, 0]), "shape"),
    (lambda m: m.update(shape=[40.5, 8]), "shape"),
    (lambda m: m.update(shape="big"), "shape"),
    (lambda m: m.update(data_type="int64"), "data type"),
])
def test_crafted_array_metadata_is_an_error_naming_the_slide(tmp_path, edit, match):
    root = _store(tmp_path / "s", n_slides=2)
    _edit_json(root / "slides" / "s1" / "features" / "zarr.json", edit)
    store = open_store(root)
    with pytest.raises(StoreError, match=rf"slide 's1'.*{match}"):
        store.read("s1")
    assert store.read("s0")[0].shape == (40, 8)


@pytest.mark.parametrize("label", [1.7, [1], 10**12, 1e308, True, -1, "1"])
def test_a_crafted_label_is_an_error_naming_the_slide(tmp_path, label):
    root = _store(tmp_path / "s", n_slides=2)
    _edit_json(root / "slides" / "s1" / "zarr.json", lambda m: m["attributes"].update(label=label))
    store = open_store(root)
    with pytest.raises(StoreError, match=r"slide 's1': label .* is not a class index"):
        store.label("s1")
    assert store.label("s0") == 0


@pytest.mark.parametrize("classes", ["tumour", [], [1, 2], {"a": 1}])
def test_crafted_class_names_are_an_error(tmp_path, classes):
    root = _store(tmp_path / "s", n_slides=2)
    _edit_json(root / "zarr.json", lambda m: m["attributes"].update(classes=classes))
    with pytest.raises(StoreError, match="'classes' must be a non-empty list"):
        _ = open_store(root).classes


@pytest.mark.parametrize("size", [-5, 1, 2.5, "512", 10**9])
def test_a_crafted_patch_size_is_an_error_naming_the_slide(tmp_path, size):
    root = _store(tmp_path / "s", n_slides=1)
    _edit_json(root / "slides" / "s0" / "zarr.json", lambda m: m["attributes"].update(patch_size_level0=size))
    with pytest.raises(StoreError, match=r"slide 's0': patch_size_level0 must be an integer"):
        slide_neighbours(open_store(root), "s0", 1)


def test_a_huge_integer_label_in_a_labels_csv_is_an_error_before_any_write(tmp_path):
    import torch

    from fastmil.data import ingest

    src = _mkdir(tmp_path / "src")
    torch.save(torch.ones(3, 4), src / "a.pt")
    (tmp_path / "labels.csv").write_text("slide_id,label\na,100000000000\n")
    with pytest.raises(ValueError, match="slide 'a': integer label 100000000000 is not a class index"):
        ingest(src, tmp_path / "store", labels_csv=tmp_path / "labels.csv", progress=False)
    assert not (tmp_path / "store").exists()


# ------------------------------------------------------------------------- item 13: errors that blame the cause
def test_a_full_disk_during_ingest_blames_the_store_not_the_source(tmp_path, monkeypatch):
    import errno

    from fastmil.data import ingest
    from fastmil.data import store as store_module
    from tests.files import write_trident_h5

    src = _mkdir(tmp_path / "src")
    write_trident_h5(src / "a.h5", np.ones((5, 4), np.float32), grid_coords(5))

    def full(root):
        raise OSError(errno.ENOSPC, "No space left on device", str(root))

    monkeypatch.setattr(store_module, "_fsync_tree", full)
    report = ingest(src, tmp_path / "store", progress=False)
    reason = dict(report.failed)["a"]
    assert "cannot write to store" in reason and "No space left on device" in reason
    assert "corrupt" not in reason and not any((tmp_path / "store").glob(".staging/*"))


def test_a_checkpoint_that_cannot_be_written_is_one_clear_oserror(tmp_path, monkeypatch):
    import torch

    from fastmil.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "last.pt", {"epoch": 1})
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos; basic_ios::clear: iostream error")))
    with pytest.raises(OSError, match=r"cannot write checkpoint .*last\.pt.*MiB free.*previous checkpoint"):
        save_checkpoint(tmp_path / "last.pt", {"epoch": 2})
    assert torch.load(tmp_path / "last.pt")["epoch"] == 1 and len(list(tmp_path.iterdir())) == 1


def test_the_cli_reports_a_machine_error_in_one_line(tmp_path, monkeypatch, capsys):
    import errno

    from fastmil import cli

    root = _store(tmp_path / "s", n_slides=1)
    monkeypatch.setattr("fastmil.data.store.FeatureStore.summary", lambda self: (_ for _ in ()).throw(
        OSError(errno.EIO, "Input/output error", str(root / "zarr.json"))))
    assert cli.main(["info", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Input/output error" in err and "zarr.json" in err


# ------------------------------------------------------------------------------------------ item 7: checksums
@pytest.mark.parametrize("compression", [None, "zstd"])
@pytest.mark.parametrize("where", ["features", "coords"])
def test_a_flipped_bit_in_a_chunk_is_an_error_not_different_features(tmp_path, compression, where):
    root = tmp_path / "s"
    store = create_store(root)
    rng = np.random.default_rng(0)
    store.write_slide("x", rng.standard_normal((5000, 8)).astype(np.float32), grid_coords(5000),
                      compression=compression)
    store.close()
    chunk = root / "slides" / "x" / where / "c" / "1" / "0"
    if not chunk.exists():
        chunk = root / "slides" / "x" / where / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 3] ^= 0x10
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"slide 'x'.*(CRC32C|checksum|cannot read)"):
        open_store(root).read("x")


def test_checksums_can_be_skipped_on_read_and_old_stores_without_them_still_read(tmp_path):
    root = tmp_path / "s"
    store = create_store(root)
    feats = np.arange(80, dtype=np.float32).reshape(10, 8)
    store.write_slide("plain", feats, checksum=False)
    store.write_slide("summed", feats)
    store.close()
    assert json.loads((root / "slides" / "summed" / "features" / "zarr.json").read_text())["codecs"][-1]["name"] \
        == "crc32c"
    chunk = root / "slides" / "summed" / "features" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 1
    chunk.write_bytes(bytes(data))
    assert np.array_equal(open_store(root).read("plain")[0], feats)
    unchecked = open_store(root, verify_checksums=False).read("summed")[0]
    assert unchecked[0, 0] != feats[0, 0] and np.array_equal(unchecked[1:], feats[1:])


def test_ingest_into_a_read_only_store_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    import errno

    from fastmil.cli import main
    from fastmil.data import store_lock

    root = _store(tmp_path / "s", n_slides=1)
    src = _mkdir(tmp_path / "src")

    def read_only(store, timeout=0.0):
        raise OSError(errno.EROFS, "Read-only file system", str(store / store_lock.LOCK_NAME))

    monkeypatch.setattr(store_lock, "acquire", read_only)
    import torch

    torch.save(torch.ones(3, 8), src / "x.pt")
    assert main(["ingest", str(src), str(root), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot open the store for writing: Read-only file system" in err


# ------------------------------------------------------------------------------- review: the store's own folders
@pytest.mark.parametrize("name", ["slides", ".trash", ".staging"])
def test_a_store_whose_own_folder_is_a_link_is_refused_and_nothing_outside_is_touched(tmp_path, name):
    """With ``slides -> /home/u`` and ``.trash/Documents.<hex>``, recovery used to remove /home/u/Documents."""
    root = _store(tmp_path / "s", n_slides=1)
    outside = _mkdir(tmp_path / "home")
    (outside / "Documents").mkdir()
    (outside / "Documents" / "thesis.txt").write_text("precious")
    if name == "slides":
        import shutil

        shutil.rmtree(root / "slides")
        _mkdir(root / ".trash" / f"Documents.{uuid.uuid4().hex}").joinpath("zarr.json").write_text("{}")
    (root / name).symlink_to(outside, target_is_directory=True)
    for mode in ("a", "r"):
        with pytest.raises(StoreError, match=f"{name} is not a folder of the store itself"):
            open_store(root, mode=mode)
    assert (outside / "Documents" / "thesis.txt").read_text() == "precious"
    assert sorted(p.name for p in outside.iterdir()) == ["Documents"]


def test_two_processes_creating_one_new_store_get_one_store(tmp_path):
    root = tmp_path / "fresh"  # not created beforehand: creation itself runs under the lock
    procs = [subprocess.Popen([sys.executable, "-c", INGEST, str(root), tag, "60"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=REPO) for tag in ("a", "b")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len(open_store(root).slide_ids) == 12


def test_an_h5_dataset_that_was_never_written_is_refused(tmp_path):
    import h5py

    from fastmil.data import ingest

    src = _mkdir(tmp_path / "src")
    with h5py.File(src / "ghost.h5", "w") as fh:
        fh.create_dataset("features", shape=(10**6, 1024), dtype=np.float32, chunks=(1024, 1024))
    assert (src / "ghost.h5").stat().st_size < 100_000
    report = ingest(src, tmp_path / "store", progress=False)
    assert "never written" in dict(report.failed)["ghost"]


def test_labels_are_class_indices_integral_floats_included(tmp_path):
    root = _store(tmp_path / "s", n_slides=2)
    _edit_json(root / "slides" / "s1" / "zarr.json", lambda m: m["attributes"].update(label=1.0))
    store = open_store(root, mode="a")
    assert store.label("s1") == 1
    with pytest.raises(ValueError, match="label 1.7 is not a class index"):
        store.set_labels({"s0": 1.7}, ["a", "b"])
    store.set_labels({"s0": np.int64(1), "s1": 0.0}, ["a", "b"])
    assert store.labels() == {"s0": 1, "s1": 0}
