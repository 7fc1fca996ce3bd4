"""Untrusted files must not reach outside themselves: state files, HDF5 links and external
storage, archive bombs and links, COCO file names."""
from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from converter.archive import UnpackLimits, safe_unpack
from converter.cli import main as convert_main
from converter.errors import InputError
from converter.formats.keras_h5 import read_h5
from converter.readers import read_checkpoint
from helpers import synth_checkpoint
from hostile_helpers import assert_refused, invoke, verify_coco_on
from model.temp_files import HOST_TAG, STALE_AFTER_S, sweep_stale, temp_dir

D0 = "efficientdet-d0"


@pytest.fixture(scope="module")
def outside_ckpt(tmp_path_factory) -> Path:
    """A valid d0 checkpoint in a folder the hostile inputs point at."""
    return synth_checkpoint(D0, tmp_path_factory.mktemp("elsewhere"), optimizer=False)


def _state(folder: Path, target: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint").write_text(f'model_checkpoint_path: "{target}"\n', encoding="utf-8")
    return folder


@pytest.mark.parametrize("form", ["relative", "absolute"])
def test_state_file_in_a_folder_cannot_leave_it(tmp_path, outside_ckpt, form):
    target = os.path.relpath(outside_ckpt, tmp_path / "ckpt") if form == "relative" \
        else str(outside_ckpt)
    folder = _state(tmp_path / "ckpt", target)
    out = tmp_path / "out.pth"
    assert_refused(invoke(convert_main, "--ckpt", folder, "--out", out), 3,
                   "outside its folder", out=out)


def test_state_file_through_a_symlink_out_is_refused(tmp_path, outside_ckpt):
    folder = _state(tmp_path / "ckpt", "model")
    (folder / "model.index").symlink_to(Path(str(outside_ckpt) + ".index"))
    with pytest.raises(InputError, match="outside its folder"):
        read_checkpoint(folder)


def test_passing_the_prefix_directly_is_trusted(tmp_path, outside_ckpt):
    contents = read_checkpoint(outside_ckpt)
    assert contents.format == "tf1" and contents.source == outside_ckpt


def test_state_file_in_an_archive_cannot_leave_it(tmp_path, outside_ckpt):
    archive = tmp_path / "evil.tar.gz"
    state = f'model_checkpoint_path: "{outside_ckpt}"\n'.encode()
    _tar(archive, [_file(f"{D0}/checkpoint", state)])
    out = tmp_path / "out.pth"
    assert_refused(invoke(convert_main, "--ckpt", archive, "--out", out,
                          "--cache-dir", tmp_path / "cache"), 3, "outside its folder", out=out)


# --- archives --------------------------------------------------------------------------------

def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, object]]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for info, data in members:
            tar.addfile(info, data)
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def test_decompression_bomb_is_refused_before_writing(tmp_path):
    size = 80 << 20  # over the ratio floor; ~80 KB packed
    info = tarfile.TarInfo(f"{D0}/model.data-00000-of-00001")
    info.size = size
    archive = _tar(tmp_path / "bomb.tar.gz", [(info, io.BufferedReader(_Zeros(size)))])
    assert archive.stat().st_size < size // 100
    out, cache = tmp_path / "out.pth", tmp_path / "cache"
    assert_refused(invoke(convert_main, "--ckpt", archive, "--out", out, "--cache-dir", cache),
                   3, "decompression bomb", out=out)
    assert not [p for p in cache.rglob("*") if p.is_file()]


@pytest.mark.parametrize("limits, message", [
    (UnpackLimits(max_members=2), "more than 2 members"),
    (UnpackLimits(max_bytes=10), "more than 10 bytes"),
])
def test_unpack_limits(tmp_path, limits, message):
    archive = _tar(tmp_path / "a.tar.gz", [_file(f"{D0}/f{i}", b"0123456789") for i in range(3)])
    with pytest.raises(InputError, match=message):
        safe_unpack(archive, tmp_path / "cache" / "dest", limits)
    assert list((tmp_path / "cache").iterdir()) == []


@pytest.mark.parametrize("kind", ["sparse", "inside symlink", "fifo"])
def test_sparse_links_and_devices_are_refused(tmp_path, kind):
    info = tarfile.TarInfo(f"{D0}/member")
    if kind == "sparse":
        info.type = tarfile.GNUTYPE_SPARSE
    elif kind == "inside symlink":
        info.type, info.linkname = tarfile.SYMTYPE, "checkpoint"
    else:
        info.type = tarfile.FIFOTYPE
    archive = tmp_path / "a.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT) as tar:
        tar.addfile(info)
    with pytest.raises(InputError, match="refused"):
        safe_unpack(archive, tmp_path / "cache" / "dest")
    assert list((tmp_path / "cache").iterdir()) == []


