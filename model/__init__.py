"""PyTorch EfficientDet that mirrors google/automl's TF graph layer for layer."""
from .config import DetConfig, get_config, release_config
from .efficientdet import EfficientDet, flatten_outputs
from .registry import RELEASES, VARIANTS

__all__ = ["EfficientDet", "DetConfig", "RELEASES", "VARIANTS", "get_config", "release_config",
           "flatten_outputs"]
