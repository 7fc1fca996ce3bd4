"""``convert`` end to end: synthetic checkpoints of every reference manifest through the CLI into
weights that ``EfficientDet.from_pretrained`` loads strictly, with the checkpoint's (EMA) values
in PyTorch layout; the other input formats; and every failure exit code.

Expected values are read back from the checkpoint with TensorFlow and put into PyTorch layout by
this file's own transposes (not ``mappings.layouts``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from converter.cli import main
from helpers import REFERENCE_DIR, load_manifest, synth_checkpoint, synth_tensors, write_checkpoint
from mappings import mapping_table, tf_to_pt
from model.efficientdet import EfficientDet

pytestmark = [pytest.mark.needs_tf, pytest.mark.usefixtures("single_thread")]

EMA = "/ExponentialMovingAverage"
D0 = "efficientdet-d0"
MANIFEST_DIRS = sorted(p.parent.name for p in REFERENCE_DIR.glob("*/manifest.json"))
# Measured on a busy 2-core machine (synth in-process + convert + strict load + compare):
# d0 / lite* / odd sizes 1-2.5 s each, d1-d3 1.5-3.5 s, d4 ~6 s, d5 ~5 s, d6 ~8 s, d7 ~10 s,
# d7x ~12 s (d5 and up: 270-620 MB checkpoints). BIG variants are written without optimizer
# slots (half the bytes; slots are covered by the d0 tests) and compare a deterministic subset
# of tensors. The quick suite (-m "not slow") converts the d0 / lite0 family and the odd
# sizes; every other variant runs with the slow tests.
BIG = {"efficientdet-d4", "efficientdet-d5", "efficientdet-d6", "efficientdet-d7",
       "efficientdet-d7x"}
QUICK = {"efficientdet-d0", "efficientdet-d0-nc20", "efficientdet-d0-600x420",
         "efficientdet-lite0", "efficientdet-lite1-500x340"}
SUBSET_STRIDE = 7           # big variants: every 7th tensor by TF name, plus the special ones


def _param(dir_name: str):
    return dir_name if dir_name in QUICK else pytest.param(dir_name, marks=pytest.mark.slow)


@pytest.fixture(scope="module")
def tf():
    return pytest.importorskip("tensorflow")


@pytest.fixture(scope="module")
def reference():
    if not (REFERENCE_DIR / "synth_ckpt.py").is_file():
        pytest.skip(f"reference fixtures not found at {REFERENCE_DIR}")
    return REFERENCE_DIR


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def _to_pt_layout(tf_name: str, array: np.ndarray) -> torch.Tensor:
    leaf = tf_name.rsplit("/", 1)[-1]
    if leaf == "depthwise_kernel":               # [kh, kw, C, 1] -> [C, 1, kh, kw]
        array = array.transpose(2, 3, 0, 1)
    elif leaf in ("kernel", "pointwise_kernel"):  # [kh, kw, in, out] -> [out, in, kh, kw]
        array = array.transpose(3, 2, 0, 1)
    return torch.from_numpy(np.array(array, order="C"))   # copies; 0-d WSM stays 0-d


def _assert_model_equals_checkpoint(model: EfficientDet, prefix, tf, ema: bool = True,
                                    subset: bool = False) -> int:
    """Every (or every SUBSET_STRIDE-th) mapped tensor equals the checkpoint value bit for bit;
    returns how many were compared."""
    state = model.state_dict()
    reader = tf.train.load_checkpoint(str(prefix))
    table = {e.tf_name: e.pt_name for e in mapping_table(model.config)}
    names = sorted(table)
    if subset:
        special = [n for n in names if "predict" in n or "/WSM" in n or "/stem/" in n]
        names = sorted(set(names[::SUBSET_STRIDE]) | set(special))
    for name in names:
        expected = _to_pt_layout(name, reader.get_tensor(name + EMA if ema else name))
        got = state[table[name]]
        assert got.shape == expected.shape and got.dtype == torch.float32, name
        assert torch.equal(got, expected), name
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert counters and all(int(state[k]) == 0 for k in counters)
    return len(names)


def _tree(path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# --------------------------------------------------------------------------- every manifest

@pytest.mark.parametrize("dir_name", [_param(d) for d in MANIFEST_DIRS])
def test_convert_every_manifest(dir_name, tmp_path, tf):
    manifest = load_manifest(dir_name)
    big = dir_name in BIG
    # The folder names the variant: d6 and d7 checkpoints are otherwise indistinguishable.
    ckpt_dir = tmp_path / manifest["variant"]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    try:
        prefix = synth_checkpoint(dir_name, ckpt_dir, seed=0, optimizer=not big, in_process=True)
        result = invoke("--ckpt", ckpt_dir, "--out", out_dir / "model.pth", "-q")
        assert result.exit_code == 0, result.stderr
        assert result.stdout.strip() == str(out_dir / "model.pth")
        assert _tree(out_dir) == ["model.pth"]
        model = EfficientDet.from_pretrained(out_dir / "model.pth")
        state = model.state_dict()
        assert model.config.name == manifest["variant"]   # image size is not in a checkpoint
        assert model.config.num_classes == manifest["num_classes"]
        predict = state["class_net.class_predict.pointwise.bias"]
        assert predict.shape == (model.config.num_anchors * manifest["num_classes"],)
        assert model.metadata["source"]["ema"] == "shadows"
        assert model.metadata["source"]["format"] == "tf1"
        checked = _assert_model_equals_checkpoint(model, prefix, tf, ema=True, subset=big)
        assert checked >= (100 if big else manifest["counts"]["model"])
    finally:
        if big:   # pytest keeps the last runs' tmp folders: do not leave GBs behind
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            shutil.rmtree(out_dir, ignore_errors=True)


# --------------------------------------------------------------------------- d0 variations

@pytest.fixture(scope="module")
def d0_prefix(tmp_path_factory, tf, reference):
    """Seed-0 d0 checkpoint with EMA, Momentum slots and global_step (read-only by convention)."""
    return synth_checkpoint(D0, tmp_path_factory.mktemp("d0"), in_process=True)


@pytest.fixture(scope="module")
def d0_ema_state(d0_prefix, tf):
    """d0's EMA values in PyTorch layout, keyed by state_dict name."""
    reader = tf.train.load_checkpoint(str(d0_prefix))
    config = EfficientDet.from_config(D0).config
    return {e.pt_name: _to_pt_layout(e.tf_name, reader.get_tensor(e.tf_name + EMA))
            for e in mapping_table(config)}


