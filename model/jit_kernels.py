"""The numba-compiled kernels (``model/*_jit.py``), each imported on first use.

``None`` means numba cannot be imported here; the callers then run their numpy twins.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Optional


@functools.cache
def compiled(module: str, name: Optional[str] = None) -> Any:
    """``model.<module>.<name>`` (the module itself without ``name``), or None without numba."""
    try:
        loaded = importlib.import_module(f"{__package__}.{module}")
    except ImportError:
        return None
    return loaded if name is None else getattr(loaded, name)
