"""Which variant (and how many classes) a checkpoint holds, read from its names and shapes."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from model.config import DetConfig, get_config
from model.registry import VARIANTS

from .errors import InputError, VariantError


@dataclass(frozen=True)
class Structure:
    """The architecture facts visible in checkpoint variable names and shapes."""

    backbone_name: str
    fpn_num_filters: int
    fpn_cell_repeats: int
    box_class_repeats: int
    min_level: int
    max_level: int
    weighted_fusion: bool      # WSM variables exist (fastattn / attn)
    num_anchors: int
    num_classes: int

    def describe(self) -> str:
        return (f"backbone {self.backbone_name}, fpn_num_filters {self.fpn_num_filters}, "
                f"{self.fpn_cell_repeats} BiFPN cells, {self.box_class_repeats} head repeats, "
                f"levels P{self.min_level}-P{self.max_level}, "
                f"{'weighted' if self.weighted_fusion else 'sum'} fusion, "
                f"{self.num_classes} classes")

    def matches(self, config: DetConfig) -> bool:
        return (config.backbone_name == self.backbone_name
                and config.fpn_num_filters == self.fpn_num_filters
                and config.fpn_cell_repeats == self.fpn_cell_repeats
                and config.box_class_repeats == self.box_class_repeats
                and config.min_level == self.min_level and config.max_level == self.max_level
                and (config.fpn_weight_method != "sum") == self.weighted_fusion
                and config.num_anchors == self.num_anchors)


def _indices(pattern: str, names: Mapping[str, Any]) -> set[int]:
    regex = re.compile(pattern)
    return {int(m.group(1)) for name in names for m in [regex.search(name)] if m}


def read_structure(names: Mapping[str, tuple[int, ...]]) -> Structure:
    """Reads the architecture from TF1 names; raises VariantError if it is not EfficientDet and
    InputError if its predictor kernels have impossible shapes."""
    backbones = {m.group(1) for name in names
                 for m in [re.match(r"^(efficientnet-(?:b\d+|lite\d+))/", name)] if m}
    box_predict = names.get("box_net/box-predict/pointwise_kernel") or \
        names.get("box_net/box-predict/kernel")
    class_predict = names.get("class_net/class-predict/pointwise_kernel") or \
        names.get("class_net/class-predict/kernel")
    levels = _indices(r"^box_net/box-0-bn-(\d+)/", names)
    if len(backbones) != 1 or not box_predict or not class_predict or not levels:
        found = ", ".join(sorted(backbones)) or "no efficientnet backbone"
        raise VariantError(f"not an EfficientDet checkpoint ({found}; "
                           f"box/class predictors {'found' if box_predict else 'missing'})")
    _check_predictor("box_net/box-predict", box_predict, 4)
    num_anchors = box_predict[-1] // 4
    _check_predictor("class_net/class-predict", class_predict, num_anchors)
    return Structure(
        backbone_name=backbones.pop(),
        fpn_num_filters=box_predict[-2],
        fpn_cell_repeats=len(_indices(r"^fpn_cells/cell_(\d+)/", names)),
        box_class_repeats=len(_indices(r"^box_net/box-(\d+)/", names)),
        min_level=min(levels), max_level=max(levels),
        weighted_fusion=any(re.search(r"/fnode\d+/WSM(_\d+)?$", n) for n in names),
        num_anchors=num_anchors,
        num_classes=class_predict[-1] // num_anchors)


def _check_predictor(name: str, shape: tuple[int, ...], multiple: int) -> None:
    """A predictor kernel is [kh, kw, in, out] with ``out`` a positive multiple of ``multiple``."""
    if len(shape) != 4 or shape[-1] <= 0 or shape[-1] % multiple:
        raise InputError(f"{name} kernel has shape {list(shape)}; expected [kh, kw, in, out] "
                         f"with out a positive multiple of {multiple}; malformed checkpoint")


def detect_config(names: Mapping[str, tuple[int, ...]], variant: str | None = None,
                  source: Path | None = None, **overrides: Any) -> DetConfig:
    """The config of the checkpoint's variant, with its own ``num_classes``.

    ``variant`` (e.g. from ``--variant``) must agree with the checkpoint. When several released
    variants share one structure (d6 and d7 differ only in input size and anchor scale), the
    variant named in the source path decides; otherwise the caller must say which.
    """
    structure = read_structure(names)
    overrides = {"num_classes": structure.num_classes, **overrides}
    if variant is not None:
        if variant not in VARIANTS:
            raise VariantError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
        config = get_config(variant, **overrides)
        if not structure.matches(config):
            raise VariantError(f"--variant {variant} does not match the checkpoint, which has "
                               f"{structure.describe()}")
        return config
    candidates = [name for name in VARIANTS if structure.matches(get_config(name, **overrides))]
    if len(candidates) > 1 and source is not None:
        named = [name for name in candidates
                 if re.search(re.escape(name) + r"(?![\w])", str(source))]
        candidates = named or candidates
    if not candidates:
        raise VariantError(f"no released variant has {structure.describe()}; "
                           f"pass --variant for the closest one")
    if len(candidates) > 1:
        raise VariantError(f"checkpoint matches {' and '.join(candidates)}; pass --variant")
    return get_config(candidates[0], **overrides)
