"""The training loop: ``fit`` (train with early stopping, checkpoint every epoch, exact resume) and ``evaluate``.

Run folder layout::

    RUN/config.yaml     the TrainConfig used            RUN/splits.csv   train/val/test slide ids (CLAM layout)
    RUN/last.pt         full state after each epoch     RUN/best.pt      best model by the monitored val metric
    RUN/history.json    per-epoch train loss + val      RUN/metrics.json per-split metrics of the best model

Determinism: the model is initialised from ``seed``; each epoch reseeds torch from ``(seed, epoch)`` and the
sampler shuffles from ``(seed, epoch)``; the learning rate is a pure function of (epoch, step). Resuming
from ``last.pt`` after a kill therefore replays the interrupted epoch exactly: on CPU the final weights equal
those of an uninterrupted run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from tqdm.auto import tqdm

from .. import __version__
from ..data.batching import BagBatchSampler, BagLoader
from ..data.store import FeatureStore, open_store
from ..methods import get_method
from .checkpoint import check_model_config, load_checkpoint, save_checkpoint, write_text_atomic
from .config import TrainConfig
from .metrics import compute_metrics
from .splits import labelled_slides, load_splits, make_splits, write_splits

__all__ = ["RunResult", "fit", "evaluate", "load_model", "predict_slides", "select_device"]

EVAL_INSTANCES_PER_STEP = 262_144
# Keys that may change between an interrupted run and its resumption (they do not change the numbers on CPU).
_RESUMABLE_CHANGES = {"epochs", "device", "prefetch", "patience"}


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict  # split -> metrics of the best model
    history: list  # one dict per epoch
    best_epoch: int


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def _as_store(store: FeatureStore | str | os.PathLike) -> FeatureStore:
    return store if isinstance(store, FeatureStore) else open_store(store)


def _lr_factor(cfg: TrainConfig, epoch: int, step: int, steps_in_epoch: int) -> float:
    """Linear warm-up for ``warmup_epochs``, then cosine decay to 0 at the end of the last epoch."""
    t = epoch + step / max(1, steps_in_epoch)
    if t < cfg.warmup_epochs:
        return (t + 1e-3) / cfg.warmup_epochs
    span = max(1e-9, cfg.epochs - cfg.warmup_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - cfg.warmup_epochs) / span)))


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.default_rng([seed, epoch, 31]).integers(0, 2**62))


def _class_weight(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    counts = np.bincount(np.asarray(labels), minlength=n_classes).astype(np.float64)
    weight = np.where(counts > 0, counts.sum() / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weight, dtype=torch.float32)


def _autocast(amp: str, device: torch.device):
    """bf16/fp16 autocast on CUDA; a no-op for ``amp="none"`` or on the CPU."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _better(monitor: str, value: float | None, best: float | None) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best if monitor == "loss" else value > best