def _assert_equals(state: dict, expected: dict) -> None:
    assert set(expected) <= set(state)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_no_ema_takes_raw_values(tmp_path, d0_prefix, d0_ema_state, tf):
    out = tmp_path / "raw.pth"
    result = invoke("--ckpt", d0_prefix, "--out", out, "--no-ema")
    assert result.exit_code == 0, result.stderr
    assert "EMA used:  no (raw values)" in result.stderr
    assert "variant:   efficientdet-d0 (90 classes, image 512x512)" in result.stderr
    model = EfficientDet.from_pretrained(out)
    assert model.metadata["source"]["ema"] == "none"
    _assert_model_equals_checkpoint(model, d0_prefix, tf, ema=False)
    # ... and the raw values really differ from the EMA ones (synth perturbs them).
    key = "backbone.stem.conv2d.weight"
    assert not torch.equal(model.state_dict()[key], d0_ema_state[key])


def test_json_report(tmp_path, d0_prefix):
    out = tmp_path / "d0.pth"
    result = invoke("--ckpt", d0_prefix, "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    manifest = load_manifest(D0)
    assert report["out"] == str(out) and out.is_file()
    assert report["variant"] == D0
    assert report["converted"] == manifest["counts"]["model"]
    assert report["ignored"] == {"optimizer slot (TF1 Momentum)":
                                 manifest["counts"]["optimizer_slot"],
                                 "training step counter": manifest["counts"]["step"]}
    assert report["config"]["num_classes"] == 90 and report["config"]["name"] == D0
    index = d0_prefix.parent / (d0_prefix.name + ".index")
    assert report["source"]["sha256"] == hashlib.sha256(index.read_bytes()).hexdigest()
    assert report["source"] == {**report["source"], "format": "tf1", "ema": "shadows"}
    assert EfficientDet.from_pretrained(out).metadata["source"] == report["source"]


def test_safetensors_output(tmp_path, d0_prefix, d0_ema_state):
    out = tmp_path / "d0.safetensors"
    result = invoke("--ckpt", d0_prefix, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert _tree(tmp_path) == ["d0.safetensors"]
    model = EfficientDet.from_pretrained(out)
    assert model.config.name == D0 and model.metadata["source"]["ema"] == "shadows"
    _assert_equals(model.state_dict(), d0_ema_state)


@pytest.mark.parametrize("relative,fmt", [
    ("efficientdet-d0/d0.h5", "h5"),
    ("efficientdet-d0/tf2_ckpt", "tf2"),
    ("efficientdet-d0/saved_model", "saved_model"),
])
def test_other_formats_give_the_ema_values(tmp_path, relative, fmt, d0_ema_state):
    """The H5 export, the TF2 emackpt and the SavedModel all hold d0's EMA weights."""
    source = REFERENCE_DIR / relative
    if not source.exists():
        pytest.skip(f"{source} not present")
    reference_before = _tree(REFERENCE_DIR / D0)
    out = tmp_path / "d0.pth"
    result = invoke("--ckpt", source, "--out", out, "-q")
    assert result.exit_code == 0, result.stderr
    model = EfficientDet.from_pretrained(out)
    assert model.config.name == D0 and model.config.num_classes == 90
    assert model.metadata["source"]["format"] == fmt
    assert model.metadata["source"]["ema"] == "model entries"
    _assert_equals(model.state_dict(), d0_ema_state)
    assert len(d0_ema_state) == load_manifest(D0)["counts"]["model"]
    assert _tree(REFERENCE_DIR / D0) == reference_before      # nothing written there


def test_force_overwrites(tmp_path, d0_prefix):
    out = tmp_path / "d0.pth"
    out.write_bytes(b"old")
    result = invoke("--ckpt", d0_prefix, "--out", out, "-q")
    _assert_fails(result, 6, "exists", "--force")
    assert out.read_bytes() == b"old"
    result = invoke("--ckpt", d0_prefix, "--out", out, "-q", "--force")
    assert result.exit_code == 0, result.stderr
    assert _tree(tmp_path) == ["d0.pth"] and EfficientDet.from_pretrained(out).config.name == D0



@pytest.mark.parametrize("size,image_hw", [("600x420", (420, 600)), ("768", (768, 768))])
def test_image_size_is_recorded(tmp_path, d0_prefix, size, image_hw):
    """A checkpoint does not know its input size; --image-size stores it in the config."""
    out = tmp_path / "d0.pth"
    result = invoke("--ckpt", d0_prefix, "--out", out, "-q", "--image-size", size)
    assert result.exit_code == 0, result.stderr
    assert EfficientDet.from_pretrained(out).config.image_size == image_hw


# --------------------------------------------------------------------------- failures

def _assert_fails(result, code: int, *fragments: str, out_dir=None, expected_tree=()) -> str:
    """Exit ``code``; click's one 'Error:' line carries the fragments; no traceback; nothing
    (not even a temp file) written into ``out_dir``."""
    stderr = result.stderr
    assert result.exit_code == code, (result.exit_code, result.stdout, stderr)
    assert isinstance(result.exception, SystemExit), result.exception   # nothing escaped
    assert "Traceback" not in stderr + result.stdout
    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    if code != 2 and code != 1:
        # -q: the message is the only thing on stderr
        assert [line for line in stderr.splitlines() if line.strip()] == errors
    assert result.stdout == ""
    if out_dir is not None:
        assert _tree(out_dir) == sorted(expected_tree)
    return errors[0]


@pytest.fixture()
def out_dir(tmp_path):
    path = tmp_path / "out"
    path.mkdir()
    return path


def test_missing_path(tmp_path, out_dir):
    result = invoke("--ckpt", tmp_path / "nope", "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 3, "nope", out_dir=out_dir)


def test_truncated_data_file(tmp_path, out_dir, tf, reference):
    prefix = synth_checkpoint(D0, tmp_path / "ckpt", in_process=True)
    data = prefix.parent / (prefix.name + ".data-00000-of-00001")
    with data.open("r+b") as handle:
        handle.truncate(data.stat().st_size // 2)
    result = invoke("--ckpt", prefix, "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 3, "truncated", out_dir=out_dir)


def test_prefix_without_index(tmp_path, out_dir, tf, reference):
    prefix = synth_checkpoint(D0, tmp_path / "ckpt", in_process=True)
    (prefix.parent / (prefix.name + ".index")).unlink()
    result = invoke("--ckpt", prefix, "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 3, "model.ckpt.index is missing", out_dir=out_dir)


def test_not_a_checkpoint(tmp_path, out_dir):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, not weights\n")
    result = invoke("--ckpt", notes, "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 3, "is not a checkpoint", out_dir=out_dir)


def test_unknown_variant_is_usage_error(d0_prefix, out_dir):
    result = invoke("--ckpt", d0_prefix, "--out", out_dir / "x.pth", "--variant",
                    "efficientdet-d9", "-q")
    _assert_fails(result, 2, "Invalid value for '--variant'", out_dir=out_dir)


def test_mismatched_variant(d0_prefix, out_dir):
    result = invoke("--ckpt", d0_prefix, "--out", out_dir / "x.pth", "--variant",
                    "efficientdet-d1", "-q")
    _assert_fails(result, 4, "--variant efficientdet-d1 does not match", "efficientnet-b0",
                  out_dir=out_dir)


def _d6_structure_only(prefix, tf) -> list[str]:
    """d6's small tensors only (every BN vector, bias and predictor; no large kernels): enough
    for variant detection, which reads names and shapes, at a few % of the bytes. Returns the
    dropped model tensors."""
    tensors = synth_tensors("efficientdet-d6", seed=0, ema=False, optimizer=False)
    write_checkpoint({k: v for k, v in tensors.items() if v.size <= 400_000}, prefix)
    return sorted(k for k, v in tensors.items() if v.size > 400_000)


def test_ambiguous_d6_d7_structure(tmp_path, out_dir, tf):
    if "efficientdet-d6" not in MANIFEST_DIRS:
        pytest.skip("no d6 manifest")
    dropped = _d6_structure_only(tmp_path / "mine" / "model.ckpt", tf)
    result = invoke("--ckpt", tmp_path / "mine", "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 4, "efficientdet-d6 and efficientdet-d7", "--variant", out_dir=out_dir)
    # Naming the variant gets past detection; then every dropped kernel is listed (exit 1).
    result = invoke("--ckpt", tmp_path / "mine", "--out", out_dir / "x.pth", "-q",
                    "--variant", "efficientdet-d7")
    _assert_fails(result, 1, "does not cover efficientdet-d7", out_dir=out_dir)
    listed = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert dropped and listed == sorted(tf_to_pt(name)[0] for name in dropped)


@pytest.mark.slow
def test_ambiguous_d6_d7_real_checkpoint(tmp_path, out_dir, tf):
    """The full synthetic d6 checkpoint copied into a folder named 'mine'."""
    if "efficientdet-d6" not in MANIFEST_DIRS:
        pytest.skip("no d6 manifest")
    prefix = synth_checkpoint("efficientdet-d6", tmp_path / "mine", optimizer=False,
                              in_process=True)
    try:
        result = invoke("--ckpt", tmp_path / "mine", "--out", out_dir / "x.pth", "-q")
        _assert_fails(result, 4, "efficientdet-d6 and efficientdet-d7", "--variant",
                      out_dir=out_dir)
        result = invoke("--ckpt", prefix, "--out", out_dir / "d7.pth", "-q",
                        "--variant", "efficientdet-d7")
        assert result.exit_code == 0, result.stderr
        model = EfficientDet.from_pretrained(out_dir / "d7.pth")
        assert model.config.name == "efficientdet-d7" and model.config.anchor_scale == 5.0
        assert model.config.image_size == (1536, 1536)
    finally:
        shutil.rmtree(tmp_path / "mine", ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def d0_tensors(tf, reference):
    return synth_tensors(D0, seed=0, optimizer=False)


def test_nan_in_used_weight(tmp_path, out_dir, d0_tensors):
    tensors = dict(d0_tensors)
    name = "efficientnet-b0/blocks_5/conv2d/kernel" + EMA
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0, 3, 7] = np.nan
    prefix = write_checkpoint(tensors, tmp_path / "ckpt" / "model.ckpt")
    result = invoke("--ckpt", prefix, "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 5, name, "NaN", out_dir=out_dir)


def test_nan_in_unused_raw_copy_is_ignored(tmp_path, out_dir, d0_tensors):
    """With EMA shadows the raw copy is not used, so its NaN does not matter; with --no-ema
    it does."""
    tensors = dict(d0_tensors)
    name = "box_net/box-1-bn-4/moving_variance"
    tensors[name] = np.full_like(tensors[name], np.inf)
    prefix = write_checkpoint(tensors, tmp_path / "ckpt" / "model.ckpt")
    result = invoke("--ckpt", prefix, "--out", out_dir / "ema.pth", "-q")
    assert result.exit_code == 0, result.stderr
    result = invoke("--ckpt", prefix, "--out", out_dir / "raw.pth", "-q", "--no-ema")
    _assert_fails(result, 5, name, out_dir=out_dir, expected_tree=["ema.pth"])


def test_output_exists_without_force(d0_prefix, out_dir):
    (out_dir / "x.pth").write_bytes(b"keep me")
    result = invoke("--ckpt", d0_prefix, "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 6, "exists", out_dir=out_dir, expected_tree=["x.pth"])
    assert (out_dir / "x.pth").read_bytes() == b"keep me"


def test_output_folder_missing(d0_prefix, tmp_path):
    result = invoke("--ckpt", d0_prefix, "--out", tmp_path / "no" / "such" / "x.pth", "-q")
    _assert_fails(result, 6, "does not exist")
    assert not (tmp_path / "no").exists()


def test_bad_image_size_is_usage_error(d0_prefix, out_dir):
    result = invoke("--ckpt", d0_prefix, "--out", out_dir / "x.pth", "--image-size", "wide")
    _assert_fails(result, 2, "--image-size", out_dir=out_dir)


def test_output_suffix_must_be_weights(d0_prefix, out_dir):
    result = invoke("--ckpt", d0_prefix, "--out", out_dir / "x.bin", "-q")
    _assert_fails(result, 6, ".pth", out_dir=out_dir)


@pytest.mark.parametrize("ema", [True, False], ids=["ema", "no-ema"])
def test_checkpoint_missing_a_variable(tmp_path, out_dir, tf, reference, ema):
    """A variable absent altogether (raw and shadow) is a missing state_dict key either way."""
    tensors = synth_tensors(D0, seed=0, ema=ema, optimizer=False)
    gone = "fpn_cells/cell_1/fnode2/op_after_combine7/conv/pointwise_kernel"
    for key in (gone, gone + EMA):
        tensors.pop(key, None)
    prefix = write_checkpoint(tensors, tmp_path / "ckpt" / "model.ckpt")
    result = invoke("--ckpt", prefix, "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 1, "does not cover efficientdet-d0", out_dir=out_dir)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Error:")]
    assert lines == ["1 state_dict keys missing from the checkpoint:",
                     "  fpn_cells.cell_1.fnode2.op_after_combine7.conv.pointwise.weight"]


def test_checkpoint_missing_one_ema_shadow(tmp_path, out_dir, d0_tensors):
    """Shadows present but one missing: that variable is listed by TF name, not silently taken
    raw (mixing averaged and raw weights)."""
    tensors = dict(d0_tensors)
    name = "class_net/class-predict/bias"
    tensors.pop(name + EMA)
    prefix = write_checkpoint(tensors, tmp_path / "ckpt" / "model.ckpt")
    result = invoke("--ckpt", prefix, "--out", out_dir / "x.pth", "-q")
    _assert_fails(result, 1, "EMA shadows missing", out_dir=out_dir)
    lines = [line for line in result.stderr.splitlines() if not line.startswith("Error:")]
    assert lines == ["1 EMA shadows missing:", f"  {name}"]
    # --no-ema takes the raw copy, which is complete.
    result = invoke("--ckpt", prefix, "--out", out_dir / "raw.pth", "-q", "--no-ema")
    assert result.exit_code == 0, result.stderr


# --------------------------------------------------------------------------- help / version

def test_help_mentions_every_option():
    for flag in ("--help", "-h"):
        result = invoke(flag)
        assert result.exit_code == 0
        for param in main.params:
            for opt in param.opts:
                assert opt in result.stdout, opt
        assert "Exit codes" in result.stdout
    result = invoke("--version")
    assert result.exit_code == 0 and "convert" in result.stdout


def test_console_script_installed():
    assert shutil.which("convert", path=os.path.dirname(sys.executable)) is not None
