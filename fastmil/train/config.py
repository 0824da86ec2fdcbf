"""Training configuration: sections ``model``, ``method``, ``optim``, ``data``, ``run``, ``task`` (YAML, CLI
overrides).

```yaml
model:  {name: abmil, embed_dim: 512, attn_dim: 128, gated: true, dropout: 0.25}   # the model's own section
method: {name: plain}                                                               # the method's own section
optim:  {lr: 2.0e-4, weight_decay: 1.0e-4, warmup_epochs: 0, epochs: 20, grad_clip: 1.0}
data:   {bags_per_step: 1, max_instances_per_step: null, val_fraction: 0.2, test_fraction: 0.2, prefetch: 2,
         class_weighting: true, cache: none}
run:    {seed: 0, device: auto, amp: none, monitor: auto, patience: 10, workers: 1, host_allocator: keep}
task:   {name: classification, survival_csv: null, bins: 4, alpha: 0.0}                # or `task: survival`
```

The chosen model and method validate their own sections (their ``Config`` dataclasses). Values are converted to
the declared types (``lr: 2e-4`` is a string to PyYAML), unknown keys are an error with a "did you mean", and
``section.key=value`` overrides (``fastmil train ... optim.lr=1e-4 run.amp=bf16``) apply on top of the file. The
resolved config is saved as ``RUN/config.yaml``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .._config import ConfigError, build, closest, read_yaml_mapping, suggest, to_dict
from ..data.cache import CacheTier
from ..methods import get_method, method_config
from ..nn import model_config

__all__ = ["DataConfig", "OptimConfig", "RunConfig", "SECTIONS", "TrainConfig", "load_config", "parse_overrides"]

Monitor = Literal["auto", "auc", "balanced_accuracy", "macro_f1", "loss", "c_index", "td_auc"]
CLASSIFICATION_MONITORS = ("auc", "balanced_accuracy", "macro_f1", "loss")
SURVIVAL_MONITORS = ("c_index", "td_auc", "loss")
Amp = Literal["none", "bf16", "fp16"]
HostAllocator = Literal["keep", "system"]


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up and a cosine decay to 0 at the end of the last epoch."""

    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    epochs: int = 20
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("weight_decay and warmup_epochs must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 or null, got {self.grad_clip}")


@dataclass
class DataConfig:
    """Steps (bags per step and/or an instance budget), the random split, loading, class weighting."""

    bags_per_step: int | None = 1
    max_instances_per_step: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    prefetch: int = 2
    class_weighting: bool = True
    cache: CacheTier = "none"  # keep the train and validation slides in memory: host | device | auto (data/cache.py)

    def __post_init__(self) -> None:
        if self.bags_per_step is None and self.max_instances_per_step is None:
            raise ValueError("set bags_per_step and/or max_instances_per_step")
        fractions = (self.val_fraction, self.test_fraction)
        if not (all(0 <= f < 1 for f in fractions) and sum(fractions) < 1):
            raise ValueError("need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1")
        if self.prefetch < 1:
            raise ValueError(f"prefetch must be >= 1, got {self.prefetch}")


@dataclass
class RunConfig:
    """Seed, device, mixed precision (CUDA), and early stopping on a validation metric."""

    seed: int = 0
    device: str = "auto"
    amp: Amp = "none"
    monitor: Monitor = "auto"  # auto: auc (classification), c_index (survival)
    patience: int = 10
    workers: int = 1  # data-parallel processes (fastmil train --workers N: Ray Train, one shard of each step each)
    host_allocator: HostAllocator = "keep"  # keep freed host memory for reuse (fastmil.train.host_memory)

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")


