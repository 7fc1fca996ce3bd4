"""Loss hyper-parameters (no torch: the ``train`` CLI reads them for ``--help``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

IOU_LOSS_TYPES = ("iou", "giou", "diou", "ciou")


@dataclass(frozen=True)
class LossConfig:
    """Loss hyper-parameters; names and defaults are automl's ``hparams_config``."""

    alpha: float = 0.25
    gamma: float = 1.5
    label_smoothing: float = 0.0
    delta: float = 0.1
    box_loss_weight: float = 50.0
    iou_loss_type: Optional[str] = None
    iou_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.iou_loss_type is not None and self.iou_loss_type not in IOU_LOSS_TYPES:
            raise ValueError(f"unknown iou_loss_type {self.iou_loss_type!r}; "
                             f"known: {', '.join(IOU_LOSS_TYPES)}")
