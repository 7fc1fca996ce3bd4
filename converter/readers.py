"""Entry point: ``read_checkpoint(path)`` for every checkpoint format users have.

Formats (see ``converter.locate`` for the accepted path forms):

* ``'tf1'``: TF1 name-based checkpoints (automl's released ``.tar.gz`` files);
* ``'tf2'``: TF2 object-based checkpoints (automl ``tf2/train.py`` ``ckpt-*`` /
  ``emackpt-*``), named through their object graph;
* ``'saved_model'``: a SavedModel's ``variables/``;
* ``'h5'``: Keras ``.h5`` weights;
* archives (``.tar.gz`` / ``.tgz`` / ``.tar``) holding any of the above are
  unpacked safely into the cache folder first.

Whatever the format, ``CheckpointContents.names`` are TF1 variable names.
"""

from __future__ import annotations

from pathlib import Path

from converter.archive import unpack_cached
from converter.cache import default_cache_dir
from converter.contents import CheckpointContents, check_finite
from converter.formats.keras_h5 import read_h5
from converter.formats.tf1 import read_name_based
from converter.formats.tf2 import read_object_based
from converter.formats.tf_bundle import open_bundle
from converter.locate import ARCHIVE, BUNDLE, H5, SAVED_MODEL, Located, find_in_tree, locate

__all__ = ["read_checkpoint", "read_located", "check_finite", "CheckpointContents"]


def read_located(located: Located) -> CheckpointContents:
    """Read a checkpoint already classified by ``locate`` (not an archive)."""
    if located.kind == BUNDLE:
        bundle = open_bundle(located.path)
        if bundle.is_object_based:
            return read_object_based(bundle, format="tf2")
        return read_name_based(bundle, format="tf1")
    if located.kind == SAVED_MODEL:
        bundle = open_bundle(located.path / "variables" / "variables")
        if bundle.is_object_based:
            return read_object_based(bundle, format="saved_model")
        # TF1-era SavedModel: variables keep their TF1 names; automl's TF1
        # export restored the EMA shadows into them.
        return read_name_based(bundle, format="saved_model", ema_in_model_entries=True)
    if located.kind == H5:
        return read_h5(located.path)
    raise ValueError(f"cannot read a located {located.kind!r} directly")


def read_checkpoint(path: str | Path, *, cache_dir: Path | None = None) -> CheckpointContents:
    """Open a checkpoint of any supported format and expose it under TF1 names.

    Args:
        path: prefix, checkpoint file, directory, SavedModel, ``.h5`` or
            archive (see ``converter.locate``).
        cache_dir: where archives are unpacked; default ``default_cache_dir()``
            (``$EFFDET_CACHE`` or ``~/.cache/effdet-tf-port``).

    Returns:
        The checkpoint's names, shapes and lazy loader. Tensors are read on
        ``load``; call ``check_finite`` on the ones used.

    Raises:
        InputError: missing, truncated, corrupt or unrecognised input, or an
            unsafe archive.
    """
    located = locate(Path(path))
    if located.kind == ARCHIVE:
        root = unpack_cached(located.path, cache_dir or default_cache_dir())
        located = find_in_tree(root)
    return read_located(located)
