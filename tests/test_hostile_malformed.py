"""Malformed input gets one line and exit 3, never a traceback: odd tensor dtypes and shapes,
stray shards, malformed goldens and COCO annotations."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from converter.cli import main as convert_main
from helpers import REFERENCE_DIR, synth_checkpoint, synth_tensors, write_checkpoint
from hostile_helpers import assert_refused, invoke, verify_coco_on

pytestmark = [pytest.mark.needs_tf, pytest.mark.usefixtures("single_thread")]

D0 = "efficientdet-d0"
STEM = "efficientnet-b0/stem/conv2d/kernel"
EMA = "/ExponentialMovingAverage"


@pytest.fixture(scope="module")
def d0_tensors() -> dict:
    pytest.importorskip("tensorflow")
    return synth_tensors(D0, optimizer=False)


def _convert_with(tmp_path: Path, tensors: dict, changes: dict) -> tuple[object, Path]:
    prefix = write_checkpoint({**tensors, **changes}, tmp_path / "ckpt" / "model.ckpt")
    out = tmp_path / "out.pth"
    return invoke(convert_main, "--ckpt", prefix, "--out", out, "-q"), out


@pytest.mark.parametrize("dtype, fragment", [
    (np.int32, "int64 values"), (np.complex64, "complex64 values"), ("string", "values")])
def test_non_float_tensors_are_refused(tmp_path, d0_tensors, dtype, fragment):
    shape = d0_tensors[STEM].shape
    value = np.full(shape, b"x", dtype=object) if dtype == "string" else np.ones(shape, dtype)
    result, out = _convert_with(tmp_path, d0_tensors, {STEM: value, STEM + EMA: value})
    assert_refused(result, 3, STEM, "floating point", fragment, out=out)


def test_flattened_kernel_is_refused(tmp_path, d0_tensors):
    flat = d0_tensors[STEM].reshape(-1)
    result, out = _convert_with(tmp_path, d0_tensors, {STEM: flat, STEM + EMA: flat})
    assert_refused(result, 3, STEM, "dimensions", out=out)


@pytest.mark.parametrize("head, channels", [
    ("class_net/class-predict", 0), ("box_net/box-predict", 3), ("box_net/box-predict", 0)])
def test_impossible_predictor_channels_are_refused(tmp_path, d0_tensors, head, channels):
    kernel = np.zeros((1, 1, 64, channels), np.float32)
    bias = np.zeros((channels,), np.float32)
    changes = {f"{head}/pointwise_kernel": kernel, f"{head}/pointwise_kernel{EMA}": kernel,
               f"{head}/bias": bias, f"{head}/bias{EMA}": bias}
    result, out = _convert_with(tmp_path, d0_tensors, changes)
    assert_refused(result, 3, head, "malformed checkpoint", out=out)


def test_stray_shard_beside_a_complete_checkpoint_is_ignored(tmp_path):
    prefix = synth_checkpoint(D0, tmp_path / "ckpt", optimizer=False)
    (prefix.parent / (prefix.name + ".data-00000-of-00002")).write_bytes(b"left over")
    out = tmp_path / "out.pth"
    result = invoke(convert_main, "--ckpt", prefix.parent, "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_missing_shard_named_by_the_index_is_still_reported(tmp_path):
    prefix = synth_checkpoint(D0, tmp_path / "ckpt", optimizer=False)
    shard = prefix.parent / (prefix.name + ".data-00000-of-00001")
    shard.rename(prefix.parent / (prefix.name + ".data-00000-of-00002"))
    out = tmp_path / "out.pth"
    assert_refused(invoke(convert_main, "--ckpt", prefix, "--out", out), 3,
                   "missing data shard", out=out)


# --- goldens ---------------------------------------------------------------------------------

def _golden_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "golden"
    folder.mkdir()
    for name in ("golden.json", "golden.npz"):
        shutil.copyfile(REFERENCE_DIR / D0 / name, folder / name)
    return folder


def test_golden_with_missing_keys_is_one_error(tmp_path):
    from verify.reference import ReferenceError, load_golden

    folder = _golden_copy(tmp_path)
    golden = json.loads((folder / "golden.json").read_text())
    for key in ("input", "variant"):
        broken = {k: v for k, v in golden.items() if k != key}
        (folder / "golden.json").write_text(json.dumps(broken))
        with pytest.raises(ReferenceError, match="malformed golden") as excinfo:
            load_golden(folder)
        assert "\n" not in str(excinfo.value)
    (folder / "golden.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ReferenceError, match="malformed golden"):
        load_golden(folder)


def test_truncated_golden_npz_is_one_error(tmp_path):
    from verify.reference import ReferenceError, load_golden

    folder = _golden_copy(tmp_path)
    data = (folder / "golden.npz").read_bytes()
    (folder / "golden.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReferenceError, match="unreadable golden"):
        load_golden(folder)


# --- COCO annotations ------------------------------------------------------------------------

@pytest.mark.parametrize("change, fragment", [
    ({"bbox": ["1", "2", "3", "4"]}, "bbox"),
    ({"bbox": [1, 2, float("nan"), 4]}, "bbox"),
    ({"id": None}, "lacks id"),
    ({"id": "7"}, "not a unique int"),
    ({"area": "big"}, "area"),
])
def test_malformed_coco_annotations(tmp_path, change, fragment):
    ann = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3, 4], "area": 12,
           "iscrowd": 0, **change}
    ann = {k: v for k, v in ann.items() if v is not None}
    result, results = verify_coco_on(
        tmp_path, [{"id": 1, "file_name": "a.jpg", "width": 8, "height": 8}], [ann])
    assert_refused(result, 3, fragment, out=results)
