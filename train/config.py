"""Training hyper-parameters, named and defaulted as automl's ``hparams_config``."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from model.config import build_from_fields
from model.loss_config import LossConfig

LR_DECAY_METHODS = ("cosine", "stepwise", "polynomial")


@dataclass(frozen=True)
class TrainConfig(LossConfig):
    """What automl's ``default_detection_configs`` sets for training (same names); the loss
    fields (alpha, gamma, ...) are :class:`LossConfig`'s."""

    batch_size: int = 64              # global batch (all processes together)
    num_epochs: int = 300
    learning_rate: float = 0.08       # for a batch of 64; scaled by batch_size / 64
    lr_warmup_init: float = 0.008
    lr_warmup_epoch: float = 1.0
    lr_decay_method: str = "cosine"
    first_lr_drop_epoch: float = 200.0
    second_lr_drop_epoch: float = 250.0
    poly_lr_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 4e-5
    clip_gradients_norm: float = 10.0
    moving_average_decay: float = 0.9998
    var_freeze_expr: Optional[str] = None
    map_freq: int = 5                 # COCO AP every map_freq epochs (and after the last)
    # Input pipeline (dataloader.py).
    input_rand_hflip: bool = True
    jitter_min: float = 0.1
    jitter_max: float = 2.0
    skip_crowd_during_training: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()   # validates iou_loss_type
        if self.lr_decay_method not in LR_DECAY_METHODS:
            raise ValueError(f"unknown lr_decay_method {self.lr_decay_method!r}; "
                             f"known: {', '.join(LR_DECAY_METHODS)}")
        if self.batch_size < 1 or self.num_epochs <= 0:
            raise ValueError("batch_size and num_epochs must be positive")
        if not 0 < self.jitter_min <= self.jitter_max:
            raise ValueError("need 0 < jitter_min <= jitter_max")
        if self.var_freeze_expr is not None:
            try:
                re.compile(self.var_freeze_expr)
            except re.error as error:
                raise ValueError(f"var_freeze_expr {self.var_freeze_expr!r}: {error}") from None

    def loss_config(self) -> LossConfig:
        names = {f.name for f in dataclasses.fields(LossConfig)}
        return LossConfig(**{name: getattr(self, name) for name in names})

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        return build_from_fields(cls, values, "training config")
