"""Class and box heads (automl efficientdet/tf2/efficientdet_keras.py::ClassNet / BoxNet).

Tower convs are shared across levels while every (repeat, level) pair has its own BN:
``class_net.class_0`` and ``class_net.class_0_bn_3`` mirror TF's ``class-0`` and ``class-0-bn-3``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import DetConfig
from .tf_compat import SeparableConv2d, batch_norm, create_act, create_conv2d, drop_connect

# automl initialises the class-predict bias to -log((1 - 0.01) / 0.01) (focal-loss prior).
CLASS_PRIOR_PROBABILITY = 0.01


def class_prior_bias() -> float:
    return -math.log((1 - CLASS_PRIOR_PROBABILITY) / CLASS_PRIOR_PROBABILITY)


class HeadNet(nn.Module):
    """``box_class_repeats`` x (conv -> per-level BN -> act) then a predictor conv.

    ``prefix`` is the TF layer prefix ('class' or 'box'); outputs are NCHW per level with
    channel = anchor * num_outputs + output, as TF's channels-last layout.
    """

    def __init__(self, prefix: str, num_outputs: int, config: DetConfig):
        super().__init__()
        channels = config.fpn_num_filters
        self.prefix = prefix
        self.repeats = config.box_class_repeats
        self.levels = list(range(config.min_level, config.max_level + 1))
        self.survival_prob = config.survival_prob
        conv = SeparableConv2d if config.separable_conv else \
            (lambda c_in, c_out: create_conv2d(c_in, c_out, 3))
        for i in range(self.repeats):
            self.add_module(f"{prefix}_{i}", conv(channels, channels))
            for level in self.levels:
                self.add_module(f"{prefix}_{i}_bn_{level}", batch_norm(channels))
        self.add_module(f"{prefix}_predict", conv(channels, config.num_anchors * num_outputs))
        self.act = create_act(config.act_type)

    @property
    def predict(self) -> nn.Module:
        return self.get_submodule(f"{self.prefix}_predict")

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for level, x in zip(self.levels, feats):
            for i in range(self.repeats):
                shortcut = x
                x = self.get_submodule(f"{self.prefix}_{i}")(x)
                x = self.act(self.get_submodule(f"{self.prefix}_{i}_bn_{level}")(x))
                if i > 0 and self.survival_prob:
                    x = drop_connect(x, self.survival_prob, self.training) + shortcut
            outputs.append(self.predict(x))
        return outputs


def class_net(config: DetConfig) -> HeadNet:
    head = HeadNet("class", config.num_classes, config)
    init_class_predict(head.predict)
    return head


def box_net(config: DetConfig) -> HeadNet:
    return HeadNet("box", 4, config)


def init_class_predict(predict: nn.Module) -> None:
    """Bias = focal-loss prior, as automl initialises ``class-predict``."""
    conv = predict.pointwise if isinstance(predict, SeparableConv2d) else predict
    bias = conv.bias
    if not isinstance(bias, torch.Tensor):
        raise ValueError(f"class predictor {type(predict).__name__} has no bias")
    nn.init.constant_(bias, class_prior_bias())
