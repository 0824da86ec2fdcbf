"""Classification metrics for slide-level predictions, computed by scikit-learn.

``compute_metrics(y_true [S] int, probs [S, C] float) -> dict`` with:

- ``n``, ``accuracy``;
- ``auc``: binary ROC AUC of class 1; for C > 2 the macro mean of the one-vs-rest AUCs of the classes present in
  ``y_true`` (scikit-learn's ``roc_auc_score(multi_class="ovr", average="macro")`` when every class is present;
  scikit-learn raises where a class is absent, fastmil averages the defined ones), and ``per_class_auc`` (one-vs-rest
  per class, None where undefined);
- ``balanced_accuracy`` (scikit-learn's: mean recall over the classes present in ``y_true``);
- ``macro_f1``, ``weighted_f1``, ``macro_recall``: scikit-learn's defaults (classes seen in ``y_true`` or in the
  predictions; ``zero_division=0``);
- ``per_class_recall`` (None for a class absent from ``y_true``) and ``confusion_matrix`` ``[C, C]`` (rows = true).

A metric that is undefined for the given labels (AUC with one class present, anything on an empty split) is None.
"""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["binary_auc", "compute_metrics", "format_metrics_table", "pr_curve", "roc_curve"]


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of ``score`` for the boolean target ``positive``; None if one class is absent."""
    from sklearn.metrics import roc_auc_score

    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, np.asarray(score, dtype=np.float64)))


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    from sklearn.metrics import roc_curve as sk_roc_curve

    fpr, tpr, _ = sk_roc_curve(np.asarray(positive, dtype=bool), np.asarray(score, dtype=np.float64),
                               drop_intermediate=False)
    return fpr, tpr


def pr_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """``(recall, precision, average_precision)`` of ``score`` for the boolean target ``positive``."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    precision, recall, _ = precision_recall_curve(positive, score)
    return recall, precision, float(average_precision_score(positive, score))


def compute_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    from sklearn import metrics as skm

    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [S, C] with S = {y.shape[0]}, got {p.shape}")
    n_classes = p.shape[1]
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"labels must be in [0, {n_classes}), got {sorted(set(y.tolist()))}")
    labels = list(range(n_classes))
    if y.size == 0:
        return {"n": 0, "auc": None, "per_class_auc": [None] * n_classes, "accuracy": None,
                "balanced_accuracy": None, "macro_f1": None, "weighted_f1": None, "macro_recall": None,
                "per_class_recall": [None] * n_classes, "confusion_matrix": np.zeros((n_classes,) * 2, int).tolist()}
    pred = p.argmax(axis=1)
    present = np.isin(labels, y)
    per_class_auc = [binary_auc(y == c, p[:, c]) for c in labels]
    defined = [a for a in per_class_auc if a is not None]
    auc = per_class_auc[1] if n_classes == 2 else (float(np.mean(defined)) if defined else None)
    recall = skm.recall_score(y, pred, labels=labels, average=None, zero_division=0)
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true": the documented convention
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(skm.balanced_accuracy_score(y, pred))
    return {
        "n": int(y.size),
        "auc": auc,
        "per_class_auc": per_class_auc,
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(skm.f1_score(y, pred, average="macro", zero_division=0)),
        "weighted_f1": float(skm.f1_score(y, pred, average="weighted", zero_division=0)),
        "macro_recall": float(skm.recall_score(y, pred, average="macro", zero_division=0)),
        "per_class_recall": [float(r) if present[c] else None for c, r in enumerate(recall)],
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
    }


def format_metrics_table(metrics: dict[str, dict]) -> str:
    """A fixed-width table of ``{split: metrics}``: n, AUC, balanced accuracy, macro F1, loss (survival metrics:
    slides, patients, events, C-index, time-dependent AUC, loss)."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    if any("c_index" in m for m in metrics.values()):
        lines = [f"{'split':<6} {'n':>4} {'patients':>8} {'events':>6} {'C-index':>7} {'tdAUC':>6} {'loss':>7}"]
        for split, m in metrics.items():
            lines.append(f"{split:<6} {m['n']:>4} {m.get('n_patients', 0):>8} {m.get('n_events', 0):>6} "
                         f"{fmt(m.get('c_index')):>7} {fmt(m.get('td_auc')):>6} {fmt(m.get('loss')):>7}")
        return "\n".join(lines)
    lines = [f"{'split':<6} {'n':>4} {'AUC':>6} {'bal.acc':>8} {'macroF1':>8} {'loss':>7}"]
    for split, m in metrics.items():
        lines.append(f"{split:<6} {m['n']:>4} {fmt(m.get('auc')):>6} {fmt(m.get('balanced_accuracy')):>8} "
                     f"{fmt(m.get('macro_f1')):>8} {fmt(m.get('loss')):>7}")
    return "\n".join(lines)
