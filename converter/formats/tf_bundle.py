"""Open a TF tensor bundle (``PREFIX.index`` + ``PREFIX.data-NNNNN-of-MMMMM``).

Both TF1 name-based and TF2 object-based checkpoints (and a SavedModel's
``variables/variables``) are tensor bundles; this module opens one with
``tf.train.load_checkpoint`` and checks, before any tensor is read, that the
data shards exist and are long enough to hold the tensors the index lists.
TensorFlow is imported lazily so that H5-only use does not need it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from converter.contents import as_numpy
from converter.errors import ConversionError, InputError

__all__ = ["TensorBundle", "open_bundle", "import_tensorflow", "OBJECT_GRAPH_KEY"]

#: Key under which TF2 object-based checkpoints store their TrackableObjectGraph.
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

_SHARD_RE = re.compile(r"\.data-(\d+)-of-(\d+)$")

# Errors TF's checkpoint reader raises for unreadable files: its own OpErrors
# (DataLossError, NotFoundError, ...) plus plain Python ones from the pybind
# layer ("Read less bytes than requested" is an IndexError).
_READ_ERRORS: tuple[type[BaseException], ...] = (ValueError, IndexError, OSError, RuntimeError)


def import_tensorflow() -> ModuleType:
    """Import TensorFlow quietly (see ``converter.tf_quiet``)."""
    from converter.tf_quiet import import_tensorflow_quietly
    try:
        tf = import_tensorflow_quietly()
    except ImportError as exc:
        raise ConversionError(
            f"reading TF checkpoints needs TensorFlow ({exc}); install the 'tf' extra"
        ) from exc
    return tf


def _read_errors(tf: ModuleType) -> tuple[type[BaseException], ...]:
    return (tf.errors.OpError, *_READ_ERRORS)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class TensorBundle:
    """An opened tensor bundle: key -> shape/dtype, and raw reads by key.

    Attributes:
        prefix: the bundle prefix (``.../model.ckpt-123``; no ``.index``).
        shapes: checkpoint key -> shape.
        dtypes: checkpoint key -> numpy dtype name (``'float32'``, ``'int64'``,
            ``'string'`` for the object graph, ...).
    """

    prefix: Path
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    _reader: Any = field(repr=False)
    _errors: tuple[type[BaseException], ...] = field(repr=False)

    def read_raw(self, key: str) -> Any:
        """The stored value as TF returns it (bytes for string scalars)."""
        try:
            return self._reader.get_tensor(key)
        except self._errors as exc:
            raise InputError(
                f"cannot read tensor {key} from checkpoint {self.prefix}: {_first_line(exc)}"
            ) from exc

    def read(self, key: str) -> np.ndarray:
        """The stored value as float32 / int64 numpy (see ``contents.as_numpy``)."""
        return as_numpy(self.read_raw(key))

    @property
    def is_object_based(self) -> bool:
        """True for TF2 object-based checkpoints (they hold an object graph)."""
        return OBJECT_GRAPH_KEY in self.shapes


_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_BYTES = 48


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def index_num_shards(index: Path) -> int | None:
    """``num_shards`` from the bundle header in a checkpoint index, or None if unreadable.

    The index is a LevelDB-format table (uncompressed blocks) whose first entry, under the
    empty key, is a ``BundleHeaderProto`` with ``num_shards`` as field 1.
    """
    try:
        data = index.read_bytes()
        footer = data[-_FOOTER_BYTES:]
        if len(footer) != _FOOTER_BYTES or int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
            return None
        _, pos = _varint(footer, 0)                       # metaindex handle: offset
        _, pos = _varint(footer, pos)                     # ... size
        index_offset, pos = _varint(footer, pos)          # index block handle
        block = data[index_offset:]
        shared, pos = _varint(block, 0)                   # first index entry
        key_len, pos = _varint(block, pos)
        _, pos = _varint(block, pos)
        data_offset, _ = _varint(block, pos + key_len)    # -> first data block handle
        entry = data[data_offset:]
        shared, pos = _varint(entry, 0)
        key_len, pos = _varint(entry, pos)
        value_len, pos = _varint(entry, pos)
        if shared or key_len:                             # the header sits under the key ""
            return None
        header = entry[pos:pos + value_len]
        pos = 0
        while pos < len(header):                          # protobuf fields of the header
            tag, pos = _varint(header, pos)
            if tag & 7 != 0:
                return None
            value, pos = _varint(header, pos)
            if tag >> 3 == 1:
                return value if value > 0 else None
        return 1 if header == b"" else None
    except (OSError, ValueError, IndexError):
        return None


def data_shards(prefix: Path) -> list[Path]:
    """The ``PREFIX.data-*-of-N`` files, after checking all N exist.

    N is the index's ``num_shards``; other ``-of-M`` files beside it (left over from an
    earlier save) are ignored. Without a readable header the shards found must agree on N.

    Raises:
        InputError: no shard, or some of the N shards are missing.
    """
    directory = prefix.parent
    stem = prefix.name + ".data-"
    found: dict[int, dict[int, Path]] = {}  # total -> shard number -> file
    if directory.is_dir():
        for entry in directory.iterdir():
            if not entry.name.startswith(stem):
                continue
            match = _SHARD_RE.search(entry.name)
            if match and entry.name[: match.start()] == prefix.name:
                found.setdefault(int(match.group(2)), {})[int(match.group(1))] = entry
    if not found:
        raise InputError(
            f"checkpoint {prefix} has an index but no data shard ({prefix.name}.data-*) next to it"
        )
    total = index_num_shards(directory / (prefix.name + ".index"))
    if total is None:
        if len(found) > 1:
            raise InputError(f"checkpoint {prefix} has data shards of {len(found)} different "
                             f"saves (-of-{', -of-'.join(map(str, sorted(found)))})")
        total = next(iter(found))
    shards = found.get(total, {})
    missing = [i for i in range(total) if i not in shards]
    if missing:
        raise InputError(
            f"checkpoint {prefix} is missing data shard(s) {missing} of {total}"
        )
    return [shards[i] for i in range(total)]


def _min_data_bytes(shapes: dict[str, tuple[int, ...]], dtypes: dict[str, Any]) -> int:
    """Bytes the fixed-size tensors occupy (string tensors vary and count 0)."""
    total = 0
    for key, shape in shapes.items():
        dtype = dtypes[key]
        if dtype.name == "string":
            continue
        total += int(np.prod(shape, dtype=np.int64)) * int(dtype.size)
    return total


def open_bundle(prefix: Path) -> TensorBundle:
    """Open the tensor bundle at ``prefix`` and check its shards are complete.

    Args:
        prefix: bundle prefix; ``prefix.index`` must exist.

    Raises:
        InputError: index missing or not a checkpoint index; data shard missing;
            data shorter than the tensors listed in the index (truncated file).
    """
    index = prefix.parent / (prefix.name + ".index")
    if not index.is_file():
        raise InputError(f"checkpoint index {index} not found")
    tf = import_tensorflow()
    errors = _read_errors(tf)
    try:
        reader = tf.train.load_checkpoint(str(prefix))
        shapes_tf = reader.get_variable_to_shape_map()
        dtypes_tf = reader.get_variable_to_dtype_map()
    except errors as exc:
        raise InputError(
            f"{index} is not a readable TF checkpoint index: {_first_line(exc)}"
        ) from exc
    shards = data_shards(prefix)
    available = sum(p.stat().st_size for p in shards)
    needed = _min_data_bytes(shapes_tf, dtypes_tf)
    if available < needed:
        raise InputError(
            f"checkpoint data of {prefix} is truncated: {available} bytes in "
            f"{len(shards)} shard(s), the index lists tensors needing at least {needed}"
        )
    return TensorBundle(
        prefix=prefix,
        shapes={k: tuple(int(d) for d in v) for k, v in shapes_tf.items()},
        dtypes={k: v.name for k, v in dtypes_tf.items()},
        _reader=reader,
        _errors=errors,
    )
