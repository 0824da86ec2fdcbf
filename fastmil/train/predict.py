"""Prediction for a trained run: per-slide probabilities, per-instance attention, heatmaps, and per-split metrics
and curves.

Output folder::

    OUT/predictions.csv            slide_id, split (the run's train/val/test, or "none"), label (if known),
                                   prob_<class>..., pred
    OUT/metrics.json               {split: metrics} over the predicted slides of each split (never pooled across
                                   splits: training slides would inflate, or with few slides distort, the figure)
    OUT/roc_<split>.png            ROC curve(s) of the split, when it holds two classes or more
    OUT/pr_<split>.png             precision-recall curve(s) of the split, likewise
    OUT/confusion_<split>.png      confusion matrix of the split, when it has labels
    OUT/attention/<slide_id>.npy   float32 [N] attention weights, in the store's instance order
    OUT/heatmaps/<slide_id>.png    attention drawn on the patch grid (and ground truth, where the store has it)
    OUT/top_k/<slide_id>.csv       the top-k attended patches (rank, index, x, y, attention); with the slide
                                   file (``slides_dir``), their crops in OUT/top_k/<slide_id>/rank_<r>.png
    OUT/overlays/<slide_id>.png    attention over the slide thumbnail (with ``slides_dir``)
    OUT/geojson/<slide_id>.geojson the patches as QuPath detections with attention measurements (``geojson``)

A survival run (``task: survival``) writes instead of the class columns and classification curves::

    OUT/predictions.csv            slide_id, case_id, split, time, event, risk (the slide's), patient_risk
                                   (its patient's: mean logits of their slides), hazard_<bin>...
    OUT/metrics.json               {split: survival metrics} (fastmil.survival.metrics), patient level
    OUT/km_<split>.png             Kaplan-Meier curves of the split's patients above / below the split's median
                                   risk, with the log-rank p-value
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .._atomic import write_text_atomic
from ..data.grid import lattice_cells, patch_stride
from ..data.labels import read_splits_csv
from ..data.store import FeatureStore, StoreError, open_store
from ..survival import risk_from_logits, save_km_plot, survival_metrics
from .loop import load_method
from .metrics import binary_auc, compute_metrics, pr_curve, roc_curve
from .slide_outputs import find_slide_file, save_slide_overlay, write_geojson, write_top_k
from .survival_task import SurvivalRun
from .validate import predict_slides

__all__ = ["SPLITS", "predict", "attention_grid", "save_confusion", "save_heatmap", "save_pr", "save_roc",
           "write_survival_predictions"]

SPLITS = ("train", "val", "test")


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


def _curve_targets(classes: Sequence[str]) -> Sequence[int]:
    """The classes drawn as one-vs-rest curves: the positive class of a binary task, else every class."""
    return [1] if len(classes) == 2 else range(len(classes))


def save_roc(path: Path, y: np.ndarray, probs: np.ndarray, classes: Sequence[str], title: str = "") -> None:
    """One-vs-rest ROC curve(s) of ``probs [S, C]`` against ``y [S]`` (classes absent from ``y`` are skipped)."""
    fig = _figure((5, 5))
    ax = fig.subplots()
    for c in _curve_targets(classes):
        positive = y == c
        auc = binary_auc(positive, probs[:, c])
        if auc is None:
            continue
        fpr, tpr = roc_curve(positive, probs[:, c])
        ax.plot(fpr, tpr, label=f"{classes[c]} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def save_pr(path: Path, y: np.ndarray, probs: np.ndarray, classes: Sequence[str], title: str = "") -> None:
    """One-vs-rest precision-recall curve(s) with average precision, and each class's prevalence as baseline."""
    fig = _figure((5, 5))
    ax = fig.subplots()
    for c in _curve_targets(classes):
        positive = y == c
        if positive.all() or not positive.any():
            continue
        recall, precision, ap = pr_curve(positive, probs[:, c])
        line = ax.step(recall, precision, where="post", label=f"{classes[c]} (AP {ap:.3f})")[0]
        ax.axhline(positive.mean(), color=line.get_color(), ls=":", lw=0.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def save_confusion(path: Path, matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str = "") -> None:
    """The confusion matrix (rows = true class, columns = predicted) with its counts written in each cell."""
    m = np.asarray(matrix)
    fig = _figure((1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max())))
    for (i, j), count in np.ndenumerate(m):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if count > m.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def run_split_of(run: Path, ids: Sequence[str]) -> dict[str, str]:
    """The split (``train``/``val``/``test``) of each slide in the run's ``splits.csv``; ``"none"`` for others."""
    path = run / "splits.csv"
    owner = {}
    if path.exists():
        owner = {sid: name for name, members in read_splits_csv(path).items() for sid in members}
    return {sid: owner.get(sid, "none") for sid in ids}


