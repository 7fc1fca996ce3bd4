"""TF1 name-based checkpoints: the keys already are TF1 variable names.

This is the format of automl's released ``efficientdet-*.tar.gz`` files and of
anything ``tf.compat.v1.train.Saver`` wrote (keys such as
``efficientnet-b0/stem/conv2d/kernel``, ``.../ExponentialMovingAverage``,
``.../Momentum``, ``global_step``). Every key is exposed; nothing is skipped.
"""

from __future__ import annotations

from converter.contents import CheckpointContents
from converter.formats.tf_bundle import TensorBundle

__all__ = ["read_name_based"]


def read_name_based(
    bundle: TensorBundle, *, format: str = "tf1", ema_in_model_entries: bool = False
) -> CheckpointContents:
    """Expose every key of a name-based bundle under its own name.

    Args:
        bundle: an opened bundle without ``_CHECKPOINTABLE_OBJECT_GRAPH``.
        format: ``'tf1'``, or ``'saved_model'`` for a TF1-era SavedModel's variables.
        ema_in_model_entries: see ``CheckpointContents``.
    """
    return CheckpointContents(
        format=format,
        source=bundle.prefix,
        names=dict(sorted(bundle.shapes.items())),
        ema_in_model_entries=ema_in_model_entries,
        skipped={},
        _loader=bundle.read,
    )
