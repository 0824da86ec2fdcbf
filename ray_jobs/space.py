"""Sweep specifications: the YAML a sweep is described by, and its search space as Ray Tune distributions.

```yaml
store: demo_out/store            # the zarr store, read in place by every trial (a path every worker reaches)
out: sweeps/demo                 # experiment folder: Ray's trial folders, results.csv, best_config.yaml, PNG
train_config: null               # a `fastmil train` config YAML the trials start from (optional)
base: {optim.epochs: 4}          # fixed overrides on top of it (section.key: value)
search_space:                    # section.key: {distribution: arguments}
  optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
  optim.weight_decay: {choice: [1.0e-5, 1.0e-4]}
num_samples: 4                   # trials (times the grid, for grid_search entries)
metric: auc                      # validation metric: val_<metric> from each epoch's record (survival: c_index)
mode: max
scheduler: {name: asha, grace_period: 1, reduction_factor: 2}   # or {name: fifo}
resources: {cpus_per_trial: 1, gpus_per_trial: 0}                # fractional GPUs pack trials on one GPU
max_concurrent: 2                # trials at once (null: as many as the resources allow)
max_failures: 2                  # restarts of a failed trial, each from its last checkpoint
folds: 0                         # k >= 2: score a config by the mean best validation metric over k patient folds
```

Distributions: ``loguniform``/``uniform`` ``[low, high]``, ``randint`` ``[low, high)``, ``choice`` ``[...]``,
``grid`` ``[...]`` (every value, times ``num_samples``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastmil._config import read_yaml_mapping

__all__ = ["DISTRIBUTIONS", "SweepSpec", "load_spec", "tune_space"]

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


@dataclass
class SweepSpec:
    """A sweep, as read from its YAML (paths resolved against the current directory)."""

    store: str
    out: str
    search_space: dict[str, dict[str, Any]]
    train_config: str | None = None
    base: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 4
    metric: str = "auc"
    mode: str = "max"
    scheduler: dict[str, Any] = field(default_factory=lambda: {"name": "asha"})
    resources: dict[str, float] = field(default_factory=lambda: {"cpus_per_trial": 1, "gpus_per_trial": 0})
    max_concurrent: int | None = None
    max_failures: int = 2
    folds: int = 0
    synth: dict[str, Any] | None = None  # the demo: synthesise this cohort into `store` when it is missing

    def __post_init__(self) -> None:
        if not self.search_space:
            raise ValueError("sweep: search_space is empty")
        for key, dist in self.search_space.items():
            if "." not in key:
                raise ValueError(f"sweep: search_space key {key!r} must be section.key (e.g. optim.lr)")
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
                raise ValueError(f"sweep: {key}: expected one of {DISTRIBUTIONS} with its arguments, got {dist!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"sweep: mode must be max or min, got {self.mode!r}")
        if self.num_samples < 1 or self.max_failures < 0 or self.folds == 1 or self.folds < 0:
            raise ValueError("sweep: need num_samples >= 1, max_failures >= 0 and folds 0 or >= 2")
        if self.scheduler.get("name", "asha") not in ("asha", "fifo"):
            raise ValueError(f"sweep: scheduler.name must be asha or fifo, got {self.scheduler.get('name')!r}")
        gpus = float(self.resources.get("gpus_per_trial", 0))
        if gpus < 0 or float(self.resources.get("cpus_per_trial", 1)) <= 0:
            raise ValueError("sweep: resources need cpus_per_trial > 0 and gpus_per_trial >= 0")


def load_spec(path: str | os.PathLike | None, **overrides: Any) -> SweepSpec:
    """The sweep of a YAML file (or of ``overrides`` alone), with command-line ``overrides`` (None = keep)."""
    data = {} if path is None else read_yaml_mapping(path, "a sweep config (see ray_jobs/space.py)")
    data.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(data) - set(SweepSpec.__dataclass_fields__))
    if unknown:
        raise ValueError(f"{path or 'sweep'}: unknown keys {unknown}; known: {sorted(SweepSpec.__dataclass_fields__)}")
    for key in ("store", "out"):
        if key not in data:
            raise ValueError(f"{path or 'sweep'}: {key!r} is missing (in the YAML or as --{key})")
    spec = SweepSpec(**data)
    spec.store = str(Path(spec.store).expanduser().resolve()) if "://" not in spec.store else spec.store
    spec.out = str(Path(spec.out).expanduser().resolve())
    if spec.train_config is not None:
        spec.train_config = str(Path(spec.train_config).expanduser().resolve())
    return spec


def tune_space(spec: SweepSpec) -> dict[str, Any]:
    """The search space as Ray Tune sampling objects, keyed by ``section.key``."""
    from ray import tune

    space: dict[str, Any] = {}
    for key, dist in spec.search_space.items():
        kind, args = next(iter(dist.items()))
        if kind in ("loguniform", "uniform", "randint"):
            low, high = args
            space[key] = getattr(tune, kind)(low, high)
        elif kind == "choice":
            space[key] = tune.choice(list(args))
        else:
            space[key] = tune.grid_search(list(args))
    return space
