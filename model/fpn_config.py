"""The BiFPN graph as data (automl efficientdet/tf2/fpn_configs.py::bifpn_config @ 6a54c87)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FpnNode:
    """One fusion node: its level and the indices of the feature maps it fuses.

    Indices count the cell's input levels first (0 = min_level), then earlier nodes.
    """

    feat_level: int
    inputs_offsets: tuple[int, ...]


def bifpn_nodes(min_level: int, max_level: int) -> list[FpnNode]:
    """Top-down nodes P(max-1)..P(min) fusing [same level, level above], then bottom-up
    nodes P(min+1)..P(max) fusing [every earlier node of that level, level below]."""
    num_levels = max_level - min_level + 1
    node_ids = {min_level + i: [i] for i in range(num_levels)}
    nodes: list[FpnNode] = []
    for level in range(max_level - 1, min_level - 1, -1):
        nodes.append(FpnNode(level, (node_ids[level][-1], node_ids[level + 1][-1])))
        node_ids[level].append(num_levels + len(nodes) - 1)
    for level in range(min_level + 1, max_level + 1):
        nodes.append(FpnNode(level, (*node_ids[level], node_ids[level - 1][-1])))
        node_ids[level].append(num_levels + len(nodes) - 1)
    return nodes


def feat_sizes(image_size: tuple[int, int], max_level: int) -> list[tuple[int, int]]:
    """(H, W) of every level 0..max_level: each level is ``(prev - 1) // 2 + 1`` per axis."""
    sizes = [(int(image_size[0]), int(image_size[1]))]
    for _ in range(max_level):
        height, width = sizes[-1]
        sizes.append(((height - 1) // 2 + 1, (width - 1) // 2 + 1))
    return sizes
