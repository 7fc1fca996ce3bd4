"""Downloads are verified and tied to what was asked: URL- and digest-keyed cache, pinned
digests re-checked on reuse, --sha256, stall and deadline, a lock, release/variant agreement,
SIGTERM during a download."""
from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.cli import main as convert_main
from converter.download import resolve_release
from converter.errors import DownloadError
from helpers import REPO_DIR, synth_checkpoint
from hostile_helpers import assert_refused, invoke, leftovers
from test_download import serve

D0 = "efficientdet-d0"
ARCHIVE = f"coco2/{D0}.tar.gz"


def _bucket(root: Path, variant: str, served_as: str = ARCHIVE) -> Path:
    folder = root / "src" / variant
    synth_checkpoint(variant, folder, optimizer=False, prefix_name="model", in_process=True)
    (root / "bucket" / served_as).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "bucket" / served_as, "w:gz", compresslevel=1) as tar:
        tar.add(folder, arcname=D0)
    shutil.rmtree(root / "src")
    return root / "bucket"


@pytest.fixture(scope="module")
def d0_bucket(tmp_path_factory) -> Path:
    pytest.importorskip("tensorflow")
    return _bucket(tmp_path_factory.mktemp("d0"), D0)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cache_is_keyed_by_url(tmp_path, d0_bucket):
    other = tmp_path / "other"
    shutil.copytree(d0_bucket, other)
    with (other / ARCHIVE).open("ab") as handle:  # same name, other bytes
        handle.write(b"\0" * 1024)
    with serve(d0_bucket) as first, serve(other) as second:
        a = resolve_release(D0, cache_dir=tmp_path / "cache", base_url=first)
        b = resolve_release(D0, cache_dir=tmp_path / "cache", base_url=second)
    assert a != b
    assert f"unpacked-{_digest(d0_bucket / ARCHIVE)[:16]}" in str(a)
    assert f"unpacked-{_digest(other / ARCHIVE)[:16]}" in str(b)


def test_pinned_digest_is_checked_again_on_reuse(tmp_path, d0_bucket):
    digest = _digest(d0_bucket / ARCHIVE)
    cache = tmp_path / "cache"
    with serve(d0_bucket) as base:
        path = resolve_release(D0, cache_dir=cache, base_url=base, sha256=digest)
        archive = next(cache.rglob(f"{D0}.tar.gz"))
        archive.write_bytes(b"poisoned")  # tampered with in the cache
        again = resolve_release(D0, cache_dir=cache, base_url=base, sha256=digest.upper())
        assert again == path and _digest(archive) == digest  # fetched again, not reused
    # a poisoned cache entry whose record claims another digest is not reused without network
    record = archive.parent / "download.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "sha256": "1" * 64}))
    with pytest.raises(DownloadError, match="cannot download"):
        resolve_release(D0, cache_dir=cache, base_url=base, sha256=digest)


def test_sha256_option(tmp_path, d0_bucket):
    out = tmp_path / "out.pth"
    with serve(d0_bucket) as base:
        result = invoke(convert_main, "--ckpt", D0, "--out", out, "--base-url", base,
                        "--cache-dir", tmp_path / "cache", "--sha256", "ab" * 32, "-q")
    assert_refused(result, 7, "sha256 mismatch", out=out)
    assert leftovers(tmp_path / "cache") == []
    result = invoke(convert_main, "--ckpt", D0, "--out", out, "--sha256", "xyz")
    assert result.exit_code == 2 and "64 hex digits" in result.output


def test_release_holding_another_variant_is_refused(tmp_path):
    bucket = _bucket(tmp_path, "efficientdet-lite0")  # a lite0 served as efficientdet-d0
    out = tmp_path / "out.pth"
    with serve(bucket) as base:
        result = invoke(convert_main, "--ckpt", D0, "--out", out, "--base-url", base,
                        "--cache-dir", tmp_path / "cache", "-q")
    assert_refused(result, 4, "efficientdet-lite0", "not efficientdet-d0", out=out)


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Promises 10 MB, then sends ``piece`` bytes every ``pause`` seconds (none if 0)."""

    piece, pause = 100, 0.1

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.send_response(200)
        self.send_header("Content-Length", str(10 << 20))
        self.end_headers()
        try:
            for _ in range(600):
                if self.piece:
                    self.wfile.write(b"\0" * self.piece)
                    self.wfile.flush()
                time.sleep(self.pause)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def trickle(piece: int, pause: float) -> Iterator[str]:
    handler = type("Handler", (_Trickle,), {"piece": piece, "pause": pause})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("piece, limits, message", [
    (100, {"stall_s": 0.5}, "stalled: "),          # trickles: under 16 KiB per window
    (0, {"stall_s": 0.5}, "no data for 0.5 s"),     # sends nothing at all
    (20_000, {"stall_s": 5, "deadline_s": 0.5}, "deadline"),
])
def test_trickling_server_fails_fast(tmp_path, piece, limits, message):
    calls: list[int] = []
    started = time.monotonic()
    with trickle(piece, 0.1) as base, pytest.raises(DownloadError, match=message):
        resolve_release(D0, cache_dir=tmp_path, base_url=base,
                        progress=lambda done, total: calls.append(done), **limits)
    assert time.monotonic() - started < 5
    assert (len(calls) > 2) == bool(piece)  # progress shows bytes as they arrive
    assert leftovers(tmp_path) == []


def test_two_fetches_of_one_release_do_not_break_each_other(tmp_path, d0_bucket):
    results: list[object] = []

    def fetch() -> None:
        try:
            results.append(resolve_release(D0, cache_dir=tmp_path, base_url=base))
        except Exception as error:  # noqa: BLE001 - collected for the assertion
            results.append(error)

    with serve(d0_bucket) as base:
        threads = [threading.Thread(target=fetch) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(results) == 3 and len(set(results)) == 1, results
    assert Path(results[0]).with_name("model.index").is_file()
    assert leftovers(tmp_path) == [] and not list(tmp_path.rglob("*.lock"))


@pytest.mark.slow  # a fresh interpreter (~6 s)
def test_sigterm_during_a_download_exits_130_and_leaves_nothing(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out.pth"
    with trickle(100, 0.1) as base:
        process = subprocess.Popen(
            [sys.executable, "-m", "converter", "--ckpt", D0, "--out", str(out), "-q",
             "--base-url", base, "--cache-dir", str(cache)],
            cwd=REPO_DIR, env={**os.environ, "PYTHONPATH": str(REPO_DIR)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not leftovers(cache) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        assert leftovers(cache), "the download never started"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["Error: interrupted; " + str(out) + " was not written"]
    assert "Traceback" not in stderr and not out.exists()
    assert leftovers(cache) == [] and not list(cache.rglob("*.lock"))


def test_sha256_of_a_local_file(tmp_path, d0_bucket):
    archive, out = d0_bucket / ARCHIVE, tmp_path / "out.pth"
    result = invoke(convert_main, "--ckpt", archive, "--out", out, "--sha256", "cd" * 32)
    assert_refused(result, 3, "sha256 mismatch", out=out)
    result = invoke(convert_main, "--ckpt", d0_bucket, "--out", out, "--sha256", "cd" * 32)
    assert_refused(result, 3, "single file", out=out)
    result = invoke(convert_main, "--ckpt", archive, "--out", out, "-q", "--sha256",
                    _digest(archive), "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
