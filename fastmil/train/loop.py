"""``fit``: train any registered method on a store (early stopping, a checkpoint every epoch, exact resume), and
``evaluate``: the metrics of a run's best model on its splits.

``fit`` is a composition of parts with one job each: the run folder (:mod:`.run_folder`), one optimisation
step (:mod:`.step`), the epoch loop (:mod:`.epoch`), validation and early stopping (:mod:`.validate`), per-epoch
records (:mod:`.logging`). Nothing in it is method-specific: the method (:mod:`fastmil.methods`) owns its
model, teacher and buffers, and all of them travel in its ``state_dict``.

Determinism: the method is initialised from ``run.seed``; each epoch reseeds torch from ``(seed, epoch)`` and the
sampler shuffles from ``(seed, epoch)``; the learning rate is a pure function of (epoch, step). Resuming from
``last.pt`` after a kill replays the interrupted epoch exactly: on CPU the final weights (student and teacher
alike) equal those of an uninterrupted run.
"""
from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from .._atomic import write_text_atomic
from .._config import ConfigError, to_dict
from ..checkpoint import check_model_config, load_checkpoint
from ..data.batching import BagBatchSampler, BagLoader
from ..data.cache import CohortCache, cohort_bytes, open_cache
from ..data.store import FeatureStore, open_store
from ..methods import Method, build_method
from ..survival import survival_targets
from .classification_task import ClassificationRun
from .config import RESUMABLE_CHANGES, TrainConfig
from .distributed import DataParallel
from .epoch import train_epoch
from .host_memory import keep_freed_host_memory
from .logging import EpochLogger
from .run_folder import ReadOnlyRunFolder, RunFolder, TrainState
from .splits import labelled_slides, load_splits, make_group_splits, make_splits
from .step import Stepper
from .survival_task import SurvivalRun
from .validate import EarlyStopping

__all__ = ["CHECKPOINT_FORMAT", "EpochCallback", "RunResult", "evaluate", "fit", "load_method", "load_model",
           "select_device"]

CHECKPOINT_FORMAT = 2
"""Version of ``last.pt``/``best.pt``: a method's full ``state_dict`` (model, teacher, buffers)."""

EpochCallback = Callable[[dict, RunFolder], None]
"""Called after every epoch with the epoch's record and the run folder (its checkpoints are written)."""


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict  # split -> metrics of the best model
    history: list  # one record per epoch
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


def _signature(cfg: TrainConfig, in_dim: int, classes: list[str]) -> dict:
    """What a checkpoint must match to be loaded into a freshly built method."""
    signature = {"model": to_dict(cfg.model), "method": to_dict(cfg.method), "in_dim": in_dim,
                 "n_classes": len(classes), "classes": list(classes)}
    if cfg.task.name != "classification":  # (classification runs of earlier versions have no "task" key)
        signature["task"] = cfg.task.name
    return signature


def _task_targets(store: FeatureStore, cfg: TrainConfig, run: RunFolder, resume: bool):
    """``(labels, cases, classes, survival records)``: what splits stratify by (class labels; for survival the
    event indicator), the patients (survival; else None), the head's output names, and the survival targets (a
    resumed run reads its own copy)."""
    if cfg.task.name != "survival":
        labels = labelled_slides(store)
        return labels, None, store.classes or [str(c) for c in range(max(labels.values()) + 1)], None
    records = (SurvivalRun.load(run.path).records if resume
               else survival_targets(store, cfg.task.survival_csv))
    return ({s: int(r.event) for s, r in records.items()}, {s: r.case_id for s, r in records.items()},
            [f"bin_{k}" for k in range(cfg.task.bins)], records)


