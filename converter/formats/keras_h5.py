"""Keras (tf_keras / Keras 2) ``.h5`` weight files, exposed under TF1 names.

``Model.save_weights('x.h5')`` writes one group per top-level layer (listed in
the root attribute ``layer_names``); each group lists its datasets in the
attribute ``weight_names``, named ``<variable name>:0``. For automl's
EfficientDet the variable names are the TF1 names, so the dataset
``efficientnet-b0/efficientnet-b0/stem/conv2d/kernel:0`` is the TF1 variable
``efficientnet-b0/stem/conv2d/kernel``: the leading layer group and ``:0`` are
dropped. A full-model ``.h5`` keeps the same layout under ``model_weights/``.
Keras 3 ``.weights.h5`` files (``layers/<layer>/vars/<i>``) store no variable
names and are refused.

An ``.h5`` is data from whoever made it, and HDF5 can make a read reach other
files: external links, external raw storage and virtual datasets. Files using
any of them are refused before a value is read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from converter.contents import CheckpointContents, as_numpy
from converter.errors import InputError

__all__ = ["read_h5", "HDF5_MAGIC"]

#: First 8 bytes of every HDF5 file (without a user block).
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, str):
        return value
    raise ValueError(f"attribute entry {value!r} is not a string")


def _names(attribute: object, what: str) -> list[str]:
    """A Keras name-list attribute (``layer_names``, ``weight_names``) as strings."""
    values = np.asarray(attribute)
    if values.ndim != 1 or (values.size and values.dtype.kind not in "SUO"):
        raise ValueError(f"attribute {what} is not a list of names")
    return [_text(x) for x in values]


def check_self_contained(handle) -> None:
    """Refuse a file whose reads could reach other files.

    Raises:
        InputError: an external link, a dataset with external storage, or a
            virtual dataset anywhere in the file.
    """
    import h5py  # noqa: PLC0415

    def problem(name: str, link: object) -> str | None:
        # h5py stops at the first non-None return (raising inside the callback is unsafe)
        if isinstance(link, h5py.ExternalLink):
            return f"{name} is an external link to {link.filename}"
        if isinstance(link, h5py.HardLink):
            obj = handle[name]
            if isinstance(obj, h5py.Dataset) and obj.external:
                return f"dataset {name} uses external storage"
            if isinstance(obj, h5py.Dataset) and obj.is_virtual:
                return f"dataset {name} is a virtual dataset"
        return None

    found = handle.visititems_links(problem)
    if found:
        raise InputError(f"{handle.filename}: {found}, which reads other files; refused")


def _tf1_name(weight_name: str) -> str:
    return weight_name[:-2] if weight_name.endswith(":0") else weight_name


def _weight_paths(root) -> dict[str, str]:
    """TF1 name -> dataset path inside the file, for a Keras 2 weights group."""
    import h5py  # noqa: PLC0415 - only needed for this format

    paths: dict[str, str] = {}
    layer_names = root.attrs.get("layer_names")
    if layer_names is not None:
        for layer in _names(layer_names, "layer_names"):
            group = root[layer]
            for weight in _names(group.attrs.get("weight_names", []), f"{layer}/weight_names"):
                paths.setdefault(_tf1_name(weight), f"{layer}/{weight}")
        return paths

    def visit(path: str, obj: object) -> None:
        if isinstance(obj, h5py.Dataset) and "/" in path:
            paths.setdefault(_tf1_name(path.split("/", 1)[1]), path)

    root.visititems(visit)
    return paths


def _shape(dataset: object, where: str) -> tuple[int, ...]:
    shape = getattr(dataset, "shape", None)
    if shape is None:
        raise ValueError(f"{where} is not a dataset")
    return tuple(int(d) for d in shape)


def read_h5(path: Path) -> CheckpointContents:
    """Read the names and shapes of a Keras ``.h5`` weights file.

    Values are read lazily; each ``load`` opens the file briefly.

    Raises:
        InputError: not an HDF5 file, unreadable, a Keras 3 weights file, or
            holding no weights.
    """
    import h5py  # noqa: PLC0415

    try:
        is_hdf5 = h5py.is_hdf5(str(path))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    if not is_hdf5:
        raise InputError(f"{path} is not an HDF5 file")
    try:
        with h5py.File(path, "r") as handle:
            check_self_contained(handle)
            root = handle["model_weights"] if "model_weights" in handle else handle
            if "layer_names" not in root.attrs and "layers" in root:
                raise InputError(
                    f"{path} is a Keras 3 weights file (layers/*/vars/*); it stores no "
                    "variable names, re-save it with tf_keras"
                )
            prefix = "model_weights/" if root is not handle else ""
            paths = {name: prefix + p for name, p in _weight_paths(root).items()}
            names = {name: _shape(handle[p], p) for name, p in paths.items()}
    except (OSError, KeyError, ValueError, TypeError, AttributeError) as exc:
        raise InputError(f"cannot read HDF5 weights {path}: {exc}") from exc
    if not names:
        raise InputError(f"HDF5 file {path} holds no Keras weights")

    def load(name: str) -> np.ndarray:
        try:
            with h5py.File(path, "r") as handle:
                return as_numpy(handle[paths[name]][()])
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"cannot read {name} from HDF5 weights {path}: {exc}") from exc

    return CheckpointContents(
        format="h5",
        source=path,
        names=dict(sorted(names.items())),
        # automl writes .h5 weights from its inference model, into which the EMA
        # shadows were restored; no separate shadows exist to prefer.
        ema_in_model_entries=True,
        skipped={},
        _loader=load,
    )
