"""EfficientNet / EfficientNet-Lite backbone definitions as data.

Block strings and scaling rules follow automl's backbone/efficientnet_builder.py and
efficientnet_lite_builder.py (@ 6a54c87); ``build_blocks`` expands them into the list of
MBConv blocks that automl builds (one entry per ``blocks_N`` scope).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

# The EfficientNet-B0 architecture: r=repeats, k=kernel, s=strides, e=expand ratio,
# i/o=input/output filters, se=squeeze-excite ratio (efficientnet_builder._DEFAULT_BLOCKS_ARGS).
BLOCK_STRINGS = (
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
)
STEM_FILTERS = 32


@dataclass(frozen=True)
class BackboneParams:
    """Global scaling of one backbone (automl GlobalParams fields that shape the graph)."""

    width_coefficient: float
    depth_coefficient: float
    survival_prob: float = 0.8        # drop-connect in training only
    use_se: bool = True
    fix_head_stem: bool = False       # lite: stem width and first/last repeats not scaled
    depth_divisor: int = 8
    min_depth: int | None = None


_LITE = dict(use_se=False, fix_head_stem=True)
# (width, depth) from efficientnet_params / efficientnet_lite_params; EfficientDet sets
# survival_prob 0 for b0 (efficientdet_keras.py: "'b0' in backbone_name").
BACKBONES: dict[str, BackboneParams] = {
    "efficientnet-b0": BackboneParams(1.0, 1.0, survival_prob=0.0),
    "efficientnet-b1": BackboneParams(1.0, 1.1),
    "efficientnet-b2": BackboneParams(1.1, 1.2),
    "efficientnet-b3": BackboneParams(1.2, 1.4),
    "efficientnet-b4": BackboneParams(1.4, 1.8),
    "efficientnet-b5": BackboneParams(1.6, 2.2),
    "efficientnet-b6": BackboneParams(1.8, 2.6),
    "efficientnet-b7": BackboneParams(2.0, 3.1),
    "efficientnet-b8": BackboneParams(2.2, 3.6),
    "efficientnet-lite0": BackboneParams(1.0, 1.0, **_LITE),
    "efficientnet-lite1": BackboneParams(1.0, 1.1, **_LITE),
    "efficientnet-lite2": BackboneParams(1.1, 1.2, **_LITE),
    "efficientnet-lite3": BackboneParams(1.2, 1.4, **_LITE),
    "efficientnet-lite4": BackboneParams(1.4, 1.8, **_LITE),
}


@dataclass(frozen=True)
class BlockArgs:
    """One MBConv block (automl BlockArgs, the fields EfficientDet backbones use)."""

    kernel_size: int
    num_repeat: int
    input_filters: int
    output_filters: int
    expand_ratio: int
    stride: int
    se_ratio: float | None
    id_skip: bool = True


_BLOCK_RE = re.compile(r"^r(\d+)_k(\d+)_s(\d)(\d)_e(\d+)_i(\d+)_o(\d+)(?:_se([\d.]+))?(_noskip)?$")


def decode_block_string(block_string: str) -> BlockArgs:
    """Parses 'r2_k3_s22_e6_i16_o24_se0.25' (square strides only)."""
    match = _BLOCK_RE.match(block_string)
    if not match:
        raise ValueError(f"cannot parse block string {block_string!r}")
    r, k, sy, sx, e, i, o, se, noskip = match.groups()
    if sy != sx:
        raise ValueError(f"non-square strides in {block_string!r}")
    return BlockArgs(kernel_size=int(k), num_repeat=int(r), input_filters=int(i),
                     output_filters=int(o), expand_ratio=int(e), stride=int(sy),
                     se_ratio=float(se) if se else None, id_skip=noskip is None)


def round_filters(filters: int, params: BackboneParams, skip: bool = False) -> int:
    """Channel count scaled by the width coefficient, rounded to ``depth_divisor``."""
    if skip or not params.width_coefficient:
        return filters
    divisor = params.depth_divisor
    scaled = filters * params.width_coefficient
    rounded = max(params.min_depth or divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:  # never round down by more than 10%
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, params: BackboneParams) -> int:
    return int(math.ceil(params.depth_coefficient * repeats))


def stem_filters(params: BackboneParams) -> int:
    return round_filters(STEM_FILTERS, params, skip=params.fix_head_stem)


def stage_repeats(params: BackboneParams,
                  block_strings: tuple[str, ...] = BLOCK_STRINGS) -> list[int]:
    """Blocks per stage (one stage per block string) after depth scaling; lite keeps the first
    and last stage's repeats."""
    groups = [decode_block_string(s) for s in block_strings]
    return [group.num_repeat if params.fix_head_stem and index in (0, len(groups) - 1)
            else round_repeats(group.num_repeat, params) for index, group in enumerate(groups)]


def build_blocks(params: BackboneParams,
                 block_strings: tuple[str, ...] = BLOCK_STRINGS) -> list[BlockArgs]:
    """Every MBConv block in build order (index N is automl's ``blocks_N``)."""
    groups = [decode_block_string(s) for s in block_strings]
    blocks: list[BlockArgs] = []
    for group, repeats in zip(groups, stage_repeats(params, block_strings)):
        first = replace(group, num_repeat=repeats,
                        input_filters=round_filters(group.input_filters, params),
                        output_filters=round_filters(group.output_filters, params))
        blocks.append(first)
        rest = replace(first, input_filters=first.output_filters, stride=1)
        blocks.extend([rest] * (repeats - 1))
    return blocks


def reduction_endpoints(blocks: list[BlockArgs]) -> list[int]:
    """Block indices whose outputs are automl's ``reduction_1..5`` endpoints.

    A block is an endpoint when it is the last one or the next block has stride 2
    (efficientnet_model.Model.call).
    """
    return [i for i in range(len(blocks))
            if i == len(blocks) - 1 or blocks[i + 1].stride > 1]
