"""Atomic text and byte writes for the verify tools' reports, results and plots."""

from __future__ import annotations

import os
from pathlib import Path

from model.weights_io import atomic_path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) so readers see the old file or the new one, never a torn one."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, then rename it over
    ``path``; the temporary file is removed on failure."""
    with atomic_path(path) as tmp_name, open(tmp_name, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)