def predict(
    run: str | os.PathLike,
    store: FeatureStore | str | os.PathLike,
    out: str | os.PathLike,
    slide_ids: Sequence[str] | None = None,
    *,
    split: str = "all",
    heatmaps: bool = True,
    slides_dir: str | os.PathLike | None = None,
    top_k: int = 16,
    geojson: bool = False,
    progress: bool = True,
) -> Path:
    """Predict the slides of ``store`` (``slide_ids``, or those of the run's ``split``: ``all`` (default),
    ``train``, ``val`` or ``test``) with the run's best model; write ``out`` (see the module docstring).
    ``slides_dir``: folder of the slide files (``<slide_id>.svs``, ...) for overlays and crops."""
    if split not in ("all", *SPLITS):
        raise ValueError(f"split must be 'all' or one of {SPLITS}, got {split!r}")
    store = store if isinstance(store, FeatureStore) else open_store(store)
    run = Path(run)
    method, cfg, sig = load_method(run, store)
    device = next(method.parameters()).device
    ids = list(slide_ids) if slide_ids is not None else store.slide_ids
    missing = [s for s in ids if s not in store]
    if missing:
        raise ValueError(f"slides not in store {store.path}: {', '.join(map(repr, missing[:5]))}")
    split_of = run_split_of(run, ids)
    if split != "all":
        ids = [s for s in ids if split_of[s] == split]
        if not ids:
            raise ValueError(f"no slide of the run's {split!r} split among the slides to predict")
    survival = SurvivalRun.load(run) if cfg.task.name == "survival" else None
    outputs, attention = predict_slides(method, store, ids, device, keep_attention=True, progress=progress,
                                        amp=cfg.run.amp, output="probs" if survival is None else "logits")
    classes = sig["classes"]
    out = Path(out)
    (out / "attention").mkdir(parents=True, exist_ok=True)
    labels = store.labels(ids)
    if survival is None:  # outputs: class probabilities
        _write_predictions(out, ids, outputs, labels, split_of, classes)
        _write_split_reports(out, ids, outputs, labels, split_of, classes)
        titles = {sid: f"p({classes[-1]})={p[-1]:.3f}" + ("" if labels[sid] is None else
                                                            f" label={classes[labels[sid]]}")
                  for sid, p in zip(ids, outputs)}
    else:  # outputs: per-bin hazard logits
        titles = write_survival_predictions(out, ids, outputs, split_of, survival, _train_ids(run))
    for sid in ids:
        np.save(out / "attention" / f"{sid}.npy", attention[sid].astype(np.float32))
    for name, wanted in (("heatmaps", heatmaps), ("top_k", top_k > 0), ("geojson", geojson),
                         ("overlays", slides_dir is not None)):
        if wanted:
            (out / name).mkdir(exist_ok=True)
    bar = tqdm(ids, desc="slide outputs", unit="slide", disable=None if progress else True, leave=False)
    for sid in bar:
        coords = store.read_coords(sid)
        if coords is None:
            continue
        patch_size = store.slide_attrs(sid).get("patch_size_level0")
        try:
            stride = patch_stride(coords, patch_size)  # the lattice step (equals the patch size without overlap)
        except ValueError as exc:
            raise StoreError(f"slide {sid!r}: {exc}") from None
        patch_size = int(patch_size or stride)
        title = titles[sid]
        slide_file = find_slide_file(slides_dir, sid) if slides_dir is not None else None
        if heatmaps:
            save_heatmap(out / "heatmaps" / f"{sid}.png", sid, coords, attention[sid], stride,
                         store.read_instance_labels(sid), title)
        if top_k > 0:
            write_top_k(out / "top_k", sid, coords, patch_size, attention[sid], top_k, slide_file)
        if geojson:
            write_geojson(out / "geojson" / f"{sid}.geojson", sid, coords, patch_size, attention[sid])
        if slide_file is not None:
            save_slide_overlay(out / "overlays" / f"{sid}.png", slide_file, sid, coords, stride, attention[sid],
                               title=title)
    return out


