"""automl's learning-rate schedules (tf2/train_lib.py @ 6a54c87), as plain functions of the step."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .config import TrainConfig


@dataclass(frozen=True)
class LrSchedule:
    """``update_learning_rate_schedule_parameters`` resolved for one run."""

    adjusted_lr: float
    lr_warmup_init: float
    lr_warmup_step: int
    first_lr_drop_step: int
    second_lr_drop_step: int
    total_steps: int
    method: str
    poly_lr_power: float

    @classmethod
    def from_config(cls, config: TrainConfig, steps_per_epoch: int) -> "LrSchedule":
        # Port of automl efficientdet/tf2/train_lib.py::update_learning_rate_schedule_parameters
        return cls(
            adjusted_lr=config.learning_rate * config.batch_size / 64,
            lr_warmup_init=config.lr_warmup_init,
            lr_warmup_step=int(config.lr_warmup_epoch * steps_per_epoch),
            first_lr_drop_step=int(config.first_lr_drop_epoch * steps_per_epoch),
            second_lr_drop_step=int(config.second_lr_drop_epoch * steps_per_epoch),
            total_steps=int(config.num_epochs * steps_per_epoch),
            method=config.lr_decay_method,
            poly_lr_power=config.poly_lr_power)

    # Port of automl efficientdet/tf2/train_lib.py::{Cosine,Stepwise,Polynomial}LrSchedule.__call__
    def __call__(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0 for the first update)."""
        if step < self.lr_warmup_step:
            return self.lr_warmup_init + step / self.lr_warmup_step * \
                (self.adjusted_lr - self.lr_warmup_init)
        if self.method == "cosine":
            # automl divides the whole step (not the steps after warm-up) by the decay steps.
            decay_steps = self.total_steps - self.lr_warmup_step
            return 0.5 * self.adjusted_lr * (1 + math.cos(math.pi * step / decay_steps))
        if self.method == "polynomial":
            return self.adjusted_lr * (1 - step / self.total_steps) ** self.poly_lr_power
        if step < self.first_lr_drop_step:
            return self.adjusted_lr
        return self.adjusted_lr * (0.1 if step < self.second_lr_drop_step else 0.01)
