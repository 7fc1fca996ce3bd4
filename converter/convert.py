"""Checkpoint tensors -> PyTorch state_dict through the mapping table, with a full report."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from mappings import ignore_reason, table_for
from mappings.layouts import pt_shape, to_torch
from mappings.rules import EMA_SUFFIX
from model.config import DetConfig

from .contents import CheckpointContents
from .errors import InputError, MappingError, NonFiniteError


@dataclass
class MappingReport:
    """What the conversion consumed, skipped and could not place."""

    unmatched_tf: list[str] = field(default_factory=list)      # model tensors with no key
    missing_pt: list[str] = field(default_factory=list)        # keys the checkpoint lacks
    shape_mismatch: list[tuple[str, tuple, tuple, tuple]] = field(default_factory=list)
    ema_missing: list[str] = field(default_factory=list)       # EMA expected but absent
    ignored: Counter = field(default_factory=Counter)          # reason -> count (IGNORED_TF)
    ema_source: str = "none"         # 'shadows', 'model entries' or 'none' (raw values)
    converted: int = 0

    @property
    def ok(self) -> bool:
        return not (self.unmatched_tf or self.missing_pt or self.shape_mismatch
                    or self.ema_missing)

    def problems(self) -> list[str]:
        """Every gap, grouped and counted, one line each, sorted."""
        lines = []
        for title, items in (("unmatched checkpoint tensors", self.unmatched_tf),
                             ("state_dict keys missing from the checkpoint", self.missing_pt),
                             ("EMA shadows missing", self.ema_missing)):
            if items:
                lines.append(f"{len(items)} {title}:")
                lines.extend(f"  {name}" for name in sorted(items))
        if self.shape_mismatch:
            lines.append(f"{len(self.shape_mismatch)} shape mismatches (key, tf, transformed, expected):")
            lines.extend(f"  {k}: {a} -> {b} != {c}" for k, a, b, c in sorted(self.shape_mismatch))
        return lines


def convert_checkpoint(contents: CheckpointContents, config: DetConfig, use_ema: bool = True,
                       progress: Callable[[Iterable], Iterable] = iter
                       ) -> tuple[dict[str, torch.Tensor], MappingReport]:
    """Maps every model tensor of ``contents`` into a state_dict for ``config``.

    With ``use_ema`` the ``<name>/ExponentialMovingAverage`` shadow is taken wherever the
    checkpoint has shadows (as automl evaluates). Raises MappingError (with the report's lines)
    on any gap, NonFiniteError on NaN/Inf in a used tensor, and InputError on a used tensor
    that is not floating point or has the wrong number of dimensions.
    """
    report = MappingReport()
    table = {entry.tf_name: entry for entry in table_for(config)}
    has_shadows = any(name.endswith(EMA_SUFFIX) for name in contents.names)
    if contents.ema_in_model_entries:
        report.ema_source = "model entries"
    elif use_ema and has_shadows:
        report.ema_source = "shadows"
    state_dict: dict[str, torch.Tensor] = {}
    report.ignored.update(contents.skipped.values())     # what the reader did not expose
    for name in contents.names:
        reason = ignore_reason(name)
        if reason:
            report.ignored[reason] += 1
        elif name.endswith(EMA_SUFFIX):
            if name[:-len(EMA_SUFFIX)] not in table:
                report.unmatched_tf.append(name)
            elif report.ema_source != "shadows":
                report.ignored["EMA shadow (raw values requested)"] += 1
        elif name not in table:
            report.unmatched_tf.append(name)
    for tf_name in progress(sorted(table)):
        entry = table[tf_name]
        source = tf_name
        if report.ema_source == "shadows":
            source = tf_name + EMA_SUFFIX
            if source not in contents.names:
                if tf_name in contents.names:
                    report.ema_missing.append(tf_name)      # raw value there, shadow not
                else:
                    report.missing_pt.append(entry.pt_name)  # the variable is absent
                continue
        if source not in contents.names:
            report.missing_pt.append(entry.pt_name)
            continue
        shape = tuple(contents.names[source])
        if len(shape) != len(entry.pt_shape):
            raise InputError(f"tensor {source} of {contents.source} has shape {list(shape)}, "
                             f"expected {len(entry.pt_shape)} dimensions; malformed checkpoint")
        if pt_shape(shape, entry.layout) != entry.pt_shape:
            report.shape_mismatch.append((entry.pt_name, shape, pt_shape(shape, entry.layout),
                                          entry.pt_shape))
            continue
        array = contents.load(source)
        if array.dtype.kind != "f":
            raise InputError(f"tensor {source} of {contents.source} holds {array.dtype} values; "
                             "weights must be floating point")
        if not np.isfinite(array).all():
            raise NonFiniteError(f"tensor {source} of {contents.source} has NaN or Inf values")
        state_dict[entry.pt_name] = to_torch(array.astype(np.float32, copy=False), entry.layout)
        report.converted += 1
    if not report.ok:
        error = MappingError(f"checkpoint does not cover {config.name}: " +
                             ", ".join(line.rstrip(":") for line in report.problems() if line[0] != " "))
        error.report = report
        raise error
    for key in bn_counters(state_dict):
        state_dict[key] = torch.tensor(0, dtype=torch.long)
    return state_dict, report


def bn_counters(state_dict: dict[str, torch.Tensor]) -> list[str]:
    """``num_batches_tracked`` keys PyTorch BN layers expect (PT-only, no TF counterpart)."""
    suffix = ".running_mean"
    return [k[:-len(suffix)] + ".num_batches_tracked" for k in state_dict if k.endswith(suffix)]
