"""Where unpacked archives and downloaded releases are kept."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "default_cache_dir"]

#: Environment variable that overrides the cache folder.
CACHE_ENV = "EFFDET_CACHE"

_DEFAULT = "~/.cache/effdet-tf-port"


def default_cache_dir() -> Path:
    """``$EFFDET_CACHE`` if set and non-empty, else ``~/.cache/effdet-tf-port``."""
    return Path(os.environ.get(CACHE_ENV) or _DEFAULT).expanduser()
