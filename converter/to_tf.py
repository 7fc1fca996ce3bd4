"""The way back: PyTorch weights -> an automl TF1 name-based checkpoint.

The same mapping tables as the forward conversion, read the other way (state_dict key -> TF
name, PyTorch layout -> TF layout). The checkpoint holds what automl's restore expects of a
released checkpoint: every model variable, its ``<name>/ExponentialMovingAverage`` shadow
(automl averages the trainable variables and the BN moving statistics; the released manifests
have one shadow per model variable) and ``global_step``. Optimizer slots are not written (the
released checkpoints have none either).

The shadows take the weights given (the ones to run inference with); the raw variables take
``raw_state_dict`` when given (``convert --no-ema`` of the same checkpoint), else the same
values, so TF -> PyTorch -> TF gives back every model tensor of the original bit for bit.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from mappings import table_for
from mappings.layouts import to_tf
from mappings.rules import EMA_SUFFIX
from mappings.table import is_pt_only
from model.config import DetConfig
from model.temp_files import sweep_stale, temp_dir

from .errors import MappingError, NonFiniteError, OutputError

__all__ = ["CHECKPOINT_PREFIX", "GLOBAL_STEP", "ExportGaps", "check_out_dir", "tf_tensors", "write_tf_checkpoint"]

#: File prefix inside the output folder, as in automl's release archives (``model.index``).
CHECKPOINT_PREFIX = "model"
GLOBAL_STEP = "global_step"


@dataclass
class ExportGaps:
    """State_dict keys the table cannot place, table keys the state_dict lacks, wrong shapes."""

    unknown: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = []
        for title, keys in (("state_dict keys with no TF variable", self.unknown),
                            ("state_dict keys missing", self.missing)):
            if keys:
                lines.append(f"{len(keys)} {title}:")
                lines.extend(f"  {key}" for key in sorted(keys))
        if self.shape_mismatch:
            lines.append(f"{len(self.shape_mismatch)} shape mismatches (key, given, expected):")
            lines.extend(f"  {k}: {a} != {b}" for k, a, b in sorted(self.shape_mismatch))
        return lines


def _check_covers(state_dict: Mapping[str, torch.Tensor], config: DetConfig, what: str) -> None:
    table = {entry.pt_name: entry for entry in table_for(config)}
    gaps = ExportGaps(
        unknown=[k for k in state_dict if k not in table and not is_pt_only(k)],
        missing=[k for k in table if k not in state_dict],
        shape_mismatch=[(k, tuple(v.shape), table[k].pt_shape) for k, v in state_dict.items()
                        if k in table and tuple(v.shape) != table[k].pt_shape])
    if gaps.unknown or gaps.missing or gaps.shape_mismatch:
        error = MappingError(f"{what} do not match {config.name}: " + ", ".join(
            line.rstrip(":") for line in gaps.lines() if line[0] != " "))
        error.lines = gaps.lines()
        raise error


def _tf_value(state_dict: Mapping[str, torch.Tensor], entry, what: str) -> np.ndarray:
    tensor = state_dict[entry.pt_name]
    if not tensor.is_floating_point():
        raise MappingError(f"{what}: {entry.pt_name} is {tensor.dtype}, not a float tensor")
    array = to_tf(tensor.float(), entry.layout)
    if not np.isfinite(array).all():
        raise NonFiniteError(f"{what}: {entry.pt_name} has NaN or Inf values")
    return array


def tf_tensors(state_dict: Mapping[str, torch.Tensor], config: DetConfig,
               raw_state_dict: Mapping[str, torch.Tensor] | None = None,
               global_step: int = 0) -> dict[str, np.ndarray]:
    """``{TF checkpoint key: array}``: every model variable (raw values), its EMA shadow (the
    weights of ``state_dict``) and ``global_step``; float32 in TF layout.

    Raises MappingError when a state_dict does not match ``config``'s table exactly (every key,
    every shape; the lines are in ``error.lines``) and NonFiniteError on NaN/Inf.
    """
    _check_covers(state_dict, config, "weights")
    if raw_state_dict is not None:
        _check_covers(raw_state_dict, config, "raw weights")
    tensors: dict[str, np.ndarray] = {}
    for entry in table_for(config):
        shadow = _tf_value(state_dict, entry, "weights")
        tensors[entry.tf_name + EMA_SUFFIX] = shadow
        tensors[entry.tf_name] = shadow if raw_state_dict is None else \
            _tf_value(raw_state_dict, entry, "raw weights")
    tensors[GLOBAL_STEP] = np.asarray(global_step, dtype=np.int64)
    return tensors


def _save_bundle(tensors: Mapping[str, np.ndarray], prefix: Path) -> None:
    """``tf.raw_ops.SaveV2``: the bundle format ``tf.compat.v1.train.Saver`` writes."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    names = sorted(tensors)
    try:
        tf.raw_ops.SaveV2(prefix=str(prefix), tensor_names=names,
                          shape_and_slices=[""] * len(names),
                          tensors=[tf.constant(tensors[name]) for name in names])
    except tf.errors.OpError as error:           # e.g. disk full
        raise OutputError(f"{prefix}: TensorFlow could not write the checkpoint: "
                          f"{error.message}") from None
    (prefix.parent / "checkpoint").write_text(
        f'model_checkpoint_path: "{prefix.name}"\n'
        f'all_model_checkpoint_paths: "{prefix.name}"\n', encoding="utf-8")


