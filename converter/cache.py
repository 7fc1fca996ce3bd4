"""Where unpacked archives and downloaded releases are kept."""

from __future__ import annotations

import os
from pathlib import Path

from converter.errors import OutputError

__all__ = ["CACHE_ENV", "default_cache_dir", "make_cache_folder"]

#: Environment variable that overrides the cache folder.
CACHE_ENV = "EFFDET_CACHE"

_DEFAULT = "~/.cache/effdet-tf-port"


def default_cache_dir() -> Path:
    """``$EFFDET_CACHE`` if set and non-empty, else ``~/.cache/effdet-tf-port``."""
    return Path(os.environ.get(CACHE_ENV) or _DEFAULT).expanduser()


def make_cache_folder(folder: Path) -> Path:
    """Create a cache folder (and parents) if needed.

    Raises:
        OutputError: it cannot be created (read-only, not a folder, permission).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create cache folder {folder}: {exc.strerror or exc}") from exc
    return folder
