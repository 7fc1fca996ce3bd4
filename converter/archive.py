"""Unpack ``.tar.gz`` / ``.tgz`` / ``.tar`` archives safely into a cache folder.

Every member is checked before anything is written: absolute names, ``..``
components, links of any kind, device or FIFO members and sparse members make
the whole archive refused with ``InputError``, as does an archive over the
``UnpackLimits`` (member count, total unpacked bytes, unpacked/packed ratio).
Extraction goes into a temporary folder next to the destination, which is
renamed into place only once complete and removed on any failure, so an
interrupted unpack never looks finished.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from converter.cache import make_cache_folder
from converter.errors import InputError, OutputError
from converter.locking import file_lock
from model.temp_files import sweep_stale, temp_dir

__all__ = [
    "COMPLETE_MARKER",
    "UnpackLimits",
    "check_members",
    "safe_unpack",
    "unpack_cached",
    "sha256_file",
]

#: File written last into an unpacked folder; its presence means the unpack finished.
COMPLETE_MARKER = ".complete"
# What tarfile/gzip raise on damaged input: bad headers, a truncated stream,
# bad deflate data, or I/O errors (gzip.BadGzipFile is an OSError).
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)
_READ_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


@dataclass(frozen=True)
class UnpackLimits:
    """What an archive may unpack to. automl's largest release (D7x) unpacks to under 1 GiB.

    Attributes:
        max_members: members (files and folders) in the archive.
        max_bytes: total unpacked bytes.
        max_ratio: unpacked bytes per archive byte, checked once the total
            exceeds ``ratio_floor`` (small archives of text compress well).
    """

    max_members: int = 10_000
    max_bytes: int = 16 << 30
    max_ratio: float = 50.0
    ratio_floor: int = 64 << 20


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _check_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    if name.startswith("/") or name.startswith("\\") or (name[:1].isalpha() and name[1:2] == ":"):
        raise InputError(f"archive {archive} has a member with an absolute path: {name!r}; refused")
    if ".." in name.replace("\\", "/").split("/"):
        raise InputError(
            f"archive {archive} has a member leaving the target folder: {name!r}; refused"
        )
    if member.issym() or member.islnk():
        raise InputError(
            f"archive {archive} has a link member {name!r} -> {member.linkname!r}; refused"
        )
    if member.issparse() or getattr(member, "sparse", None):
        raise InputError(f"archive {archive} has a sparse member {name!r}; refused")
    if not (member.isfile() or member.isdir()):
        raise InputError(f"archive {archive} has a device/FIFO member {name!r}; refused")


def _checked_members(
    tar: tarfile.TarFile, archive: Path, limits: UnpackLimits
) -> list[tarfile.TarInfo]:
    packed = max(archive.stat().st_size, 1)
    members: list[tarfile.TarInfo] = []
    total = 0
    for member in tar:
        _check_member(member, archive)
        members.append(member)
        total += member.size
        if len(members) > limits.max_members:
            raise InputError(f"archive {archive} has more than {limits.max_members} members; refused")
        if total > limits.max_bytes:
            raise InputError(
                f"archive {archive} unpacks to more than {limits.max_bytes} bytes; refused"
            )
        if total > limits.ratio_floor and total > limits.max_ratio * packed:
            raise InputError(
                f"archive {archive} unpacks to over {limits.max_ratio:g} times its size "
                f"({packed} bytes packed); refused as a decompression bomb"
            )
    return members


def check_members(archive: Path, limits: UnpackLimits = UnpackLimits()) -> list[tarfile.TarInfo]:
    """Read the member list and refuse the archive if any member is unsafe or it is too big.

    The headers are read one by one and reading stops at the first limit passed,
    so a bomb is refused without being decompressed in full.

    Raises:
        InputError: unreadable archive, an unsafe member, or a limit passed.
    """
    try:
        with tarfile.open(archive, "r:*") as tar:
            return _checked_members(tar, archive, limits)
    except _ARCHIVE_ERRORS as exc:
        raise InputError(f"{archive} is not a readable tar/gzip archive: {exc}") from exc


def safe_unpack(archive: Path, destination: Path, limits: UnpackLimits = UnpackLimits()) -> Path:
    """Unpack ``archive`` into ``destination`` (which must not exist yet).

    The members are checked as in ``check_members`` and only they are
    extracted, into a temporary sibling folder then renamed to ``destination``.
    If another process finished the same destination first, its copy is kept.
    Stale temporary folders of killed runs beside ``destination`` are removed.

    Returns:
        ``destination``.

    Raises:
        InputError: unreadable, truncated, unsafe or oversized archive.
        OutputError: the cache folder cannot be created.
    """
    make_cache_folder(destination.parent)
    sweep_stale(destination.parent)
    staging = temp_dir(destination.parent, "unpack")
    try:
        with tarfile.open(archive, "r:*") as tar:
            # the members extracted are the ones checked, read from this same open file;
            # tarfile's 'data' filter (PEP 706, where present) re-checks real paths.
            members = _checked_members(tar, archive, limits)
            data_filter = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **data_filter)  # noqa: S202 - checked
        (staging / COMPLETE_MARKER).write_text(archive.name + "\n", encoding="utf-8")
        try:
            os.rename(staging, destination)
        except OSError:
            if not (destination / COMPLETE_MARKER).is_file():
                raise
    except _READ_ERRORS as exc:
        raise InputError(f"{archive} is not a readable tar/gzip archive: {exc}") from exc
    except OSError as exc:  # writing: disk full, permissions
        raise OutputError(f"cannot unpack {archive} into {destination.parent}: "
                          f"{exc.strerror or exc}") from exc
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
    make_cache_folder(destination.parent)
    with file_lock(destination.parent / (destination.name + ".lock")):
        if (destination / COMPLETE_MARKER).is_file():  # another process finished it meanwhile
            return destination
        if destination.exists():
            shutil.rmtree(destination)  # left over from an interrupted unpack
        return safe_unpack(archive, destination)