# ----------------------------------------------------------------------------------------------------------------
# the parts of fit
# ----------------------------------------------------------------------------------------------------------------
def _open_run(run: RunFolder, cfg: TrainConfig, resume: bool, split_csv, labels: dict, store: FeatureStore,
              cases: dict[str, str] | None = None):
    """Start a new run folder, or read the state of the run to resume. Returns ``(splits, state, checkpoint)``.
    With ``cases``, a random split keeps each patient's slides in one split."""
    if not resume:
        if run.holds_run():
            raise ValueError(f"{run.path}: holds a run already; pass --resume to continue it or choose another --out")
        if split_csv:
            splits = load_splits(split_csv, labels, store)
        elif cases is not None:
            splits = make_group_splits(labels, cases, cfg.data.val_fraction, cfg.data.test_fraction, cfg.run.seed)
        else:
            splits = make_splits(labels, cfg.data.val_fraction, cfg.data.test_fraction, cfg.run.seed)
        return splits, TrainState(), None
    saved = run.load_last()
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{run.last}: written by an older fastmil (checkpoint format {saved.get('format', 1)}); "
                         "start a new run")
    old = TrainConfig.from_dict(saved["config"]).flat()
    changed = sorted(k for k, v in cfg.flat().items() if k not in RESUMABLE_CHANGES and old.get(k) != v)
    if changed:
        raise ValueError(f"{run.path}: cannot resume with a different config ({', '.join(changed)} changed)")
    state = TrainState.from_dict(saved["train_state"])
    if state.stop_reason == "epochs" and cfg.optim.epochs > state.epochs_done:
        state.stop_reason = ""  # a larger optim.epochs continues a finished run
    elif state.stop_reason == "patience" and state.bad_epochs < cfg.run.patience:
        state.stop_reason = ""  # a larger run.patience continues an early-stopped run
    return saved["splits"], state, saved


