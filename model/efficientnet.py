"""EfficientNet / EfficientNet-Lite feature extractor as automl builds it for EfficientDet.

Attribute names follow the TF scopes: ``stem.conv2d``, ``blocks.N.depthwise_conv2d``,
``blocks.N.tpu_batch_normalization_1``, ``blocks.N.se.conv2d_1`` ... (Keras numbers layers
of one kind in creation order, so the expand conv of a block is ``conv2d`` and its
projection ``conv2d_1``, unless the block has no expansion, where the projection is ``conv2d``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .efficientnet_config import (BackboneParams, BlockArgs, build_blocks, reduction_endpoints,
                                  stem_filters)
from .tf_compat import batch_norm, create_act, create_conv2d, drop_connect

Taps = Optional[dict[str, torch.Tensor]]


class Stem(nn.Module):
    """3x3 stride-2 conv (no bias) -> BN -> act."""

    def __init__(self, out_channels: int, act_type: str):
        super().__init__()
        self.conv2d = create_conv2d(3, out_channels, 3, stride=2, bias=False)
        self.tpu_batch_normalization = batch_norm(out_channels)
        self.act = create_act(act_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.tpu_batch_normalization(self.conv2d(x)))


class SqueezeExcite(nn.Module):
    """Spatial mean -> reduce conv(+bias) -> act -> expand conv(+bias) -> sigmoid gate."""

    def __init__(self, channels: int, reduced: int, act_type: str):
        super().__init__()
        self.conv2d = create_conv2d(channels, reduced, 1)
        self.conv2d_1 = create_conv2d(reduced, channels, 1)
        self.act = create_act(act_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.conv2d_1(self.act(self.conv2d(squeezed))))


# Port of automl efficientdet/backbone/efficientnet_model.py::MBConvBlock @ 6a54c87
class MBConvBlock(nn.Module):
    """Inverted residual: [expand 1x1 -> BN -> act] -> depthwise -> BN -> act -> [SE]
    -> project 1x1 -> BN, plus the input when stride 1 and channels are unchanged."""

    def __init__(self, args: BlockArgs, in_channels: int, act_type: str, use_se: bool,
                 survival_prob: float):
        super().__init__()
        # Keras takes input channels from the incoming tensor, not from the block args: they
        # differ for lite3/4 blocks_0 (fix_head_stem keeps the stem at 32, args say 40/48).
        self.has_expand = args.expand_ratio != 1
        channels = args.input_filters * args.expand_ratio if self.has_expand else in_channels
        if self.has_expand:
            self.conv2d = create_conv2d(in_channels, channels, 1, bias=False)
            self.tpu_batch_normalization = batch_norm(channels)
        self.depthwise_conv2d = create_conv2d(channels, channels, args.kernel_size, args.stride,
                                              depthwise=True, bias=False)
        depthwise_bn = batch_norm(channels)
        self.se = None
        if use_se and args.se_ratio and 0 < args.se_ratio <= 1:
            reduced = max(1, int(args.input_filters * args.se_ratio))
            self.se = SqueezeExcite(channels, reduced, act_type)
        project = create_conv2d(channels, args.output_filters, 1, bias=False)
        project_bn = batch_norm(args.output_filters)
        if self.has_expand:
            self.tpu_batch_normalization_1 = depthwise_bn
            self.conv2d_1 = project
            self.tpu_batch_normalization_2 = project_bn
        else:
            self.tpu_batch_normalization = depthwise_bn
            self.conv2d = project
            self.tpu_batch_normalization_1 = project_bn
        self.act = create_act(act_type)
        self.residual = args.id_skip and args.stride == 1 and \
            args.input_filters == args.output_filters
        self.survival_prob = survival_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.has_expand:
            x = self.act(self.tpu_batch_normalization(self.conv2d(x)))
            x = self.act(self.tpu_batch_normalization_1(self.depthwise_conv2d(x)))
            if self.se is not None:
                x = self.se(x)
            x = self.tpu_batch_normalization_2(self.conv2d_1(x))
        else:
            x = self.act(self.tpu_batch_normalization(self.depthwise_conv2d(x)))
            if self.se is not None:
                x = self.se(x)
            x = self.tpu_batch_normalization_1(self.conv2d(x))
        if self.residual:
            x = drop_connect(x, self.survival_prob, self.training) + shortcut
        return x


class EfficientNet(nn.Module):
    """Returns the reduction endpoints C1..C5 (stride 2..32) of an EfficientNet."""

    def __init__(self, params: BackboneParams, act_type: str):
        super().__init__()
        block_args = build_blocks(params)
        channels = stem_filters(params)
        self.stem = Stem(channels, act_type)
        self.blocks = nn.ModuleList()
        for index, args in enumerate(block_args):
            # Linearly decaying survival probability (efficientnet_model.Model.call).
            survival = params.survival_prob
            if survival:
                survival = 1.0 - (1.0 - survival) * index / len(block_args)
            self.blocks.append(MBConvBlock(args, channels, act_type, params.use_se, survival))
            channels = args.output_filters
        self.endpoints = reduction_endpoints(block_args)
        self.feature_channels = [block_args[i].output_filters for i in self.endpoints]

    def forward(self, x: torch.Tensor, taps: Taps = None) -> list[torch.Tensor]:
        x = self.stem(x)
        if taps is not None:
            taps["backbone/stem"] = x
        features = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if taps is not None:
                taps[f"backbone/block_{index:02d}"] = x
            if index in self.endpoints:
                features.append(x)
        return features
