"""PyTorch EfficientDet that mirrors google/automl's TF graph layer for layer."""
from .config import VARIANTS, DetConfig, get_config
from .efficientdet import EfficientDet, flatten_outputs

__all__ = ["EfficientDet", "DetConfig", "VARIANTS", "get_config", "flatten_outputs"]
