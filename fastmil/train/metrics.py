"""Classification metrics for slide-level predictions, written without external dependencies.

``compute_metrics(y_true [S] int, probs [S, C] float) -> dict`` with: auc (binary, or macro one-vs-rest over the
classes present), balanced_accuracy, macro_f1, macro_recall, per_class_recall, confusion_matrix (rows = true),
accuracy, n. A metric that is undefined for the given labels (e.g. AUC with one class present) is None.
"""
from __future__ import annotations

import numpy as np

__all__ = ["binary_auc", "compute_metrics", "format_metrics_table", "roc_curve"]


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney U statistic (ties count one half); None if one class is absent."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` at every distinct threshold, from (0, 0) to (1, 1)."""
    positive = np.asarray(positive, dtype=bool)
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s, p = np.asarray(score)[order], positive[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(p)[distinct]
    fps = np.cumsum(~p)[distinct]
    tpr = np.r_[0.0, tps / max(1, p.sum())]
    fpr = np.r_[0.0, fps / max(1, (~p).sum())]
    return fpr, tpr


def compute_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict:
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be [S, C] with S = {y.shape[0]}, got {p.shape}")
    n_classes = p.shape[1]
    pred = p.argmax(axis=1)
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    recall = [float(tp[c] / support[c]) if support[c] else None for c in range(n_classes)]
    f1 = [float(2 * tp[c] / (support[c] + predicted[c])) if (support[c] + predicted[c]) else 0.0
          for c in range(n_classes)]
    present = [c for c in range(n_classes) if support[c]]
    if n_classes == 2:
        auc = binary_auc(y == 1, p[:, 1])
    else:
        per_class = [binary_auc(y == c, p[:, c]) for c in present]
        per_class = [a for a in per_class if a is not None]
        auc = float(np.mean(per_class)) if per_class else None
    return {
        "n": int(len(y)),
        "auc": auc,
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "balanced_accuracy": float(np.mean([recall[c] for c in present])) if present else None,
        # sklearn's "macro" convention: classes seen in y_true or predictions; a class never true has recall 0
        "macro_recall": float(np.mean([recall[c] or 0.0 for c in range(n_classes) if support[c] or predicted[c]]))
        if len(y) else None,
        "macro_f1": float(np.mean(f1)),
        "per_class_recall": recall,
        "confusion_matrix": cm.tolist(),
    }


def format_metrics_table(metrics: dict[str, dict]) -> str:
    """A fixed-width table of ``{split: metrics}``: n, AUC, balanced accuracy, macro F1, loss."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{'split':<6} {'n':>4} {'AUC':>6} {'bal.acc':>8} {'macroF1':>8} {'loss':>7}"]
    for split, m in metrics.items():
        lines.append(f"{split:<6} {m['n']:>4} {fmt(m.get('auc')):>6} {fmt(m.get('balanced_accuracy')):>8} "
                     f"{fmt(m.get('macro_f1')):>8} {fmt(m.get('loss')):>7}")
    return "\n".join(lines)
