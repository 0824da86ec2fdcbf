"""Ray Tune sweeps: a tiny ASHA sweep to completion, a trial killed (SIGKILL) mid-training restarted from its last
checkpoint without losing or repeating epochs, and an interrupted sweep resumed without rerunning finished trials."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fastmil.data import SynthConfig, synthesize_store
from fastmil.train.config import load_config

REPO = Path(__file__).resolve().parents[2]
DATA = SynthConfig(n_slides=20, dim=12, median_instances=70, min_instances=40, size_sigma=0.3, tumour_fraction_min=0.05,
                   tumour_fraction_max=0.1, seed=6)
BASE = {"model.embed_dim": 16, "model.attn_dim": 8, "optim.epochs": 2, "run.patience": 5}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return synthesize_store(DATA, tmp_path_factory.mktemp("sweep") / "store", progress=False)


def _spec(store, out, **extra):
    from ray_jobs.space import load_spec

    spec = {"store": str(store.path), "out": str(out), "base": BASE,
            "search_space": {"optim.lr": {"grid": [1e-3, 3e-3, 1e-2]}}, "num_samples": 1,
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}, "max_concurrent": 2,
            "max_failures": 1, **extra}
    path = Path(out).with_suffix(".yaml")
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path), path


def test_tiny_asha_sweep_writes_results_and_the_best_config(ray_local, store, tmp_path):
    from ray_jobs.sweep import run_sweep

    spec, _ = _spec(store, tmp_path / "sweep")
    summary = run_sweep(spec)
    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == 3 and set(table["status"]) == {"done"}
    assert sorted(table["optim.lr"]) == [1e-3, 3e-3, 1e-2]
    best = table.loc[table["val_auc"].idxmax()]
    assert summary["best_config"] == {"optim.lr": best["optim.lr"]}
    cfg = load_config(tmp_path / "sweep" / "best_config.yaml")  # usable as fastmil train --config
    assert cfg.optim.lr == best["optim.lr"] and cfg.model.embed_dim == 16 and cfg.optim.epochs == 2
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000
    assert table["epochs"].between(1, 2).all()  # ASHA may stop a trial after its first epoch


def test_a_killed_trial_restarts_from_its_last_checkpoint(ray_local, store, tmp_path, monkeypatch):
    from ray_jobs.sweep import FAULT_ENV, run_sweep

    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"{marker}:1")  # SIGKILL after reporting epoch 1 (0-based) of 4
    spec, _ = _spec(store, tmp_path / "sweep", search_space={"optim.lr": {"grid": [3e-3]}},
                    base={**BASE, "optim.epochs": 4}, scheduler={"name": "fifo"})
    run_sweep(spec)
    assert marker.is_file()  # the trial's process was killed once
    trials = [p for p in (tmp_path / "sweep" / "trials").iterdir() if p.is_dir()]
    assert len(trials) == 1
    reported = [json.loads(line)["epoch"] for line in (trials[0] / "result.json").read_text().splitlines()]
    assert reported == [0, 1, 2, 3]  # nothing lost, nothing repeated: epochs 2-3 ran after the restart
    last = sorted(trials[0].glob("checkpoint_*"))[-1]
    history = json.loads((last / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    assert pd.read_csv(tmp_path / "sweep" / "results.csv")["status"].tolist() == ["done"]


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(ray_local, store, tmp_path):
    from ray_jobs.space import load_spec
    from ray_jobs.sweep import run_sweep

    _, path = _spec(store, tmp_path / "sweep", base={**BASE, "optim.epochs": 3}, scheduler={"name": "fifo"},
                    max_concurrent=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "ray_jobs.sweep", "--config", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    trials = tmp_path / "sweep" / "trials"
    deadline = time.monotonic() + 600  # a ceiling: on a loaded machine the second trial starts minutes in

    def finished() -> list[Path]:
        """Trials Tune has closed. One trial runs at a time, so of the trials that have reported, every one but the
        last written to has returned (3 reported epochs alone can precede the return, and Tune restarts a trial that
        was still running when interrupted)."""
        reported = [p for p in trials.glob("*/result.json") if p.stat().st_size]
        reported.sort(key=lambda p: p.stat().st_mtime)
        return [p for p in reported[:-1] if len(p.read_text().splitlines()) >= 3]

    while not finished() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert finished(), "no trial finished before the deadline"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment state and stops
    proc.wait(timeout=120)
    first = finished()[0]
    lines_before = first.read_text().splitlines()
    summary = run_sweep(load_spec(path), resume=True)
    assert first.read_text().splitlines() == lines_before  # the finished trial did not run again
    table = pd.read_csv(tmp_path / "sweep" / "results.csv")
    assert len(table) == 3 and set(table["status"]) == {"done"}
    # every trial trained all its epochs; one interrupted mid-run may have repeated the epochs after its last
    # checkpoint that Tune had saved when the signal came (the finished trial, checked above, repeated nothing)
    assert table["epochs"].tolist() == [3, 3, 3]
    assert summary["best_metric"] == table["val_auc"].max()


def test_k_fold_scoring_reports_the_mean_best_validation_metric(ray_local, store, tmp_path):
    from ray_jobs.sweep import run_sweep

    spec, _ = _spec(store, tmp_path / "sweep", search_space={"optim.lr": {"grid": [3e-3]}}, folds=2,
                    scheduler={"name": "fifo"})
    summary = run_sweep(spec)
    trial = next(p for p in (tmp_path / "sweep" / "trials").iterdir() if p.is_dir())
    reports = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert [r["folds_done"] for r in reports] == [1, 2]
    last = sorted(trial.glob("checkpoint_*"))[-1]
    scores = json.loads((last / "folds.json").read_text())["scores"]
    assert len(scores) == 2 and reports[-1]["val_auc"] == pytest.approx(sum(scores) / 2)
    assert summary["best_metric"] == pytest.approx(reports[-1]["val_auc"])  # all folds, not the running mean's max
