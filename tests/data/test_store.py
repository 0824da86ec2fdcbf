import numpy as np
import pytest
import torch

from fastmil import _atomic as atomic_mod
from fastmil.data import StoreError, create_store, open_store
from tests.files import grid_coords


def _slide(n=5000, d=16, seed=0, dtype=np.float16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(dtype), grid_coords(n)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_write_read_identical_bytes(tmp_path, dtype):
    store = create_store(tmp_path / "s")
    feats, coords = _slide(dtype=dtype)
    store.write_slide("slide-A", feats, coords, {"patch_size_level0": 512, "label": 1})
    reread = open_store(tmp_path / "s")
    f, c = reread.read("slide-A")
    assert f.dtype == dtype and f.tobytes() == feats.tobytes()
    assert c.dtype == np.int32 and np.array_equal(c, coords)
    assert reread.slide_attrs("slide-A")["patch_size_level0"] == 512
    assert reread.label("slide-A") == 1
    assert reread.n_instances("slide-A") == 5000 and reread.dim == 16
    # chunked along N with full rows, 4096 rows per chunk
    chunks = sorted(p.name for p in (tmp_path / "s" / "slides" / "slide-A" / "features" / "c").iterdir())
    assert chunks == ["0", "1"]


def test_load_bags_packs_store_slides(tmp_path):
    store = create_store(tmp_path / "s")
    for i, n in enumerate([3, 10, 1]):
        f, c = _slide(n=n, seed=i)
        store.write_slide(f"s{i}", f, c, {"label": i % 2})
    store.set_labels({"s0": 0, "s1": 1, "s2": 0}, ["neg", "pos"])
    bags = store.load_bags(["s1", "s2"])
    assert bags.ids == ["s1", "s2"] and bags.offsets.tolist() == [0, 10, 11]
    assert bags.labels.tolist() == [1, 0] and bags.coords.shape == (11, 2)
    assert store.summary()["label_counts"] == {"neg": 2, "pos": 1}


def test_existing_slide_needs_overwrite(tmp_path):
    store = create_store(tmp_path / "s")
    f, c = _slide(n=10)
    store.write_slide("a", f, c)
    with pytest.raises(StoreError, match="'a': already in store"):
        store.write_slide("a", f, c)
    store.write_slide("a", f[:5], c[:5], overwrite=True)
    assert store.n_instances("a") == 5
    assert not (tmp_path / "s" / ".trash").exists()


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda f, c: (np.where(np.arange(len(f))[:, None] == 4100, np.nan, f).astype(f.dtype), c),
         r"'bad'.*NaN/Inf.*instance 4100"),
        (lambda f, c: (f, c[:-1]), r"'bad'.*length mismatch"),
        (lambda f, c: (f, np.concatenate([c[:-1], c[:1]])), r"'bad'.*duplicate coordinates"),
        (lambda f, c: (f[:0], c[:0]), r"'bad'.*empty bag"),
        (lambda f, c: (f.astype(np.int32), c), r"'bad'.*floating point"),
    ],
)
def test_bad_slides_rejected_and_leave_nothing(tmp_path, mutate, match):
    store = create_store(tmp_path / "s")
    f, c = mutate(*_slide(n=5000))
    with pytest.raises(ValueError, match=match):
        store.write_slide("bad", f, c)
    assert "bad" not in store and store.slide_ids == []
    assert not (tmp_path / "s" / ".staging").exists() or not any((tmp_path / "s" / ".staging").iterdir())


def test_exception_mid_write_leaves_no_partial_slide_and_rerun_completes(tmp_path, monkeypatch):
    store = create_store(tmp_path / "s")
    f, c = _slide(n=9000)
    real_setitem = None
    calls = {"n": 0}

    import zarr

    real_setitem = zarr.Array.__setitem__

    def failing_setitem(self, key, value):
        calls["n"] += 1
        if calls["n"] == 2:  # second feature chunk
            raise OSError("disk full (injected)")
        return real_setitem(self, key, value)

    monkeypatch.setattr(zarr.Array, "__setitem__", failing_setitem)
    with pytest.raises(StoreError, match="slide 'victim': cannot write to store .*injected"):  # the cause, named
        store.write_slide("victim", f, c)
    assert "victim" not in store
    assert not (tmp_path / "s" / "slides" / "victim").exists()
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)
    store.write_slide("victim", f, c)
    assert open_store(tmp_path / "s").read("victim")[0].tobytes() == f.tobytes()