def _is_checkpoint_file(name: str) -> bool:
    return name == "checkpoint" or name.startswith(CHECKPOINT_PREFIX + ".")


def check_out_dir(out_dir: Path, force: bool) -> None:
    """OutputError unless ``out_dir`` can be written: its parent exists, and it does not exist
    or (with ``force``) is a folder holding only a checkpoint written here."""
    if not out_dir.parent.is_dir():
        raise OutputError(f"{out_dir}: output folder {out_dir.parent} does not exist")
    if not out_dir.exists():
        return
    if not force:
        raise OutputError(f"{out_dir} exists; pass --force to overwrite")
    if not out_dir.is_dir() or not all(_is_checkpoint_file(p.name) for p in out_dir.iterdir()):
        raise OutputError(f"{out_dir} is not a checkpoint folder written by convert --to "
                          f"tf-ckpt; not replaced")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(staging: Path, out_dir: Path, force: bool) -> None:
    """Renames ``staging`` to ``out_dir``; an existing ``out_dir`` (checked again: it may have
    appeared meanwhile) is moved aside first and put back if the rename fails."""
    check_out_dir(out_dir, force)
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    aside = temp_dir(out_dir.parent, out_dir.name + ".old")
    os.replace(out_dir, aside / "replaced")
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(aside / "replaced", out_dir)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def write_tf_checkpoint(tensors: Mapping[str, np.ndarray], out_dir: str | Path,
                        force: bool = False) -> Path:
    """Writes ``out_dir/model.{index,data-00000-of-00001}`` and the ``checkpoint`` state file
    (what ``tf.train.latest_checkpoint(out_dir)`` finds) into a temporary folder beside
    ``out_dir``, then renames it into place; returns the checkpoint prefix. An existing
    ``out_dir`` is replaced only with ``force``; a failed write leaves nothing behind."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir, force)
    sweep_stale(out_dir.parent)  # staging folders of killed runs
    try:
        staging = temp_dir(out_dir.parent, out_dir.name)
    except OSError as error:
        raise OutputError(f"{out_dir}: cannot write beside it ({error})") from None
    try:
        staging.chmod(0o777 & ~_umask())          # mkdtemp's 0700 -> what mkdir would give
        _save_bundle(tensors, staging / CHECKPOINT_PREFIX)
        _move_into_place(staging, out_dir, force)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise OutputError(f"{out_dir}: {error}") from None
        raise
    return out_dir / CHECKPOINT_PREFIX

