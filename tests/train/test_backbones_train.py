"""Every backbone of the backbones issue trains from the CLI, plain and as MHIM-MIL's student and teacher (the README's
two-stage recipe), logs its own loss terms, and evaluates and predicts (heatmaps of its documented attention) like
any run. How well each learns is not asserted here: on this 24-slide cohort a few epochs decide nothing (see the
backbones issue's note for the cohort runs)."""
from __future__ import annotations

import json

import pytest

from fastmil.cli import main
from fastmil.data import SynthConfig, synthesize_store
from fastmil.train import load_method, predict

DATA = SynthConfig(n_slides=24, dim=32, median_instances=150, size_sigma=0.3, tumour_fraction_min=0.02,
                   tumour_fraction_max=0.05, seed=3)
OWN_TERMS = {"dsmil": {"max_instance"}, "clam_sb": {"instance"}, "clam_mb": {"instance"}, "transmil": set()}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthesize_store(DATA, tmp_path_factory.mktemp("backbones") / "store", progress=False)


@pytest.mark.parametrize("name", sorted(OWN_TERMS))
def test_backbone_trains_plain_and_under_mhim_from_the_cli(store, tmp_path, name):
    common = ["--store", str(store.path), "-q", "--model", name, "optim.lr=1e-3", "model.embed_dim=128",
              "model.dropout=0.1", *(["model.landmarks=64"] if name == "transmil" else [])]
    assert main(["train", "--out", str(tmp_path / "plain"), "--epochs", "2", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "mhim"), "--epochs", "2", *common, "--method", "mhim",
                 f"method.teacher_init={tmp_path / 'plain'}"]) == 0
    for run, terms in (("plain", OWN_TERMS[name]), ("mhim", OWN_TERMS[name] | {"consistency", "keep_frac"})):
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert 0.0 <= metrics["test"]["auc"] <= 1.0 and metrics["test"]["n"] > 0, (run, metrics["test"])
        history = json.loads((tmp_path / run / "history.json").read_text())
        assert {"ce"} | terms <= set(history[-1]["train"]), history[-1]["train"]
    method, cfg, _ = load_method(tmp_path / "mhim", store)
    assert cfg.model.name == name and type(method.model).__name__.lower().replace("_", "") == name.replace("_", "")
    out = predict(tmp_path / "mhim", store, tmp_path / "pred", store.slide_ids[:2], progress=False)
    assert (out / "heatmaps" / f"{store.slide_ids[0]}.png").is_file()
    assert main(["eval", "--run", str(tmp_path / "mhim"), "--store", str(store.path), "-q"]) == 0
