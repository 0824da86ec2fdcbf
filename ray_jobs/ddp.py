"""Data-parallel training on Ray Train: ``fastmil train ... --workers N`` (or ``run.workers=N``).

A ``TorchTrainer`` starts N workers (one per GPU with ``use_gpu``, else CPU processes) and a ``torch.distributed``
process group (NCCL on GPUs, gloo on CPUs); each worker runs fastmil's ``fit`` with
``distributed=DataParallel(rank, N)``: a disjoint, seed-determined share of every step, gradients averaged after
backward (:mod:`fastmil.train.distributed`), rank 0 alone writing the run folder. Checkpoints (``last.pt``,
``best.pt``) and ``--resume`` are the run folder's, exactly as in a single-process run, so the run folder must be
on storage every worker reaches (one machine, or a shared filesystem on a cluster). Ray's own bookkeeping goes
to ``RUN/ray/``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["train_data_parallel"]


def _worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: fastmil's fit on this worker's shard."""
    import ray.train

    from fastmil.train import TrainConfig, fit
    from fastmil.train.distributed import DataParallel

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = TrainConfig.from_dict(config["config"])

    def report(record: dict, run) -> None:
        from fastmil.train.run_folder import flatten_record

        ray.train.report({k: v for k, v in flatten_record(record).items() if isinstance(v, (int, float))})

    fit(config["store"], config["out"], cfg, split_csv=config["split_csv"], resume=config["resume"],
        progress=False, callbacks=[report], distributed=DataParallel(rank, world))


def train_data_parallel(store: str | os.PathLike, out: str | os.PathLike, config, *, workers: int,
                        resume: bool = False, split_csv: str | os.PathLike | None = None,
                        use_gpu: bool | None = None) -> Path:
    """Train ``config`` on ``store`` into the run folder ``out`` with ``workers`` data-parallel Ray Train workers
    (on the Ray cluster ``ray.init`` connects to: a local one by default). Returns the run folder."""
    import ray
    import torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if workers < 2:
        raise ValueError(f"data-parallel training needs >= 2 workers, got {workers}")
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    config = config.with_overrides({"run.workers": workers}) if config.run.workers != workers else config
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"store": str(Path(store).resolve()), "out": str(out), "config": config.to_dict(),
                           "resume": resume,
                           "split_csv": None if split_csv is None else str(Path(split_csv).resolve())},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
        run_config=RunConfig(storage_path=str(out / "ray"), name="train"),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"data-parallel training failed: {result.error}") from result.error
    return out
