"""Fetch automl's released EfficientDet checkpoints by name, once, into a cache.

Release names and archive paths are ``model.registry.RELEASES`` (google/automl
``efficientdet/README.md`` and ``Det-AdvProp.md``): D0-D7x under ``coco2/``,
Lite0-4 and Lite3x under ``coco/`` (``.tgz``), fixed-640 D2-D6 under
``coco640/``, AdvProp D0-D5 under ``advprop/``; all below
``https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/``. Each
archive holds one folder with a TF1 name-based checkpoint (``checkpoint`` state
file, ``model.index``, ``model.data-*``).

Cache layout (``$EFFDET_CACHE`` or ``~/.cache/effdet-tf-port``)::

    releases/<name>/<archive>         the downloaded file
    releases/<name>/download.json     url, sha256 and size of what was downloaded
    releases/<name>/unpacked/...      the unpacked archive (``.complete`` marks it done)

The base URL can be changed (argument, or ``$EFFDET_BASE_URL``), e.g. to an
internal mirror or a ``file://`` folder with the same layout.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from converter.archive import COMPLETE_MARKER, safe_unpack, sha256_file
from converter.cache import default_cache_dir
from converter.errors import DownloadError, InputError, VariantError
from converter.locate import find_in_tree
from model import registry

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "KNOWN_SHA256",
    "RELEASES",
    "release_url",
    "resolve_release",
]

DEFAULT_BASE_URL = registry.BUCKET_URL
BASE_URL_ENV = "EFFDET_BASE_URL"

#: Release name -> archive path below the base URL (``model.registry.RELEASES``).
RELEASES: dict[str, str] = {name: release.archive for name, release in registry.RELEASES.items()}

#: Full URL -> expected sha256 of the archive, where a published digest is known
#: (``model.registry.RELEASES``). Others are recorded in download.json only.
KNOWN_SHA256: dict[str, str] = {DEFAULT_BASE_URL + release.archive: release.sha256
                                for release in registry.RELEASES.values() if release.sha256}

#: ``progress(bytes_done, bytes_total_or_None)``, called after every chunk.
Progress = Callable[[int, "int | None"], None]

_CHUNK = 1 << 20
_TIMEOUT_S = 60
_RECORD = "download.json"


def release_url(name: str, base_url: str | None = None) -> str:
    """URL of a release archive: ``base_url`` > ``$EFFDET_BASE_URL`` > automl's bucket.

    Raises:
        VariantError: ``name`` is not a release name.
    """
    if name not in RELEASES:
        raise VariantError(f"unknown release {name!r}; valid names: {', '.join(RELEASES)}")
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + RELEASES[name]


def _cached_checkpoint(unpacked: Path) -> Path | None:
    """The checkpoint path in a complete unpacked release, or None."""
    if not (unpacked / COMPLETE_MARKER).is_file():
        return None
    try:
        return find_in_tree(unpacked).path
    except InputError:
        return None


def _fetch(url: str, folder: Path, progress: Progress | None) -> tuple[Path, str, int]:
    """Stream ``url`` into a temporary file in ``folder``; return (file, sha256, size)."""
    handle, temp_name = tempfile.mkstemp(prefix=".download-", suffix=".part", dir=folder)
    temp = Path(temp_name)
    digest = hashlib.sha256()
    done = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "effdet-tf-port"})
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(
            request, timeout=_TIMEOUT_S
        ) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while block := response.read(_CHUNK):
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
        if total is not None and done != total:
            raise DownloadError(f"download of {url} ended after {done} of {total} bytes")
    except urllib.error.HTTPError as exc:
        temp.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        temp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot download {url}: {reason}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp, digest.hexdigest(), done


def _write_record(folder: Path, record: dict[str, object]) -> None:
    temp = folder / (_RECORD + ".tmp")
    temp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, folder / _RECORD)


def _read_record(folder: Path) -> dict[str, object] | None:
    try:
        return json.loads((folder / _RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _download(url: str, archive: Path, expected: str | None, progress: Progress | None) -> None:
    """Download ``url`` to ``archive`` (atomically), check its digest, record it."""
    temp, digest, size = _fetch(url, archive.parent, progress)
    if expected and digest != expected.lower():
        temp.unlink(missing_ok=True)
        raise DownloadError(f"sha256 mismatch for {url}: expected {expected}, downloaded {digest}")
    os.replace(temp, archive)
    _write_record(archive.parent, {
        "url": url,
        "archive": archive.name,
        "sha256": digest,
        "bytes": size,
        "expected_sha256": expected,
        "downloaded_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })


def _archive_usable(archive: Path, url: str, expected: str | None) -> bool:
    """True if a previously downloaded archive for ``url`` is on disk, whole."""
    record = _read_record(archive.parent)
    if not archive.is_file() or not record or record.get("url") != url:
        return False
    digest = sha256_file(archive)
    return digest == record.get("sha256") and (not expected or digest == expected.lower())


def resolve_release(
    name: str,
    *,
    cache_dir: Path | None = None,
    base_url: str | None = None,
    progress: Progress | None = None,
    sha256: str | None = None,
) -> Path:
    """Return the local checkpoint of a release, downloading it on first use.

    Args:
        name: a key of ``model.registry.RELEASES`` (``efficientdet-d0`` .. ``d7``, ``d7x``,
            ``lite0`` .. ``lite4``, ``lite3x``, ``d2-640`` .. ``d6-640``,
            ``d0-advprop`` .. ``d5-advprop``).
        cache_dir: cache folder; default ``default_cache_dir()``.
        base_url: overrides ``$EFFDET_BASE_URL`` and automl's bucket.
        progress: called as ``progress(bytes_done, bytes_total_or_None)``.
        sha256: expected digest of the archive; default ``KNOWN_SHA256[url]``
            where known, else not checked (the digest is recorded either way).

    Returns:
        The checkpoint inside the unpacked release (for the released archives
        the TF1 prefix, e.g. ``.../unpacked/efficientdet-d0/model``), ready for
        ``read_checkpoint``. A complete cached copy is used without network.

    Raises:
        VariantError: unknown release name.
        DownloadError: network error, HTTP error (e.g. 404), digest mismatch,
            or a downloaded file that is not a usable tar/gzip archive.
    """
    url = release_url(name, base_url)
    folder = (cache_dir or default_cache_dir()) / "releases" / name
    unpacked = folder / "unpacked"
    cached = _cached_checkpoint(unpacked)
    if cached is not None:
        return cached
    folder.mkdir(parents=True, exist_ok=True)
    archive = folder / RELEASES[name].rsplit("/", 1)[-1]
    expected = sha256 or KNOWN_SHA256.get(url)
    if not _archive_usable(archive, url, expected):
        _download(url, archive, expected, progress)
    if unpacked.exists():
        shutil.rmtree(unpacked)  # incomplete or unusable earlier unpack
    try:
        safe_unpack(archive, unpacked)
        return find_in_tree(unpacked).path
    except InputError as exc:
        archive.unlink(missing_ok=True)  # do not reuse it: the next call downloads again
        raise DownloadError(f"archive downloaded from {url} is unusable: {exc.message}") from exc
