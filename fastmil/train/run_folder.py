"""The run folder: what a training run writes, and the state it resumes from.

    RUN/config.yaml     the resolved TrainConfig         RUN/splits.csv    train/val/test slide ids (CLAM layout)
    RUN/last.pt         full state after each epoch      RUN/best.pt       best model by the monitored val metric
    RUN/history.json    one record per epoch             RUN/metrics.csv   the same, one flat row per epoch
    RUN/metrics.json    per-split metrics of the best model (evaluate)
    RUN/tb/             TensorBoard events (when the tensorboard package is installed)

Every file is written atomically (write aside, then rename): a kill leaves the old or the new version.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._atomic import write_text_atomic
from .._config import read_yaml_mapping
from ..checkpoint import load_checkpoint, save_checkpoint
from .splits import write_splits

__all__ = ["ReadOnlyRunFolder", "RunFolder", "TrainState", "flatten_record"]


@dataclass
class TrainState:
    """Progress of a run: epochs done, per-epoch records, early-stopping state, why it stopped (if it did)."""

    epochs_done: int = 0
    history: list[dict] = field(default_factory=list)
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stop_reason: str = ""  # "", "epochs" (last epoch reached) or "patience" (early stop)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainState:
        return cls(**data)


def flatten_record(record: dict) -> dict[str, Any]:
    """A history record as one flat row: ``epoch``, ``lr``, ``train_<term>``, ``val_<metric>`` (scalars only),
    ``time_<part>_s``."""
    row: dict[str, Any] = {"epoch": record["epoch"], "lr": record.get("lr")}
    for section in ("train", "val", "time"):
        for key, value in record.get(section, {}).items():
            if isinstance(value, (int, float)) or value is None:
                row[f"{section}_{key}"] = value
    return row


class RunFolder:
    """Paths and atomic writes of one run folder."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.last = self.path / "last.pt"
        self.best = self.path / "best.pt"

    def holds_run(self) -> bool:
        return self.last.is_file()

    def load_last(self) -> dict:
        return load_checkpoint(self.last)

    def start(self, config: dict, splits: dict[str, list[str]]) -> None:
        """Create the folder and write the resolved config and the splits."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        write_splits(self.path / "splits.csv", splits)

    def read_config(self) -> dict:
        cfg = self.path / "config.yaml"
        if not cfg.is_file():
            raise ValueError(f"{self.path}: not a fastmil run folder (no config.yaml)")
        return read_yaml_mapping(cfg, "a run's config.yaml")

    def save(self, name: str, state: dict) -> None:
        save_checkpoint(self.path / name, state)

    @property
    def writable(self) -> bool:
        return True

    def write_history(self, history: list[dict]) -> None:
        """``history.json`` (nested records) and ``metrics.csv`` (one flat row per epoch, union of columns)."""
        write_text_atomic(self.path / "history.json", json.dumps(history, indent=2))
        rows = [flatten_record(r) for r in history]
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path / "metrics.csv", buf.getvalue())


class ReadOnlyRunFolder(RunFolder):
    """The run folder as a data-parallel process other than rank 0 sees it: it reads (resume) but never writes."""

    @property
    def writable(self) -> bool:
        return False

    def start(self, config: dict, splits: dict[str, list[str]]) -> None:
        pass

    def save(self, name: str, state: dict) -> None:
        pass

    def write_history(self, history: list[dict]) -> None:
        pass
