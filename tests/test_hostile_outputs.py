"""Outputs never lose the user's data and never leave litter: exclusive create, umask and
--force modes, destination checks before the work, interrupts (exit 130), stale temp sweep."""
from __future__ import annotations

import errno
import os
import signal
import stat

import pytest

import converter.cli as convert_cli
from converter.interrupts import sigterm_as_interrupt
from helpers import synth_checkpoint
from hostile_helpers import assert_refused, invoke, leftovers
from model.temp_files import HOST_TAG

pytestmark = [pytest.mark.needs_tf, pytest.mark.usefixtures("single_thread")]

D0 = "efficientdet-d0"
DEAD_PID = 2 ** 30


@pytest.fixture(scope="module")
def d0_prefix(tmp_path_factory):
    pytest.importorskip("tensorflow")
    return synth_checkpoint(D0, tmp_path_factory.mktemp("d0"), optimizer=False)


@pytest.fixture
def umask():
    def set_mask(mask: int) -> None:
        os.umask(mask)
    previous = os.umask(0o022)
    yield set_mask
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_output_appearing_during_the_conversion_is_kept(tmp_path, d0_prefix, monkeypatch):
    out = tmp_path / "out.pth"
    convert = convert_cli.convert_checkpoint

    def convert_while_someone_writes_out(*args, **kwargs):
        out.write_bytes(b"the user's file")
        return convert(*args, **kwargs)

    monkeypatch.setattr(convert_cli, "convert_checkpoint", convert_while_someone_writes_out)
    result = invoke(convert_cli.main, "--ckpt", d0_prefix, "--out", out, "-q")
    assert_refused(result, 6, "appeared while it was being written")
    assert out.read_bytes() == b"the user's file"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_new_output_follows_the_umask_and_stale_temps_are_swept(tmp_path, d0_prefix, umask,
                                                                mask):
    stale = tmp_path / f".effdet-{HOST_TAG}-{DEAD_PID}-abcdefgh.out.pth.tmp"
    stale.write_bytes(b"left by a killed run")
    umask(mask)
    out = tmp_path / "out.pth"
    result = invoke(convert_cli.main, "--ckpt", d0_prefix, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert _mode(out) == 0o666 & ~mask
    assert leftovers(tmp_path) == []


def test_force_keeps_the_existing_mode(tmp_path, d0_prefix, umask):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    out.chmod(0o604)
    result = invoke(convert_cli.main, "--ckpt", d0_prefix, "--out", out, "-q", "--force")
    assert result.exit_code == 0, result.output
    assert _mode(out) == 0o604 and out.stat().st_size > 1000


@pytest.mark.parametrize("where", ["proc", "long name", "not a folder", "unwritable"])
def test_destination_is_checked_before_the_work(tmp_path, where):
    if where == "proc":
        out = type(tmp_path)("/proc/self/out.pth")
    elif where == "long name":
        out = tmp_path / ("x" * 300 + ".pth")
    elif where == "not a folder":
        (tmp_path / "file").write_bytes(b"")
        out = tmp_path / "file" / "out.pth"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes anywhere")
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
        out = folder / "out.pth"
    # the checkpoint does not even exist: the destination is refused first
    result = invoke(convert_cli.main, "--ckpt", tmp_path / "no-such-ckpt", "--out", out)
    assert_refused(result, 6)


def test_disk_full_while_writing_is_one_line_and_no_temp(tmp_path, d0_prefix, monkeypatch):
    import model.weights_io as weights_io

    def full(obj, name):
        with open(name, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights_io.torch, "save", full)
    out = tmp_path / "out.pth"
    result = invoke(convert_cli.main, "--ckpt", d0_prefix, "--out", out, "-q")
    assert_refused(result, 6, "No space left on device", out=out)


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_interrupt_exits_130_and_leaves_nothing(tmp_path, d0_prefix, monkeypatch, how):
    import model.weights_io as weights_io
    save = weights_io.torch.save

    def interrupted(obj, name):
        save(obj, name)  # the temp file is complete on disk when the interrupt comes
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise KeyboardInterrupt

    monkeypatch.setattr(weights_io.torch, "save", interrupted)
    out = tmp_path / "out.pth"
    result = invoke(convert_cli.main, "--ckpt", d0_prefix, "--out", out, "-q")
    assert_refused(result, 130, "interrupted", out=out)


def test_sigterm_raises_keyboard_interrupt_only_inside_the_block():
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), sigterm_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is previous
