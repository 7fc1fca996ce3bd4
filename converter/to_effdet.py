"""Over to rwightman's effdet: our state_dict -> the state_dict of ``effdet.create_model(
'tf_efficientdet_<variant>')`` (effdet 0.4.x, timm ``tf_efficientnet_*`` backbones).

Both models are automl's graph, so the mapping is a rename of modules plus one change of
layout: automl's (and our) per-input fusion scalars ``WSM``, ``WSM_1``, ... of a BiFPN node
become effdet's one vector ``combine.edge_weights`` (same order, same fast-attention formula).
Tensors keep their PyTorch layout. The renames, as data:

* backbone: automl's flat ``blocks.N`` -> timm's ``blocks.<stage>.<index>`` (stages from the
  backbone's block strings), leaves by block kind (``_MBCONV`` / ``_DEPTHWISE_SEPARABLE``);
* ``resample_pL`` -> ``fpn.resample.<L - min_level>.conv``;
* ``fpn_cells.cell_c.fnodej.resample_<i>_<offset>_<n>`` -> ``fpn.cell.c.fnode.j.combine.
  resample.<offset>.conv``, ``op_after_combine<n>`` -> ``after_combine.conv``;
* heads: ``class_i`` -> ``conv_rep.i``, the per-level ``class_i_bn_L`` -> ``bn_rep.i.<L -
  min_level>.bn``, ``class_predict`` -> ``predict`` (same for box).
"""
from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Mapping

import torch

from model import EfficientDet
from model.config import DetConfig
from model.efficientnet_config import BACKBONES, stage_repeats
from model.weights_io import DestinationError, atomic_path, check_destination

from .errors import MappingError, OutputError

__all__ = ["effdet_model_name", "effdet_state_dict", "save_effdet"]

# Block leaves, ours -> timm's: an MBConv block with an expansion conv, and the depthwise-
# separable block timm builds where the expand ratio is 1 (no expansion conv).
_MBCONV = {"conv2d": "conv_pw", "tpu_batch_normalization": "bn1",
           "depthwise_conv2d": "conv_dw", "tpu_batch_normalization_1": "bn2",
           "se.conv2d": "se.conv_reduce", "se.conv2d_1": "se.conv_expand",
           "conv2d_1": "conv_pwl", "tpu_batch_normalization_2": "bn3"}
_DEPTHWISE_SEPARABLE = {"depthwise_conv2d": "conv_dw", "tpu_batch_normalization": "bn1",
                        "se.conv2d": "se.conv_reduce", "se.conv2d_1": "se.conv_expand",
                        "conv2d": "conv_pw", "tpu_batch_normalization_1": "bn2"}

# Module path renames outside the backbone blocks (the first match wins); ``{level}`` is the
# matched level minus min_level.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.stem\.conv2d\.", "backbone.conv_stem."),
    (r"^backbone\.stem\.tpu_batch_normalization\.", "backbone.bn1."),
    (r"^resample_p(?P<level>\d+)\.conv2d\.", "fpn.resample.{level}.conv.conv."),
    (r"^resample_p(?P<level>\d+)\.bn\.", "fpn.resample.{level}.conv.bn."),
    (r"^fpn_cells\.cell_(\d+)\.fnode(\d+)\.resample_\d+_(\d+)_\d+\.conv2d\.",
     r"fpn.cell.\1.fnode.\2.combine.resample.\3.conv.conv."),
    (r"^fpn_cells\.cell_(\d+)\.fnode(\d+)\.resample_\d+_(\d+)_\d+\.bn\.",
     r"fpn.cell.\1.fnode.\2.combine.resample.\3.conv.bn."),
    (r"^fpn_cells\.cell_(\d+)\.fnode(\d+)\.op_after_combine\d+\.conv\.depthwise\.",
     r"fpn.cell.\1.fnode.\2.after_combine.conv.conv_dw."),
    (r"^fpn_cells\.cell_(\d+)\.fnode(\d+)\.op_after_combine\d+\.conv\.pointwise\.",
     r"fpn.cell.\1.fnode.\2.after_combine.conv.conv_pw."),
    (r"^fpn_cells\.cell_(\d+)\.fnode(\d+)\.op_after_combine\d+\.bn\.",
     r"fpn.cell.\1.fnode.\2.after_combine.conv.bn."),
    (r"^(class|box)_net\.(?:class|box)_(\d+)\.depthwise\.", r"\1_net.conv_rep.\2.conv_dw."),
    (r"^(class|box)_net\.(?:class|box)_(\d+)\.pointwise\.", r"\1_net.conv_rep.\2.conv_pw."),
    (r"^(class|box)_net\.(?:class|box)_(\d+)_bn_(?P<level>\d+)\.",
     r"\1_net.bn_rep.\2.{level}.bn."),
    (r"^(class|box)_net\.(?:class|box)_predict\.depthwise\.", r"\1_net.predict.conv_dw."),
    (r"^(class|box)_net\.(?:class|box)_predict\.pointwise\.", r"\1_net.predict.conv_pw."),
)
_BLOCK = re.compile(r"^backbone\.blocks\.(\d+)\.(.+)\.(\w+)$")
_FUSION = re.compile(r"^fpn_cells\.cell_(\d+)\.fnode(\d+)\.WSM(?:_(\d+))?$")


