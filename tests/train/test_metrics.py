import warnings

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


def _random_case(rng, n_classes, size, absent):
    """Labels drawn from the classes not in ``absent``; probabilities that favour the true class."""
    allowed = [c for c in range(n_classes) if c not in absent]
    y = rng.choice(allowed, size)
    logits = rng.standard_normal((size, n_classes)) + rng.uniform(0, 2) * np.eye(n_classes)[y]
    logits[rng.random(size) < 0.1] = 0.0  # exact ties in the scores
    return y, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.parametrize("seed", range(40))
def test_every_metric_equals_sklearn_on_random_cases(seed):
    """Binary and multiclass, splits of 1-30 slides, absent classes (in the labels and/or the predictions) and
    one-class splits: each metric equals scikit-learn's (AUC where scikit-learn defines it; elsewhere the mean of
    its one-vs-rest AUCs over the classes present)."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 5))
    absent = set(rng.choice(n_classes, int(rng.integers(0, n_classes)), replace=False).tolist())
    y, probs = _random_case(rng, n_classes, int(rng.integers(1, 31)), absent)
    m = compute_metrics(y, probs)
    pred = probs.argmax(1)
    labels = list(range(n_classes))
    assert m["n"] == len(y)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true"
        warnings.simplefilter("ignore", UserWarning)
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted", zero_division=0))
    assert m["macro_recall"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    recall = skm.recall_score(y, pred, labels=labels, average=None, zero_division=0)
    for c in labels:
        assert m["per_class_recall"][c] == (pytest.approx(recall[c]) if c in y else None)
        one_vs_rest = skm.roc_auc_score(y == c, probs[:, c]) if 0 < (y == c).sum() < len(y) else None
        assert m["per_class_auc"][c] == (None if one_vs_rest is None else pytest.approx(one_vs_rest))
    present = sorted(set(y.tolist()))
    if len(present) < 2:
        assert m["auc"] is None
    elif n_classes == 2:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    elif len(present) == n_classes:
        assert m["auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    else:
        assert m["auc"] == pytest.approx(np.mean([skm.roc_auc_score(y == c, probs[:, c]) for c in present]))


def test_macro_f1_with_an_absent_class_is_sklearns():
    """The case from the issue: a 3-class split without class 2 (macro over the classes seen, not over all 3)."""
    y = np.array([0, 0, 1, 1, 1])
    probs = np.eye(3)[[0, 1, 1, 1, 0]] * 0.8 + 0.2 / 3
    m = compute_metrics(y, probs)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, probs.argmax(1), average="macro"))
    assert m["macro_f1"] == pytest.approx((0.5 + 2 / 3) / 2)  # F1 of class 0 and 1; with class 2: 0.389


def test_empty_split_and_bad_labels():
    m = compute_metrics(np.zeros(0, int), np.zeros((0, 3)))
    assert m["n"] == 0 and m["auc"] is None and m["macro_f1"] is None
    with pytest.raises(ValueError, match="labels must be in"):
        compute_metrics(np.array([0, 3]), np.full((2, 3), 1 / 3))
