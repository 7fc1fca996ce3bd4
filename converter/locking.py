"""An exclusive lock between processes on one path: ``fcntl.flock`` on a lock file.

The lock file is removed again on release. A process that opened it just before removal would
hold a lock on a file nobody else sees; every acquirer therefore checks, once it holds the lock,
that the path still names the file it locked, and retries otherwise.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

__all__ = ["LockBusy", "file_lock"]


class LockBusy(OSError):
    """The lock is held by another process and ``wait=False`` was asked."""


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block.

    Raises:
        LockBusy: ``wait`` is false and another process holds the lock.
        OSError: the lock file cannot be created.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"{path} is locked by another process") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # removed by its previous holder meanwhile: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)
