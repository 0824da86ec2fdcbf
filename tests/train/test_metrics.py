import numpy as np
import pytest
from sklearn import metrics as skm

from fastmil.train.metrics import binary_auc, compute_metrics, roc_curve


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(0.3 * y + rng.random(200) * 0.8, 0, 1)
    p1[::7] = 0.5  # ties
    probs = np.stack([1 - p1, p1], 1)
    m = compute_metrics(y, probs)
    pred = probs.argmax(1)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["macro_recall"] == pytest.approx(skm.recall_score(y, pred, average="macro"))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    fpr, tpr = roc_curve(y == 1, p1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(m["auc"])


def test_multiclass_macro_ovr_auc_matches_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    logits = rng.standard_normal((300, 4)) + 1.5 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y, probs)
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert m["per_class_recall"] == pytest.approx(list(skm.recall_score(y, probs.argmax(1), average=None)))


def test_auc_undefined_with_one_class():
    assert binary_auc(np.ones(5, bool), np.arange(5)) is None
    assert compute_metrics(np.zeros(3, int), np.array([[0.9, 0.1]] * 3))["auc"] is None
