"""Write-aside-then-rename: the one mechanism behind every file fastmil writes atomically."""
from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_target", "write_text_atomic"]


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    The caller writes the whole file to the yielded path. If the block raises, the temporary file is removed
    and ``path`` is left as it was (absent or old), never half-written.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:  # the rename itself: durable before anything that depends on it (a journal's commit point)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (JSON, YAML, CSV) atomically."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
