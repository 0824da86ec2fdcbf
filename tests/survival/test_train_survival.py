"""task: survival end to end: fit (plain and MHIM-MIL), evaluate, predict (KM plot), cross-validation, errors."""
import csv
import json

import pytest
import torch

from fastmil import Bags
from fastmil._config import ConfigError
from fastmil.data import SynthConfig, synthesize_store
from fastmil.survival import SurvivalRecord, group_logits, survival_nll
from fastmil.train import TrainConfig, evaluate, fit, predict
from fastmil.train.cv import cross_validate
from fastmil.train.survival_task import SurvivalRun
from tests.tolerance import check, rounding_bound

DATA = SynthConfig(n_slides=300, dim=32, median_instances=500, min_instances=200, max_instances=1500, size_sigma=0.4,
                   survival=True, seed=1)
SURVIVAL = {"model": {"embed_dim": 64, "attn_dim": 32, "dropout": 0.1}, "optim": {"epochs": 12, "lr": 2e-3},
            "data": {"test_fraction": 0.3},
            "run": {"patience": 12}, "task": "survival"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("survival")
    return root, synthesize_store(DATA, root / "store", progress=False)


@pytest.fixture(scope="module")
def trained(cohort):
    root, store = cohort
    return fit(store, root / "run", TrainConfig.from_dict(SURVIVAL), progress=False)


def test_abmil_learns_burden_driven_survival(cohort, trained):
    root, _ = cohort
    test = trained.metrics["test"]
    assert test["c_index"] >= 0.75, trained.metrics
    assert test["n_patients"] <= test["n"] and test["n_events"] > 0
    for name in ("survival.csv", "survival.json", "best.pt", "metrics.csv"):
        assert (root / "run" / name).is_file()
    rows = list(csv.DictReader(open(root / "run" / "metrics.csv")))
    assert {"train_nll", "val_c_index", "val_td_auc"} <= set(rows[0])
    edges = json.loads((root / "run" / "survival.json").read_text())["edges"]
    assert len(edges) == 3 and edges == sorted(edges)
    assert json.loads((root / "run" / "metrics.json").read_text())["test"]["c_index"] == test["c_index"]


def test_patients_never_cross_splits(cohort, trained):
    root, _ = cohort
    run = SurvivalRun.load(root / "run")
    from fastmil.data import read_splits_csv

    owner = {s: name for name, ids in read_splits_csv(root / "run" / "splits.csv").items() for s in ids}
    by_case = {}
    for sid, rec in run.records.items():
        by_case.setdefault(rec.case_id, set()).add(owner[sid])
    assert all(len(splits) == 1 for splits in by_case.values())


def test_step_loss_groups_a_patients_slides():
    run = SurvivalRun({"a": SurvivalRecord("p", 5.0, True), "b": SurvivalRecord("p", 5.0, True),
                       "c": SurvivalRecord("q", 1.0, False)}, [2.0, 4.0, 8.0], 0.25)
    bags = Bags.from_list([torch.zeros(2, 3)] * 3, ids=["a", "c", "b"])
    logits = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grouped = group_logits(logits, torch.tensor([0, 1, 0]))  # p = mean of a and b, q = c
    expected = survival_nll(grouped, torch.tensor([2, 0]), torch.tensor([True, False]), 0.25)  # fp64 throughout
    expected.backward()
    actual = run.loss_fn(logits.detach(), bags)  # groups and takes the NLL in fp32
    # depth: the patient mean of 2 slides (sum, division), logsigmoid (3), the cumsum over the 4 bins, the two log
    # terms' sum, the alpha mix (3), the mean over the 2 patients and its division; the rounding of the logits to
    # fp32 enters once, amplified by the loss's condition in them, sum |x dL/dx| / L
    depth = 2 + 3 + 4 + 1 + 3 + 2 + 1
    condition = float((logits.detach().abs() * logits.grad.abs()).sum() / expected.detach().abs())
    check(abs(actual.item() - expected.item()) / abs(expected.item()), rounding_bound(depth, extra=condition),
          "survival", "step loss fp32")


def test_evaluate_and_predict_write_km_plots(cohort, trained, tmp_path):
    root, store = cohort
    metrics = evaluate(root / "run", store, progress=False)
    assert metrics["test"]["c_index"] == pytest.approx(trained.metrics["test"]["c_index"])
    out = predict(root / "run", store, tmp_path / "pred", split="test", heatmaps=False, top_k=0, progress=False)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert {"case_id", "time", "event", "risk", "patient_risk", "hazard_0", "hazard_3"} <= set(rows[0])
    assert all(0 < float(r["hazard_0"]) < 1 for r in rows)
    report = json.loads((out / "metrics.json").read_text())
    assert report["test"]["c_index"] == pytest.approx(trained.metrics["test"]["c_index"])
    assert 0 <= report["test"]["logrank_p"] <= 1
    assert (out / "km_test.png").stat().st_size > 10_000


def test_mhim_two_stage_survival(cohort, trained, tmp_path):
    """The README's two-stage recipe with task: survival: the plain run's model initialises teacher and student."""
    root, store = cohort
    cfg = TrainConfig.from_dict({**SURVIVAL, "method": {"name": "mhim", "teacher_init": str(root / "run"),
                                                        "high_ratio": 0.01}, "optim": {"epochs": 3, "lr": 2e-4}})
    result = fit(store, tmp_path / "mhim", cfg, progress=False)
    assert {"nll", "consistency", "keep_frac"} <= set(result.history[-1]["train"])
    assert result.metrics["test"]["c_index"] >= 0.75, result.metrics


def test_cross_validation_pools_test_folds(cohort, tmp_path):
    _, store = cohort
    cfg = TrainConfig.from_dict({**SURVIVAL, "optim": {"epochs": 1}})
    rows = cross_validate(store, tmp_path / "cv", cfg, folds=2, progress=False)
    assert {"c_index", "td_auc", "n_patients"} <= {r["metric"] for r in rows}
    assert (tmp_path / "cv" / "km_test.png").is_file()
    risks = list(csv.DictReader(open(tmp_path / "cv" / "test_risks.csv")))
    assert {r["fold"] for r in risks} == {"0", "1"}
    summary = {r["metric"]: r for r in csv.DictReader(open(tmp_path / "cv" / "summary.csv"))}
    p = float(summary["logrank_p_pooled"]["mean"])
    assert 0 <= p <= 1 and summary["logrank_p_pooled"]["fold_0"] == ""
    assert f"logrank_p_pooled = {p:.3g}" in (tmp_path / "cv" / "summary.md").read_text()


def test_survival_errors(tmp_path):
    store = synthesize_store(SynthConfig(n_slides=6, dim=8, median_instances=30, min_instances=10), tmp_path / "s",
                             progress=False)
    with pytest.raises(ValueError, match="no survival targets"):
        fit(store, tmp_path / "run", TrainConfig.from_dict({"task": "survival"}), progress=False)
    with pytest.raises(ConfigError, match="not a survival metric"):
        TrainConfig.from_dict({"task": "survival", "run": {"monitor": "auc"}})


@pytest.mark.parametrize("name", ["plain", "mhim", "srmil", "mhim+srmil"])
def test_every_method_takes_the_survival_loss(name):
    """Each method's label terms come from the task's loss (named nll), its own terms unchanged, and gradients
    reach the head."""
    from fastmil.methods import StepContext, build_method, method_config
    from fastmil.nn import model_config

    g = torch.Generator().manual_seed(0)
    feats, coords, ids = [], [], []
    for b, n in enumerate((30, 1, 57)):
        cells = torch.randperm(100, generator=g)[:n]
        coords.append(torch.stack([cells % 10 * 256, cells // 10 * 256], 1))
        feats.append(torch.randn(n, 6, generator=g))
        ids.append(f"s{b}")
    bags = Bags.from_list(feats, coords=coords, ids=ids)  # no labels: survival needs none
    run = SurvivalRun({"s0": SurvivalRecord("p", 3.0, True), "s1": SurvivalRecord("p", 3.0, True),
                       "s2": SurvivalRecord("q", 9.0, False)}, [2.0, 5.0, 8.0], 0.0)
    spatial = "srmil" in name
    model = ({"name": "graphmil", "heads": 2, "head_dim": 8, "radius": 1, "head_hidden": 8, "dropout": 0.0}
             if spatial else {"name": "abmil", "embed_dim": 16, "attn_dim": 8})
    options = {"recycle_tokens": 2, "recycle_heads": 2} if "mhim" in name else {}
    torch.manual_seed(0)
    method = build_method(method_config({"name": name, **options}), model_config(model), 6, 4)
    ctx = StepContext(epoch=0, step=0, steps_per_epoch=1, epochs=1, seed=0, loss_fn=run.loss_fn, loss_name="nll")
    out = method.training_step(bags, ctx)
    expected = {"plain": {"nll"}, "mhim": {"nll", "consistency"}, "srmil": {"nll_masked", "nll_clean", "recon"},
                "mhim+srmil": {"nll", "consistency", "nll_masked", "recon"}}[name]
    assert expected <= set(out.terms) and not any(k.startswith("ce") for k in out.terms)
    out.loss.backward()
    head = method.model.head[-1] if spatial else method.model.classifier  # the last layer: one logit per bin
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_splits_and_run_folder_errors(cohort, tmp_path):
    _, store = cohort
    records = {"a": SurvivalRecord("p", 1.0, True), "b": SurvivalRecord("p", 1.0, True)}
    from fastmil.train.config import TaskConfig

    with pytest.raises(ValueError, match="patient 'p' has slides in two splits: 'a' in 'train' and 'b' in 'test'"):
        SurvivalRun.for_splits(records, {"train": ["a"], "val": [], "test": ["b"]}, TaskConfig(name="survival"))
    (tmp_path / "survival.csv").write_text("slide_id,time,event\na,1,1\n")
    (tmp_path / "survival.json").write_text('{"edges": [1.0]}')
    with pytest.raises(ValueError, match="survival.json: damaged"):
        SurvivalRun.load(tmp_path)


def test_resume_uses_the_runs_own_targets(cohort, tmp_path):
    """A resumed survival run continues with the targets it started with, whatever the store holds now."""
    root, store = cohort
    cfg = TrainConfig.from_dict({**SURVIVAL, "optim": {"epochs": 1}})
    fit(store, tmp_path / "run", cfg, progress=False)
    saved = (tmp_path / "run" / "survival.csv").read_text()
    original = store.attrs["survival"]
    try:
        store.update_attrs(survival={s: [c, t + 100.0, e] for s, (c, t, e) in original.items()})
        result = fit(store, tmp_path / "run", cfg.with_overrides(["optim.epochs=2"]), resume=True, progress=False)
    finally:
        store.update_attrs(survival=original)
    assert len(result.history) == 2
    assert (tmp_path / "run" / "survival.csv").read_text() == saved