def _write_predictions(out: Path, ids: Sequence[str], probs: np.ndarray, labels: dict, split_of: dict[str, str],
                       classes: Sequence[str]) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["slide_id", "split", "label", *[f"prob_{c}" for c in classes], "pred"])
    for sid, p in zip(ids, probs):
        y = labels[sid]
        w.writerow([sid, split_of[sid], "" if y is None else classes[y], *[f"{v:.6f}" for v in p],
                    classes[int(p.argmax())]])
    write_text_atomic(out / "predictions.csv", buf.getvalue())


def _train_ids(run: Path) -> list[str]:
    return read_splits_csv(run / "splits.csv").get("train", [])


def write_survival_predictions(out: Path, ids: Sequence[str], logits: np.ndarray, split_of: dict[str, str],
                               survival: SurvivalRun, train_ids: Sequence[str]) -> dict[str, str]:
    """``predictions.csv``, ``metrics.json`` and ``km_<split>.png`` of a survival run (module docstring); returns
    a heatmap title per slide. Slides without a survival target in the run get risks but no metrics."""
    import torch

    slide_risk = risk_from_logits(torch.from_numpy(np.asarray(logits, np.float64))).numpy()
    known = [i for i, s in enumerate(ids) if s in survival.records]
    patient_risk: dict[str, float] = {}
    if known:
        cases, _, _, risks = survival.patient_risks([ids[i] for i in known], logits[known])
        patient_risk = dict(zip(cases, risks.tolist()))
    hazards = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["slide_id", "case_id", "split", "time", "event", "risk", "patient_risk",
                *[f"hazard_{k}" for k in range(hazards.shape[1])]])
    titles = {}
    for sid, risk, h in zip(ids, slide_risk, hazards):
        rec = survival.records.get(sid)
        w.writerow([sid, "" if rec is None else rec.case_id, split_of[sid], "" if rec is None else rec.time,
                    "" if rec is None else int(rec.event), f"{risk:.6f}",
                    "" if rec is None else f"{patient_risk[rec.case_id]:.6f}", *[f"{v:.6f}" for v in h]])
        titles[sid] = f"risk={risk:.3f}" + ("" if rec is None else f" time={rec.time:g} event={int(rec.event)}")
    write_text_atomic(out / "predictions.csv", buf.getvalue())
    train_records = {s: survival.records[s] for s in train_ids if s in survival.records}
    report = {}
    for name in SPLITS:  # (slides outside the run's splits have no target in the run)
        rows = [i for i in known if split_of[ids[i]] == name]
        if not rows:
            continue
        members = [ids[i] for i in rows]
        report[name] = survival_metrics(members, logits[rows], survival.records, survival.edges, train_records,
                                        survival.alpha)
        cases, time, event, risk = survival.patient_risks(members, logits[rows])
        report[name]["logrank_p"] = save_km_plot(
            out / f"km_{name}.png", time, event, risk > np.median(risk),
            f"{name} split: {len(cases)} patients, split at the median predicted risk")
    write_text_atomic(out / "metrics.json", json.dumps(report, indent=2))
    return titles


def _write_split_reports(out: Path, ids: Sequence[str], probs: np.ndarray, labels: dict, split_of: dict[str, str],
                         classes: Sequence[str]) -> None:
    """``metrics.json`` and the ROC / PR / confusion-matrix PNGs of each split, over that split's labelled slides."""
    report = {}
    for name in (*SPLITS, "none"):
        rows = [i for i, s in enumerate(ids) if split_of[s] == name and labels[s] is not None]
        if not rows:
            continue
        y = np.array([labels[ids[i]] for i in rows])
        metrics = compute_metrics(y, probs[rows])
        report[name] = metrics
        title = f"{name} split: {len(rows)} slides"
        save_confusion(out / f"confusion_{name}.png", metrics["confusion_matrix"], classes, title)
        if len(set(y.tolist())) > 1:
            save_roc(out / f"roc_{name}.png", y, probs[rows], classes, title)
            save_pr(out / f"pr_{name}.png", y, probs[rows], classes, title)
    write_text_atomic(out / "metrics.json", json.dumps(report, indent=2))
