"""Hidden temporary files and folders that name their owner, and the sweep of stale ones.

Every temporary path the tools create beside an output or in the cache is named
``.effdet-<host>-<pid>-<random>.<label>.tmp`` (``<host>``: 8 hex digits of this machine's
name). A run killed by SIGKILL (or a power cut) cannot remove its own; a later run removes those
of this machine whose process is gone, and any older than ``STALE_AFTER_S`` (a folder shared
between machines: another machine's pids say nothing here). Nothing else is ever removed: only
names of exactly this pattern.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path

__all__ = ["HOST_TAG", "STALE_AFTER_S", "temp_file", "temp_dir", "sweep_stale"]

#: A temp whose owner's pid is alive (or reused) is still removed after this long.
STALE_AFTER_S = 24 * 3600
#: This machine in temp names.
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_PATTERN = re.compile(r"^\.effdet-([0-9a-f]{8})-(\d+)-[a-z0-9_]{8}\.[^/]*\.tmp$")
_LABEL_MAX = 64  # keeps the temp name under NAME_MAX even for a long final name


def _affixes(label: str) -> tuple[str, str]:
    label = re.sub(r"[^\w.-]", "_", label)[:_LABEL_MAX] or "out"
    return f".effdet-{HOST_TAG}-{os.getpid()}-", f".{label}.tmp"


def temp_file(folder: Path, label: str) -> Path:
    """Create an empty temp file (mode 0600) in ``folder``; ``label`` is part of its name."""
    prefix, suffix = _affixes(label)
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.close(fd)
    return Path(name)


def temp_dir(folder: Path, label: str) -> Path:
    """Create a temp folder in ``folder``; ``label`` is part of its name."""
    prefix, suffix = _affixes(label)
    return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=folder))


def _owner_gone(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by someone else
        return False
    return False


def sweep_stale(folder: Path) -> list[Path]:
    """Remove the stale temps of this naming pattern in ``folder``; return what was removed.

    Stale: made on this machine by a process that no longer exists, or older than
    ``STALE_AFTER_S``.
    Errors (a folder that cannot be listed, a temp removed concurrently) are ignored.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        match = _PATTERN.match(entry.name)
        if not match:
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            ours = match.group(1) == HOST_TAG
            if not (old or (ours and _owner_gone(int(match.group(2))))):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed
