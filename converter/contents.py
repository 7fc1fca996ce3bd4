"""What a checkpoint reader returns: TF1 names, shapes, and lazy tensor access.

Every format (TF1 name-based, TF2 object-based, SavedModel variables, Keras H5)
is presented under **TF1 variable names**, exactly as they appear in automl's
name-based checkpoints, e.g. ``efficientnet-b0/stem/conv2d/kernel``,
``box_net/box-0-bn-3/beta/ExponentialMovingAverage``, ``.../Momentum`` and
``global_step``. The mapping layer therefore sees one naming whatever was read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from converter.errors import NonFiniteError
from mappings import ignore_reason

__all__ = ["CheckpointContents", "FORMATS", "check_finite", "as_numpy"]

#: Values of ``CheckpointContents.format``.
FORMATS = ("tf1", "tf2", "saved_model", "h5")


@dataclass
class CheckpointContents:
    """Names, shapes and lazy values of one checkpoint, under TF1 variable names.

    Attributes:
        format: ``'tf1'`` | ``'tf2'`` | ``'saved_model'`` | ``'h5'``.
        source: the file, prefix or directory actually read (for a TF checkpoint
            the prefix, e.g. ``.../model.ckpt-12345``; for a SavedModel its
            ``variables/variables`` prefix; for H5 the file).
        names: TF1 variable name -> shape for every tensor exposed; for TF1
            checkpoints that is every key, including EMA shadows, optimizer
            slots and ``global_step``.
        ema_in_model_entries: True when the model entries already hold the
            weights inference uses and no ``/ExponentialMovingAverage`` shadows
            exist to prefer (TF2 ``emackpt-*``: trainables averaged by tfa's
            ``AverageModelCheckpoint``; SavedModel and H5 exports written from
            automl's inference model, which restores the EMA shadows first).
        skipped: checkpoint keys that are not exposed -> reason (object graph,
            optimizer state, the EfficientNet classification head, ...).
    """

    format: str
    source: Path
    names: dict[str, tuple[int, ...]]
    ema_in_model_entries: bool = False
    skipped: dict[str, str] = field(default_factory=dict)
    _loader: Callable[[str], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def load(self, name: str) -> np.ndarray:
        """Read one tensor by TF1 name.

        Returns:
            A numpy array of shape ``names[name]``: float32 for floating
            tensors (float16/bfloat16/float64 are cast), int64 for integers.

        Raises:
            KeyError: ``name`` is not in ``names``.
            InputError: the stored bytes cannot be read (truncated, corrupt).
        """
        if name not in self.names:
            raise KeyError(f"{name!r} is not a tensor of {self.source}")
        if self._loader is None:
            raise RuntimeError("CheckpointContents was built without a loader")
        return self._loader(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names


def as_numpy(value: object) -> np.ndarray:
    """Normalise a stored value to float32 (floating) or int64 (integer) numpy."""
    array = np.asarray(value)
    kind = array.dtype.kind
    if kind in "iub":
        return array.astype(np.int64, copy=False)
    if kind == "f" or array.dtype.name == "bfloat16":
        return array.astype(np.float32, copy=False)
    return array


def check_finite(contents: CheckpointContents, names: Iterable[str]) -> None:
    """Raise NonFiniteError naming the first model tensor with NaN or Inf.

    Entries of the ignore list (``mappings.IGNORED_TF``: optimizer slots and
    accumulators, ``global_step``, ...) are not model tensors and are passed over.
    Tensors are checked in the order given; the converter passes the names it
    actually uses.
    """
    for name in names:
        if ignore_reason(name):
            continue
        value = contents.load(name)
        if value.dtype.kind != "f":
            continue
        finite = np.isfinite(value)
        if not finite.all():
            n_nan = int(np.isnan(value).sum())
            n_inf = int(value.size - finite.sum()) - n_nan
            raise NonFiniteError(
                f"tensor {name} of {contents.source} has {n_nan} NaN and {n_inf} Inf "
                f"values out of {value.size}"
            )
