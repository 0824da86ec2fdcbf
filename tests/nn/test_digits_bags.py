"""MNIST-bags-style benchmark on scikit-learn's bundled 8x8 digits: gated ABMIL beats mean pooling.

A bag is positive when it holds at least one 9; bag sizes ~ N(10, 2); train/val bags draw images from one
pool and test bags from a disjoint pool.
"""
import numpy as np
from sklearn.datasets import load_digits

from fastmil.data import create_store
from fastmil.train import TrainConfig, fit


def _make_bags(images, digits, n_bags, rng):
    nines, others = np.flatnonzero(digits == 9), np.flatnonzero(digits != 9)
    bags = []
    for i in range(n_bags):
        size = int(np.clip(round(rng.normal(10, 2)), 2, 20))
        label = i % 2
        idx = rng.choice(others, size=size, replace=False)
        if label:
            k = int(rng.integers(1, 3))
            idx[:k] = rng.choice(nines, size=k, replace=False)
            rng.shuffle(idx)
        bags.append((images[idx].astype(np.float32), label))
    return bags


def test_abmil_beats_mean_pooling_on_digits_bags(tmp_path):
    digits = load_digits()
    x, y = digits.data / 16.0, digits.target
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    pool_a, pool_b = order[: len(y) // 2], order[len(y) // 2 :]
    train = _make_bags(x[pool_a], y[pool_a], 120, rng)
    test = _make_bags(x[pool_b], y[pool_b], 80, rng)
    store = create_store(tmp_path / "digits")
    ids = {"train": [], "val": [], "test": []}
    for split, bags in (("train", train[:90]), ("val", train[90:]), ("test", test)):
        for feats, label in bags:
            sid = f"{split}-{len(ids[split]):03d}"
            store.write_slide(sid, feats, attrs={"label": label})
            ids[split].append(sid)
    store.set_labels({s: store.label(s) for s in store.slide_ids}, ["no-nine", "nine"])
    split_csv = tmp_path / "splits_0.csv"
    rows = max(len(v) for v in ids.values())
    split_csv.write_text(",train,val,test\n" + "".join(
        f"{i}," + ",".join(ids[k][i] if i < len(ids[k]) else "" for k in ("train", "val", "test")) + "\n"
        for i in range(rows)))

    aucs = {}
    for model in ({"name": "abmil", "embed_dim": 64, "attn_dim": 32, "dropout": 0.0},
                  {"name": "meanmil", "embed_dim": 64, "dropout": 0.0}):
        cfg = TrainConfig.from_dict(model=model, optim={"epochs": 15, "lr": 1e-3}, run={"patience": 15, "seed": 0})
        result = fit(store, tmp_path / model["name"], cfg, split_csv=split_csv, progress=False)
        aucs[model["name"]] = result.metrics["test"]["auc"]
    assert aucs["abmil"] > aucs["meanmil"], aucs
    assert aucs["abmil"] >= 0.85, aucs