@torch.no_grad()
def predict_slides(
    model: nn.Module,
    store: FeatureStore,
    slide_ids: Sequence[str],
    device: torch.device,
    *,
    keep_attention: bool = False,
    progress: bool = False,
    amp: str = "none",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Class probabilities ``[S, C]`` (in ``slide_ids`` order) and, optionally, per-slide attention ``{id: [N]}``."""
    model.eval()
    sampler = BagBatchSampler(store.sizes(slide_ids), max_instances_per_step=EVAL_INSTANCES_PER_STEP, shuffle=False)
    loader = BagLoader(store, slide_ids, sampler)
    probs: dict[str, np.ndarray] = {}
    attention: dict[str, np.ndarray] = {}
    for bags in tqdm(loader, desc="predict", unit="step", disable=not progress, leave=False):
        bags = bags.to(device)
        with _autocast(amp, device):
            logits, weights = model(bags)
        p = torch.softmax(logits.float(), dim=-1).cpu().numpy()
        w = weights.float().cpu().numpy()
        off = bags.offsets.cpu().numpy()
        for b, sid in enumerate(bags.ids):
            probs[sid] = p[b]
            if keep_attention:
                attention[sid] = w[off[b] : off[b + 1]]
    return np.stack([probs[s] for s in slide_ids]) if slide_ids else np.zeros((0, 0)), attention


def _split_metrics(model, store, ids, labels, device, class_weight, amp) -> dict:
    if not ids:
        return {"n": 0}
    probs, _ = predict_slides(model, store, ids, device, amp=amp)
    y = np.array([labels[s] for s in ids])
    metrics = compute_metrics(y, probs)
    logp = torch.log(torch.from_numpy(probs).clamp_min(1e-12))
    metrics["loss"] = float(F.nll_loss(logp.float(), torch.from_numpy(y), weight=class_weight))
    return metrics


def _model_signature(cfg: TrainConfig, model: nn.Module, classes: list[str]) -> dict:
    return {"method": cfg.method, "classes": list(classes), **getattr(model, "config", {})}


def _build_model(cfg: TrainConfig, in_dim: int, n_classes: int) -> nn.Module:
    return get_method(cfg.method).build_model(
        in_dim, n_classes, embed_dim=cfg.embed_dim, attn_dim=cfg.attn_dim, dropout=cfg.dropout, gated=cfg.gated
    )


def fit(
    store: FeatureStore | str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    split_csv: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    step_callback: Callable[[int, int, float], None] | None = None,
) -> RunResult:
    """Train ``config.method`` on the labelled slides of ``store``; write the run folder ``out``.

    Args:
        split_csv: CLAM-style splits file; default: a stratified random split from ``config.seed``.
        resume: continue from ``out/last.pt`` (the config must match, except epochs/device/prefetch/patience).
        step_callback: called as ``step_callback(epoch, step, loss)`` after every optimiser step.
    """
    store = _as_store(store)
    cfg = config or TrainConfig()
    run = Path(out)
    labels = labelled_slides(store)
    classes = store.classes or [str(c) for c in range(max(labels.values()) + 1)]
    n_classes = len(classes)
    device = select_device(cfg.device)
    if cfg.amp != "none" and device.type != "cuda":
        raise ValueError(f"config: amp={cfg.amp!r} needs a CUDA device (got {device})")

    state = None
    if resume:
        state = load_checkpoint(run / "last.pt")
        saved_cfg = state["config"]
        diffs = sorted(k for k in saved_cfg if k not in _RESUMABLE_CHANGES and saved_cfg[k] != cfg.to_dict().get(k))
        if diffs:
            raise ValueError(f"{run}: cannot resume with a different config ({', '.join(diffs)} changed)")
        splits = state["splits"]
    else:
        if (run / "last.pt").exists():
            raise ValueError(f"{run}: holds a run already; pass --resume to continue it or choose another --out")
        splits = load_splits(split_csv, labels, store) if split_csv else make_splits(
            labels, cfg.val_fraction, cfg.test_fraction, cfg.seed
        )
    if not splits["train"]:
        raise ValueError("the train split is empty")
    train_classes = {labels[s] for s in splits["train"]}
    if len(train_classes) < 2:
        raise ValueError(f"the train split holds one class only ({classes[next(iter(train_classes))]!r})")
    run.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    write_splits(run / "splits.csv", splits)

    torch.manual_seed(cfg.seed)
    model = _build_model(cfg, store.dim, n_classes).to(device)
    signature = _model_signature(cfg, model, classes)
    method = get_method(cfg.method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    class_weight = _class_weight([labels[s] for s in splits["train"]], n_classes) if cfg.class_weighting else None
    cw_device = None if class_weight is None else class_weight.to(device)

    start_epoch, history, best, best_epoch, bad_epochs = 0, [], None, -1, 0
    if state is not None:
        check_model_config(state["model_config"], signature, str(run / "last.pt"))
        model.load_state_dict(state["model_state"])
        optimizer.load_state_dict(state["optimizer_state"])
        start_epoch = int(state["epoch"]) + 1
        history, best, best_epoch, bad_epochs = state["history"], state["best"], state["best_epoch"], state["bad_epochs"]
        if state.get("finished"):
            start_epoch = cfg.epochs

    sampler = BagBatchSampler(
        store.sizes(splits["train"]),
        bags_per_step=cfg.bags_per_step,
        max_instances_per_step=cfg.max_instances_per_step,
        shuffle=True,
        seed=cfg.seed,
    )
    loader = BagLoader(store, splits["train"], sampler, prefetch=cfg.prefetch, pin_memory=device.type == "cuda")
    labels_of = {s: labels[s] for ids in splits.values() for s in ids}
    monitor_split = "val" if splits["val"] else "train"

    epochs = tqdm(range(start_epoch, cfg.epochs), desc="train", unit="epoch", disable=not progress,
                  initial=start_epoch, total=cfg.epochs)
    finished = False
    for epoch in epochs:
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))
        loader.set_epoch(epoch)
        n_steps = len(sampler)
        model.train()
        losses = []
        for step, bags in enumerate(tqdm(loader, desc=f"epoch {epoch}", unit="step", disable=not progress,
                                         leave=False, total=n_steps)):
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * _lr_factor(cfg, epoch, step, n_steps)
            bags = bags.to(device, non_blocking=True)
            with _autocast(cfg.amp, device):
                loss, _ = method.loss(model, bags, cw_device)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            losses.append(float(loss.detach()))
            if step_callback is not None:
                step_callback(epoch, step, losses[-1])
        monitored = _split_metrics(model, store, splits[monitor_split], labels_of, device, class_weight, cfg.amp)
        value = monitored.get(cfg.monitor)
        if cfg.monitor == "auc" and value is None:  # AUC undefined (one class in val): fall back to loss
            value = -monitored["loss"]
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), monitor_split: monitored})
        if _better(cfg.monitor, value, best):
            best, best_epoch, bad_epochs = value, epoch, 0
            save_checkpoint(run / "best.pt", {"model_state": model.state_dict(), "model_config": signature,
                                              "epoch": epoch, "fastmil_version": __version__})
        else:
            bad_epochs += 1
        finished = bad_epochs >= cfg.patience or epoch == cfg.epochs - 1
        save_checkpoint(run / "last.pt", {
            "model_state": model.state_dict(), "optimizer_state": optimizer.state_dict(), "epoch": epoch,
            "config": cfg.to_dict(), "model_config": signature, "splits": splits, "history": history,
            "best": best, "best_epoch": best_epoch, "bad_epochs": bad_epochs, "finished": finished,
            "fastmil_version": __version__,
        })
        write_text_atomic(run / "history.json", json.dumps(history, indent=2))
        shown = "-" if value is None else f"{value:.4f}"
        epochs.set_postfix(loss=f"{np.mean(losses):.4f}", **{f"{monitor_split}_{cfg.monitor}": shown})
        if finished:
            break

    metrics = evaluate(run, store, progress=progress)
    return RunResult(run, metrics, history, best_epoch)


def load_model(run: str | os.PathLike, store: FeatureStore | None = None, device: torch.device | None = None):
    """Rebuild the best model of a run folder; returns ``(model, cfg, signature)``.

    With ``store``, checks that the store's feature dim and classes match the checkpoint.
    """
    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ValueError(f"{run}: not a fastmil run folder (no config.yaml)")
    with open(run / "config.yaml", encoding="utf-8") as fh:
        cfg = TrainConfig.from_dict(yaml.safe_load(fh))
    best = load_checkpoint(run / "best.pt")
    sig = best["model_config"]
    model = _build_model(cfg, sig["in_dim"], sig["n_classes"])
    check_model_config(sig, _model_signature(cfg, model, sig["classes"]), str(run / "best.pt"))
    try:
        model.load_state_dict(best["model_state"])
    except RuntimeError as exc:
        raise ValueError(f"{run / 'best.pt'}: checkpoint is from another model config: {exc}") from exc
    if store is not None:
        if store.dim != sig["in_dim"]:
            raise ValueError(f"{run}: model expects {sig['in_dim']}-dim features, store {store.path} has {store.dim}")
        if store.classes and list(store.classes) != list(sig["classes"]):
            raise ValueError(f"{run}: model classes {sig['classes']} differ from store classes {store.classes}")
    model.to(device or select_device(cfg.device))
    return model, cfg, sig


def evaluate(
    run: str | os.PathLike,
    store: FeatureStore | str | os.PathLike,
    splits: Sequence[str] = ("train", "val", "test"),
    *,
    progress: bool = True,
) -> dict:
    """Metrics of the run's best model on each split; written to ``RUN/metrics.json`` and returned."""
    run = Path(run)
    store = _as_store(store)
    model, cfg, sig = load_model(run, store)
    device = next(model.parameters()).device
    labels = labelled_slides(store)
    split_ids = load_splits(run / "splits.csv", labels, store)
    class_weight = _class_weight([labels[s] for s in split_ids["train"]], sig["n_classes"]) if cfg.class_weighting else None
    out = {}
    for name in tqdm(splits, desc="evaluate", unit="split", disable=not progress, leave=False):
        out[name] = _split_metrics(model, store, split_ids[name], labels, device, class_weight, cfg.amp)
    write_text_atomic(run / "metrics.json", json.dumps(out, indent=2))
    return out
