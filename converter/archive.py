"""Unpack ``.tar.gz`` / ``.tgz`` / ``.tar`` archives safely into a cache folder.

Every member is checked before anything is written: absolute names, ``..``
components, links whose target leaves the destination, and device or FIFO
members make the whole archive refused with ``InputError``. Extraction goes
into a temporary folder next to the destination, which is renamed into place
only once complete, so an interrupted unpack never looks finished.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from converter.errors import InputError

__all__ = ["COMPLETE_MARKER", "check_members", "safe_unpack", "unpack_cached", "sha256_file"]

#: File written last into an unpacked folder; its presence means the unpack finished.
COMPLETE_MARKER = ".complete"
# What tarfile/gzip raise on damaged input: bad headers, a truncated stream,
# bad deflate data, or I/O errors (gzip.BadGzipFile is an OSError).
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _inside(path: str) -> bool:
    """True if a normalised POSIX path relative to the destination stays inside it."""
    return path != ".." and not path.startswith("../") and not posixpath.isabs(path)


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    if posixpath.isabs(name) or name.startswith("\\") or (name[:1].isalpha() and name[1:2] == ":"):
        raise InputError(f"archive {archive} has a member with an absolute path: {name!r}; refused")
    if ".." in name.replace("\\", "/").split("/"):
        raise InputError(
            f"archive {archive} has a member leaving the target folder: {name!r}; refused"
        )
    if member.issym():
        target = member.linkname
        resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
        if posixpath.isabs(target) or not _inside(resolved):
            raise InputError(
                f"archive {archive} has a symlink pointing outside the target folder: "
                f"{name!r} -> {target!r}; refused"
            )
    elif member.islnk():
        target = member.linkname
        if posixpath.isabs(target) or not _inside(posixpath.normpath(target)):
            raise InputError(
                f"archive {archive} has a hard link pointing outside the target folder: "
                f"{name!r} -> {target!r}; refused"
            )
    elif not (member.isfile() or member.isdir()):
        raise InputError(f"archive {archive} has a device/FIFO member {name!r}; refused")


def check_members(archive: Path) -> list[tarfile.TarInfo]:
    """Read the member list and refuse the archive if any member is unsafe.

    Raises:
        InputError: unreadable archive, or an unsafe member.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
    except _ARCHIVE_ERRORS as exc:
        raise InputError(f"{archive} is not a readable tar/gzip archive: {exc}") from exc
    for member in members:
        _check_member(member, archive)
    return members


def safe_unpack(archive: Path, destination: Path) -> Path:
    """Unpack ``archive`` into ``destination`` (which must not exist yet).

    The members are checked first (``check_members``); the archive is then
    extracted into a temporary sibling folder and renamed to ``destination``.
    If another process finished the same destination first, its copy is kept.

    Returns:
        ``destination``.

    Raises:
        InputError: unreadable, truncated or unsafe archive.
    """
    check_members(archive)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=destination.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                # Second line of defence: tarfile's own 'data' filter re-checks
                # real paths while extracting.
                tar.extractall(staging, filter="data")
            else:  # pragma: no cover - Python without PEP 706 backport
                tar.extractall(staging)  # noqa: S202 - members checked above
        (staging / COMPLETE_MARKER).write_text(archive.name + "\n", encoding="utf-8")
        try:
            os.rename(staging, destination)
        except OSError:
            if not (destination / COMPLETE_MARKER).is_file():
                raise
    except _ARCHIVE_ERRORS as exc:
        raise InputError(f"cannot unpack {archive}: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return destination


def unpack_cached(archive: Path, cache_dir: Path) -> Path:
    """Unpack ``archive`` under ``cache_dir/archives/`` once, keyed by content.

    Returns:
        The folder holding the unpacked members
        (``cache_dir/archives/<name>-<sha256[:16]>``); reused if complete.
    """
    digest = sha256_file(archive)
    stem = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    destination = cache_dir / "archives" / f"{stem}-{digest[:16]}"
    if (destination / COMPLETE_MARKER).is_file():
        return destination
    if destination.exists():
        shutil.rmtree(destination)  # left over from an interrupted unpack
    return safe_unpack(archive, destination)
