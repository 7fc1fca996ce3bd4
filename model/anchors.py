"""Anchor boxes as automl generates them (efficientdet/tf2/anchors.py::Anchors @ 6a54c87)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .config import DetConfig
from .fpn_config import feat_sizes


def anchor_boxes_yxyx(config: DetConfig) -> np.ndarray:
    """All anchors as float64 ``[A_total, 4]`` (ymin, xmin, ymax, xmax) in input pixels.

    Order: level -> row (y) -> column (x) -> octave scale -> aspect ratio, the order in which
    the heads' channels-last outputs flatten. Strides are ``image_size / feat_size`` per axis
    (fractional when the size is not a power-of-two multiple).
    """
    sizes = feat_sizes(config.image_size, config.max_level)
    image_h, image_w = config.image_size
    boxes_all = []
    for level in range(config.min_level, config.max_level + 1):
        stride_y = image_h / sizes[level][0]
        stride_x = image_w / sizes[level][1]
        y = stride_y / 2 + np.arange(sizes[level][0]) * stride_y
        x = stride_x / 2 + np.arange(sizes[level][1]) * stride_x
        xv, yv = np.meshgrid(x, y)
        centers = np.stack([yv.reshape(-1), xv.reshape(-1)], axis=1)  # [H*W, 2]
        half_sizes = []
        for octave in range(config.num_scales):
            for aspect in config.aspect_ratios:
                if isinstance(aspect, tuple):
                    aspect_x, aspect_y = aspect
                else:
                    aspect_x = np.sqrt(aspect)
                    aspect_y = 1.0 / aspect_x
                octave_scale = 2 ** (octave / float(config.num_scales))
                base_y = config.anchor_scale * stride_y * octave_scale
                base_x = config.anchor_scale * stride_x * octave_scale
                half_sizes.append((base_y * aspect_y / 2.0, base_x * aspect_x / 2.0))
        half = np.asarray(half_sizes)[None]                           # [1, A, 2]
        boxes = np.concatenate([centers[:, None] - half, centers[:, None] + half], axis=2)
        boxes_all.append(boxes.reshape(-1, 4))
    return np.concatenate(boxes_all, axis=0)


class Anchors(nn.Module):
    """Holds the float32 anchors of one config as a (non-persistent) buffer."""

    boxes_yxyx: torch.Tensor     # [A_total, 4] (ymin, xmin, ymax, xmax) in network-input pixels

    def __init__(self, config: DetConfig):
        super().__init__()
        boxes = torch.from_numpy(anchor_boxes_yxyx(config).astype(np.float32))
        self.register_buffer("boxes_yxyx", boxes, persistent=False)

    def forward(self) -> torch.Tensor:
        return self.boxes_yxyx
