"""Per-epoch records: the run folder's history files, TensorBoard (when installed), and the console.

On a terminal the console shows tqdm bars; when stdout is not a terminal (a log file, a cluster job) it gets
one plain line per epoch instead of redrawn bars.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Any

from tqdm.auto import tqdm

from .epoch import EpochStats
from .run_folder import RunFolder, flatten_record

__all__ = ["EpochLogger", "tensorboard_available"]


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write events (the ``tensorboard`` package, extra ``[tb]``)."""
    return importlib.util.find_spec("tensorboard") is not None


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


class EpochLogger:
    """Collects one record per epoch (``{"epoch", "lr", "train": {...}, "val": {...}, "time": {...}}``) and
    writes it everywhere it belongs."""

    def __init__(self, run: RunFolder, history: list[dict], *, epochs: int, start_epoch: int, progress: bool,
                 monitor: str, tensorboard: bool | None = None) -> None:
        self.run, self.history, self.epochs, self.monitor = run, history, epochs, monitor
        self.interactive = progress and sys.stdout.isatty()
        self.plain = progress and not self.interactive
        self.bar = tqdm(total=epochs, initial=start_epoch, desc="train", unit="epoch", disable=not self.interactive)
        self.writer = None
        if tensorboard if tensorboard is not None else tensorboard_available():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.path / "tb"), purge_step=start_epoch)

    def record(self, epoch: int, lr: float, stats: EpochStats, val: dict, eval_s: float) -> dict:
        record = {
            "epoch": epoch,
            "lr": lr,
            "train": dict(stats.terms),
            "val": {k: v for k, v in val.items() if isinstance(v, (int, float)) or v is None},
            "time": {"data_s": stats.data_s, "compute_s": stats.compute_s, "eval_s": eval_s},
        }
        self.history.append(record)
        self.run.write_history(self.history)
        if self.writer is not None:
            for key, value in flatten_record(record).items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, epoch)
            self.writer.flush()
        shown = {"loss": stats.terms.get("loss"), f"val_{self.monitor}": val.get(self.monitor)}
        if self.interactive:
            self.bar.update(1)
            self.bar.set_postfix({k: _fmt(v) for k, v in shown.items()})
        elif self.plain:
            terms = "  ".join(f"train_{k} {_fmt(v)}" for k, v in stats.terms.items())
            vals = "  ".join(f"val_{k} {_fmt(val.get(k))}" for k in ("auc", "balanced_accuracy", "loss") if k in val)
            print(f"epoch {epoch + 1}/{self.epochs}  {terms}  {vals}  "
                  f"time {stats.data_s + stats.compute_s + eval_s:.1f} s (data wait {stats.data_s:.1f} s)", flush=True)
        return record

    def note(self, message: str) -> None:
        """A message for the console (early stop, nothing left to do)."""
        if self.interactive:
            self.bar.write(message)
        elif self.plain:
            print(message, flush=True)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