def _check_spatial_inputs(method: Method, store: FeatureStore, ids: list[str]) -> None:
    """A method on the patch graph (SRMIL) needs every slide's coordinates: refuse before training, naming them."""
    if method.neighbour_radius is None:
        return
    missing = [s for s in ids if not store.has_coords(s)]
    if missing:
        raise ValueError(f"{len(missing)} slide(s) have no patch coordinates, which method {method.name} needs: "
                         f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")


def _agree_on_early_stopping(distributed: DataParallel, early: EarlyStopping, improved: bool) -> bool:
    """Every process takes rank 0's early-stopping state (so all stop after the same epoch: a process that stopped
    alone would leave the others waiting in the gradient all-reduce)."""
    state = distributed.from_rank0([float(improved), float(early.bad_epochs), float(early.best_epoch),
                                    float("nan") if early.best is None else float(early.best)])
    early.bad_epochs, early.best_epoch = int(state[1]), int(state[2])
    early.best = None if state[3] != state[3] else state[3]
    return bool(state[0])


def _train_loader(store: FeatureStore, ids: list[str], cfg: TrainConfig, device: torch.device,
                  neighbour_radius: int | None, distributed: DataParallel | None,
                  groups: list[int] | None = None, cache: CohortCache | None = None) -> BagLoader:
    rank, world = (0, 1) if distributed is None else (distributed.rank, distributed.world)
    sampler = BagBatchSampler(store.sizes(ids), bags_per_step=cfg.data.bags_per_step,
                              max_instances_per_step=cfg.data.max_instances_per_step, shuffle=True, seed=cfg.run.seed,
                              rank=rank, world=world, groups=groups)
    return BagLoader(store, ids, sampler, prefetch=cfg.data.prefetch, pin_memory=device.type == "cuda",
                     neighbour_radius=neighbour_radius, cache=cache)


def _last_state(method: Method, stepper: Stepper, state: TrainState, cfg: TrainConfig, signature: dict,
                splits: dict) -> dict[str, Any]:
    return {"format": CHECKPOINT_FORMAT, "method_state": method.state_dict(), "stepper_state": stepper.state_dict(),
            "train_state": state.to_dict(), "config": cfg.to_dict(), "signature": signature, "splits": splits,
            "fastmil_version": __version__}


def _nothing_left(state: TrainState, cfg: TrainConfig) -> str:
    if state.stop_reason == "patience":
        return (f"run stopped early after epoch {state.epochs_done} (no improvement for {state.bad_epochs} epochs, "
                f"patience {cfg.run.patience}); raise run.patience (and optim.epochs) to continue it")
    return (f"run finished all {state.epochs_done} epochs; pass a larger optim.epochs (now {cfg.optim.epochs}) "
            "with --resume to continue it")


EXPLODING_FACTOR = 100.0
"""An epoch whose mean training loss exceeds this multiple of the first epoch's (and 10) gets a warning."""
EXPLODED_LOSS = 1e4
"""A mean training loss above this is a warning from the first epoch on (a cross-entropy is ~log C; 1e29 was seen
with features near 1e30)."""


def _warn_if_exploding(history: list[dict]) -> None:
    """Warn (once, on the epoch it happens) when the training loss has grown far past its first epoch's value:
    finite, but diverging (a too high learning rate, features near their dtype's limit)."""
    losses = [r["train"].get("loss") for r in history]
    if not losses or losses[-1] is None:
        return
    if losses[-1] > EXPLODED_LOSS and all(x is None or x <= EXPLODED_LOSS for x in losses[:-1]):
        warnings.warn(f"the training loss is {losses[-1]:.3g} in epoch {len(losses) - 1}: training has exploded "
                      "(features near their dtype's limit? a too high optim.lr?)", RuntimeWarning, stacklevel=3)
        return
    if len(losses) < 2 or losses[0] is None:
        return
    limit = max(10.0, EXPLODING_FACTOR * abs(losses[0]))
    if EXPLODED_LOSS >= losses[-1] > limit and all(x is None or x <= limit for x in losses[1:-1]):
        warnings.warn(f"the training loss is exploding: {losses[-1]:.3g} in epoch {len(losses) - 1} against "
                      f"{losses[0]:.3g} in epoch 0; lower optim.lr or set optim.grad_clip", RuntimeWarning,
                      stacklevel=3)


def fit(
    store: FeatureStore | str | os.PathLike,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    split_csv: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    step_callback: Callable[[int, int, float], None] | None = None,
    callbacks: Sequence[EpochCallback] = (),
    distributed: DataParallel | None = None,
) -> RunResult:
    """Train ``config.method`` (around ``config.model``) on the labelled slides of ``store`` into the run folder
    ``out``; returns the best model's metrics on every split.

    Args:
        split_csv: CLAM-style splits file; default: a stratified random split from ``run.seed``.
        resume: continue from ``out/last.pt`` (with ``config=None``: the run's saved config; a given config must
            match it, except ``optim.epochs``, ``run.device``, ``data.prefetch``, ``data.cache``,
            ``run.patience``, ``run.host_allocator``; larger epochs/patience continue a finished run).
        step_callback: ``step_callback(epoch, step, loss)`` after every optimiser step.
        callbacks: ``callback(record, run_folder)`` after every epoch (its checkpoints written): Ray Tune reports.
        distributed: this process's place in a data-parallel run (an initialised ``torch.distributed`` group;
            ``fastmil train --workers N`` through Ray Train): each process trains on its shard of every step,
            gradients are averaged, only rank 0 writes the run folder (the others read it to resume), and only
            rank 0 evaluates the finished run (the others return empty metrics).
    """
    main = distributed is None or distributed.is_main
    store, run = _as_store(store), (RunFolder(out) if main else ReadOnlyRunFolder(out))
    cfg = config or (TrainConfig.from_dict(run.read_config()) if resume else TrainConfig())
    world = 1 if distributed is None else distributed.world
    if cfg.run.workers != world:
        raise ValueError(f"config: run.workers={cfg.run.workers} but this fit runs in {world} process(es); "
                         "data-parallel runs start through `fastmil train --workers N` (Ray Train)")
    labels, cases, classes, records = _task_targets(store, cfg, run, resume)
    device = select_device(cfg.run.device)
    if cfg.run.host_allocator == "keep":
        keep_freed_host_memory()
    if cfg.run.amp != "none" and device.type != "cuda":
        raise ValueError(f"config: run.amp={cfg.run.amp!r} needs a CUDA device (got {device})")
    splits, state, saved = _open_run(run, cfg, resume, split_csv, labels, store, cases)
    task = (ClassificationRun.for_splits(labels, classes, splits, cfg.data.class_weighting, device)
            if records is None else SurvivalRun.for_splits(records, splits, cfg.task))
    torch.manual_seed(cfg.run.seed)
    method = build_method(cfg.method, cfg.model, store.dim, len(classes)).to(device)
    _check_spatial_inputs(method, store, [s for ids in splits.values() for s in ids])
    stepper = Stepper(method, cfg.optim, cfg.run.amp, device, distributed)
    signature = _signature(cfg, store.dim, classes)
    if saved is not None:
        check_model_config(saved["signature"], signature, str(run.last))
        method.load_state_dict(saved["method_state"])
        stepper.load_state_dict(saved["stepper_state"])
    run.start(cfg.to_dict(), splits)  # only once the run is known to be startable or resumable
    if run.writable and not resume:
        task.save(run.path)
    monitor_split = "val" if splits["val"] else "train"
    cached_ids = sorted({*splits["train"], *splits[monitor_split]})
    cache = open_cache(cfg.data.cache, store, cached_ids, device, method.neighbour_radius)
    loader = _train_loader(store, splits["train"], cfg, device, method.neighbour_radius, distributed,
                           task.groups(splits["train"]), cache)
    early = EarlyStopping(cfg.monitor, cfg.run.patience, state.best, state.best_epoch, state.bad_epochs)
    logger = EpochLogger(run, state.history, epochs=cfg.optim.epochs, start_epoch=state.epochs_done,
                         progress=progress and main, monitor=cfg.monitor, tensorboard=None if main else False)
    trained = False
    if cfg.data.cache != "none":
        size = cohort_bytes(store, cached_ids, method.neighbour_radius) / 2**30
        logger.note(f"data.cache={cfg.data.cache}: " + (
            f"nothing fits the {size:.2f} GiB; slides are read from the store every epoch" if cache is None
            else f"{cache.tier} tier, {size:.2f} GiB for {len(cached_ids)} slides"))
    try:
        if state.stop_reason:
            logger.note(_nothing_left(state, cfg))
        while not state.stop_reason and state.epochs_done < cfg.optim.epochs:
            trained = True
            epoch = state.epochs_done
            stats = train_epoch(stepper, loader, epoch, epochs=cfg.optim.epochs, seed=cfg.run.seed, device=device,
                                class_weight=task.class_weight, progress=logger.interactive,
                                step_callback=step_callback, loss_fn=task.loss_fn, loss_name=task.loss_name)
            started = time.perf_counter()
            val = task.split_metrics(method, store, splits[monitor_split], splits["train"], device, cfg.run.amp, cache)
            record = logger.record(epoch, stepper.lr, stats, val, time.perf_counter() - started)
            _warn_if_exploding(logger.history)
            improved = early.update(epoch, val)
            if distributed is not None:  # rank 0 decides for every process, whatever their metrics' rounding
                improved = _agree_on_early_stopping(distributed, early, improved)
            if improved:
                run.save("best.pt", {"format": CHECKPOINT_FORMAT, "method_state": method.state_dict(),
                                     "signature": signature, "epoch": epoch, "fastmil_version": __version__})
            stop = "patience" if early.exhausted else "epochs" if epoch + 1 == cfg.optim.epochs else ""
            state = TrainState(epoch + 1, logger.history, early.best, early.best_epoch, early.bad_epochs, stop)
            run.save("last.pt", _last_state(method, stepper, state, cfg, signature, splits))
            for callback in callbacks:
                callback(record, run)
        if trained and state.stop_reason == "patience":
            logger.note(f"early stop after epoch {state.epochs_done}: best val {cfg.monitor} at epoch "
                        f"{state.best_epoch + 1}")
    finally:
        logger.close()
    if not main:
        distributed.barrier()  # rank 0 has written best.pt and evaluates; the others are done
        return RunResult(run.path, {}, state.history, state.best_epoch)
    try:
        metrics = evaluate(run.path, store, progress=progress)
    finally:  # release the other processes even when the evaluation fails (rank 0 then raises)
        if distributed is not None:
            distributed.barrier()
    return RunResult(run.path, metrics, state.history, state.best_epoch)


# ----------------------------------------------------------------------------------------------------------------
# loading and evaluating a finished run
# ----------------------------------------------------------------------------------------------------------------
def load_method(
    run: str | os.PathLike, store: FeatureStore | None = None, device: torch.device | None = None
) -> tuple[Method, TrainConfig, dict]:
    """The best method of a run folder (in eval mode); returns ``(method, config, signature)``.

    With ``store``, checks that the store's feature dim and classes match the checkpoint."""
    folder = RunFolder(run)
    try:
        cfg = TrainConfig.from_dict(folder.read_config())
    except ConfigError as exc:
        raise ValueError(f"{folder.path / 'config.yaml'}: {exc} (a run folder of an older fastmil? retrain)") from exc
    best = load_checkpoint(folder.best)
    if best.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{folder.best}: written by an older fastmil (checkpoint format {best.get('format', 1)}); retrain"
        )
    sig = best["signature"]
    method = build_method(cfg.method, cfg.model, sig["in_dim"], sig["n_classes"])
    check_model_config(sig, _signature(cfg, sig["in_dim"], sig["classes"]), str(folder.best))
    try:
        method.load_state_dict(best["method_state"])
    except RuntimeError as exc:
        raise ValueError(f"{folder.best}: checkpoint is from another model config: {exc}") from exc
    if store is not None:
        if store.dim != sig["in_dim"]:
            raise ValueError(
                f"{folder.path}: model expects {sig['in_dim']}-dim features, store {store.path} has {store.dim}"
            )
        if sig.get("task", "classification") == "classification" and store.classes and list(store.classes) != list(
                sig["classes"]):
            raise ValueError(f"{folder.path}: model classes {sig['classes']} differ from store classes {store.classes}")
    method.to(device or select_device(cfg.run.device)).eval()
    return method, cfg, sig


