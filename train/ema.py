"""Exponential moving average of the weights, as automl's TF2 training keeps it.

automl wraps its optimizer in ``tfa.optimizers.MovingAverage(average_decay=moving_average_decay,
dynamic_decay=True)``: after each update of a trained variable its average moves by
``avg -= (avg - var) * (1 - decay)`` with ``decay = min(moving_average_decay,
(1 + n) / (10 + n))``, ``n`` the number of updates before this one. Only trained variables are
averaged; BN moving statistics are copied from the model.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """A frozen copy of ``model`` holding the averages; ``module`` is a ready model for eval."""

    def __init__(self, model: nn.Module, decay: float, trained_names: set[str]):
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.trained_names = trained_names
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        averages = dict(self.module.named_parameters())
        for name, param in model.named_parameters():
            if name in self.trained_names:
                average = averages[name]
                average.sub_((average - param.detach()) * (1.0 - decay))
        averaged_buffers = dict(self.module.named_buffers())
        for name, buffer in model.named_buffers():
            averaged_buffers[name].copy_(buffer)
        self.num_updates += 1

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
