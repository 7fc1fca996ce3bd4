"""Decide what a user-given path points at, before anything is opened.

Accepted forms:

* a TF checkpoint prefix (``.../model.ckpt-12345``), or one of its files
  (``.index``, ``.data-NNNNN-of-MMMMM``, ``.meta``);
* a directory holding a ``checkpoint`` state file (its
  ``model_checkpoint_path``, relative or absolute, is followed), or exactly
  one ``*.index``, or a SavedModel (``variables/variables.index``), or exactly
  one ``*.h5``; a SavedModel's ``saved_model.pb`` or ``variables/`` folder;
* a Keras ``.h5`` file (recognised by its HDF5 signature);
* a ``.tar.gz`` / ``.tgz`` / ``.tar`` archive (by name or by content).
"""

from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from converter.errors import InputError
from converter.formats.keras_h5 import HDF5_MAGIC

__all__ = ["Located", "locate", "locate_in_dir", "find_in_tree", "read_state_file"]

BUNDLE = "bundle"
SAVED_MODEL = "saved_model"
H5 = "h5"
ARCHIVE = "archive"

_SHARD_RE = re.compile(r"\.data-\d+-of-\d+$")
_STATE_RE = re.compile(r'^\s*model_checkpoint_path\s*:\s*"((?:[^"\\]|\\.)*)"\s*$', re.M)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
_GZIP_MAGIC = b"\x1f\x8b"
_STATE_FILE = "checkpoint"


@dataclass(frozen=True)
class Located:
    """What a path points at.

    Attributes:
        kind: ``'bundle'`` (TF tensor bundle; ``path`` is its prefix),
            ``'saved_model'`` (``path`` is the SavedModel directory),
            ``'h5'`` (``path`` is the file) or ``'archive'``.
        path: see ``kind``.
    """

    kind: str
    path: Path


def _prefix_exists(prefix: Path) -> bool:
    return (prefix.parent / (prefix.name + ".index")).is_file()


def _has_shards(prefix: Path) -> bool:
    if not prefix.parent.is_dir():
        return False
    stem = prefix.name + ".data-"
    return any(p.name.startswith(stem) for p in prefix.parent.iterdir())


def _bundle(prefix: Path, given: Path) -> Located:
    if _prefix_exists(prefix):
        return Located(BUNDLE, prefix)
    if _has_shards(prefix):
        raise InputError(f"checkpoint {given}: data shard(s) found but {prefix}.index is missing")
    raise InputError(f"checkpoint {given} not found (no {prefix}.index)")


def _inside(path: Path, directory: Path) -> bool:
    """True if ``path`` (symlinks resolved) lies inside ``directory``."""
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


def read_state_file(directory: Path) -> Path:
    """The prefix named by ``directory/checkpoint`` (``model_checkpoint_path``).

    A relative path is taken relative to ``directory``; an absolute one that
    does not exist (a checkpoint moved from another machine) falls back to its
    basename inside ``directory``, as TensorFlow does. The state file is data
    from whoever made the folder, so the prefix must stay inside ``directory``:
    a path that leaves it (``../..``, an absolute path elsewhere, a symlink out)
    is refused. Pass such a prefix directly to use it.

    Raises:
        InputError: unreadable state file, no ``model_checkpoint_path`` in it,
            or a prefix outside ``directory``.
    """
    state = directory / _STATE_FILE
    try:
        text = state.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read checkpoint state file {state}: {exc}") from exc
    match = _STATE_RE.search(text)
    if not match:
        raise InputError(f"checkpoint state file {state} has no model_checkpoint_path")
    value = re.sub(r"\\(.)", r"\1", match.group(1))
    if "\0" in value:
        raise InputError(f"checkpoint state file {state} names a path with a NUL byte; refused")
    prefix = Path(value)
    if prefix.is_absolute() and not _prefix_exists(prefix):
        prefix = Path(prefix.name)
    candidate = prefix if prefix.is_absolute() else directory / prefix
    index = candidate.parent / (candidate.name + ".index")
    if not (_inside(candidate, directory) and _inside(index, directory)):
        raise InputError(
            f"checkpoint state file {state} names {value!r}, outside its folder; refused "
            "(pass that prefix directly if you trust it)"
        )
    return candidate


def _is_saved_model(directory: Path) -> bool:
    return (directory / "saved_model.pb").is_file() or (
        directory / "variables" / "variables.index"
    ).is_file()


def _saved_model(directory: Path) -> Located:
    if not (directory / "variables" / "variables.index").is_file():
        raise InputError(
            f"SavedModel {directory} has no variables/variables.index (weights missing)"
        )
    return Located(SAVED_MODEL, directory)


