"""Hyper-parameter sweeps of fastmil on Ray Tune: ``python -m ray_jobs.sweep --config SWEEP.yaml`` (also
``fastmil sweep``).

Each trial is fastmil's own ``fit`` (no second training loop) on the store, read in place by path. After every
epoch the trial reports its flat epoch record (``val_auc``, ``train_loss``, ...) to Tune with a checkpoint holding
the run folder's state (``last.pt``, ``best.pt``, ``config.yaml``, ``splits.csv``, history); a restarted trial
(``FailureConfig(max_failures)``: a crashed or killed worker) restores that folder from ``tune.get_checkpoint()``
and resumes ``fit`` from its last epoch, so no finished epoch is lost or repeated. ASHA (default) stops weak trials
early on the per-epoch metric; FIFO runs every trial to the end. (Population-based training is not offered: it
restarts a trial from another trial's checkpoint with changed hyper-parameters, which ``fit``'s resume refuses by
design, since a resumed run must be the run it continues.) ``--resume`` continues an interrupted sweep
(``Tuner.restore``: finished trials are not rerun).

With ``folds: k`` a trial trains k patient-level folds (:func:`fastmil.train.cv.patient_folds`) one after another
and reports, after each fold, the mean of the folds' best validation metrics so far (the scheduler's time axis is
then the fold); its checkpoint holds the finished folds' scores.

Outputs in ``out``: Ray's experiment folder (``out/trials``), ``results.csv`` (one row per trial: config, best
validation metric and epoch, status), ``best_config.yaml`` (a ``fastmil train --config`` file: the trials' start
config with the best trial's values) and ``sweep.png`` (validation metric against each swept hyper-parameter).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .space import SweepSpec, load_spec, tune_space

__all__ = ["CHECKPOINT_FILES", "main", "run_sweep", "train_trial"]

CHECKPOINT_FILES = ("last.pt", "best.pt", "config.yaml", "splits.csv", "history.json", "metrics.csv",
                    "survival.csv", "survival.json")
"""What of a run folder a trial checkpoint carries (everything ``fit(resume=True)`` reads)."""
FAULT_ENV = "FASTMIL_SWEEP_KILL_AFTER_EPOCH"
"""Fault injection for the tests: ``"<marker file>:<epoch>"`` in the driver's environment makes the first trial
process that finishes that epoch (and finds no marker) create the marker and SIGKILL itself right after
reporting it (the setting travels to the trials with the sweep, whatever environment Ray's workers have)."""


def _train_config(spec: dict, values: dict[str, Any]):
    from fastmil.train.config import load_config

    return load_config(spec["train_config"], {**spec["base"], **values})


def _restore(checkpoint, run_dir: Path) -> bool:
    """Put a trial checkpoint's files into ``run_dir``; True if it held a run to resume. Without a checkpoint the
    trial starts afresh: whatever an earlier attempt left in ``run_dir`` (it may have died after writing
    ``last.pt`` but before its first report) is removed."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    if checkpoint is None:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as folder:
        for path in Path(folder).iterdir():
            shutil.copy2(path, run_dir / path.name)
    return (run_dir / "last.pt").is_file()


def _maybe_die(target: str | None, epoch: int) -> None:
    if not target:
        return
    marker, _, at = target.rpartition(":")
    if epoch == int(at) and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(2.0)  # let the driver take the report in, so the kill lands between epochs, as a test wants
        os.kill(os.getpid(), signal.SIGKILL)


def _reporter(fault: str | None):
    """The epoch callback of ``fit``: report the flat record with a checkpoint of the run folder."""
    from ray import tune

    from fastmil.train.run_folder import flatten_record

    def report(record: dict, run) -> None:
        flat = {k: v for k, v in flatten_record(record).items() if isinstance(v, (int, float))}
        with tempfile.TemporaryDirectory(prefix="fastmil-ckpt-") as folder:
            for name in CHECKPOINT_FILES:
                if (run.path / name).is_file():
                    shutil.copy2(run.path / name, Path(folder) / name)
            tune.report(flat, checkpoint=tune.Checkpoint.from_directory(folder))
        _maybe_die(fault, record["epoch"])

    return report


def train_trial(config: dict[str, Any]) -> None:
    """The Tune trainable: ``config`` holds the swept ``section.key`` values and the sweep under ``_sweep``."""
    from ray import tune

    from fastmil.train import fit

    spec = config["_sweep"]
    values = {k: v for k, v in config.items() if not k.startswith("_")}
    cfg = _train_config(spec, values)
    trial_dir = Path(tune.get_context().get_trial_dir())
    if spec["folds"] >= 2:
        _train_folds(spec, cfg, trial_dir)
        return
    run_dir = trial_dir / "run"
    resume = _restore(tune.get_checkpoint(), run_dir)
    fit(spec["store"], run_dir, None if resume else cfg, resume=resume, progress=False,
        callbacks=[_reporter(spec.get("fault"))])


def _train_folds(spec: dict, cfg, trial_dir: Path) -> None:
    """k-fold scoring: one fit per fold, a report after each with the mean best validation metric so far."""
    from ray import tune

    from fastmil.data import open_store
    from fastmil.train import fit
    from fastmil.train.cv import draw_folds
    from fastmil.train.splits import write_splits

    store = open_store(spec["store"])
    folds = draw_folds(store, cfg, spec["folds"])
    scores: list[float] = []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            scores = json.loads((Path(folder) / "folds.json").read_text())["scores"]
    sign = 1 if spec["mode"] == "max" else -1
    for k in range(len(scores), len(folds)):
        split = trial_dir / f"splits_{k}.csv"
        write_splits(split, folds[k])
        fold_dir = trial_dir / f"fold_{k}"
        if fold_dir.exists():  # a fold interrupted before its report restarts from scratch
            shutil.rmtree(fold_dir)
        result = fit(store, fold_dir, cfg, split_csv=split, progress=False)
        vals = [r["val"].get(spec["metric"]) for r in result.history if r["val"].get(spec["metric"]) is not None]
        scores.append(max(vals, key=lambda v: sign * v) if vals else float("nan"))
        with tempfile.TemporaryDirectory(prefix="fastmil-ckpt-") as folder:
            (Path(folder) / "folds.json").write_text(json.dumps({"scores": scores}))
            tune.report({f"val_{spec['metric']}": sum(scores) / len(scores), "folds_done": len(scores)},
                        checkpoint=tune.Checkpoint.from_directory(folder))


def _scheduler(spec: SweepSpec, max_t: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    options = {k: v for k, v in spec.scheduler.items() if k != "name"}
    name = spec.scheduler.get("name", "asha")
    if name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, **options)
    return FIFOScheduler()


def _tuner(spec: SweepSpec, resume: bool):
    from ray import tune

    from fastmil.train.config import CLASSIFICATION_MONITORS, SURVIVAL_MONITORS

    base = _train_config({"train_config": spec.train_config, "base": spec.base}, {})
    allowed = SURVIVAL_MONITORS if base.task.name == "survival" else CLASSIFICATION_MONITORS
    if spec.metric not in allowed:
        raise ValueError(f"metric {spec.metric!r} is not reported for task {base.task.name}; use one of "
                         f"{list(allowed)}")
    max_t = spec.folds if spec.folds >= 2 else base.optim.epochs
    metric = f"val_{spec.metric}"
    trainable = tune.with_resources(train_trial, {"cpu": float(spec.resources.get("cpus_per_trial", 1)),
                                                  "gpu": float(spec.resources.get("gpus_per_trial", 0))})
    experiment = Path(spec.out) / "trials"
    if resume:
        if not tune.Tuner.can_restore(str(experiment)):
            raise ValueError(f"{experiment}: no sweep to resume there")
        return tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    if tune.Tuner.can_restore(str(experiment)):
        raise ValueError(f"{experiment}: holds a sweep already; pass --resume to continue it or choose another out")
    sweep = {"store": spec.store, "train_config": spec.train_config, "base": spec.base, "folds": spec.folds,
             "metric": spec.metric, "mode": spec.mode, "fault": os.environ.get(FAULT_ENV)}
    return tune.Tuner(
        trainable,
        param_space={**tune_space(spec), "_sweep": sweep},
        tune_config=tune.TuneConfig(metric=metric, mode=spec.mode, num_samples=spec.num_samples,
                                    scheduler=_scheduler(spec, max_t),
                                    max_concurrent_trials=spec.max_concurrent),
        run_config=tune.RunConfig(name="trials", storage_path=str(Path(spec.out)),
                                  failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  verbose=0),
    )


def _ensure_store(spec: SweepSpec) -> None:
    if spec.synth is None or Path(spec.store).exists():
        return
    from fastmil.data import SynthConfig, synthesize_store

    synthesize_store(SynthConfig(**spec.synth), spec.store, progress=False)


def run_sweep(spec: SweepSpec, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) the sweep; write ``results.csv``, ``best_config.yaml`` and ``sweep.png`` into ``spec.out``.
    Returns ``{"best_config": {...section.key values}, "best_metric": float, "results": path}``."""
    import ray

    _ensure_store(spec)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    # a checkpoint per epoch is the point here; Tune warns when it snapshots its state that often
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    grid = _tuner(spec, resume).fit()
    return _write_outputs(spec, grid)


def _write_outputs(spec: SweepSpec, grid) -> dict[str, Any]:
    from fastmil._atomic import write_text_atomic

    metric = f"val_{spec.metric}"
    keys = list(spec.search_space)
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = {k: result.config.get(k) for k in keys}
        best = best_epoch = None
        if history is not None and metric in history:
            series = history[metric].dropna()
            if len(series) and spec.folds >= 2:  # the running mean over folds: its last value is the score
                best = float(series.iloc[-1])
            elif len(series):
                pos = series.idxmax() if spec.mode == "max" else series.idxmin()
                best = float(series[pos])
                best_epoch = int(history.loc[pos, "epoch"]) if "epoch" in history else None
        # epochs trained: a trial restored from a checkpoint may report again the epochs after it
        trained = 0 if history is None else (history["epoch"].nunique() if "epoch" in history else len(history))
        rows.append({"trial": Path(result.path).name, **values, metric: best, "best_epoch": best_epoch,
                     "epochs": trained,
                     "status": "error" if result.error is not None else "done"})
    import pandas as pd

    table = pd.DataFrame(rows)
    out = Path(spec.out)
    write_text_atomic(out / "results.csv", table.to_csv(index=False))
    scored = table.dropna(subset=[metric])
    if scored.empty:
        raise RuntimeError(f"sweep: no trial reported {metric}; see {out / 'trials'}")
    best_row = scored.loc[scored[metric].idxmax() if spec.mode == "max" else scored[metric].idxmin()]
    best_values = {k: _plain(best_row[k]) for k in keys}
    best_cfg = _train_config({"train_config": spec.train_config, "base": spec.base}, best_values)
    write_text_atomic(out / "best_config.yaml", yaml.safe_dump(best_cfg.to_dict(), sort_keys=False))
    _plot(table, keys, metric, spec, out / "sweep.png")
    return {"best_config": best_values, "best_metric": float(best_row[metric]), "results": str(out / "results.csv")}


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _plot(table, keys: list[str], metric: str, spec: SweepSpec, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        kind = next(iter(spec.search_space[key]))
        x = table[key]
        numeric = kind in ("loguniform", "uniform", "randint")
        ax.scatter(x if numeric else x.astype(str), table[metric], c="tab:blue")
        if kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{len(table)} trials, {spec.scheduler.get('name', 'asha')}")
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png", dir=path.parent, delete=False) as tmp:
        fig.savefig(tmp.name, dpi=100)
    os.replace(tmp.name, path)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    from fastmil.cli import _ray_sweep_arguments

    p = argparse.ArgumentParser(prog="python -m ray_jobs.sweep", description=__doc__.split("\n\n")[0])
    _ray_sweep_arguments(p)
    return p


def main(argv: list[str] | None = None, args: argparse.Namespace | None = None) -> int:
    if args is None:
        args = build_parser().parse_args(argv)
    spec = load_spec(args.config, store=args.store, out=args.out, num_samples=args.num_samples, folds=args.folds,
                     max_failures=args.max_failures)
    if args.gpus_per_trial is not None or args.cpus_per_trial is not None:
        spec.resources = {**spec.resources, **({"gpus_per_trial": args.gpus_per_trial}
                                               if args.gpus_per_trial is not None else {}),
                          **({"cpus_per_trial": args.cpus_per_trial} if args.cpus_per_trial is not None else {})}
    if args.scheduler is not None:
        spec.scheduler = {"name": args.scheduler}
    if args.address is not None:
        import ray

        ray.init(address=args.address)
    summary = run_sweep(spec, resume=args.resume)
    print(f"best val_{spec.metric} {summary['best_metric']:.4f} with {summary['best_config']}")
    print(f"results      {summary['results']}")
    print(f"best config  {Path(spec.out) / 'best_config.yaml'}  (fastmil train --config ...)")
    print(f"plot         {Path(spec.out) / 'sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
