import shutil

import h5py
import numpy as np
import pytest
import torch

from fastmil.data import StoreError, ingest, open_store, read_splits_csv
from tests.files import grid_coords, write_trident_h5


def _features(n, d=24, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


def test_trident_h5_round_trip_rechunked(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    f1, f2 = _features(5000, seed=1), _features(17, seed=2, dtype=np.float16)
    write_trident_h5(src / "slide_1.h5", f1, grid_coords(5000))
    write_trident_h5(src / "slide_2.h5", f2, grid_coords(17))
    report = ingest(src, tmp_path / "store", progress=False)
    assert report.written == ["slide_1", "slide_2"] and report.without_coords == []
    store = open_store(tmp_path / "store")
    for sid, f, n in (("slide_1", f1, 5000), ("slide_2", f2, 17)):
        feats, coords = store.read(sid)
        assert feats.dtype == f.dtype and feats.tobytes() == f.tobytes()
        assert np.array_equal(coords, grid_coords(n))
    attrs = store.slide_attrs("slide_1")
    assert attrs["patch_size_level0"] == 512 and attrs["magnification"] == 20 and attrs["source"] == "slide_1.h5"
    meta = store._meta("slide_1")
    assert meta["chunk_rows"] == 4096  # TRIDENT's (1, D) chunks were re-chunked


def test_ingest_is_idempotent_and_resumable(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    for i in range(3):
        write_trident_h5(src / f"s{i}.h5", _features(50, seed=i), grid_coords(50))
    ingest(src, tmp_path / "store", progress=False)
    shutil.rmtree(tmp_path / "store" / "slides" / "s1")  # as if the first run died before s1
    report = ingest(src, tmp_path / "store", progress=False)
    assert report.written == ["s1"] and report.skipped == ["s0", "s2"]
    assert open_store(tmp_path / "store").slide_ids == ["s0", "s1", "s2"]


def test_pt_plus_coords_round_trip(tmp_path):
    pt_dir, coords_dir = tmp_path / "feat" / "pt_files", tmp_path / "coords"
    pt_dir.mkdir(parents=True)
    coords_dir.mkdir()
    t = torch.randn(300, 32)
    torch.save(t, pt_dir / "case-9.pt")
    with h5py.File(coords_dir / "case-9.h5", "w") as fh:
        ds = fh.create_dataset("coords", data=grid_coords(300, step=256))
        ds.attrs["patch_size"] = 256
        ds.attrs["patch_level"] = 0
        ds.attrs["downsample"] = np.array([2.0, 2.0])
    ingest(tmp_path / "feat", tmp_path / "store", coords_dir=coords_dir, encoder="resnet50-trunc", progress=False)
    store = open_store(tmp_path / "store")
    f, c = store.read("case-9")
    assert np.array_equal(f, t.numpy()) and np.array_equal(c, grid_coords(300, step=256))
    attrs = store.slide_attrs("case-9")
    assert attrs["patch_size_level0"] == 512 and attrs["encoder"] == "resnet50-trunc"


def test_real_clam_coordinate_files_survive_import(tmp_path, clam_coords_dir):
    pt_dir = tmp_path / "pt_files"
    pt_dir.mkdir()
    originals = {}
    for path in sorted(clam_coords_dir.glob("*.h5")):
        with h5py.File(path, "r") as fh:
            originals[path.stem] = fh["coords"][:]
        # clearly synthetic features paired with real coordinates
        torch.save(torch.randn(len(originals[path.stem]), 8, dtype=torch.float16), pt_dir / f"{path.stem}.pt")
    assert len(originals) == 8
    ingest(pt_dir, tmp_path / "store", coords_dir=clam_coords_dir, progress=False)
    store = open_store(tmp_path / "store")
    assert store.slide_ids == sorted(originals)
    for sid, coords in originals.items():
        _, stored = store.read(sid)
        assert np.array_equal(stored.astype(np.int64), coords), sid
        assert store.slide_attrs(sid)["patch_size_level0"] == 512


def test_missing_coords_for_a_slide(tmp_path):
    pt_dir, coords_dir = tmp_path / "pt", tmp_path / "coords"
    pt_dir.mkdir()
    coords_dir.mkdir()
    torch.save(torch.randn(5, 4), pt_dir / "lonely.pt")
    with pytest.raises(ValueError, match=r"slide 'lonely': missing coordinates"):
        ingest(pt_dir, tmp_path / "store", coords_dir=coords_dir, strict=True, progress=False)
    assert open_store(tmp_path / "store").slide_ids == []


def test_pt_without_coords_dir_is_stored_without_coords(tmp_path):
    pt_dir = tmp_path / "pt"
    pt_dir.mkdir()
    torch.save(torch.randn(5, 4), pt_dir / "a.pt")
    report = ingest(pt_dir, tmp_path / "store", progress=False)
    assert report.without_coords == ["a"]
    assert open_store(tmp_path / "store").read("a")[1] is None


def test_pt_with_arbitrary_pickle_is_refused(tmp_path):
    pt_dir = tmp_path / "pt"
    pt_dir.mkdir()
    torch.save({"features": torch.randn(3, 2), "evil": _Unsafe()}, pt_dir / "x.pt")
    with pytest.raises(ValueError, match=r"slide 'x'.*not weights-only"):
        ingest(pt_dir, tmp_path / "store", strict=True, progress=False)


class _Unsafe:
    pass


def test_nan_features_in_h5_name_the_slide_and_leave_nothing(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    f = _features(100)
    f[37, 3] = np.inf
    write_trident_h5(src / "broken.h5", f, grid_coords(100))
    with pytest.raises(ValueError, match=r"slide 'broken'.*NaN/Inf.*instance 37"):
        ingest(src, tmp_path / "store", strict=True, progress=False)
    assert open_store(tmp_path / "store").slide_ids == []


def test_coords_features_length_mismatch_in_h5(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    write_trident_h5(src / "short.h5", _features(10), grid_coords(9))
    with pytest.raises(ValueError, match=r"slide 'short'.*length mismatch"):
        ingest(src, tmp_path / "store", strict=True, progress=False)


def test_duplicate_slide_ids(tmp_path):
    src = tmp_path / "mixed"
    src.mkdir()
    write_trident_h5(src / "dup.h5", _features(4), grid_coords(4))
    torch.save(torch.randn(4, 24), src / "dup.pt")
    with pytest.raises(ValueError, match=r"duplicate slide id 'dup'"):
        ingest(src, tmp_path / "store", strict=True, progress=False)
    # the same id arriving later from a different source file
    ingest(src, tmp_path / "store", format="h5", progress=False)
    other = tmp_path / "other" / "pt_files"
    other.mkdir(parents=True)
    torch.save(torch.randn(4, 24), other / "dup.pt")
    with pytest.raises(StoreError, match=r"duplicate slide id 'dup'.*already in store from 'dup.h5'"):
        ingest(other.parent, tmp_path / "store", strict=True, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_truncated_or_corrupt_h5(tmp_path, damage):
    src = tmp_path / "h5"
    src.mkdir()
    path = src / "damaged.h5"
    write_trident_h5(path, _features(2000), grid_coords(2000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x89HDF\r\n" + bytes(range(256)) * 40)
    with pytest.raises(ValueError, match=r"slide 'damaged'.*truncated or corrupt"):
        ingest(src, tmp_path / "store", strict=True, progress=False)
    assert open_store(tmp_path / "store").slide_ids == []


def test_coordinate_only_h5_gets_a_hint(tmp_path, clam_coords_dir):
    src = tmp_path / "h5"
    src.mkdir()
    first = sorted(clam_coords_dir.glob("*.h5"))[0]
    shutil.copy(first, src / first.name)
    with pytest.raises(ValueError, match=r"no 'features' dataset.*--coords-dir"):
        ingest(src, tmp_path / "store", strict=True, progress=False)


def test_labels_csv_string_labels_and_unknown_slides(tmp_path):
    src = tmp_path / "h5"
    src.mkdir()
    for sid in ("a", "b", "c"):
        write_trident_h5(src / f"{sid}.h5", _features(3), grid_coords(3))
    good = tmp_path / "labels.csv"
    good.write_text("case_id,slide_id,label\np1,a,LUSC\np2,b,LUAD\np3,c,LUSC\n")
    report = ingest(src, tmp_path / "store", labels_csv=good, progress=False)
    store = open_store(tmp_path / "store")
    assert report.classes == ["LUAD", "LUSC"] == store.classes
    assert store.labels() == {"a": 1, "b": 0, "c": 1}
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,label\na,1\nnot-a-slide,0\n")
    with pytest.raises(ValueError, match=r"1 slide\(s\).*'not-a-slide'"):
        ingest(src, tmp_path / "store", labels_csv=bad, strict=True, progress=False)
    assert open_store(tmp_path / "store").labels() == {"a": 1, "b": 0, "c": 1}  # unchanged


def test_labels_csv_conflicting_rows(tmp_path):
    from fastmil.data import read_labels_csv

    p = tmp_path / "l.csv"
    p.write_text("slide_id,label\na,0\na,1\n")
    with pytest.raises(ValueError, match=r"'a' listed twice"):
        read_labels_csv(p)
    p.write_text("slide,label\na,0\n")
    with pytest.raises(ValueError, match="needs 'slide_id' and 'label'"):
        read_labels_csv(p)


def test_clam_splits_csv(tmp_path):
    p = tmp_path / "splits_0.csv"
    p.write_text(",train,val,test\n0,a,d,f\n1,b,e,\n2,c,,\n")
    assert read_splits_csv(p) == {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["f"]}
    p.write_text(",train,val,test\n0,a,a,\n")
    with pytest.raises(ValueError, match="'a' is in both 'train' and 'val'"):
        read_splits_csv(p)


def _mixed_folder(root):
    """Two good slides, and three bad ones: NaN features, a truncated file, coords shorter than features."""
    src = root / "mixed"
    src.mkdir()
    for i, sid in enumerate(("good-a", "good-b")):
        write_trident_h5(src / f"{sid}.h5", _features(50, seed=i), grid_coords(50))
    nan = _features(40)
    nan[5, 1] = np.nan
    write_trident_h5(src / "bad-nan.h5", nan, grid_coords(40))
    write_trident_h5(src / "bad-trunc.h5", _features(2000), grid_coords(2000))
    data = (src / "bad-trunc.h5").read_bytes()
    (src / "bad-trunc.h5").write_bytes(data[: len(data) // 2])
    write_trident_h5(src / "bad-short.h5", _features(10), grid_coords(9))
    return src


def test_bad_slides_are_reported_and_skipped_and_a_rerun_changes_nothing(tmp_path):
    src = _mixed_folder(tmp_path)
    report = ingest(src, tmp_path / "store", progress=False)
    assert report.written == ["good-a", "good-b"]
    reasons = dict(report.failed)
    assert sorted(reasons) == ["bad-nan", "bad-short", "bad-trunc"]
    assert "NaN/Inf" in reasons["bad-nan"] and "truncated or corrupt" in reasons["bad-trunc"]
    assert "length mismatch" in reasons["bad-short"]
    assert all(f"slide {sid!r}" in reason for sid, reason in reasons.items())
    store = open_store(tmp_path / "store")
    assert store.slide_ids == ["good-a", "good-b"]
    before = {sid: store.read(sid)[0].copy() for sid in store.slide_ids}
    again = ingest(src, tmp_path / "store", progress=False)
    assert again.written == [] and again.skipped == ["good-a", "good-b"] and dict(again.failed) == reasons
    store = open_store(tmp_path / "store")
    assert store.slide_ids == ["good-a", "good-b"]
    assert all(np.array_equal(store.read(sid)[0], before[sid]) for sid in before)
    with pytest.raises(ValueError, match=r"slide 'bad-nan'"):  # strict: the first bad slide (sorted order) stops it
        ingest(src, tmp_path / "store2", strict=True, progress=False)
    assert open_store(tmp_path / "store2").slide_ids == []


def test_cli_ingest_lists_failures_and_exits_non_zero(tmp_path, capsys):
    from fastmil.cli import main

    src = _mixed_folder(tmp_path)
    store = tmp_path / "cohort.zarr"
    assert main(["ingest", str(src), str(store), "-q"]) == 1
    err = capsys.readouterr().err
    assert "FAILED bad-nan" in err and "FAILED bad-trunc" in err and "FAILED bad-short" in err
    rows = (tmp_path / "cohort.zarr.failures.csv").read_text().splitlines()
    assert rows[0] == "slide_id,reason" and sorted(r.split(",")[0] for r in rows[1:]) == ["bad-nan", "bad-short",
                                                                                          "bad-trunc"]
    assert main(["ingest", str(src), str(store), "-q"]) == 1  # a re-run: same failures, nothing else changes
    assert open_store(store).slide_ids == ["good-a", "good-b"]
    for bad in ("bad-nan", "bad-trunc", "bad-short"):
        (src / f"{bad}.h5").unlink()
    assert main(["ingest", str(src), str(store), "-q"]) == 0
    assert not (tmp_path / "cohort.zarr.failures.csv").exists()


def test_labels_for_slides_not_yet_extracted_are_a_warning(tmp_path):
    """A cohort CSV ahead of extraction: the known slides get labels (classes from the whole CSV, so they do not
    change as the cohort arrives); the others are named in a warning; strict makes it an error."""
    src = tmp_path / "h5"
    src.mkdir()
    for sid in ("a", "b"):
        write_trident_h5(src / f"{sid}.h5", _features(3), grid_coords(3))
    cohort = tmp_path / "cohort.csv"
    cohort.write_text("slide_id,label\na,LUSC\nb,LUSC\nlater-1,LUAD\nlater-2,LUAD\n")
    with pytest.warns(UserWarning, match=r"2 slide\(s\).*'later-1', 'later-2'.*left out"):
        report = ingest(src, tmp_path / "store", labels_csv=cohort, progress=False)
    assert report.unknown_labels == ["later-1", "later-2"]
    store = open_store(tmp_path / "store")
    assert store.classes == ["LUAD", "LUSC"] and store.labels() == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match=r"neither in .* nor in the store"):
        ingest(src, tmp_path / "store3", labels_csv=cohort, strict=True, progress=False)
    assert open_store(tmp_path / "store3").slide_ids == []
