"""Training configuration: a dataclass, loadable from YAML, validated on construction."""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import yaml

__all__ = ["TrainConfig", "load_config"]

MONITORS = ("auc", "balanced_accuracy", "macro_f1", "loss")
AMP_MODES = ("none", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved as ``config.yaml`` in the run folder)."""

    method: str = "abmil"
    epochs: int = 20
    lr: float = 2e-4
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    embed_dim: int = 512
    attn_dim: int = 128
    gated: bool = True
    dropout: float = 0.25
    bags_per_step: int | None = 1
    max_instances_per_step: int | None = None
    seed: int = 0
    monitor: str = "auc"
    patience: int = 10
    grad_clip: float | None = 1.0
    amp: str = "none"  # CUDA only: "bf16" or "fp16" autocast; softmax and accumulations stay fp32
    class_weighting: bool = True
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    device: str = "auto"
    prefetch: int = 2

    def __post_init__(self) -> None:
        from ..methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"config: unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.epochs < 1:
            raise ValueError(f"config: epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ValueError(f"config: lr must be > 0, got {self.lr}")
        if self.monitor not in MONITORS:
            raise ValueError(f"config: monitor must be one of {MONITORS}, got {self.monitor!r}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"config: amp must be one of {AMP_MODES}, got {self.amp!r}")
        if not (0 <= self.val_fraction < 1 and 0 <= self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError("config: need 0 <= val_fraction, test_fraction and val_fraction + test_fraction < 1")
        if self.bags_per_step is None and self.max_instances_per_step is None:
            raise ValueError("config: set bags_per_step and/or max_instances_per_step")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"config: dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """Read a YAML config (or the defaults) and apply ``overrides`` (None values are ignored)."""
    data: dict[str, Any] = {}
    if path is not None:
        with open(path, encoding="utf-8") as fh:
            loaded = yaml.safe_load(fh) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: config must be a mapping of key: value")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.from_dict(data)