def test_stale_temps_of_dead_runs_are_swept_and_nothing_else(tmp_path):
    dead_pid = 2 ** 30  # above any pid_max
    stale = tmp_path / f".effdet-{HOST_TAG}-{dead_pid}-abcdefgh.unpack.tmp"
    stale.mkdir()
    (stale / "big").write_bytes(b"x")
    stale_file = tmp_path / f".effdet-{HOST_TAG}-{dead_pid}-abcdefgh.out.pth.tmp"
    stale_file.write_bytes(b"x")
    other_host = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    old_of_other_host = tmp_path / f".effdet-{other_host}-{dead_pid}-abcdefgh.old.tmp"
    old_of_other_host.write_bytes(b"x")
    a_day_ago = time.time() - STALE_AFTER_S - 60
    os.utime(old_of_other_host, (a_day_ago, a_day_ago))
    live = temp_dir(tmp_path, "unpack")  # this process: alive
    keep = [tmp_path / ".effdet-notours.tmp",
            tmp_path / f".effdet-{HOST_TAG}-{dead_pid}-short.tmp",
            tmp_path / f".effdet-{other_host}-{dead_pid}-abcdefgh.recent.tmp",  # may be running
            tmp_path / "out.pth"]
    for path in keep:
        path.write_bytes(b"x")
    assert sorted(sweep_stale(tmp_path)) == sorted([stale, stale_file, old_of_other_host])
    assert live.is_dir() and all(p.exists() for p in keep)


def test_archive_with_two_checkpoints_is_refused(tmp_path):
    archive = _tar(tmp_path / "two.tar.gz", [
        _file("a/checkpoint", b'model_checkpoint_path: "model"\n'), _file("a/model.index"),
        _file("b/model.index")])
    with pytest.raises(InputError, match="holds 2 checkpoints"):
        read_checkpoint(archive, cache_dir=tmp_path / "cache")


# --- HDF5 ------------------------------------------------------------------------------------

def _h5(path: Path, hostile: str, secret: Path) -> Path:
    secret.write_bytes(np.arange(4, dtype="<f4").tobytes())
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"layer"]
        group = f.create_group("layer")
        group.attrs["weight_names"] = [b"w:0"]
        if hostile == "external storage":
            group.create_dataset("w:0", shape=(4,), dtype="<f4", external=[(str(secret), 0, 16)])
        elif hostile == "virtual dataset":
            with h5py.File(secret.with_suffix(".h5"), "w") as other:
                other["data"] = np.ones(4, "f4")
            layout = h5py.VirtualLayout(shape=(4,), dtype="f4")
            layout[:] = h5py.VirtualSource(str(secret.with_suffix(".h5")), "data", shape=(4,))
            group.create_virtual_dataset("w:0", layout)
        else:
            with h5py.File(secret.with_suffix(".h5"), "w") as other:
                other["data"] = np.ones(4, "f4")
            group["w:0"] = h5py.ExternalLink(str(secret.with_suffix(".h5")), "/data")
    return path


@pytest.mark.parametrize("hostile", ["external storage", "virtual dataset", "external link"])
def test_h5_reaching_other_files_is_refused(tmp_path, hostile):
    path = _h5(tmp_path / "w.h5", hostile, tmp_path / "secret.bin")
    with pytest.raises(InputError, match="refused"):
        read_h5(path)
    out = tmp_path / "out.pth"
    assert_refused(invoke(convert_main, "--ckpt", path, "--out", out), 3, "refused", out=out)


@pytest.mark.parametrize("attribute", [np.int64(3), np.array([1, 2]), [b"\xff\xfe"]])
def test_h5_malformed_attributes(tmp_path, attribute):
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = attribute
    with pytest.raises(InputError, match="cannot read HDF5 weights"):
        read_h5(path)


# --- verify coco ------------------------------------------------------------------------------

@pytest.mark.parametrize("file_name", ["../outside.jpg", "/etc/passwd", "a/../../x.jpg"])
def test_coco_file_name_must_stay_inside_images(tmp_path, file_name):
    result, results = verify_coco_on(
        tmp_path, [{"id": 1, "file_name": file_name, "width": 8, "height": 8}], [])
    assert_refused(result, 3, "leaves the image directory", out=results)
