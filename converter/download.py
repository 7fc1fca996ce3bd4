"""Fetch automl's released EfficientDet checkpoints by name, once, into a cache.

Release names and archive paths are ``model.registry.RELEASES`` (google/automl
``efficientdet/README.md`` and ``Det-AdvProp.md``): D0-D7x under ``coco2/``,
Lite0-4 and Lite3x under ``coco/`` (``.tgz``), fixed-640 D2-D6 under
``coco640/``, AdvProp D0-D5 under ``advprop/``; all below
``https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/``. Each
archive holds one folder with a TF1 name-based checkpoint (``checkpoint`` state
file, ``model.index``, ``model.data-*``).

Cache layout (``$EFFDET_CACHE`` or ``~/.cache/effdet-tf-port``), keyed by the
URL and by the archive's digest, so a copy fetched from one place is never
reused for another::

    releases/<name>/<sha256(url)[:16]>/<archive>            the downloaded file
    releases/<name>/<sha256(url)[:16]>/download.json        url, sha256 and size of it
    releases/<name>/<sha256(url)[:16]>/unpacked-<sha256[:16]>/...  the unpacked archive

A pinned digest (``KNOWN_SHA256`` or the caller's ``sha256``) is checked after
every download and again, on the archive, whenever the cache is reused. One
process at a time works on an entry (a lock file beside it); the others wait
and then reuse its result. A download fails when the server sends almost
nothing for ``stall_s`` seconds, or when it runs past ``deadline_s``.

The base URL can be changed (argument, or ``$EFFDET_BASE_URL``), e.g. to an
internal mirror or a ``file://`` folder with the same layout.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from converter.archive import COMPLETE_MARKER, safe_unpack, sha256_file
from converter.cache import default_cache_dir, make_cache_folder
from converter.errors import DownloadError, InputError, VariantError
from converter.locate import find_in_tree
from converter.locking import file_lock
from model import registry
from model.temp_files import sweep_stale, temp_file

__all__ = [
    "BASE_URL_ENV",
    "DEFAULT_BASE_URL",
    "KNOWN_SHA256",
    "RELEASES",
    "check_sha256",
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
_RECORD = "download.json"
#: A download stalls when fewer than ``_STALL_MIN_BYTES`` arrive within ``stall_s`` seconds.
STALL_S = 60.0
_STALL_MIN_BYTES = 16 << 10
#: Whole-download deadline (D7x is ~0.5 GB).
DEADLINE_S = 3600.0
_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def check_sha256(text: str) -> str:
    """``text`` as a lower-case hex sha256 digest.

    Raises:
        ValueError: not 64 hex digits.
    """
    if not _SHA256_RE.match(text.strip()):
        raise ValueError(f"{text!r} is not a sha256 digest (64 hex digits)")
    return text.strip().lower()


def release_url(name: str, base_url: str | None = None) -> str:
    """URL of a release archive: ``base_url`` > ``$EFFDET_BASE_URL`` > automl's bucket.

    Raises:
        VariantError: ``name`` is not a release name.
    """
    if name not in RELEASES:
        raise VariantError(f"unknown release {name!r}; valid names: {', '.join(RELEASES)}")
    base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return base.rstrip("/") + "/" + RELEASES[name]


def _checkpoint_in(unpacked: Path) -> Path | None:
    """The checkpoint path in a complete unpacked release, or None."""
    if not (unpacked / COMPLETE_MARKER).is_file():
        return None
    try:
        return find_in_tree(unpacked).path
    except InputError:
        return None


def _fetch(url: str, folder: Path, progress: Progress | None, stall_s: float,
           deadline_s: float) -> tuple[Path, str, int]:
    """Stream ``url`` into a temporary file in ``folder``; return (file, sha256, size).

    The temporary file is removed on every failure, interrupts included.
    """
    temp = temp_file(folder, "download")
    digest = hashlib.sha256()
    done = 0
    started = time.monotonic()
    window_start, window_bytes = started, 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "effdet-tf-port"})
        with temp.open("wb") as out, urllib.request.urlopen(request, timeout=stall_s) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            while block := response.read1(_CHUNK):  # whatever arrived: progress within chunks
                out.write(block)
                digest.update(block)
                done += len(block)
                if progress is not None:
                    progress(done, total)
                now = time.monotonic()
                if now - started > deadline_s:
                    raise DownloadError(f"download of {url} passed its {deadline_s:g} s "
                                        f"deadline after {done} bytes")
                window_bytes += len(block)
                if now - window_start >= stall_s:
                    if window_bytes < _STALL_MIN_BYTES:
                        raise DownloadError(f"download of {url} stalled: {window_bytes} bytes "
                                            f"in {now - window_start:.0f} s")
                    window_start, window_bytes = now, 0
        if total is not None and done != total:
            raise DownloadError(f"download of {url} ended after {done} of {total} bytes")
    except urllib.error.HTTPError as exc:
        temp.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except TimeoutError as exc:
        temp.unlink(missing_ok=True)
        raise DownloadError(f"download of {url} stalled: no data for {stall_s:g} s") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        temp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, TimeoutError):
            raise DownloadError(f"download of {url} stalled: no data for {stall_s:g} s") from exc
        raise DownloadError(f"cannot download {url}: {reason}") from exc
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp, digest.hexdigest(), done


def _write_record(folder: Path, record: dict[str, object]) -> None:
    temp = temp_file(folder, _RECORD)
    temp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(temp, folder / _RECORD)


def _read_record(folder: Path) -> dict[str, object]:
    try:
        record = json.loads((folder / _RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _download(url: str, archive: Path, expected: str | None, progress: Progress | None,
              stall_s: float, deadline_s: float) -> str:
    """Download ``url`` to ``archive`` (atomically), check its digest, record it; return the
    digest."""
    temp, digest, size = _fetch(url, archive.parent, progress, stall_s, deadline_s)
    if expected and digest != expected:
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
    return digest


def _cached_digest(folder: Path, archive: Path, url: str, expected: str | None) -> str | None:
    """The digest of the archive cached for ``url``, if it can be reused: recorded for this
    URL and, when a digest is pinned, the file on disk still has it (hashed again)."""
    record = _read_record(folder)
    digest = record.get("sha256")
    if record.get("url") != url or not isinstance(digest, str):
        return None
    if expected is None:
        unpacked_done = _checkpoint_in(folder / f"unpacked-{digest[:16]}") is not None
        return digest if unpacked_done or archive.is_file() else None
    if digest != expected or not archive.is_file() or sha256_file(archive) != expected:
        return None
    return digest


def resolve_release(
    name: str,
    *,
    cache_dir: Path | None = None,
    base_url: str | None = None,
    progress: Progress | None = None,
    sha256: str | None = None,
    stall_s: float = STALL_S,
    deadline_s: float = DEADLINE_S,
) -> Path:
    """Return the local checkpoint of a release, downloading it on first use.

    Args:
        name: a key of ``model.registry.RELEASES`` (``efficientdet-d0`` .. ``d7``, ``d7x``,
            ``lite0`` .. ``lite4``, ``lite3x``, ``d2-640`` .. ``d6-640``,
            ``d0-advprop`` .. ``d5-advprop``).
        cache_dir: cache folder; default ``default_cache_dir()``.
        base_url: overrides ``$EFFDET_BASE_URL`` and automl's bucket.
        progress: called as ``progress(bytes_done, bytes_total_or_None)`` whenever
            bytes arrive.
        sha256: expected digest of the archive; default ``KNOWN_SHA256[url]``
            where known, else not checked (the digest is recorded either way).
            Checked after the download and on every reuse of the cache.
        stall_s: fail when fewer than 16 KiB arrive in this many seconds.
        deadline_s: fail when the download takes longer than this.

    Returns:
        The checkpoint inside the unpacked release (for the released archives
        the TF1 prefix, e.g. ``.../unpacked-<digest>/efficientdet-d0/model``),
        ready for ``read_checkpoint``. A complete cached copy is used without network.

    Raises:
        VariantError: unknown release name.
        DownloadError: network error, HTTP error (e.g. 404), stall, deadline,
            digest mismatch, or a downloaded file that is not a usable archive.
        OutputError: the cache folder cannot be written.
    """
    url = release_url(name, base_url)
    expected = check_sha256(sha256) if sha256 else KNOWN_SHA256.get(url)
    folder = make_cache_folder((cache_dir or default_cache_dir()) / "releases" / name
                               / hashlib.sha256(url.encode()).hexdigest()[:16])
    archive = folder / RELEASES[name].rsplit("/", 1)[-1]
    with file_lock(folder.with_name(folder.name + ".lock")):
        sweep_stale(folder)
        digest = _cached_digest(folder, archive, url, expected)
        if digest is not None:
            cached = _checkpoint_in(folder / f"unpacked-{digest[:16]}")
            if cached is not None:
                return cached
        else:
            digest = _download(url, archive, expected, progress, stall_s, deadline_s)
        unpacked = folder / f"unpacked-{digest[:16]}"
        if unpacked.exists():
            shutil.rmtree(unpacked)  # incomplete or unusable earlier unpack
        try:
            safe_unpack(archive, unpacked)
            return find_in_tree(unpacked).path
        except InputError as exc:
            archive.unlink(missing_ok=True)  # do not reuse it: the next call downloads again
            shutil.rmtree(unpacked, ignore_errors=True)
            raise DownloadError(f"archive downloaded from {url} is unusable: {exc.message}") \
                from exc
