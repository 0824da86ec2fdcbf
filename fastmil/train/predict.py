"""Prediction for a trained run: per-slide probabilities, per-instance attention, heatmaps and a ROC curve.

Output folder::

    OUT/predictions.csv            slide_id, label (if known), prob_<class>..., pred
    OUT/attention/<slide_id>.npy   float32 [N] attention weights, in the store's instance order
    OUT/heatmaps/<slide_id>.png    attention drawn on the patch grid (and ground truth, where the store has it)
    OUT/roc.png                    ROC curve(s), when labels are known
"""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._atomic import write_text_atomic
from ..data.grid import lattice_cells, patch_stride
from ..data.store import FeatureStore, open_store
from .loop import load_method
from .metrics import binary_auc, roc_curve
from .validate import predict_slides

__all__ = ["predict", "attention_grid", "save_heatmap", "save_roc"]


def _figure(size: tuple[float, float]):
    """A matplotlib figure that only writes files: no pyplot, no global backend switch, imported on first use
    (importing fastmil never imports matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def attention_grid(coords: np.ndarray, values: np.ndarray, stride: int) -> np.ndarray:
    """Place ``values [N]`` on the slide's patch lattice: ``[H, W]`` float with NaN where there is no patch."""
    cells = lattice_cells(coords, stride)
    grid = np.full((int(cells[:, 1].max()) + 1, int(cells[:, 0].max()) + 1), np.nan, dtype=np.float32)
    grid[cells[:, 1], cells[:, 0]] = values
    return grid


def save_heatmap(
    path: Path, slide_id: str, coords: np.ndarray, attention: np.ndarray, stride: int,
    truth: np.ndarray | None = None, title: str = "",
) -> None:
    """Attention (linear, divided by the slide's maximum) on the patch grid, beside the ground truth if given.

    Linear scale on purpose: a rank scale would stretch the many near-zero weights into a misleading gradient.
    """
    panels = 2 if truth is not None else 1
    fig = _figure((5.5 * panels, 5))
    axes = fig.subplots(1, panels, squeeze=False)
    ax = axes[0, 0]
    peak = float(attention.max()) if attention.size and attention.max() > 0 else 1.0
    img = ax.imshow(attention_grid(coords, attention / peak, stride), cmap="inferno", vmin=0, vmax=1,
                    interpolation="nearest")
    ax.set_title("attention / max attention")
    fig.colorbar(img, ax=ax, fraction=0.046)
    if truth is not None:
        ax = axes[0, 1]
        ax.imshow(attention_grid(coords, truth.astype(np.float32), stride), cmap="coolwarm", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title("ground truth (red = tumour)")
    for a in axes[0]:
        a.set_xticks([])
        a.set_yticks([])
    fig.suptitle(f"{slide_id} {title}".strip())
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def save_roc(path: Path, y: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
    fig = _figure((5, 5))
    ax = fig.subplots()
    targets = [1] if len(classes) == 2 else range(len(classes))
    for c in targets:
        positive = y == c
        auc = binary_auc(positive, probs[:, c])
        if auc is None:
            continue
        fpr, tpr = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def predict(
    run: str | os.PathLike,
    store: FeatureStore | str | os.PathLike,
    out: str | os.PathLike,
    slide_ids: Sequence[str] | None = None,
    *,
    heatmaps: bool = True,
    progress: bool = True,
) -> Path:
    """Predict every slide of ``store`` (or ``slide_ids``) with the run's best model; write ``out``."""
    store = store if isinstance(store, FeatureStore) else open_store(store)
    method, cfg, sig = load_method(run, store)
    device = next(method.parameters()).device
    ids = list(slide_ids) if slide_ids is not None else store.slide_ids
    missing = [s for s in ids if s not in store]
    if missing:
        raise ValueError(f"slides not in store {store.path}: {', '.join(map(repr, missing[:5]))}")
    probs, attention = predict_slides(method, store, ids, device, keep_attention=True, progress=progress,
                                      amp=cfg.run.amp)
    classes = sig["classes"]
    out = Path(out)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    labels = store.labels(ids)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["slide_id", "label", *[f"prob_{c}" for c in classes], "pred"])
    for sid, p in zip(ids, probs):
        y = labels[sid]
        w.writerow([sid, "" if y is None else classes[y], *[f"{v:.6f}" for v in p], classes[int(p.argmax())]])
    write_text_atomic(out / "predictions.csv", buf.getvalue())
    for sid in ids:
        np.save(out / "attention" / f"{sid}.npy", attention[sid].astype(np.float32))
    if heatmaps:
        (out / "heatmaps").mkdir(exist_ok=True)
        bar = tqdm(list(zip(ids, probs)), desc="heatmaps", unit="slide", disable=None if progress else True,
                   leave=False)
        for sid, p in bar:
            coords = store.read_coords(sid)
            if coords is None:
                continue
            stride = patch_stride(coords, store.slide_attrs(sid).get("patch_size_level0"))
            y = labels[sid]
            title = f"p({classes[-1]})={p[-1]:.3f}" + ("" if y is None else f" label={classes[y]}")
            save_heatmap(out / "heatmaps" / f"{sid}.png", sid, coords, attention[sid], stride,
                         store.read_instance_labels(sid), title)
    known = [i for i, s in enumerate(ids) if labels[s] is not None]
    if known and len({labels[ids[i]] for i in known}) > 1:
        save_roc(out / "roc.png", np.array([labels[ids[i]] for i in known]), probs[known], classes)
    return out
