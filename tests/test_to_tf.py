"""``convert --to tf-ckpt``: PyTorch weights back into an automl TF1 checkpoint.

TF -> PyTorch -> TF is bit-exact: every model variable, every ExponentialMovingAverage shadow
and ``global_step`` of a synthetic automl checkpoint come back equal (values and dtypes), read
with TensorFlow's own checkpoint reader. Then every way the export refuses bad input.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from converter import to_tf
from converter.cli import main
from converter.errors import MappingError, NonFiniteError, OutputError
from helpers import REFERENCE_DIR, cached_manifest, synth_checkpoint
from mappings.layouts import tf_shape, to_tf as layout_to_tf, to_torch
from mappings.rules import Layout
from model import EfficientDet
from model.weights_io import load_weights, save_weights

pytestmark = pytest.mark.usefixtures("single_thread")

EMA = "/ExponentialMovingAverage"
SLOT = "/Momentum"
D0, LITE0 = "efficientdet-d0", "efficientdet-lite0"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize("layout", list(Layout))
def test_layout_to_tf_inverts_to_torch(layout):
    shape = {Layout.CONV2D_HWIO_TO_OIHW: (3, 3, 5, 7), Layout.DEPTHWISE_HWCM_TO_OIHW: (3, 3, 5, 1),
             Layout.IDENTITY: (7,), Layout.SCALAR: ()}[layout]
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tensor = to_torch(array, layout)
    back = layout_to_tf(tensor, layout)
    assert back.shape == shape == tf_shape(tuple(tensor.shape), layout)
    assert back.flags.c_contiguous and np.array_equal(back, array)


@pytest.mark.parametrize("manifest_dir", sorted(p.parent.name for p in
                                                 REFERENCE_DIR.glob("*/manifest.json")))
def test_every_manifest_shadows_exactly_the_variables_the_writer_shadows(manifest_dir):
    """The writer gives every table entry a shadow; automl's training graph (the manifests)
    keeps one for every model variable, trainable or BN statistic, and no other."""
    roles: dict[str, list[str]] = {}
    for variable in cached_manifest(manifest_dir)["variables"]:
        roles.setdefault(variable["role"], []).append(variable["name"])
    assert sorted(roles["ema"]) == sorted(name + EMA for name in roles["model"])
    assert roles["step"] == ["global_step"]


@pytest.fixture(scope="module")
def tf():
    if not (REFERENCE_DIR / "synth_ckpt.py").is_file():
        pytest.skip(f"reference fixtures not found at {REFERENCE_DIR}")
    return pytest.importorskip("tensorflow")


def _converted(tmp_path: Path, variant: str) -> tuple[Path, Path, Path]:
    """The synthetic original (EMA shadows differ from the raw variables, slots present) and
    its conversion with and without EMA."""
    source = synth_checkpoint(variant, tmp_path / "src", in_process=True)
    for name, extra in (("ema.pth", ()), ("raw.pth", ("--no-ema",))):
        result = invoke("--ckpt", source, "--out", tmp_path / name, "-q", *extra)
        assert result.exit_code == 0, result.output
    return source, tmp_path / "ema.pth", tmp_path / "raw.pth"


@pytest.mark.needs_tf
@pytest.mark.parametrize("variant", [pytest.param(D0, marks=pytest.mark.slow), LITE0])
def test_round_trip_is_bit_exact(tf, tmp_path, variant):
    source, ema, raw = _converted(tmp_path, variant)
    result = invoke("--ckpt", ema, "--to", "tf-ckpt", "--raw-weights", raw,
                    "--out", tmp_path / "back")
    assert result.exit_code == 0, result.output
    original = tf.train.load_checkpoint(str(source))
    written = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(tmp_path / "back")))
    expected = sorted(n for n in original.get_variable_to_shape_map() if not n.endswith(SLOT))
    assert sorted(written.get_variable_to_shape_map()) == expected
    roles = [e["role"] for e in cached_manifest(variant)["variables"]]
    assert len(expected) == roles.count("model") + roles.count("ema") + roles.count("step")
    unequal = [n for n in expected if not _same(original.get_tensor(n), written.get_tensor(n))]
    assert unequal == []

    # ... and our reader takes the written checkpoint back to the same PyTorch weights.
    result = invoke("--ckpt", tmp_path / "back", "--out", tmp_path / "again.pth", "-q")
    assert result.exit_code == 0, result.output
    again, first = load_weights(tmp_path / "again.pth")[0], load_weights(ema)[0]
    assert again.keys() == first.keys()
    assert all(torch.equal(again[k], first[k]) for k in first)


AUTOML_DIR = os.environ.get("EFFDET_AUTOML_DIR")


@pytest.mark.slow
@pytest.mark.needs_tf
@pytest.mark.skipif(not AUTOML_DIR, reason="set EFFDET_AUTOML_DIR to a google/automl checkout "
                                           "to run automl on the written checkpoint")
def test_automl_restores_the_written_checkpoint_and_detects_as_predict(tf, tmp_path):
    """automl's own inference (``restore_ckpt(..., skip_mismatch=False)``, which needs every
    variable and shadow) on the written folder: every tap and all three post-processing paths
    match our model (``verify parity`` in live TF mode; ~1 min of CPU)."""
    from verify.cli import main as verify_main
    _, ema, _ = _converted(tmp_path, D0)
    assert invoke("--ckpt", ema, "--to", "tf-ckpt", "--out", tmp_path / "back").exit_code == 0
    report = tmp_path / "parity.json"
    result = CliRunner().invoke(verify_main, [
        "parity", "--weights", str(ema), "--tf-ckpt", str(tmp_path / "back"),
        "--automl-dir", AUTOML_DIR, "--report", str(report), "-q"])
    assert result.exit_code == 0, result.output
    detections = json.loads(report.read_text())["detections"]
    assert [(d["path"], d["matched"], d["ok"]) for d in detections] == [
        ("global", 100, True), ("per_class", 100, True), ("pyfunc", 100, True)]


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.mark.needs_tf
def test_default_writes_the_weights_as_variables_and_shadows(tf, tmp_path):
    source, ema, _ = _converted(tmp_path, LITE0)
    result = invoke("--ckpt", ema, "--to", "tf-ckpt", "--out", tmp_path / "back")
    assert result.exit_code == 0, result.output
    original = tf.train.load_checkpoint(str(source))
    written = tf.train.load_checkpoint(str(tmp_path / "back" / "model"))
    shadows = [n for n in written.get_variable_to_shape_map() if n.endswith(EMA)]
    assert shadows
    for shadow in shadows:
        assert _same(written.get_tensor(shadow), original.get_tensor(shadow))
        assert _same(written.get_tensor(shadow[:-len(EMA)]), original.get_tensor(shadow))
    assert written.get_tensor("global_step") == original.get_tensor("global_step")
    assert invoke("--ckpt", ema, "--to", "tf-ckpt", "--out", tmp_path / "back", "--force",
                  "--global-step", 7).exit_code == 0
    assert tf.train.load_checkpoint(str(tmp_path / "back" / "model")).get_tensor("global_step") == 7


@pytest.fixture(scope="module")
def lite0_state():
    model = EfficientDet.from_config(LITE0)
    return model.state_dict(), model.config


@pytest.mark.parametrize("damage", ["missing", "unknown", "shape"])
def test_a_state_dict_off_the_table_is_refused_with_every_gap(lite0_state, damage):
    state_dict, config = lite0_state
    state_dict = dict(state_dict)
    key = "class_net.class_predict.pointwise.weight"
    assert key in state_dict
    if damage == "missing":
        del state_dict[key]
    elif damage == "unknown":
        state_dict["class_net.extra.weight"] = torch.zeros(1)
    else:
        state_dict[key] = torch.zeros(3, 3)
    with pytest.raises(MappingError) as error:
        to_tf.tf_tensors(state_dict, config)
    assert len(error.value.lines) == 2 and error.value.lines[1].startswith(
        "  class_net.extra" if damage == "unknown" else f"  {key}")


def test_non_finite_weights_are_refused(lite0_state):
    state_dict, config = lite0_state
    state_dict = {**state_dict, "backbone.stem.conv2d.weight":
                  torch.full_like(state_dict["backbone.stem.conv2d.weight"], float("nan"))}
    with pytest.raises(NonFiniteError, match="backbone.stem.conv2d.weight"):
        to_tf.tf_tensors(state_dict, config)


def test_tensors_follow_the_table(lite0_state):
    state_dict, config = lite0_state
    tensors = to_tf.tf_tensors(state_dict, config, global_step=3)
    kernel = tensors["efficientnet-lite0/stem/conv2d/kernel"]
    assert kernel.shape == (3, 3, 3, 32) and kernel.dtype == np.float32
    assert np.array_equal(kernel, state_dict["backbone.stem.conv2d.weight"].numpy()
                          .transpose(2, 3, 1, 0))
    assert np.array_equal(tensors["efficientnet-lite0/stem/conv2d/kernel" + EMA], kernel)
    assert tensors["global_step"].dtype == np.int64 and tensors["global_step"] == 3
    models = [n for n in tensors if not n.endswith(EMA) and n != "global_step"]
    assert len(tensors) == 2 * len(models) + 1


def _weights(tmp_path: Path, variant: str) -> Path:
    model = EfficientDet.from_config(variant)
    path = tmp_path / f"{variant}.pth"
    save_weights(path, model.state_dict(), {"variant": variant, "config": model.config.to_dict()})
    return path


def test_cli_refusals(tmp_path):
    weights = _weights(tmp_path, LITE0)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases = [
        ((weights, "--out", tmp_path / "taken"), 6),                      # exists
        ((weights, "--out", tmp_path / "taken", "--force"), 6),           # not a checkpoint folder
        ((weights, "--out", tmp_path / "no" / "dir"), 6),                 # parent missing
        ((tmp_path / "missing.pth", "--out", tmp_path / "a"), 3),
        ((tmp_path / "taken" / "notes.txt", "--out", tmp_path / "a"), 3),
        ((weights, "--out", tmp_path / "a", "--variant", D0), 2),
        ((weights, "--out", tmp_path / "a", "--raw-weights", _weights(tmp_path, D0)), 4),
    ]
    for args, code in cases:
        result = invoke("--ckpt", args[0], "--to", "tf-ckpt", *args[1:])
        assert result.exit_code == code, (args, result.output)
        assert "Traceback" not in result.output and not (tmp_path / "a").exists()
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    assert invoke("--ckpt", weights, "--out", tmp_path / "b.pth",
                  "--global-step", 3).exit_code == 2                      # needs --to tf-ckpt


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def fail(tensors, prefix):
        (prefix.parent / "model.index").write_bytes(b"half")
        raise KeyboardInterrupt
    monkeypatch.setattr(to_tf, "_save_bundle", fail)
    with pytest.raises(KeyboardInterrupt):
        to_tf.write_tf_checkpoint({}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_appearing_meanwhile_is_kept_and_reported(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def race(tensors, prefix):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    monkeypatch.setattr(to_tf, "_save_bundle", race)
    with pytest.raises(OutputError, match="out"):
        to_tf.write_tf_checkpoint({}, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "theirs.txt").read_text() == "theirs"


def test_the_folder_gets_the_umask_mode_not_mkdtemps(tmp_path, monkeypatch):
    monkeypatch.setattr(to_tf, "_save_bundle", lambda tensors, prefix: prefix.write_bytes(b""))
    to_tf.write_tf_checkpoint({}, tmp_path / "out")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~to_tf._umask()
