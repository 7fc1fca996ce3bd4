"""PyTorch EfficientDet that mirrors google/automl's TF graph layer for layer.

Names are imported on first use (PEP 562), so ``import model`` and ``model.__version__`` do not
load torch: the command lines stay fast for ``--help`` and ``--version``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .config import DetConfig, get_config, release_config
    from .efficientdet import EfficientDet, flatten_outputs
    from .registry import RELEASES, VARIANTS

_LAZY = {"EfficientDet": ".efficientdet", "flatten_outputs": ".efficientdet",
         "DetConfig": ".config", "get_config": ".config", "release_config": ".config",
         "RELEASES": ".registry", "VARIANTS": ".registry"}

__all__ = ["EfficientDet", "DetConfig", "RELEASES", "VARIANTS", "get_config", "release_config",
           "flatten_outputs", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
