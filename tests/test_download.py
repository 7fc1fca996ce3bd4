"""Release download: a local http.server stands in for automl's bucket."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import shutil
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.download import (
    DEFAULT_BASE_URL,
    KNOWN_SHA256,
    RELEASES,
    release_url,
    resolve_release,
)
from converter.errors import DownloadError, VariantError
from converter.readers import read_checkpoint
from helpers import load_manifest, synth_checkpoint
from hostile_helpers import leftovers

D0 = "efficientdet-d0"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib name
        pass


@contextlib.contextmanager
def serve(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (ephemeral port) in a thread; yield the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _entry(cache: Path, url: str) -> Path:
    """The cache folder of one release URL."""
    name = url.rsplit("/", 1)[-1].split(".t")[0]
    return cache / "releases" / name / hashlib.sha256(url.encode()).hexdigest()[:16]


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def release_root(tmp_path_factory) -> Path:
    """A bucket folder with ``coco2/efficientdet-d0.tar.gz`` in the release layout."""
    work = tmp_path_factory.mktemp("release")
    folder = work / "src" / D0
    synth_checkpoint(D0, folder, optimizer=False, prefix_name="model")
    root = work / "bucket"
    (root / "coco2").mkdir(parents=True)
    with tarfile.open(root / "coco2" / f"{D0}.tar.gz", "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=D0)
    shutil.rmtree(work / "src")
    return root


def test_release_urls_follow_automl_readme(monkeypatch):
    monkeypatch.delenv("EFFDET_BASE_URL", raising=False)
    base = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/"
    assert DEFAULT_BASE_URL == base
    assert release_url("efficientdet-d0") == base + "coco2/efficientdet-d0.tar.gz"
    assert release_url("efficientdet-d7x") == base + "coco2/efficientdet-d7x.tar.gz"
    assert release_url("efficientdet-lite4") == base + "coco/efficientdet-lite4.tgz"
    mirrored = release_url("efficientdet-d3", "http://mirror/x")
    assert mirrored == "http://mirror/x/coco2/efficientdet-d3.tar.gz"
    monkeypatch.setenv("EFFDET_BASE_URL", "file:///srv/effdet/")
    assert release_url("efficientdet-lite0") == "file:///srv/effdet/coco/efficientdet-lite0.tgz"
    assert len(RELEASES) == 26   # 9 coco2 + 6 lite + 5 fixed-640 + 6 AdvProp (test_registry.py)
    assert all(url.startswith(base) and len(digest) == 64 for url, digest in KNOWN_SHA256.items())


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(VariantError) as excinfo:
        resolve_release("efficientdet-d8", cache_dir=tmp_path)
    message = str(excinfo.value)
    assert excinfo.value.exit_code == 4
    for name in ("efficientdet-d8", "efficientdet-d0", "efficientdet-d7x", "efficientdet-lite4"):
        assert name in message
    assert not list(tmp_path.iterdir())


@pytest.mark.needs_tf
def test_download_then_cache_without_network(tmp_path, release_root):
    cache = tmp_path / "cache"
    archive = release_root / "coco2" / f"{D0}.tar.gz"
    calls: list[tuple[int, int | None]] = []
    with serve(release_root) as base:
        path = resolve_release(D0, cache_dir=cache, base_url=base,
                               progress=lambda done, total: calls.append((done, total)))
    size = archive.stat().st_size
    assert calls and calls[-1] == (size, size)
    entry = _entry(cache, base + f"coco2/{D0}.tar.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert path == entry / f"unpacked-{digest[:16]}" / D0 / "model"

    record = json.loads((entry / "download.json").read_text(encoding="utf-8"))
    assert record["url"] == base + f"coco2/{D0}.tar.gz"
    assert record["sha256"] == digest
    assert record["bytes"] == size

    contents = read_checkpoint(path)
    manifest = load_manifest(D0)
    expected = {v["name"] for v in manifest["variables"] if v["role"] != "optimizer_slot"}
    assert contents.format == "tf1" and set(contents.names) == expected

    # Server gone: the cached copy of that URL is used, no network.
    again = resolve_release(D0, cache_dir=cache, base_url=base)
    assert again == path
    assert leftovers(cache) == []


@pytest.mark.needs_tf
def test_environment_variables_choose_cache_and_base_url(tmp_path, release_root, monkeypatch):
    monkeypatch.setenv("EFFDET_CACHE", str(tmp_path / "envcache"))
    with serve(release_root) as base:
        monkeypatch.setenv("EFFDET_BASE_URL", base)
        path = resolve_release(D0)
    assert path.is_relative_to(tmp_path / "envcache")
    assert path.with_name("model.index").is_file()


def test_http_404_is_a_download_error(tmp_path):
    empty = tmp_path / "bucket"
    empty.mkdir()
    with serve(empty) as base:
        with pytest.raises(DownloadError) as excinfo:
            resolve_release("efficientdet-lite0", cache_dir=tmp_path / "cache", base_url=base)
    message = str(excinfo.value)
    assert excinfo.value.exit_code == 7 and "\n" not in message
    assert "404" in message and base + "coco/efficientdet-lite0.tgz" in message
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_connection_refused_is_a_download_error(tmp_path):
    base = _closed_port_url()
    with pytest.raises(DownloadError, match="cannot download " + base):
        resolve_release(D0, cache_dir=tmp_path, base_url=base)


def test_sha256_mismatch_is_refused(tmp_path, release_root):
    with serve(release_root) as base:
        with pytest.raises(DownloadError, match="sha256 mismatch") as excinfo:
            resolve_release(D0, cache_dir=tmp_path, base_url=base, sha256="0" * 64)
    assert "0" * 64 in str(excinfo.value)
    entry = _entry(tmp_path, base + f"coco2/{D0}.tar.gz")
    assert not list(entry.glob("unpacked*")) and not (entry / f"{D0}.tar.gz").exists()


def test_download_that_is_not_an_archive(tmp_path):
    bucket = tmp_path / "bucket"
    (bucket / "coco2").mkdir(parents=True)
    (bucket / "coco2" / f"{D0}.tar.gz").write_bytes(b"<html>quota exceeded</html>")
    with serve(bucket) as base:
        with pytest.raises(DownloadError) as excinfo:
            resolve_release(D0, cache_dir=tmp_path / "cache", base_url=base)
    message = str(excinfo.value)
    assert "unusable" in message and f"coco2/{D0}.tar.gz" in message
    assert not list((tmp_path / "cache").rglob(f"{D0}.tar.gz"))


@pytest.mark.needs_tf
def test_convert_cli_downloads_a_release_by_name(tmp_path, release_root):
    from click.testing import CliRunner

    from converter.cli import main
    from model import EfficientDet

    out = tmp_path / "d0.pth"
    with serve(release_root) as base_url:
        result = CliRunner().invoke(main, ["--ckpt", D0, "--out", str(out), "--quiet",
                                           "--base-url", base_url,
                                           "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    model = EfficientDet.from_pretrained(out)
    assert model.config.name == D0 and model.metadata["source"]["ema"] == "shadows"
