"""Checkpoint readers: every format yields the manifest's TF1 names, shapes and values."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from converter.contents import CheckpointContents, check_finite
from converter.errors import (
    ConversionError,
    DownloadError,
    InputError,
    MappingError,
    NonFiniteError,
    OutputError,
    VariantError,
)
from converter.formats.tf2 import HEAD_REASON
from converter.readers import read_checkpoint
from helpers import REFERENCE_DIR, load_manifest, synth_checkpoint

D0 = "efficientdet-d0"
D0_DIR = REFERENCE_DIR / D0
EMA = "/ExponentialMovingAverage"

needs_tf = pytest.mark.needs_tf


def _synth_module():
    """``synth_ckpt.py`` imported as a module: the recipe gives expected values."""
    spec = importlib.util.spec_from_file_location("synth_ckpt", REFERENCE_DIR / "synth_ckpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_one_line_input_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    assert excinfo.value.exit_code == 3
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def d0_manifest() -> dict:
    return load_manifest(D0)


@pytest.fixture(scope="module")
def d0_prefix(tmp_path_factory) -> Path:
    """A seed-0 synthetic d0 checkpoint (EMA + Momentum + global_step), read-only by convention."""
    return synth_checkpoint(D0, tmp_path_factory.mktemp("d0"))


@pytest.fixture(scope="module")
def d0_tf1(d0_prefix) -> CheckpointContents:
    return read_checkpoint(d0_prefix)


@pytest.fixture()
def d0_copy(tmp_path) -> Path:
    """A private copy the test may damage."""
    return synth_checkpoint(D0, tmp_path / "ckpt")


# --------------------------------------------------------------------------- errors


def test_error_exit_codes_are_distinct_and_messages_one_line():
    codes = {
        InputError: 3, VariantError: 4, NonFiniteError: 5, OutputError: 6,
        DownloadError: 7, MappingError: 1, ConversionError: 1,
    }
    for cls, code in codes.items():
        assert issubclass(cls, ConversionError)
        assert cls.exit_code == code
    assert len({InputError.exit_code, VariantError.exit_code, NonFiniteError.exit_code,
                OutputError.exit_code, DownloadError.exit_code}) == 5
    assert str(InputError("first line\n  second\tline")) == "first line second line"


# --------------------------------------------------------------------------- TF1


@needs_tf
def test_tf1_exposes_every_manifest_name_and_shape(d0_tf1, d0_prefix, d0_manifest):
    expected = {v["name"]: tuple(v["shape"]) for v in d0_manifest["variables"]}
    assert d0_tf1.format == "tf1"
    assert d0_tf1.source == d0_prefix
    assert d0_tf1.names == expected
    assert len(expected) == 1912  # 709 model + 709 EMA + 493 Momentum + global_step
    assert d0_tf1.skipped == {}
    assert d0_tf1.ema_in_model_entries is False


@needs_tf
def test_tf1_values_follow_the_synth_recipe(d0_tf1, d0_manifest):
    synth = _synth_module()
    profile = synth.profile_from_manifest(d0_manifest)
    by_name = {v["name"]: v for v in d0_manifest["variables"]}
    for name in ("efficientnet-b0/stem/conv2d/kernel", "fpn_cells/cell_0/fnode0/WSM",
                 "box_net/box-0-bn-3/moving_variance"):
        entry = by_name[name]
        clean = synth.clean_value(0, name, entry["shape"], "float32", profile)
        raw = synth.raw_value(0, name, entry["shape"], "float32", clean)
        np.testing.assert_array_equal(d0_tf1.load(name + EMA), clean)
        np.testing.assert_array_equal(d0_tf1.load(name), raw)
        assert d0_tf1.load(name).dtype == np.float32
    step = d0_tf1.load("global_step")
    assert step.dtype == np.int64 and step.shape == ()
    assert int(step) == int(synth.clean_value(0, "global_step", [], "int64", profile))


@needs_tf
def test_load_unknown_name_raises_key_error(d0_tf1):
    with pytest.raises(KeyError, match="not-a-variable"):
        d0_tf1.load("not-a-variable")


@needs_tf
@pytest.mark.parametrize("form", ["dir", "prefix", "index", "data", "dir_without_state"])
def test_tf1_path_forms(d0_copy, form):
    given = {
        "dir": d0_copy.parent,
        "prefix": d0_copy,
        "index": d0_copy.with_name(d0_copy.name + ".index"),
        "data": d0_copy.with_name(d0_copy.name + ".data-00000-of-00001"),
        "dir_without_state": d0_copy.parent,
    }[form]
    if form == "dir_without_state":
        (d0_copy.parent / "checkpoint").unlink()
    contents = read_checkpoint(str(given))
    assert contents.format == "tf1"
    assert contents.source == d0_copy
    assert len(contents.names) == 1912


@needs_tf
def test_tf1_numbered_prefix_and_state_file_paths(tmp_path):
    prefix = synth_checkpoint(D0, tmp_path / "run", prefix_name="model.ckpt-12345")
    assert read_checkpoint(prefix).source == prefix
    state = prefix.parent / "checkpoint"
    # Absolute path in the state file.
    state.write_text(f'model_checkpoint_path: "{prefix}"\n', encoding="utf-8")
    assert read_checkpoint(prefix.parent).source == prefix
    # Absolute path from another machine: falls back to the basename here.
    moved = 'model_checkpoint_path: "/elsewhere/train/model.ckpt-12345"\n'
    state.write_text(moved, encoding="utf-8")
    assert read_checkpoint(prefix.parent).source == prefix
    # A state file naming a checkpoint that is not there.
    state.write_text('model_checkpoint_path: "model.ckpt-99"\n', encoding="utf-8")
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(prefix.parent)
    _assert_one_line_input_error(excinfo, "model.ckpt-99")


@needs_tf
def test_missing_data_shard(d0_copy):
    d0_copy.with_name(d0_copy.name + ".data-00000-of-00001").unlink()
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(d0_copy.with_name(d0_copy.name + ".index"))
    _assert_one_line_input_error(excinfo, "no data shard", str(d0_copy))


@needs_tf
def test_data_shard_without_index(d0_copy):
    d0_copy.with_name(d0_copy.name + ".index").unlink()
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(d0_copy.with_name(d0_copy.name + ".data-00000-of-00001"))
    _assert_one_line_input_error(excinfo, ".index is missing")


@needs_tf
def test_truncated_data_file(d0_copy):
    data = d0_copy.with_name(d0_copy.name + ".data-00000-of-00001")
    size = data.stat().st_size
    os.truncate(data, size // 2)
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(d0_copy)
    _assert_one_line_input_error(excinfo, "truncated", f"{size // 2} bytes")


@needs_tf
def test_data_truncated_after_opening_fails_on_load(d0_copy):
    contents = read_checkpoint(d0_copy)
    os.truncate(d0_copy.with_name(d0_copy.name + ".data-00000-of-00001"), 1000)
    last = max(contents.names)  # sorted keys are stored in order: the last is past byte 1000
    with pytest.raises(InputError) as excinfo:
        contents.load(last)
    _assert_one_line_input_error(excinfo, "cannot read tensor", last)


@needs_tf
def test_random_bytes_index(tmp_path):
    index = tmp_path / "model.ckpt.index"
    index.write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "model.ckpt.data-00000-of-00001").write_bytes(b"\0" * 16)
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(index)
    _assert_one_line_input_error(excinfo, "not a readable TF checkpoint index", str(index))


def test_random_bytes_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00\x01junk" + np.random.default_rng(1).bytes(4096))
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(path)
    _assert_one_line_input_error(excinfo, "is not a checkpoint", "4102 bytes", "00016a756e6b")


def test_empty_dir(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path)
    _assert_one_line_input_error(excinfo, "no checkpoint in", "found 0 entries")


def test_missing_path(tmp_path):
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path / "nope" / "model.ckpt-1")
    _assert_one_line_input_error(excinfo, "not found")


def test_dir_with_several_checkpoints_is_ambiguous(tmp_path):
    for name in ("a.index", "b.index"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(tmp_path)
    _assert_one_line_input_error(excinfo, "2 checkpoints", "a.index, b.index")


# --------------------------------------------------------------------------- TF2


@needs_tf
def test_tf2_emackpt_names_shapes_values(d0_tf1):
    manifest = json.loads((D0_DIR / "tf2_ckpt" / "manifest.json").read_text(encoding="utf-8"))
    model = [k for k in manifest["keys"] if k["role"] == "model"]
    contents = read_checkpoint(D0_DIR / "tf2_ckpt")
    assert contents.format == "tf2"
    assert contents.source == D0_DIR / "tf2_ckpt" / "emackpt-1"
    assert contents.ema_in_model_entries is True
    # TF1 names derived from the object graph match the manifest's tf1_name per key.
    assert contents.names == {k["tf1_name"]: tuple(k["shape"]) for k in model}
    assert len(contents.names) == 709
    # Everything else is skipped with a reason.
    others = {k["key"] for k in manifest["keys"] if k["role"] != "model"}
    assert set(contents.skipped) == others
    assert contents.skipped["optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE"] == (
        "optimizer state (iterations, hyper-parameters, loss scale)")
    assert all("average" in contents.skipped[k] for k in others if ".OPTIMIZER_SLOT/" in k)
    # Model entries are the averaged weights = TF1 EMA shadows of the seed-0 synth checkpoint.
    for name in contents.names:
        np.testing.assert_array_equal(contents.load(name), d0_tf1.load(name + EMA), err_msg=name)


@needs_tf
def test_tf2_plain_checkpoint_without_averages(tmp_path):
    import tensorflow as tf

    module = tf.Module()
    module.bias = tf.Variable(np.arange(3, dtype=np.float32), name="box_net/box-0/bias")
    module.step = tf.Variable(np.int64(7), name="global_step")
    prefix = Path(tf.train.Checkpoint(model=module).save(str(tmp_path / "ckpt")))
    contents = read_checkpoint(tmp_path)
    assert contents.format == "tf2"
    assert contents.source == prefix
    assert contents.ema_in_model_entries is False
    assert contents.names == {"box_net/box-0/bias": (3,), "global_step": ()}
    np.testing.assert_array_equal(contents.load("box_net/box-0/bias"), [0.0, 1.0, 2.0])
    assert contents.load("global_step").dtype == np.int64
    assert contents.skipped["save_counter/.ATTRIBUTES/VARIABLE_VALUE"] == (
        "tf.train.Checkpoint save counter")


# --------------------------------------------------------------------------- SavedModel


@needs_tf
@pytest.mark.parametrize("subpath", ["", "variables"])
def test_saved_model_names_values_and_head_skipped(d0_tf1, subpath):
    root = D0_DIR / "saved_model"
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    contents = read_checkpoint(root / subpath)
    assert contents.format == "saved_model"
    assert contents.source == root / "variables" / "variables"
    model = [k for k in manifest["keys"] if k["role"] == "model"]
    assert contents.names == {k["tf1_name"]: tuple(k["shape"]) for k in model}
    heads = {k["key"] for k in manifest["keys"] if k["role"] == "unused_not_in_tf1"}
    assert len(heads) == 7
    assert {k: v for k, v in contents.skipped.items() if v == HEAD_REASON}.keys() == heads
    assert not any("/head/" in n or n.startswith("head/") for n in contents.names)
    for name in list(contents.names)[::7]:
        np.testing.assert_array_equal(contents.load(name), d0_tf1.load(name + EMA), err_msg=name)


# --------------------------------------------------------------------------- H5


def test_h5_names_and_shapes():
    golden = json.loads((D0_DIR / "golden.json").read_text(encoding="utf-8"))
    expected = {
        ds.split("/", 1)[1][: -len(":0")]: tuple(shape) for ds, shape in golden["h5"]["datasets"]
    }
    contents = read_checkpoint(D0_DIR / "d0.h5")
    assert contents.format == "h5"
    assert contents.source == D0_DIR / "d0.h5"
    assert len(expected) == 709
    assert contents.names == expected
    assert "efficientnet-b0/stem/conv2d/kernel" in contents.names
    assert contents.ema_in_model_entries is True


@needs_tf
def test_h5_values_equal_tf1_ema(d0_tf1):
    contents = read_checkpoint(D0_DIR / "d0.h5")
    for name in contents.names:
        np.testing.assert_array_equal(contents.load(name), d0_tf1.load(name + EMA), err_msg=name)


def test_h5_suffix_but_not_hdf5(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"PK\x03\x04 not hdf5 at all")
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(path)
    _assert_one_line_input_error(excinfo, "is not an HDF5 file")


# --------------------------------------------------------------------------- archives


def _tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


@pytest.mark.parametrize("case", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_archive_members_are_refused(tmp_path, case):
    outside = tmp_path / "outside"
    outside.mkdir()
    cache = tmp_path / "cache"
    bad = {
        "dotdot": _file("efficientdet-d0/../../outside/evil"),
        "absolute": _file(str(outside / "evil")),
        "symlink": _link("efficientdet-d0/evil", "../../outside", tarfile.SYMTYPE),
        "hardlink": _link("efficientdet-d0/evil", "../outside/evil", tarfile.LNKTYPE),
    }[case]
    archive = _tar_with(tmp_path / "bad.tar.gz", [_file("efficientdet-d0/checkpoint"), bad])
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(archive, cache_dir=cache)
    _assert_one_line_input_error(excinfo, "refused", "evil")
    assert list(outside.iterdir()) == []
    # Nothing was extracted at all: no staging or partial folder remains.
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_not_an_archive_and_truncated_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(np.random.default_rng(2).bytes(2048))
    with pytest.raises(InputError) as excinfo:
        read_checkpoint(junk, cache_dir=tmp_path / "cache")
    _assert_one_line_input_error(excinfo, "not a readable tar/gzip archive")

    whole = _tar_with(tmp_path / "whole.tar.gz", [_file("d/model.index", os.urandom(200_000))])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(InputError):
        read_checkpoint(cut, cache_dir=tmp_path / "cache")


@needs_tf
@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tar", "w")])
def test_archive_of_synth_checkpoint_reads(tmp_path, d0_tf1, suffix, mode):
    release = tmp_path / "src" / D0
    synth_checkpoint(D0, release, prefix_name="model")
    archive = tmp_path / f"{D0}{suffix}"
    with tarfile.open(archive, mode, **({"compresslevel": 1} if "gz" in mode else {})) as tar:
        tar.add(release, arcname=D0)
    shutil.rmtree(release)
    cache = tmp_path / "cache"
    contents = read_checkpoint(archive, cache_dir=cache)
    assert contents.format == "tf1"
    assert contents.source.name == "model" and contents.source.parent.name == D0
    assert contents.source.is_relative_to(cache)
    assert len(contents.names) == 1912
    name = "class_net/class-predict/bias" + EMA
    np.testing.assert_array_equal(contents.load(name), d0_tf1.load(name))
    # Second read reuses the unpacked copy.
    assert read_checkpoint(archive, cache_dir=cache).source == contents.source
    assert len(list((cache / "archives").iterdir())) == 1


def test_archive_cache_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFDET_CACHE", str(tmp_path / "envcache"))
    archive = _tar_with(tmp_path / "x.tgz", [_file("m/weights.bin", b"junk")])
    with pytest.raises(InputError, match="no checkpoint"):
        read_checkpoint(archive)
    assert any((tmp_path / "envcache" / "archives").iterdir())


# --------------------------------------------------------------------------- check_finite


def test_check_finite_names_first_bad_model_tensor():
    values = {
        "a/kernel": np.ones((2, 2), np.float32),
        "a/kernel/Momentum": np.array([np.nan], np.float32),  # slot: ignored
        "b/gamma": np.array([1.0, np.inf, np.nan], np.float32),
        "c/beta": np.array([np.nan], np.float32),
        "global_step": np.array(5, np.int64),
    }
    contents = CheckpointContents(
        format="tf1", source=Path("/x/model"),
        names={k: v.shape for k, v in values.items()}, _loader=values.__getitem__,
    )
    check_finite(contents, ["a/kernel", "a/kernel/Momentum", "global_step"])
    with pytest.raises(NonFiniteError) as excinfo:
        check_finite(contents, ["a/kernel", "a/kernel/Momentum", "b/gamma", "c/beta"])
    message = str(excinfo.value)
    assert excinfo.value.exit_code == 5
    assert "b/gamma" in message and "c/beta" not in message
    assert "1 NaN and 1 Inf" in message