def test_crash_leftovers_are_cleaned_on_next_open(tmp_path):
    create_store(tmp_path / "s")
    leftover = tmp_path / "s" / ".staging" / f"half.{'ab' * 16}"  # write_slide's name: "<slide id>.<uuid4 hex>"
    leftover.mkdir(parents=True)
    (leftover / "zarr.json").write_text("{}")
    assert open_store(tmp_path / "s").slide_ids == []  # read mode: staging invisible
    open_store(tmp_path / "s", mode="a")
    assert not (tmp_path / "s" / ".staging").exists()


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_missing_or_truncated_chunk_is_an_error(tmp_path, compression):
    store = create_store(tmp_path / "s")
    f, c = _slide(n=9000)
    store.write_slide("x", f, c, compression=compression)
    store.write_slide("y", f, c, compression=compression)
    assert open_store(tmp_path / "s").read("x")[0].tobytes() == f.tobytes()
    (tmp_path / "s" / "slides" / "x" / "features" / "c" / "1" / "0").unlink()
    missing = r"slide 'x'.*chunk 1 is missing" if compression is None else r"slide 'x': features has 2 of 3 chunk files"
    with pytest.raises(StoreError, match=missing):
        open_store(tmp_path / "s").read("x")
    chunk = tmp_path / "s" / "slides" / "y" / "features" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(StoreError, match=r"slide 'y'.*cannot read features"):
        open_store(tmp_path / "s").read("y")


def test_store_refuses_foreign_dirs_and_readonly_writes(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="not a fastmil store"):
        create_store(tmp_path / "junk")
    with pytest.raises(StoreError, match="no such store"):
        open_store(tmp_path / "missing")
    create_store(tmp_path / "s")
    ro = open_store(tmp_path / "s")
    with pytest.raises(StoreError, match="read-only"):
        ro.write_slide("a", *_slide(n=3))
    with pytest.raises(ValueError, match="invalid slide id"):
        open_store(tmp_path / "s", mode="a").write_slide("../evil", *_slide(n=3))


def test_set_labels_rejects_unknown_slides_before_writing(tmp_path):
    store = create_store(tmp_path / "s")
    store.write_slide("a", *_slide(n=3))
    with pytest.raises(StoreError, match="not in store.*'ghost'"):
        store.set_labels({"a": 1, "ghost": 0}, ["x", "y"])
    assert store.label("a") is None and store.classes is None


def test_atomic_json_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    store = create_store(tmp_path / "s")
    store.write_slide("a", *_slide(n=3), attrs={"label": 0})

    def boom(*args, **kwargs):
        raise OSError("injected")

    monkeypatch.setattr(atomic_mod.os, "replace", boom)  # the new file is fully written, the rename fails
    with pytest.raises(OSError):
        store.update_slide_attrs("a", label=1)
    monkeypatch.undo()
    assert open_store(tmp_path / "s").label("a") == 0
    assert [p.name for p in (tmp_path / "s" / "slides" / "a").iterdir() if p.name.endswith(".tmp")] == []


def test_bf16_tensor_is_stored_as_float32(tmp_path):
    store = create_store(tmp_path / "s")
    t = torch.randn(10, 4).to(torch.bfloat16)
    store.write_slide("b", t, grid_coords(10))
    f, _ = store.read("b")
    assert f.dtype == np.float32 and np.array_equal(f, t.float().numpy())


# ---------------------------------------------------------------------------------------------------------------
# durability: every interruption leaves the old or the new version, never neither
# ---------------------------------------------------------------------------------------------------------------
FS_OPS = ("rename", "replace", "fsync", "mkdir", "open", "unlink", "rmdir")


class _Interrupt(BaseException):
    """Stands for a signal (KeyboardInterrupt-like: not an Exception, so no ``except Exception`` swallows it)."""


def _fail_at(monkeypatch, step: int) -> dict:
    """Make the ``step``-th filesystem operation (os.rename/replace/fsync/mkdir/open/unlink/rmdir,
    shutil.rmtree) raise ``_Interrupt``; returns the call counter."""
    import os
    import shutil

    count = {"n": 0}

    def wrap(real):
        def op(*args, **kwargs):
            count["n"] += 1
            if count["n"] == step:
                raise _Interrupt(f"injected at filesystem operation {step}")
            return real(*args, **kwargs)
        return op

    for name in FS_OPS:
        monkeypatch.setattr(os, name, wrap(getattr(os, name)))
    monkeypatch.setattr(shutil, "rmtree", wrap(shutil.rmtree))
    return count


