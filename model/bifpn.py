"""Extra input levels and the BiFPN, mirroring automl's ResampleFeatureMap / FNode / FPNCell.

Module paths equal the TF scopes: ``resample_p6.conv2d``, ``fpn_cells.cell_0.fnode1.WSM_1``,
``fpn_cells.cell_0.fnode1.resample_0_2_6.bn``, ``fpn_cells.cell_0.fnode1.op_after_combine6.conv``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import DetConfig
from .fpn_config import FpnNode, bifpn_nodes
from .tf_compat import (FUSE_EPS, UPSAMPLE_MODE, SeparableConv2d, batch_norm, create_act,
                        create_conv2d, max_pool_same)

Taps = Optional[dict[str, torch.Tensor]]


# Port of automl efficientdet/tf2/efficientdet_keras.py::ResampleFeatureMap @ 6a54c87
class ResampleFeatureMap(nn.Module):
    """1x1 conv(+bias) + BN when the channel count differs, then max-pool down or
    nearest-neighbour up to the target size."""

    def __init__(self, in_channels: int, out_channels: int, apply_bn: bool = True,
                 conv_after_downsample: bool = False):
        super().__init__()
        self.conv_after_downsample = conv_after_downsample
        self.conv2d = self.bn = None
        if in_channels != out_channels:
            self.conv2d = create_conv2d(in_channels, out_channels, 1)
            if apply_bn:
                self.bn = batch_norm(out_channels)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv2d is not None:
            x = self.conv2d(x)
            if self.bn is not None:
                x = self.bn(x)
        return x

    def forward(self, x: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
        height, width = x.shape[-2:]
        target_h, target_w = target_size
        if height > target_h and width > target_w:
            if not self.conv_after_downsample:
                x = self.project(x)
            stride = ((height - 1) // target_h + 1, (width - 1) // target_w + 1)
            x = max_pool_same(x, (stride[0] + 1, stride[1] + 1), stride)
            if self.conv_after_downsample:
                x = self.project(x)
            return x
        if height <= target_h and width <= target_w:
            x = self.project(x)
            if height < target_h or width < target_w:
                x = F.interpolate(x, size=(target_h, target_w), mode=UPSAMPLE_MODE)
            return x
        raise ValueError(f"cannot resample {height}x{width} to {target_h}x{target_w}")


class OpAfterCombine(nn.Module):
    """act -> (separable) 3x3 conv with bias -> BN, or conv -> BN -> act (conv_bn_act_pattern)."""

    def __init__(self, channels: int, act_type: str, separable: bool, conv_bn_act: bool):
        super().__init__()
        self.conv = SeparableConv2d(channels, channels) if separable \
            else create_conv2d(channels, channels, 3)
        self.bn = batch_norm(channels)
        self.act = create_act(act_type)
        self.conv_bn_act = conv_bn_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.conv_bn_act:
            x = self.act(x)
        x = self.bn(self.conv(x))
        return self.act(x) if self.conv_bn_act else x


# Port of automl efficientdet/tf2/efficientdet_keras.py::FNode @ 6a54c87
class FNode(nn.Module):
    """Resamples every input edge separately, fuses them, then OpAfterCombine."""

    def __init__(self, node: FpnNode, feat_channels: list[int], config: DetConfig):
        super().__init__()
        self.level_index = node.feat_level - config.min_level
        self.inputs_offsets = node.inputs_offsets
        self.weight_method = config.fpn_weight_method
        channels = config.fpn_num_filters
        num_feats = len(feat_channels)
        self.resample_names = []
        for i, offset in enumerate(node.inputs_offsets):
            name = f"resample_{i}_{offset}_{num_feats}"
            self.add_module(name, ResampleFeatureMap(feat_channels[offset], channels,
                                                     config.apply_bn_for_resampling,
                                                     config.conv_after_downsample))
            self.resample_names.append(name)
        self.weight_names = []
        if self.weight_method != "sum":
            shape = (channels,) if self.weight_method.startswith("channel_") else ()
            for i in range(len(node.inputs_offsets)):
                name = "WSM" if i == 0 else f"WSM_{i}"
                self.register_parameter(name, nn.Parameter(torch.ones(shape)))
                self.weight_names.append(name)
        self.op_name = f"op_after_combine{num_feats}"
        self.add_module(self.op_name, OpAfterCombine(channels, config.act_type,
                                                     config.separable_conv,
                                                     config.conv_bn_act_pattern))

    def fuse(self, nodes: list[torch.Tensor]) -> torch.Tensor:
        """automl FNode.fuse_features for every fpn_weight_method."""
        if self.weight_method == "sum":
            out = nodes[0]
            for node in nodes[1:]:
                out = out + node
            return out
        weights = [getattr(self, name) for name in self.weight_names]
        if self.weight_method.startswith("channel_"):
            weights = [w.view(-1, 1, 1) for w in weights]
        if self.weight_method.endswith("fastattn"):
            weights = [torch.relu(w) for w in weights]
            total = weights[0]
            for w in weights[1:]:
                total = total + w
            total = total + FUSE_EPS
            out = nodes[0] * weights[0] / total
            for node, w in zip(nodes[1:], weights[1:]):
                out = out + node * w / total
            return out
        normalized = torch.softmax(torch.stack(weights), dim=0)  # attn / channel_attn
        return (torch.stack(nodes, dim=-1) * torch.movedim(normalized, 0, -1)).sum(-1)

    def forward(self, feats: list[torch.Tensor], level_sizes: list[tuple[int, int]]) -> torch.Tensor:
        target = level_sizes[self.level_index]
        nodes = [self.get_submodule(name)(feats[offset], target)
                 for name, offset in zip(self.resample_names, self.inputs_offsets)]
        return self.get_submodule(self.op_name)(self.fuse(nodes))


class FPNCell(nn.Module):
    """One BiFPN layer: ``fnode0..`` in order; outputs the last node of every level."""

    def __init__(self, in_channels: list[int], config: DetConfig):
        super().__init__()
        nodes = bifpn_nodes(config.min_level, config.max_level)
        channels = list(in_channels)
        for index, node in enumerate(nodes):
            self.add_module(f"fnode{index}", FNode(node, channels, config))
            channels.append(config.fpn_num_filters)
        self.num_nodes = len(nodes)
        # Position (in the grown feature list) of the last node of each level.
        last = {}
        for index, node in enumerate(nodes):
            last[node.feat_level] = len(in_channels) + index
        self.output_offsets = [last[level] for level in range(config.min_level, config.max_level + 1)]

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        level_sizes = [tuple(f.shape[-2:]) for f in feats]
        feats = list(feats)
        for index in range(self.num_nodes):
            feats.append(self.get_submodule(f"fnode{index}")(feats, level_sizes))
        return [feats[i] for i in self.output_offsets]


class FPNCells(nn.Module):
    """``fpn_cell_repeats`` BiFPN cells; only cell_0 sees backbone channel counts."""

    def __init__(self, in_channels: list[int], config: DetConfig):
        super().__init__()
        self.min_level = config.min_level
        self.num_cells = config.fpn_cell_repeats
        for index in range(config.fpn_cell_repeats):
            channels = in_channels if index == 0 else [config.fpn_num_filters] * config.num_levels
            self.add_module(f"cell_{index}", FPNCell(channels, config))

    def forward(self, feats: list[torch.Tensor], taps: Taps = None) -> list[torch.Tensor]:
        for index in range(self.num_cells):
            feats = self.get_submodule(f"cell_{index}")(feats)
            if taps is not None:
                for offset, feat in enumerate(feats):
                    taps[f"fpn/cell_{index}/p{self.min_level + offset}"] = feat
        return feats
