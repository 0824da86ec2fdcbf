"""Survival targets: the CSV (and its errors), the store's copy, patients, group splits, the synthetic cohort."""
import numpy as np
import pytest

from fastmil.data import SynthConfig, create_store, synthesize_store
from fastmil.data.synthetic import survival_case, survival_outcome
from fastmil.survival import SurvivalRecord, concordance_index, read_survival_csv, survival_targets, write_survival_csv
from fastmil.survival.targets import write_survival_to_store
from fastmil.train.splits import make_group_splits


def _csv(tmp_path, text):
    path = tmp_path / "surv.csv"
    path.write_text(text)
    return path


def test_csv_reads_patients_and_round_trips(tmp_path):
    records = read_survival_csv(_csv(tmp_path, "slide_id,case_id,time,event\na,p1,10.5,1\nb,p1,10.5,true\n"
                                               "c,p2,3,0\nd,,7,alive\n"))
    assert records == {"a": SurvivalRecord("p1", 10.5, True), "b": SurvivalRecord("p1", 10.5, True),
                       "c": SurvivalRecord("p2", 3.0, False), "d": SurvivalRecord("d", 7.0, False)}
    write_survival_csv(tmp_path / "back.csv", records)
    assert read_survival_csv(tmp_path / "back.csv") == records


@pytest.mark.parametrize("text, match", [
    ("slide_id,time\na,1\n", "missing \\['event'\\]"),
    ("slide_id,time,event\na,soon,1\n", "slide 'a' has time 'soon'"),
    ("slide_id,time,event\na,-1,1\n", "slide 'a' has time -1.0"),
    ("slide_id,time,event\na,nan,1\n", "slide 'a' has time nan"),
    ("slide_id,time,event\na,1,maybe\n", "slide 'a' has event 'maybe'"),
    ("slide_id,case_id,time,event\na,p,1,1\nb,p,2,1\n", "patient 'p' has slides with different survival"),
    ("slide_id,time,event\na,1,1\na,2,1\n", "slide 'a' listed twice"),
    ("slide_id,time,event\n", "no rows"),
])
def test_csv_errors_name_the_problem(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_survival_csv(_csv(tmp_path, text))


def test_store_copy_and_missing_targets(tmp_path):
    store = create_store(tmp_path / "store")
    store.write_slide("a", np.zeros((3, 4), np.float32), None)
    with pytest.raises(ValueError, match="no survival targets"):
        survival_targets(store)
    with pytest.raises(ValueError, match="not in the store"):
        write_survival_to_store(store, {"zz": SurvivalRecord("p", 1.0, True)})
    write_survival_to_store(store, {"a": SurvivalRecord("p", 2.0, True)})
    assert survival_targets(store) == {"a": SurvivalRecord("p", 2.0, True)}
    csv_path = _csv(tmp_path, "slide_id,time,event\na,5,0\nother,1,1\n")
    with pytest.warns(UserWarning, match="1 target\\(s\\) for slides not in the store and 0 store slide"):
        assert survival_targets(store, csv_path) == {"a": SurvivalRecord("a", 5.0, False)}  # the CSV wins


def test_group_splits_keep_patients_together():
    strata = {f"s{i}": i % 2 for i in range(60)}
    groups = {f"s{i}": f"p{i // 3}" for i in range(60)}
    splits = make_group_splits(strata, groups, 0.2, 0.2, seed=0)
    owner = {s: name for name, ids in splits.items() for s in ids}
    assert sorted(owner) == sorted(strata)
    for p in set(groups.values()):
        assert len({owner[s] for s in strata if groups[s] == p}) == 1
    assert all(splits[name] for name in ("train", "val", "test"))


def test_synthetic_survival_cohort(tmp_path):
    cfg = SynthConfig(n_slides=40, dim=8, median_instances=80, min_instances=20, size_sigma=0.3, survival=True)
    store = synthesize_store(cfg, tmp_path / "store", progress=False)
    records = survival_targets(store)
    assert sorted(records) == store.slide_ids
    by_case = {}
    for sid, rec in records.items():
        by_case.setdefault(rec.case_id, []).append(sid)
        assert store.slide_attrs(sid)["case_id"] == rec.case_id
    assert any(len(v) == 2 for v in by_case.values())  # some patients have two slides
    for sids in by_case.values():  # the same burden in each slide of a patient
        assert len({store.label(s) for s in sids}) == 1
    # the hazard rises with the burden: over many patients the burden orders the outcomes
    big = SynthConfig(n_slides=600, survival=True)
    cases = dict(survival_case(big, i) for i in range(600))
    outcomes = [survival_outcome(big, c, b) for c, b in cases.items()]
    c_index = concordance_index(np.array([t for t, _ in outcomes]), np.array([e for _, e in outcomes]),
                                np.array(list(cases.values())))
    assert c_index > 0.8