def _old_and_new(n=5000):
    f, c = _slide(n=n, d=8)
    return (f, c), (f[: n // 2] + 1, c[: n // 2])


def test_interrupted_overwrite_leaves_the_old_or_the_new_slide_at_every_step(tmp_path, monkeypatch):
    (old_f, old_c), (new_f, new_c) = _old_and_new()
    outcomes = set()
    step = 0
    while True:
        step += 1
        root = tmp_path / f"s{step}"
        create_store(root).write_slide("a", old_f, old_c, attrs={"label": 0})
        store = open_store(root, mode="a")
        counter = _fail_at(monkeypatch, step)
        try:
            store.write_slide("a", new_f, new_c, attrs={"label": 1}, overwrite=True)
            interrupted = False
        except _Interrupt:
            interrupted = True
        monkeypatch.undo()
        for mode in ("r", "a", "r"):  # a reader before recovery, the recovering writer, a reader after
            reopened = open_store(root, mode=mode)
            assert reopened.slide_ids == ["a"], (step, mode)
            f, c = reopened.read("a")
            version = "new" if f.shape == new_f.shape and f.tobytes() == new_f.tobytes() else "old"
            expected_f, expected_c = (new_f, new_c) if version == "new" else (old_f, old_c)
            assert f.tobytes() == expected_f.tobytes() and np.array_equal(c, expected_c), (step, mode)
            assert reopened.label("a") == (1 if version == "new" else 0)
        outcomes.add(version)
        assert not (root / ".trash").exists() and not (root / ".staging").exists(), step
        if not interrupted:
            break
    assert counter["n"] > 40 and step == counter["n"] + 1  # every operation of the write was interrupted once
    assert outcomes == {"old", "new"}


_KILL_SCRIPT = """
import os, shutil, signal, sys
import numpy as np
from fastmil.data.store import FeatureStore, open_store
root, kill_at = sys.argv[1], int(sys.argv[2])
new = np.load(sys.argv[3])
count = {"n": 0, "on": False}
def wrap(real):
    def op(*args, **kwargs):
        if count["on"]:
            count["n"] += 1
            if count["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return op
for name in FS_OPS:
    setattr(os, name, wrap(getattr(os, name)))
shutil.rmtree = wrap(shutil.rmtree)
commit = FeatureStore._commit
def counted(self, *args):
    count["on"] = True
    return commit(self, *args)
FeatureStore._commit = counted
open_store(root, mode="a").write_slide("a", new["f"], new["c"], overwrite=True)
print("completed")
""".replace("FS_OPS", repr(FS_OPS))


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5, 6, 7, 9, 15])
def test_sigkill_during_an_overwrite_commit_leaves_a_readable_slide(tmp_path, kill_at):
    """A process killed (SIGKILL: no handler runs) at each step of the commit: readers find the old or the new
    slide, and the next writable open restores the old one if the new one never arrived."""
    import signal
    import subprocess
    import sys

    (old_f, old_c), (new_f, new_c) = _old_and_new()
    root = tmp_path / "s"
    create_store(root).write_slide("a", old_f, old_c)
    np.savez(tmp_path / "new.npz", f=new_f, c=new_c)
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(root), str(kill_at), str(tmp_path / "new.npz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    versions = []
    for mode in ("r", "a", "r"):
        f, _ = open_store(root, mode=mode).read("a")
        assert f.tobytes() in (old_f.tobytes(), new_f.tobytes()), mode
        versions.append(f.tobytes() == new_f.tobytes())
    assert len(set(versions)) == 1  # recovery does not change which version a reader saw
    assert not (root / ".trash").exists() and not (root / ".staging").exists()


def test_interrupted_label_update_is_all_old_or_all_new(tmp_path, monkeypatch):
    ids = [f"s{i}" for i in range(4)]
    step = 0
    seen = set()
    while True:
        step += 1
        root = tmp_path / f"st{step}"
        store = create_store(root)
        for sid in ids:
            store.write_slide(sid, *_slide(n=3, d=2))
        store.set_labels({sid: 0 for sid in ids}, ["neg", "pos"])
        _fail_at(monkeypatch, step)
        try:
            store.set_labels({sid: 1 for sid in ids[:3]}, ["benign", "malignant"])
            done = True
        except _Interrupt:
            done = False
        monkeypatch.undo()
        for mode in ("r", "a", "r"):
            reopened = open_store(root, mode=mode)
            labels, classes = [reopened.label(s) for s in ids], reopened.classes
            old, new = ([0, 0, 0, 0], ["neg", "pos"]), ([1, 1, 1, 0], ["benign", "malignant"])
            assert (labels, classes) in (old, new), (step, mode)
        seen.add(tuple(labels))
        assert not (root / "labels.pending.json").exists()
        if done:
            break
    assert seen == {(0, 0, 0, 0), (1, 1, 1, 0)} and step > 5


def test_missing_instance_label_chunk_is_an_error(tmp_path):
    store = create_store(tmp_path / "s")
    f, c = _slide(n=70_000, d=2)
    store.write_slide("x", f, c, instance_labels=np.ones(70_000, np.uint8))
    assert int(open_store(tmp_path / "s").read_instance_labels("x").sum()) == 70_000
    (tmp_path / "s" / "slides" / "x" / "instance_labels" / "c" / "1").unlink()  # a chunk holds 65536 labels
    with pytest.raises(StoreError, match=r"slide 'x': instance_labels has 1 of 2 chunk files"):
        open_store(tmp_path / "s").read_instance_labels("x")
