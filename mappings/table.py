"""Applying the rules: one TF name -> key, and a variant's whole table from its config."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .layouts import tf_shape
from .rules import PT_ONLY, RULES, SCOPE_TO_PT, SCOPE_TO_TF, Layout, Rule


@dataclass(frozen=True)
class MappingEntry:
    tf_name: str
    pt_name: str
    layout: Layout
    tf_shape: tuple[int, ...]
    pt_shape: tuple[int, ...]

    def to_tsv(self) -> str:
        return "\t".join([self.tf_name, self.pt_name, self.layout.value,
                          _shape_str(self.tf_shape), _shape_str(self.pt_shape)])


    @classmethod
    def from_tsv(cls, line: str) -> "MappingEntry":
        tf_name, pt_name, layout, tf_shape_, pt_shape_ = line.rstrip("\n").split("\t")
        return cls(tf_name, pt_name, Layout(layout), _parse_shape(tf_shape_),
                   _parse_shape(pt_shape_))


def _shape_str(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _parse_shape(text: str) -> tuple[int, ...]:
    inner = text.strip()[1:-1]
    return tuple(int(d) for d in inner.split(",")) if inner else ()


def _apply(substitutions: tuple[tuple[str, str], ...], text: str, **fields: str) -> str:
    for pattern, replacement in substitutions:
        text = re.sub(pattern, replacement.format(**fields) if fields else replacement, text)
    return text


def tf_to_pt(tf_name: str, separable_conv: bool = True) -> tuple[str, Layout] | None:
    """The state_dict key and layout of a TF model variable, or None if no rule matches."""
    for rule in RULES:
        if rule.separable_only and not separable_conv:
            continue
        match = rule.tf_regex.match(tf_name)
        if match and rule.scope_ok(match["scope"]):
            fields = match.groupdict()
            fields["scope"] = _apply(SCOPE_TO_PT, fields["scope"])
            return rule.pt.format(**fields), rule.layout
    return None


def pt_to_tf(pt_name: str, module: str, backbone_name: str, separable_conv: bool = True
             ) -> tuple[str, Rule] | None:
    """The inverse of ``tf_to_pt`` for a key owned by a ``module`` ('conv', 'bn', 'fnode')
    (used to generate tables)."""
    for rule in RULES:
        if rule.separable_only and not separable_conv or rule.module != module:
            continue
        match = rule.pt_regex.match(pt_name)
        if not match:
            continue
        fields = match.groupdict()
        fields["scope"] = _apply(SCOPE_TO_TF, fields["scope"], backbone=backbone_name)
        if rule.scope_ok(fields["scope"]):
            return rule.tf.format(**fields), rule
    return None


def _module_kind(module: torch.nn.Module) -> str:
    if isinstance(module, torch.nn.BatchNorm2d):
        return "bn"
    return "conv" if isinstance(module, torch.nn.Conv2d) else "fnode"


def is_pt_only(pt_name: str) -> bool:
    return any(re.search(pattern, pt_name) for pattern in PT_ONLY)


TABLE_DIR = Path(__file__).parent


def table_path(variant: str) -> Path:
    return TABLE_DIR / f"{variant}.tsv"


def read_table(path: Path) -> list[MappingEntry]:
    """A committed table (``mappings/<variant>.tsv``)."""
    with open(path) as f:
        return [MappingEntry.from_tsv(line) for line in f if line.strip() and line[0] != "#"]


def table_for(config) -> list[MappingEntry]:
    """The table of ``config``: the committed one when the config is a released variant (the
    input size does not change any variable), else generated from the rules."""
    from model.config import get_config
    from model.registry import VARIANTS
    path = table_path(config.name)
    if config.name in VARIANTS and path.is_file() and \
            config == get_config(config.name, image_size=config.image_size):
        return read_table(path)
    return mapping_table(config)


def mapping_table(config) -> list[MappingEntry]:
    """Every TF model variable of ``config`` with its key, layout and both shapes, sorted by
    TF name. Raises if a state_dict entry has no rule or does not round-trip."""
    from model import EfficientDet
    with torch.device("meta"):
        model = EfficientDet(config)
    entries = []
    for pt_name, tensor in model.state_dict().items():
        if is_pt_only(pt_name):
            continue
        owner = model.get_submodule(pt_name.rpartition(".")[0])
        found = pt_to_tf(pt_name, _module_kind(owner), config.backbone_name,
                         config.separable_conv)
        if found is None:
            raise LookupError(f"no rule produces state_dict key {pt_name}")
        tf_name, rule = found
        if tf_to_pt(tf_name, config.separable_conv) != (pt_name, rule.layout):
            raise LookupError(f"rules do not round-trip for {pt_name} <-> {tf_name}")
        entries.append(MappingEntry(tf_name, pt_name, rule.layout,
                                    tf_shape(tuple(tensor.shape), rule.layout),
                                    tuple(tensor.shape)))
    return sorted(entries, key=lambda e: e.tf_name)