@dataclass
class TaskConfig:
    """What the bag head predicts: ``classification`` (labels; cross-entropy) or ``survival`` (discrete-time
    hazards over ``bins`` time bins from the training patients' event-time quantiles; the censored NLL with weight
    ``alpha`` on uncensored patients; targets from ``survival_csv`` or the store's own, see
    :mod:`fastmil.survival`)."""

    name: Literal["classification", "survival"] = "classification"
    survival_csv: str | None = None
    bins: int = 4
    alpha: float = 0.0

    def __post_init__(self) -> None:
        if self.bins < 2:
            raise ValueError(f"bins must be >= 2, got {self.bins}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.name != "survival" and self.survival_csv is not None:
            raise ValueError("survival_csv is for task survival (task: {name: survival, survival_csv: ...})")


SECTIONS = ("model", "method", "optim", "data", "run", "task")
_FIXED = {"optim": OptimConfig, "data": DataConfig, "run": RunConfig, "task": TaskConfig}

RESUMABLE_CHANGES = {"optim.epochs", "run.device", "data.prefetch", "data.cache", "run.patience",
                     "run.host_allocator"}
"""Keys that may differ between an interrupted run and its resumption. ``run.device``, ``data.prefetch``,
``data.cache``, ``run.patience`` and ``run.host_allocator`` leave the numbers as they were; a different
``optim.epochs`` re-plans the cosine learning rate over the new total from the resumed epoch on (a finished run
continued to more epochs trains again at a mid-schedule rate), which is the point of extending a run, not a
replay."""


def _default_model() -> Any:
    return model_config(None)


def _default_method() -> Any:
    return method_config(None)


@dataclass
class TrainConfig:
    """Everything that defines a training run. Build it with :meth:`from_dict` / :func:`load_config`."""

    model: Any = field(default_factory=_default_model)
    method: Any = field(default_factory=_default_method)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)

    def __post_init__(self) -> None:
        allowed = SURVIVAL_MONITORS if self.task.name == "survival" else CLASSIFICATION_MONITORS
        if self.run.monitor != "auto" and self.run.monitor not in allowed:
            raise ConfigError(f"run.monitor={self.run.monitor!r} is not a {self.task.name} metric; use auto or one "
                              f"of {list(allowed)}")

    @property
    def monitor(self) -> str:
        """The validation metric early stopping follows (``run.monitor``, with ``auto`` resolved for the task)."""
        if self.run.monitor != "auto":
            return self.run.monitor
        return "c_index" if self.task.name == "survival" else "auc"

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None = None, /, **sections: Mapping[str, Any]) -> TrainConfig:
        """From nested mappings (``{"optim": {"lr": 1e-3}, ...}``, or the sections as keyword arguments)."""
        merged = {**dict(mapping or {}), **sections}
        for key, value in merged.items():
            if key not in SECTIONS:
                raise ConfigError(
                    f"config: unknown section {key!r}{_section_hint(str(key))}; sections: {list(SECTIONS)}"
                )
            if key == "task" and isinstance(value, str):  # `task: survival` for {name: survival}
                merged[key] = value = {"name": value}
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(f"config: section {key!r} must be a mapping of key: value, got {value!r}")
        method = method_config(merged.get("method"))
        model = dict(merged.get("model") or {})
        model.setdefault("name", get_method(method.name).default_model)  # srmil: its spatial network
        return cls(
            model=model_config(model),
            method=method,
            **{name: build(kind, merged.get(name), name) for name, kind in _FIXED.items()},
        )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: to_dict(getattr(self, name)) for name in SECTIONS}

    def flat(self) -> dict[str, Any]:
        """``{"section.key": value}`` for every key (comparisons, logs)."""
        return {f"{s}.{k}": v for s, values in self.to_dict().items() for k, v in values.items()}

    def with_overrides(self, overrides: Sequence[str] | Mapping[str, Any]) -> TrainConfig:
        """A copy with ``section.key=value`` overrides applied (strings from a command line, or a mapping)."""
        data = self.to_dict()
        items = parse_overrides(overrides) if not isinstance(overrides, Mapping) else dict(overrides)
        # a new model/method name first: its own defaults, then the keys given for it, in whatever order given
        ordered = sorted(items.items(), key=lambda kv: kv[0] not in ("model.name", "method.name"))
        for key, value in ordered:
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name:
                raise ConfigError(f"override {key!r}: expected section.key with a section in {list(SECTIONS)}"
                                  f"{_section_hint(name or section)}")
            if section in ("model", "method") and name == "name" and value != data[section].get("name"):
                if (section == "method" and "model.name" not in items
                        and data["model"] == to_dict(model_config({"name": get_method(data["method"]["name"])
                                                                   .default_model}))):
                    data["model"] = {}  # an untouched default model follows the method's default (srmil: graphmil)
                data[section] = {}  # another model/method: its own defaults, not the old one's keys
            data[section][name] = value
        return TrainConfig.from_dict(data)


def _all_keys() -> list[str]:
    defaults = TrainConfig().to_dict()
    return [f"{s}.{k}" for s, values in defaults.items() for k in values]


def _section_hint(key: str) -> str:
    """A suggestion for a key given at the wrong level (``lr`` -> ``optim.lr``)."""
    full = _all_keys()
    leaf = {k.split(".", 1)[1]: k for k in full}
    match = key if key in leaf else closest(key, leaf)
    return f" (did you mean {leaf[match]!r}?)" if match else suggest(key, full)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["optim.lr=1e-4", "run.amp=bf16"]`` -> ``{"optim.lr": "1e-4", "run.amp": "bf16"}`` (values parsed as
    YAML scalars: ``true``, ``null``, numbers; the config converts them to the declared types)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
    return out


def load_config(
    path: str | os.PathLike | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Read a YAML config (or the defaults) and apply ``section.key=value`` overrides."""
    data = {} if path is None else read_yaml_mapping(path, "a training config (section: {key: value})")
    try:
        cfg = TrainConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None
    return cfg.with_overrides(overrides) if overrides else cfg
