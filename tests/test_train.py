"""End to end: fit / evaluate / predict on synthetic slides, resume after a kill, bad inputs."""
import csv
import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastmil.cli import main
from fastmil.data import SynthConfig, create_store, synthesize_store
from fastmil.train import TrainConfig, evaluate, fit, predict
from fastmil.train.checkpoint import load_checkpoint

DATA = SynthConfig(n_slides=60, dim=32, median_instances=300, size_sigma=0.3, tumour_fraction_min=0.02,
                   tumour_fraction_max=0.05, seed=3)
TRAIN = TrainConfig(epochs=8, lr=1e-3, embed_dim=128, attn_dim=64, dropout=0.1, patience=8, seed=0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    store = synthesize_store(DATA, root / "store", progress=False)
    result = fit(store, root / "run", TRAIN, progress=False)
    return root, store, result


def test_fit_learns_the_needle_and_writes_the_run_folder(trained):
    root, _, result = trained
    assert result.metrics["test"]["auc"] >= 0.9, result.metrics
    assert result.metrics["val"]["auc"] >= 0.9
    for name in ("config.yaml", "splits.csv", "last.pt", "best.pt", "history.json", "metrics.json"):
        assert (root / "run" / name).is_file(), name
    saved = json.loads((root / "run" / "metrics.json").read_text())
    assert saved["test"]["auc"] == result.metrics["test"]["auc"]
    assert set(saved["test"]) >= {"auc", "balanced_accuracy", "macro_f1", "macro_recall", "per_class_recall",
                                  "confusion_matrix", "loss"}
    # checkpoints load without unpickling arbitrary objects
    assert torch.load(root / "run" / "last.pt", weights_only=True)["epoch"] == len(result.history) - 1


def test_attention_concentrates_on_tumour(trained):
    root, store, _ = trained
    out = predict(root / "run", store, root / "pred", heatmaps=False, progress=False)
    ratios = []
    for sid in store.slide_ids:
        truth = store.read_instance_labels(sid)
        if store.label(sid) != 1:
            continue
        att = np.load(out / "attention" / f"{sid}.npy")
        assert att.shape == truth.shape and abs(att.sum() - 1) < 1e-4
        ratios.append(att[truth == 1].mean() / att[truth == 0].mean())
    assert len(ratios) >= 10 and np.mean(ratios) >= 5.0 and np.median(ratios) >= 5.0, ratios


def test_predict_writes_csv_heatmaps_and_roc(trained):
    root, store, _ = trained
    ids = store.slide_ids[:3]
    out = predict(root / "run", store, root / "pred2", ids, progress=False)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["slide_id"] for r in rows] == ids
    for r in rows:
        assert abs(float(r["prob_normal"]) + float(r["prob_tumour"]) - 1) < 1e-5
        assert r["label"] in ("normal", "tumour") and r["pred"] in ("normal", "tumour")
    import matplotlib
    from matplotlib.image import imread

    hottest = np.array(matplotlib.colormaps["inferno"](1.0)[:3])  # colour of attention == the slide's max
    images = []
    for sid in ids:
        img = imread(out / "heatmaps" / f"{sid}.png")[..., :3]
        panels = 2  # attention beside the ground truth: synthetic slides carry per-patch labels
        assert img.shape[1] > 0.8 * panels * img.shape[0], img.shape
        assert np.any(np.abs(img - hottest).max(axis=-1) < 0.02), f"{sid}: no patch drawn at max attention"
        images.append(img)
    assert not np.array_equal(images[0], images[1])
    labels = {store.label(s) for s in ids}
    assert (out / "roc.png").exists() == (len(labels) > 1)


def test_cli_eval_and_predict(trained, capsys):
    root, _, _ = trained
    assert main(["eval", "--run", str(root / "run"), "--store", str(root / "store"), "-q"]) == 0
    assert "test" in capsys.readouterr().out
    assert main(["predict", "--run", str(root / "run"), "--store", str(root / "store"), "--out",
                 str(root / "pred3"), "--slides", "synth-00000", "--no-heatmaps", "-q"]) == 0
    assert (root / "pred3" / "attention" / "synth-00000.npy").exists()


