"""Cross-validation: patient-level folds, CLAM split folders, and ``fastmil cv`` end to end."""
import csv

import numpy as np
import pytest

from fastmil.cli import main
from fastmil.data import SynthConfig, synthesize_store
from fastmil.train.cv import patient_folds, read_case_ids, read_split_dir, write_splits_bool
from fastmil.train.splits import write_splits


def _random_cohort(rng):
    """1-4 slides per patient, labels per slide (a patient may have slides of both classes)."""
    labels, cases = {}, {}
    for p in range(int(rng.integers(12, 60))):
        for s in range(int(rng.integers(1, 5))):
            sid = f"P{p:03d}-S{s}"
            labels[sid], cases[sid] = int(rng.random() < 0.4), f"P{p:03d}"
    return labels, cases


@pytest.mark.parametrize("seed", range(25))
def test_no_patient_in_two_splits_of_any_fold(seed):
    rng = np.random.default_rng(seed)
    labels, cases = _random_cohort(rng)
    folds = int(rng.integers(2, 6))
    splits = patient_folds(labels, cases, folds, val_fraction=0.2, seed=seed)
    assert len(splits) == folds
    tests = []
    for fold in splits:
        owner = {}
        for name, members in fold.items():
            assert len(members) == len(set(members))
            for sid in members:
                assert owner.setdefault(cases[sid], name) == name, f"patient {cases[sid]} in two splits"
        assert sorted(s for members in fold.values() for s in members) == sorted(labels)  # every slide used once
        tests.append(set(fold["test"]))
    assert sorted(s for t in tests for s in t) == sorted(labels)  # the test sets partition the cohort


def test_without_cases_each_slide_is_a_patient_and_folds_are_reproducible():
    labels = {f"s{i}": i % 2 for i in range(30)}
    a = patient_folds(labels, None, 5, 0.2, seed=3)
    assert a == patient_folds(labels, None, 5, 0.2, seed=3) and a != patient_folds(labels, None, 5, 0.2, seed=4)
    assert all(len(f["test"]) == 6 and {labels[s] for s in f["test"]} == {0, 1} for f in a)  # stratified
    with pytest.raises(ValueError, match="at least 5 patients"):
        patient_folds({"a": 0, "b": 1}, None, 5, 0.2, seed=0)


def test_clam_split_folders_read_back_exactly(tmp_path):
    labels, cases = _random_cohort(np.random.default_rng(0))
    folds = patient_folds(labels, cases, 3, 0.2, seed=0)
    both, lists, bools = tmp_path / "both", tmp_path / "lists", tmp_path / "bools"
    for d in (both, lists, bools):
        d.mkdir()
    for k, fold in enumerate(folds):
        for d, form in ((both, "list"), (both, "bool"), (lists, "list"), (bools, "bool")):
            if form == "list":
                write_splits(d / f"splits_{k}.csv", fold)
            else:
                write_splits_bool(d / f"splits_{k}_bool.csv", fold)
    for d in (both, lists, bools):
        got = read_split_dir(d)
        assert [{n: sorted(m) for n, m in f.items()} for f in got] == [{n: sorted(m) for n, m in f.items()}
                                                                      for f in folds]
    rows = list(csv.reader(open(bools / "splits_0_bool.csv")))
    assert rows[0] == ["", "train", "val", "test"] and set(rows[1][1:]) <= {"True", "False"}
    write_splits(both / "splits_1.csv", folds[0])  # now disagrees with splits_1_bool.csv
    with pytest.raises(ValueError, match="disagree"):
        read_split_dir(both)


def test_case_ids_csv(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("case_id,slide_id,label\nP1,a,0\nP1,b,0\nP2,c,1\n")
    assert read_case_ids(p) == {"a": "P1", "b": "P1", "c": "P2"}
    p.write_text("slide_id,label\na,0\n")
    with pytest.raises(ValueError, match="'slide_id' and 'case_id'"):
        read_case_ids(p)


def test_cli_cv_on_a_synthetic_cohort_writes_a_summary_and_resumes(tmp_path, capsys):
    cohort = SynthConfig(n_slides=30, dim=16, median_instances=60, min_instances=20, size_sigma=0.3,
                         tumour_fraction_min=0.05, tumour_fraction_max=0.1, seed=1)
    store = synthesize_store(cohort, tmp_path / "store", progress=False)
    cases = tmp_path / "cases.csv"
    cases.write_text("slide_id,case_id\n" + "".join(f"{s},P{i // 2}\n" for i, s in enumerate(store.slide_ids)))
    args = ["cv", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "cv"), "--folds", "3",
            "--cases", str(cases), "--epochs", "2", "model.embed_dim=16", "model.attn_dim=8", "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "auc" in out and "±" in out
    rows = {r["metric"]: r for r in csv.DictReader(open(tmp_path / "cv" / "summary.csv"))}
    assert {"auc", "balanced_accuracy", "macro_f1", "weighted_f1", "accuracy"} <= set(rows)
    folds = [float(rows["accuracy"][f"fold_{k}"]) for k in range(3)]
    assert float(rows["accuracy"]["mean"]) == pytest.approx(np.mean(folds))
    assert float(rows["accuracy"]["sd"]) == pytest.approx(np.std(folds, ddof=1))
    assert "mean ± sd" in (tmp_path / "cv" / "summary.md").read_text()
    case_of = {s: f"P{i // 2}" for i, s in enumerate(store.slide_ids)}
    for k in range(3):
        fold = read_split_dir(tmp_path / "cv" / "splits")[k]
        owners = {}
        for name, members in fold.items():
            for sid in members:
                assert owners.setdefault(case_of[sid], name) == name
        assert (tmp_path / "cv" / f"fold_{k}" / "best.pt").exists()
    before = (tmp_path / "cv" / "summary.csv").read_text()
    assert main(args) == 0  # every fold finished: resumes to nothing, re-evaluates, same summary
    assert (tmp_path / "cv" / "summary.csv").read_text() == before
    assert main([a if a != "3" else "4" for a in args]) == 2  # other --folds on the same --out: refused
    assert "3-fold cross-validation" in capsys.readouterr().err


def test_a_cv_killed_while_writing_its_splits_resumes(tmp_path, monkeypatch):
    """Killed right after ``splits_0.csv`` (issue 29 item 9): the resume used to read a 1-fold cross-validation
    and ask for ``--folds 1``, itself invalid. The split set counts only once its completion marker is written."""
    from types import SimpleNamespace

    import fastmil.train.loop as loop
    from fastmil.train.cv import SPLITS_COMPLETE, cross_validate, draw_folds

    store = synthesize_store(SynthConfig(n_slides=12, dim=4, median_instances=40, min_instances=20, seed=1),
                             tmp_path / "store", progress=False)
    trained = []
    monkeypatch.setattr(loop, "fit", lambda store, run, cfg, **kw: trained.append(kw["split_csv"]) or SimpleNamespace(
        metrics={"test": {"auc": 0.5, "n": 4}}))
    out = tmp_path / "cv"
    from fastmil.train import TrainConfig

    first = draw_folds(store, TrainConfig(), 3, None)
    (out / "splits").mkdir(parents=True)
    write_splits(out / "splits" / "splits_0.csv", first[0])  # what the kill left
    cross_validate(store, out, folds=3, progress=False)
    assert len(trained) == 3 and (out / "splits" / SPLITS_COMPLETE).is_file()
    assert read_split_dir(out / "splits") == first
    cross_validate(store, out, folds=3, progress=False)  # a finished split set is read back, not redrawn
    with pytest.raises(ValueError, match="3-fold"):
        cross_validate(store, out, folds=4, progress=False)