def locate_in_dir(directory: Path) -> Located:
    """Find the checkpoint a directory stands for (see the module docstring).

    Raises:
        InputError: nothing recognisable, or more than one candidate.
    """
    if (directory / _STATE_FILE).is_file():
        prefix = read_state_file(directory)
        if not _prefix_exists(prefix):
            raise InputError(
                f"{directory / _STATE_FILE} names {prefix} but {prefix}.index does not exist"
            )
        return Located(BUNDLE, prefix)
    if _is_saved_model(directory):
        return _saved_model(directory)
    if directory.name == "variables" and _is_saved_model(directory.parent):
        return _saved_model(directory.parent)
    entries = sorted(p.name for p in directory.iterdir())
    indexes = [n for n in entries if n.endswith(".index")]
    if len(indexes) == 1:
        return Located(BUNDLE, directory / indexes[0][: -len(".index")])
    if len(indexes) > 1:
        raise InputError(
            f"{directory} holds {len(indexes)} checkpoints ({', '.join(indexes[:4])}"
            f"{', ...' if len(indexes) > 4 else ''}) and no 'checkpoint' state file; "
            "pass one prefix"
        )
    h5_files = [n for n in entries if n.endswith((".h5", ".hdf5"))]
    if len(h5_files) == 1:
        return Located(H5, directory / h5_files[0])
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise InputError(
        f"no checkpoint in {directory}: found {len(entries)} entries"
        f"{' (' + shown + ')' if entries else ''}; expected a 'checkpoint' state file, "
        "one *.index, a SavedModel or one *.h5"
    )


def _head(path: Path, size: int = 8) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(size)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _locate_file(path: Path) -> Located:
    name = path.name
    if name == _STATE_FILE:
        return locate_in_dir(path.parent)
    if name in ("saved_model.pb", "saved_model.pbtxt"):
        return _saved_model(path.parent)
    if name.endswith(".index"):
        return _bundle(path.with_name(name[: -len(".index")]), path)
    shard = _SHARD_RE.search(name)
    if shard:
        return _bundle(path.with_name(name[: shard.start()]), path)
    if name.endswith(".meta"):
        return _bundle(path.with_name(name[: -len(".meta")]), path)
    head = _head(path)
    if head.startswith(HDF5_MAGIC) or name.endswith((".h5", ".hdf5")):
        return Located(H5, path)
    if name.endswith(_ARCHIVE_SUFFIXES) or head.startswith(_GZIP_MAGIC) or tarfile.is_tarfile(path):
        return Located(ARCHIVE, path)
    if _prefix_exists(path):
        return Located(BUNDLE, path)
    raise InputError(
        f"{path} is not a checkpoint: {path.stat().st_size} bytes starting "
        f"{head.hex() or '(empty)'}, "
        "not a TF checkpoint file, HDF5 file or tar archive"
    )


def locate(path: Path) -> Located:
    """Classify ``path`` (see the module docstring).

    Raises:
        InputError: the path does not exist or is not a recognised checkpoint.
    """
    path = Path(os.path.expanduser(path))
    if path.is_dir():
        return locate_in_dir(path)
    if path.is_file():
        return _locate_file(path)
    if path.exists():
        raise InputError(f"{path} is neither a file nor a directory")
    return _bundle(path, path)


def _is_checkpoint_dir(directory: Path, files: list[str], dirs: list[str]) -> bool:
    """True if a directory holds a checkpoint: a state file, one ``*.index``, a SavedModel or
    one ``*.h5``."""
    return (
        _STATE_FILE in files
        or "saved_model.pb" in files
        or ("variables" in dirs and (directory / "variables" / "variables.index").is_file())
        or sum(f.endswith(".index") for f in files) == 1
        or sum(f.endswith((".h5", ".hdf5")) for f in files) == 1
    )


def find_in_tree(root: Path) -> Located:
    """Locate the one checkpoint inside an unpacked archive.

    A folder counts as a checkpoint if it holds a ``checkpoint`` state file,
    one ``*.index``, a SavedModel or one ``*.h5``. An archive with more than
    one such folder is refused rather than resolved by a guess.

    Raises:
        InputError: no checkpoint, or several.
    """
    found: list[Path] = []
    for current, dirs, files in os.walk(root):
        directory = Path(current)
        if directory.name == "variables" and _is_saved_model(directory.parent):
            continue
        if _is_checkpoint_dir(directory, files, dirs):
            found.append(directory)
    if not found:
        raise InputError(f"no checkpoint found inside the unpacked archive {root}")
    if len(found) > 1:
        shown = ", ".join(str(p.relative_to(root)) for p in sorted(found)[:4])
        raise InputError(
            f"archive unpacked at {root} holds {len(found)} checkpoints ({shown}"
            f"{', ...' if len(found) > 4 else ''}); unpack it and pass one"
        )
    return locate_in_dir(found[0])
