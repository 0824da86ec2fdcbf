"""Checkpoints: plain dicts of tensors and primitives, written atomically, loaded with ``weights_only=True``."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ._atomic import atomic_target, write_text_atomic

__all__ = ["save_checkpoint", "load_checkpoint", "check_model_config", "write_text_atomic"]


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` via a temporary file and an atomic rename (a crash leaves the old file).

    Raises:
        OSError: naming the path, the cause and the free space left, when the file cannot be written (torch
            reports a full disk as ``RuntimeError: ... basic_ios::clear: iostream error``).
    """
    try:
        with atomic_target(path) as tmp:
            torch.save(state, tmp)
    except (OSError, RuntimeError) as exc:
        parent = Path(path).resolve().parent
        free = shutil.disk_usage(parent).free if parent.is_dir() else None
        space = "" if free is None else f"; {free / 2**20:.0f} MiB free on that disk"
        raise OSError(getattr(exc, "errno", None) or errno.EIO,
                      f"cannot write checkpoint {path}: {getattr(exc, 'strerror', None) or exc}{space}; the previous "
                      "checkpoint (if any) is unchanged") from exc


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint safely (no arbitrary unpickling); clear error if missing or damaged."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no checkpoint at {p}")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated/corrupt files
        raise ValueError(
            f"{p}: cannot load checkpoint (truncated, corrupt or not a fastmil checkpoint): {exc}"
        ) from exc


def check_model_config(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """Raise ``ValueError`` listing every difference between a checkpoint's model config and the current one."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}"
             for k in keys if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"{where}: checkpoint is from another model config ({'; '.join(diffs)})")
