"""End to end: fit / evaluate / predict on synthetic slides, resume after a kill, bad inputs."""
import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from sklearn import metrics as skm

from fastmil.checkpoint import load_checkpoint
from fastmil.cli import main
from fastmil.data import SynthConfig, create_store, read_splits_csv, synthesize_store
from fastmil.train import TrainConfig, evaluate, fit, predict
from tests.tolerance import check, rounding_bound

DATA = SynthConfig(n_slides=60, dim=32, median_instances=300, size_sigma=0.3, tumour_fraction_min=0.02,
                   tumour_fraction_max=0.05, seed=3)
TRAIN = TrainConfig.from_dict(model={"embed_dim": 128, "attn_dim": 64, "dropout": 0.1}, optim={"epochs": 8, "lr": 1e-3},
                              run={"patience": 8, "seed": 0})


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
    for name in ("config.yaml", "splits.csv", "last.pt", "best.pt", "history.json", "metrics.csv", "metrics.json"):
        assert (root / "run" / name).is_file(), name
    saved = json.loads((root / "run" / "metrics.json").read_text())
    assert saved["test"]["auc"] == result.metrics["test"]["auc"]
    assert set(saved["test"]) >= {"auc", "balanced_accuracy", "macro_f1", "macro_recall", "per_class_recall",
                                  "confusion_matrix", "loss"}
    # checkpoints load without unpickling arbitrary objects
    last = torch.load(root / "run" / "last.pt", weights_only=True)
    assert last["train_state"]["epochs_done"] == len(result.history)
    rows = list(csv.DictReader(open(root / "run" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(len(result.history)))
    assert float(rows[-1]["train_ce"]) == pytest.approx(result.history[-1]["train"]["ce"])
    assert float(rows[-1]["val_auc"]) == pytest.approx(result.history[-1]["val"]["auc"])
    assert all(float(r["time_compute_s"]) > 0 for r in rows)


def test_attention_concentrates_on_tumour(trained):
    root, store, _ = trained
    out = predict(root / "run", store, root / "pred", heatmaps=False, progress=False)
    ratios = []
    for sid in store.slide_ids:
        truth = store.read_instance_labels(sid)
        if store.label(sid) != 1:
            continue
        att = np.load(out / "attention" / f"{sid}.npy")
        assert att.shape == truth.shape
        # fp32 softmax weights of the bag's n rows summed here in fp32: the softmax's exp, its sum over the n rows
        # and the division, then this sum over the n rows (all terms > 0: condition 1)
        check(abs(float(att.sum()) - 1.0), rounding_bound(1 + 2 * len(att) + 1), "train", "attention sums to 1")
        ratios.append(att[truth == 1].mean() / att[truth == 0].mean())
    assert len(ratios) >= 10 and np.mean(ratios) >= 5.0 and np.median(ratios) >= 5.0, ratios


def test_predict_writes_csv_heatmaps_and_roc(trained):
    root, store, _ = trained
    ids = store.slide_ids[:3]
    out = predict(root / "run", store, root / "pred2", ids, progress=False)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert [r["slide_id"] for r in rows] == ids
    for r in rows:
        # each probability is written with 6 decimals (off by <= 0.5e-6 each), after an fp32 softmax over the 2
        # classes (exp, the 2-term sum, the division)
        error = abs(float(r["prob_normal"]) + float(r["prob_tumour"]) - 1)
        check(error, 2 * 0.5e-6 + rounding_bound(1 + 2 + 1), "train", "CSV probabilities sum to 1")
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
    split_of = {r["slide_id"]: r["split"] for r in rows}
    assert set(split_of.values()) <= {"train", "val", "test"}
    for name in set(split_of.values()):
        labels = {store.label(s) for s in ids if split_of[s] == name}
        assert (out / f"roc_{name}.png").exists() == (len(labels) > 1)
        assert (out / f"confusion_{name}.png").exists()
    assert not (out / "roc.png").exists()


def test_predictions_carry_the_split_and_curves_use_one_split_only(trained):
    """Every slide of the store: its split in predictions.csv equals the run's splits.csv; the per-split metrics
    (and so the curves) are computed from that split's rows alone; --split test predicts the test slides only."""
    root, store, _ = trained
    out = predict(root / "run", store, root / "pred_splits", heatmaps=False, progress=False)
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    run_splits = read_splits_csv(root / "run" / "splits.csv")
    assert {r["slide_id"]: r["split"] for r in rows} == {s: n for n, ids in run_splits.items() for s in ids}
    report = json.loads((out / "metrics.json").read_text())
    for name in ("train", "val", "test"):
        members = [r for r in rows if r["split"] == name]
        y = np.array([r["label"] == "tumour" for r in members])
        p = np.array([float(r["prob_tumour"]) for r in members])
        assert report[name]["n"] == len(members) == len(run_splits[name])
        # the report's AUC is of the fp32 probabilities, sklearn's here of their 6-decimal CSV copies; rounding is
        # monotone, so it can tie a positive with a negative but never reorder them: each pair tied here moves the
        # AUC by at most 1 / (2 n_pos n_neg); plus fp64 roundings of the ROC's cumulative sums over the n slides
        tied = int((p[y][:, None] == p[~y][None, :]).sum())
        allowed = tied / (2 * y.sum() * (~y).sum()) + rounding_bound(len(members), torch.float64)
        check(abs(report[name]["auc"] - skm.roc_auc_score(y, p)), allowed, "train", "AUC of the CSV")
        assert (out / f"pr_{name}.png").exists()
    test_only = predict(root / "run", store, root / "pred_test", split="test", heatmaps=False, progress=False)
    rows = list(csv.DictReader(open(test_only / "predictions.csv")))
    assert sorted(r["slide_id"] for r in rows) == sorted(run_splits["test"])
    assert set(json.loads((test_only / "metrics.json").read_text())) == {"test"}


def test_cli_eval_and_predict(trained, capsys):
    root, _, _ = trained
    assert main(["eval", "--run", str(root / "run"), "--store", str(root / "store"), "-q"]) == 0
    assert "test" in capsys.readouterr().out
    assert main(["predict", "--run", str(root / "run"), "--store", str(root / "store"), "--out",
                 str(root / "pred3"), "--slide-ids", "synth-00000", "--no-heatmaps", "-q"]) == 0
    assert (root / "pred3" / "attention" / "synth-00000.npy").exists()


SMALL = SynthConfig(n_slides=16, dim=8, median_instances=60, min_instances=16, size_sigma=0.2, seed=1)
SMALL_TRAIN = {"model": {"embed_dim": 8, "attn_dim": 4, "dropout": 0.25}, "optim": {"epochs": 3, "lr": 1e-3},
               "run": {"patience": 10, "seed": 7}, "data": {"val_fraction": 0.25, "test_fraction": 0.0}}


def small(**overrides) -> TrainConfig:
    """SMALL_TRAIN with ``section.key`` overrides (``small(**{"optim.epochs": 1})``)."""
    return TrainConfig.from_dict(SMALL_TRAIN).with_overrides(overrides)

_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    from fastmil.train import TrainConfig, fit
    torch.set_num_threads({threads})  # the test process's: the thread count decides torch's reduction order
    def kill(epoch, step, loss):
        if epoch == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    fit(sys.argv[1], sys.argv[2], TrainConfig.from_dict({kw}), progress=False, step_callback=kill)
""")


def test_resume_after_kill_reproduces_uninterrupted_weights(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    full = fit(store, tmp_path / "full", small(), progress=False)
    # bitwise equality holds because the killed run's first epoch runs the same kernels in the same order as the
    # uninterrupted run's: same code path (MKL_CBWR, ATEN_CPU_CAPABILITY come with the environment), same threads
    script = _KILL_SCRIPT.format(kw=repr(SMALL_TRAIN), threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store"), str(tmp_path / "killed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["train_state"]["epochs_done"] == 1  # died in epoch 1
    with pytest.raises(ValueError, match="pass --resume"):
        fit(store, tmp_path / "killed", small(), progress=False)
    resumed = fit(store, tmp_path / "killed", small(), resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["method_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda h: [{k: v for k, v in r.items() if k != "time"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_resume_with_another_config_is_refused(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    fit(store, tmp_path / "run", small(**{"optim.epochs": 1}), progress=False)
    with pytest.raises(ValueError, match="cannot resume with a different config \\(model.embed_dim"):
        fit(store, tmp_path / "run", small(**{"model.embed_dim": 16}), resume=True, progress=False)


def test_one_class_store_is_refused(tmp_path):
    one_class = SynthConfig(n_slides=4, dim=4, median_instances=20, min_instances=8, positive_fraction=0.0)
    store = synthesize_store(one_class, tmp_path / "store", progress=False)
    with pytest.raises(ValueError, match="one class \\('normal'\\)"):
        fit(store, tmp_path / "run", small(), progress=False)
    assert main(["train", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "r"), "-q"]) == 2


def test_empty_store_says_so(tmp_path):
    create_store(tmp_path / "empty")
    with pytest.raises(ValueError, match="the store holds no slides"):
        fit(tmp_path / "empty", tmp_path / "run", small(), progress=False)


def test_split_csv_naming_missing_slides(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    split = tmp_path / "splits_0.csv"
    split.write_text(",train,val,test\n0,synth-00000,synth-00001,\n1,ghost-slide,,\n")
    with pytest.raises(ValueError, match="not in store.*'ghost-slide'"):
        fit(store, tmp_path / "run", small(), split_csv=split, progress=False)


def test_checkpoint_from_another_model_config(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    fit(store, tmp_path / "run", small(**{"optim.epochs": 1}), progress=False)
    cfg_path = tmp_path / "run" / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("embed_dim: 8", "embed_dim: 12"))
    with pytest.raises(ValueError, match="another model config.*embed_dim"):
        evaluate(tmp_path / "run", store, progress=False)
    other = create_store(tmp_path / "other")
    other.write_slide("x", np.zeros((3, 5), np.float32), attrs={"label": 0})
    other.write_slide("y", np.ones((3, 5), np.float32), attrs={"label": 1})
    cfg_path.write_text(cfg_path.read_text().replace("embed_dim: 12", "embed_dim: 8"))
    with pytest.raises(ValueError, match="expects 8-dim features.*has 5"):
        predict(tmp_path / "run", other, tmp_path / "p", progress=False)


def test_same_seed_same_numbers(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    cfg = small(**{"optim.epochs": 2})
    fit(store, tmp_path / "a", cfg, progress=False)
    fit(store, tmp_path / "b", cfg, progress=False)
    a = load_checkpoint(tmp_path / "a" / "last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["method_state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_attention_grid_places_each_patch_in_its_cell():
    from fastmil.train.predict import attention_grid

    coords = np.array([[1000, 2000], [1512, 2000], [1000, 3024], [2024, 3024]])  # 512 px stride, origin offset
    grid = attention_grid(coords, np.array([0.1, 0.2, 0.3, 0.4]), stride=512)
    expected = np.full((3, 3), np.nan, np.float32)
    expected[0, 0], expected[0, 1], expected[2, 0], expected[2, 2] = 0.1, 0.2, 0.3, 0.4
    np.testing.assert_array_equal(grid, expected)


def test_resume_with_more_epochs_continues_a_finished_run(tmp_path, capsys):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    fit(store, tmp_path / "run", small(**{"optim.epochs": 2}), progress=False)
    again = fit(store, tmp_path / "run", small(**{"optim.epochs": 2}), resume=True, progress=True)
    assert len(again.history) == 2 and "run finished all 2 epochs" in capsys.readouterr().out
    longer = fit(store, tmp_path / "run", small(**{"optim.epochs": 4}), resume=True, progress=False)
    assert [r["epoch"] for r in longer.history] == [0, 1, 2, 3]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["optim"]["epochs"] == 4


def test_plain_line_per_epoch_when_stdout_is_not_a_terminal(tmp_path, capsys):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    fit(store, tmp_path / "run", small(**{"optim.epochs": 2}), progress=True)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in lines] == ["1/2", "2/2"]
    assert "train_ce" in lines[0] and "val_auc" in lines[0] and "\r" not in out


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    fit(store, tmp_path / "run", small(**{"optim.epochs": 2}), progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/ce", "train/loss", "val/auc"} <= set(tags)
    assert [e.step for e in events.Scalars("train/ce")] == [0, 1]


def test_predict_refuses_a_path_as_slide_id_and_writes_nothing_outside(trained, tmp_path):
    """``--slide-ids ../../victim/slides/v`` used to read outside the store and write ``v.npy`` outside ``--out``
    (issue 29 item 3): an id that is a path names no slide."""
    root, store, _ = trained
    outside = create_store(tmp_path / "victim")  # a slide outside the store, of the right width
    outside.write_slide("v", np.ones((20, store.dim), np.float32))
    outside.close()
    victim = tmp_path / "victim" / "slides" / "v"
    sneaky = os.path.relpath(victim, store.path / "slides")
    with pytest.raises(ValueError, match="not in store"):
        predict(root / "run", store, tmp_path / "out" / "deep", [sneaky])
    assert sorted(p.name for p in victim.parent.iterdir()) == ["v"] and not (tmp_path / "out").exists()


class _ListLoader(list):
    def set_epoch(self, epoch):
        pass


def _plain_run_with_an_overflowing_bag(amp: str):
    """A small plain-ABMIL stepper and four one-bag batches, the third with features near fp32's limit."""
    from fastmil.bags import Bags
    from fastmil.methods import build_method, method_config
    from fastmil.nn import model_config
    from fastmil.train.step import Stepper

    torch.manual_seed(0)
    method = build_method(method_config({"name": "plain"}), model_config({"embed_dim": 8, "attn_dim": 4}), 4, 2)
    g = torch.Generator().manual_seed(0)
    batches = [Bags.from_list([torch.randn(5, 4, generator=g)], labels=[i % 2]) for i in range(4)]
    batches[2] = Bags.from_list([torch.full((5, 4), 3e38)], labels=[1], validate=False)
    return Stepper(method, TrainConfig().optim, amp, torch.device("cpu")), batches


def test_a_non_finite_loss_stops_training_naming_the_step():
    """Features near fp32's limit used to train on to a loss of 1e29 or NaN and exit 0 (issue 29 item 14)."""
    from fastmil.train.epoch import DivergedError, train_epoch

    stepper, batches = _plain_run_with_an_overflowing_bag("none")
    with pytest.raises(DivergedError, match=r"loss is (nan|inf) at epoch 0 step 2"):
        train_epoch(stepper, _ListLoader(batches), 0, epochs=1, seed=0, device=torch.device("cpu"),
                    class_weight=None)


def test_an_exploding_loss_is_a_warning():
    from fastmil.train.loop import _warn_if_exploding

    history = [{"train": {"loss": 0.7}}, {"train": {"loss": 0.5}}]
    _warn_if_exploding(history)  # no warning
    history.append({"train": {"loss": 500.0}})
    with pytest.warns(RuntimeWarning, match="exploding: 500 in epoch 2 against 0.7"):
        _warn_if_exploding(history)
    history.append({"train": {"loss": 1e29}})
    with pytest.warns(RuntimeWarning, match="1e\\+29 in epoch 3: training has exploded"):
        _warn_if_exploding(history)


def test_with_fp16_loss_scaling_one_overflowing_step_is_survived_and_all_is_not():
    """The scaler skips a step whose gradients are not finite, so one bad bag leaves the weights as they were;
    an epoch of nothing but bad steps is still an error."""
    from fastmil.train.epoch import DivergedError, train_epoch

    stepper, batches = _plain_run_with_an_overflowing_bag("fp16")
    method = stepper.method
    stats = train_epoch(stepper, _ListLoader(batches), 0, epochs=1, seed=0, device=torch.device("cpu"),
                        class_weight=None)
    assert stats.steps == 4 and all(bool(torch.isfinite(p).all()) for p in method.parameters())
    with pytest.raises(DivergedError, match="4 of 4 steps non-finite"):
        train_epoch(stepper, _ListLoader([batches[2]] * 4), 1, epochs=2, seed=0, device=torch.device("cpu"),
                    class_weight=None)


def test_a_loss_that_starts_exploded_is_a_warning():
    from fastmil.train.loop import _warn_if_exploding

    with pytest.warns(RuntimeWarning, match="1e\\+29 in epoch 0: training has exploded"):
        _warn_if_exploding([{"train": {"loss": 1e29}}])