def effdet_model_name(config: DetConfig) -> str:
    """effdet's name of the TF-ported model: ``efficientdet-d0`` -> ``tf_efficientdet_d0``."""
    return "tf_" + config.name.replace("-", "_")


def _block_positions(config: DetConfig) -> list[tuple[int, int]]:
    """``(stage, index in stage)`` of every automl ``blocks_N``."""
    return [(stage, index)
            for stage, repeats in enumerate(stage_repeats(BACKBONES[config.backbone_name]))
            for index in range(repeats)]


def _rename(key: str, config: DetConfig, blocks: list[tuple[int, int]],
            has_expand: Mapping[int, bool]) -> str | None:
    match = _BLOCK.match(key)
    if match:
        block, module, leaf = int(match[1]), match[2], match[3]
        leaves = _MBCONV if has_expand[block] else _DEPTHWISE_SEPARABLE
        if module not in leaves:
            return None
        stage, index = blocks[block]
        return f"backbone.blocks.{stage}.{index}.{leaves[module]}.{leaf}"
    for pattern, replacement in _RENAMES:
        match = re.match(pattern, key)
        if match:
            target = match.expand(replacement)
            level = match.groupdict().get("level")
            if level is not None:
                target = target.replace("{level}", str(int(level) - config.min_level))
            return target + key[match.end():]
    return None


def effdet_state_dict(model: EfficientDet) -> dict[str, torch.Tensor]:
    """``model``'s weights under effdet's keys (fusion scalars stacked per node).

    Raises MappingError listing every key no rule places.
    """
    config = model.config
    blocks = _block_positions(config)
    has_expand = {n: block.has_expand for n, block in enumerate(model.backbone.blocks)}
    fusion: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    out: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, tensor in model.state_dict().items():
        match = _FUSION.match(key)
        if match:
            node = f"fpn.cell.{match[1]}.fnode.{match[2]}.combine.edge_weights"
            fusion[node][int(match[3] or 0)] = tensor.detach().reshape(())
            continue
        target = _rename(key, config, blocks, has_expand)
        if target is None:
            unplaced.append(key)
        else:
            out[target] = tensor.detach().clone()
    if unplaced:
        error = MappingError(f"{len(unplaced)} state_dict keys have no effdet counterpart: "
                             + ", ".join(sorted(unplaced)[:5]))
        error.lines = [f"  {key}" for key in sorted(unplaced)]
        raise error
    for node, weights in fusion.items():
        out[node] = torch.stack([weights[i] for i in sorted(weights)])
    return out


def save_effdet(model: EfficientDet, path: str | Path, force: bool = False) -> Path:
    """Writes ``effdet_state_dict(model)`` with ``torch.save`` (a plain state_dict, what
    ``effdet.create_model(...).load_state_dict(torch.load(path))`` takes), atomically."""
    path = Path(path)
    if path.suffix.lower() not in (".pth", ".pt"):
        raise OutputError(f"{path}: an effdet state_dict is written as .pth or .pt")
    try:
        check_destination(path, overwrite=force)
    except DestinationError as error:
        raise OutputError(str(error)) from None
    state_dict = effdet_state_dict(model)
    try:
        with atomic_path(path, overwrite=force) as tmp_name:
            torch.save(state_dict, tmp_name)
    except DestinationError as error:
        raise OutputError(str(error)) from None
    except (OSError, RuntimeError) as error:  # torch's writer reports ENOSPC as RuntimeError
        raise OutputError(f"cannot write {path}: {error}") from None
    return path
