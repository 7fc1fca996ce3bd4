"""Checkpoints users trained: every optimizer slot and accumulator automl can write (TF1 Momentum /
Adam, TF2 object-based Keras SGD / Adam) is recognised from the one ignore list, counted per
reason in the conversion report, and anything unknown still fails the conversion."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from converter.cli import main
from helpers import cached_manifest, synth_tensors, write_checkpoint
from mappings import IGNORED_TF, ignore_reason
from model import EfficientDet

pytestmark = pytest.mark.usefixtures("single_thread")

D0 = "efficientdet-d0"
EMA = "/ExponentialMovingAverage"
ADAM_SLOTS = IGNORED_TF[r"/Adam(_1)?$"]
ADAM_POWERS = IGNORED_TF[r"(^|/)beta[12]_power$"]
STEP = IGNORED_TF[r"^global_step$"]


def _trainable(manifest: dict) -> list[str]:
    return [v["name"] for v in manifest["variables"] if v["role"] == "model" and v["trainable"]]


def _convert(ckpt_dir, out):
    return CliRunner().invoke(main, ["--ckpt", str(ckpt_dir), "--out", str(out), "--json"])


@pytest.mark.parametrize("name,reason", [
    ("efficientnet-b0/stem/conv2d/kernel/Momentum", "optimizer slot (TF1 Momentum)"),
    ("box_net/box-0/bias/Adam", ADAM_SLOTS),
    ("box_net/box-0/bias/Adam_1", ADAM_SLOTS),
    ("beta1_power", ADAM_POWERS),
    ("beta2_power", ADAM_POWERS),
    ("global_step", STEP),
    ("backbone/_blocks/0/_bn0/gamma/.OPTIMIZER_SLOT/optimizer/m/.ATTRIBUTES/VARIABLE_VALUE",
     "optimizer slot (Keras Adam m, v)"),
    ("box_net/_conv_ops/0/bias/.OPTIMIZER_SLOT/optimizer/awg_optimizer/momentum/"
     ".ATTRIBUTES/VARIABLE_VALUE", "optimizer slot (Keras SGD momentum)"),
    ("box_net/_conv_ops/0/bias/.OPTIMIZER_SLOT/optimizer/inner_optimizer/v/"
     ".ATTRIBUTES/VARIABLE_VALUE", "optimizer slot (Keras Adam m, v)"),
    ("optimizer/iter/.ATTRIBUTES/VARIABLE_VALUE",
     "optimizer state (iterations, hyper-parameters, loss scale)"),
    ("optimizer/loss_scale/current_loss_scale/.ATTRIBUTES/VARIABLE_VALUE",
     "optimizer state (iterations, hyper-parameters, loss scale)"),
])
def test_every_slot_automl_writes_has_one_reason(name, reason):
    assert ignore_reason(name) == reason
    assert sum(bool(re.search(pattern, name)) for pattern in IGNORED_TF) == 1   # no overlap


@pytest.mark.parametrize("name", [
    "efficientnet-b0/stem/conv2d/kernel/RMSProp",              # an optimizer automl never uses
    "box_net/box-0/bias/.OPTIMIZER_SLOT/optimizer/rms/.ATTRIBUTES/VARIABLE_VALUE",
    "box_net/box-0/bias/Adam_2", "box_net/box-0/bias/Momentum/x", "my_beta1_power",
])
def test_unknown_names_are_not_ignored(name):
    assert ignore_reason(name) is None


@pytest.mark.needs_tf
def test_adam_trained_tf1_checkpoint_converts_with_slots_counted(tmp_path):
    """d0 with AdamOptimizer's slots (<var>/Adam = m, <var>/Adam_1 = v) and beta powers, as
    det_model_fn writes with optimizer='adam'; the EMA values are converted."""
    manifest = cached_manifest(D0)
    tensors = synth_tensors(D0, optimizer=False)
    trainable = _trainable(manifest)
    rng = np.random.default_rng(0)
    for name in trainable:
        shape = tensors[name].shape
        tensors[name + "/Adam"] = rng.standard_normal(shape).astype(np.float32)
        tensors[name + "/Adam_1"] = rng.random(shape).astype(np.float32)
    tensors["beta1_power"] = np.float32(0.9 ** 100)
    tensors["beta2_power"] = np.float32(0.999 ** 100)
    write_checkpoint(tensors, tmp_path / "ckpt" / "model.ckpt-100")
    result = _convert(tmp_path / "ckpt", tmp_path / "adam.pth")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(trainable) == 493
    assert report["ignored"] == {ADAM_SLOTS: 2 * 493, ADAM_POWERS: 2, STEP: 1}
    assert report["converted"] == manifest["counts"]["model"] == 709
    model = EfficientDet.from_pretrained(tmp_path / "adam.pth")
    stem = tensors["efficientnet-b0/stem/conv2d/kernel" + EMA].transpose(3, 2, 0, 1)
    np.testing.assert_array_equal(model.backbone.stem.conv2d.weight.detach().numpy(), stem)


@pytest.mark.needs_tf
def test_unknown_extra_tensor_still_fails(tmp_path):
    tensors = synth_tensors(D0)
    tensors["efficientnet-b0/stem/conv2d/kernel/RMSProp"] = np.zeros((3, 3, 3, 32), np.float32)
    write_checkpoint(tensors, tmp_path / "ckpt" / "model.ckpt")
    out = tmp_path / "out.pth"
    result = _convert(tmp_path / "ckpt", out)
    assert result.exit_code == 1
    assert "1 unmatched checkpoint tensors:" in result.stderr
    assert "efficientnet-b0/stem/conv2d/kernel/RMSProp" in result.stderr
    assert not out.exists()


@pytest.mark.needs_tf
def test_adam_trained_tf2_object_based_checkpoint_converts_with_slots_counted(tmp_path):
    """An object-based checkpoint whose variables carry TF1 names (as automl's Keras model's do)
    and an Adam optimizer tracked beside the model: slot keys
    ``<path>/.OPTIMIZER_SLOT/optimizer/{m,v}/...`` and ``optimizer/beta{1,2}_power``."""
    tf = pytest.importorskip("tensorflow")
    manifest = cached_manifest(D0)
    tensors = synth_tensors(D0, optimizer=False)
    model_names = [v["name"] for v in manifest["variables"] if v["role"] == "model"]
    module = tf.Module()
    # Model entries hold the weights inference uses (as in an emackpt): the EMA values.
    module.variables_ = [tf.Variable(tensors[n + EMA], name=n) for n in model_names]
    trainable = set(_trainable(manifest))
    weights = [v for n, v in zip(model_names, module.variables_) if n in trainable]
    optimizer = tf.compat.v1.train.AdamOptimizer(1e-3)
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in weights])
    tf.train.Checkpoint(model=module, optimizer=optimizer).save(str(tmp_path / "ckpt" / "ckpt"))
    result = _convert(tmp_path / "ckpt", tmp_path / "tf2.pth")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"]["format"] == "tf2"
    assert report["ignored"] == {
        "optimizer slot (Keras Adam m, v)": 2 * 493,
        "optimizer state (iterations, hyper-parameters, loss scale)": 2,   # beta1/2_power
        "tf.train.Checkpoint save counter": 1,
        "TF2 object graph (read to derive TF1 names)": 1,
    }
    assert report["converted"] == 709
