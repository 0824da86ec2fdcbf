"""One writer per store: an exclusive ``flock`` on ``STORE/.lock``, held while a writable store is open.

Every ``mode="a"`` open takes it before recovering what an interrupted writer left (recovery clears staged
slides, which would destroy a live writer's work) and keeps it until :meth:`FeatureStore.close` (or the process
ends: the kernel drops a dead process's locks, so a crash never leaves the store locked). Readers take no lock.
Within one process the lock is shared by reference count, so a process may open its own store twice.
``flock`` is advisory and per host: on a network file system it holds across machines only where the server
implements it (NFSv4 does; run one writer per store otherwise).
"""
from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import warnings
from pathlib import Path

__all__ = ["LOCK_NAME", "StoreBusyError", "acquire", "release"]

LOCK_NAME = ".lock"
_POLL_SECONDS = 0.1
_HOLDER_WIDTH = 128  # bytes of the lock file's "pid N on HOST" line
_held: dict[str, list[int]] = {}  # realpath of the store -> [fd, open count]
_guard = threading.RLock()  # reentrant: a store's __del__ may run (and release) inside acquire on this thread
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # file systems without flock


class StoreBusyError(RuntimeError):
    """Another process holds the store's write lock."""


def _holder(lock_path: Path) -> str:
    """What the lock file says about its holder (``pid N on HOST``), for the error message."""
    try:
        text = lock_path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return "another process"
    return text or "another process"


def acquire(store: Path, timeout: float = 0.0) -> str:
    """Take the write lock of ``store``, waiting up to ``timeout`` seconds; returns the key to :func:`release`
    it with (the store's real path when locked: a store moved or relinked since still unlocks).

    Raises:
        StoreBusyError: another process holds it past ``timeout`` (the message names its pid and host).
        OSError: the lock file cannot be created (a read-only store: the message names the path).
    """
    key = os.path.realpath(store)
    with _guard:
        entry = _held.get(key)
        if entry is not None:
            entry[1] += 1
            return key
        lock_path = Path(key) / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:  # e.g. Lustre without -o flock: write on, but say it is unguarded
                    warnings.warn(f"{store}: this file system does not support flock ({exc.strerror}); another "
                                  "process writing the store at the same time would not be stopped", RuntimeWarning,
                                  stacklevel=3)
                    break
                if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise StoreBusyError(
                        f"{store}: store is being written by {_holder(lock_path)}; one writer at a time "
                        "(wait for it to finish, or read it with mode='r')") from None
                time.sleep(_POLL_SECONDS)
        # one fixed-width write in place, never a truncate first: a refused writer reading it meanwhile sees the
        # previous holder's line or this one, never an empty file
        line = f"pid {os.getpid()} on {os.uname().nodename}".encode()[: _HOLDER_WIDTH - 1]
        os.pwrite(fd, line.ljust(_HOLDER_WIDTH - 1) + b"\n", 0)
        _held[key] = [fd, 1]
        return key


def release(key: str) -> None:
    """Drop one hold of the write lock ``key`` (from :func:`acquire`); the last one unlocks it. Releasing an
    unheld key is a no-op."""
    with _guard:
        entry = _held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            os.close(entry[0])  # closing the descriptor drops the flock
