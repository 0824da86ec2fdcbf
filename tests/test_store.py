import numpy as np
import pytest
import torch

from fastmil.data import StoreError, create_store, open_store
from fastmil import _atomic as atomic_mod

from .conftest import grid_coords


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
        (lambda f, c: (np.where(np.arange(len(f))[:, None] == 4100, np.nan, f).astype(f.dtype), c), r"'bad'.*NaN/Inf.*instance 4100"),
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
    with pytest.raises(OSError, match="injected"):
        store.write_slide("victim", f, c)
    assert "victim" not in store
    assert not (tmp_path / "s" / "slides" / "victim").exists()
    monkeypatch.setattr(zarr.Array, "__setitem__", real_setitem)
    store.write_slide("victim", f, c)
    assert open_store(tmp_path / "s").read("victim")[0].tobytes() == f.tobytes()


def test_crash_leftovers_are_cleaned_on_next_open(tmp_path):
    create_store(tmp_path / "s")
    leftover = tmp_path / "s" / ".staging" / "half.abc"
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
    missing = r"slide 'x'.*chunk 1 is missing" if compression is None else r"slide 'x'.*2 of 3 chunk files"
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