def load_model(run: str | os.PathLike, store: FeatureStore | None = None, device: torch.device | None = None):
    """The model the run's best method predicts with; returns ``(model, config, signature)``."""
    method, cfg, sig = load_method(run, store, device)
    return method.model, cfg, sig


def evaluate(
    run: str | os.PathLike,
    store: FeatureStore | str | os.PathLike,
    splits: Sequence[str] = ("train", "val", "test"),
    *,
    progress: bool = True,
) -> dict:
    """Metrics of the run's best model on each split; written to ``RUN/metrics.json`` and returned."""
    import json

    run = Path(run)
    store = _as_store(store)
    method, cfg, sig = load_method(run, store)
    device = next(method.parameters()).device
    survival = SurvivalRun.load(run) if cfg.task.name == "survival" else None
    labels = labelled_slides(store) if survival is None else survival.strata()
    split_ids = load_splits(run / "splits.csv", labels, store)
    task = survival or ClassificationRun.for_splits(labels, sig["classes"], split_ids, cfg.data.class_weighting,
                                                    device, check=False)
    out = {}
    for name in tqdm(splits, desc="evaluate", unit="split", disable=None if progress else True, leave=False):
        out[name] = task.split_metrics(method, store, split_ids[name], split_ids["train"], device, cfg.run.amp)
    write_text_atomic(run / "metrics.json", json.dumps(out, indent=2))
    return out