SMALL = SynthConfig(n_slides=16, dim=8, median_instances=60, min_instances=16, size_sigma=0.2, seed=1)
SMALL_TRAIN = dict(epochs=3, lr=1e-3, embed_dim=8, attn_dim=4, dropout=0.25, patience=10, seed=7,
                   val_fraction=0.25, test_fraction=0.0)

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from fastmil.train import TrainConfig, fit
    def kill(epoch, step, loss):
        if epoch == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    fit(sys.argv[1], sys.argv[2], TrainConfig(**{kw}), progress=False, step_callback=kill)
""")


def test_resume_after_kill_reproduces_uninterrupted_weights(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    full = fit(store, tmp_path / "full", TrainConfig(**SMALL_TRAIN), progress=False)
    script = _KILL_SCRIPT.format(kw=repr(SMALL_TRAIN))
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store"), str(tmp_path / "killed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["epoch"] == 0  # died inside epoch 1
    with pytest.raises(ValueError, match="pass --resume"):
        fit(store, tmp_path / "killed", TrainConfig(**SMALL_TRAIN), progress=False)
    resumed = fit(store, tmp_path / "killed", TrainConfig(**SMALL_TRAIN), resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history == full.history


def test_resume_with_another_config_is_refused(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    fit(store, tmp_path / "run", TrainConfig(**{**SMALL_TRAIN, "epochs": 1}), progress=False)
    with pytest.raises(ValueError, match="cannot resume with a different config \\(embed_dim"):
        fit(store, tmp_path / "run", TrainConfig(**{**SMALL_TRAIN, "embed_dim": 16}), resume=True, progress=False)


def test_one_class_store_is_refused(tmp_path):
    store = synthesize_store(SynthConfig(n_slides=4, dim=4, median_instances=20, min_instances=8, positive_fraction=0.0),
                             tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match="one class \\('normal'\\)"):
        fit(store, tmp_path / "run", TrainConfig(**SMALL_TRAIN), progress=False)
    assert main(["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "r"), "-q"]) == 2


def test_split_csv_naming_missing_slides(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    split = tmp_path / "splits_0.csv"
    split.write_text(",train,val,test\n0,synth-00000,synth-00001,\n1,ghost-slide,,\n")
    with pytest.raises(ValueError, match="not in store.*'ghost-slide'"):
        fit(store, tmp_path / "run", TrainConfig(**SMALL_TRAIN), split_csv=split, progress=False)


def test_checkpoint_from_another_model_config(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    fit(store, tmp_path / "run", TrainConfig(**{**SMALL_TRAIN, "epochs": 1}), progress=False)
    cfg_path = tmp_path / "run" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("embed_dim: 8", "embed_dim: 12"))
    with pytest.raises(ValueError, match="another model config.*embed_dim: checkpoint 8 vs now 12"):
        evaluate(tmp_path / "run", store, progress=False)
    other = create_store(tmp_path / "other")
    other.write_slide("x", np.zeros((3, 5), np.float32), attrs={"label": 0})
    other.write_slide("y", np.ones((3, 5), np.float32), attrs={"label": 1})
    cfg_path.write_text(cfg_path.read_text().replace("embed_dim: 12", "embed_dim: 8"))
    with pytest.raises(ValueError, match="expects 8-dim features.*has 5"):
        predict(tmp_path / "run", other, tmp_path / "p", progress=False)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['lr_typo'\\]"):
        TrainConfig.from_dict({"lr_typo": 1})
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="transmil")
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="int8")


def test_same_seed_same_numbers(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    cfg = TrainConfig(**{**SMALL_TRAIN, "epochs": 2})
    fit(store, tmp_path / "a", cfg, progress=False)
    fit(store, tmp_path / "b", cfg, progress=False)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attention_grid_places_each_patch_in_its_cell():
    from fastmil.train.predict import attention_grid

    coords = np.array([[1000, 2000], [1512, 2000], [1000, 3024], [2024, 3024]])  # 512 px stride, origin offset
    grid = attention_grid(coords, np.array([0.1, 0.2, 0.3, 0.4]), stride=512)
    expected = np.full((3, 3), np.nan, np.float32)
    expected[0, 0], expected[0, 1], expected[2, 0], expected[2, 2] = 0.1, 0.2, 0.3, 0.4
    np.testing.assert_array_equal(grid, expected)
