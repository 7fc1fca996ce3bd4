"""Anchor targets and losses against automl itself (live TF, an automl checkout).

Set ``EFFDET_AUTOML_DIR`` to a google/automl checkout (with ``tf_keras`` and ``pyyaml``
installed: the ``.[live]`` extra); without it these tests skip. They import automl's
``tf2/anchors.py::AnchorLabeler`` and ``tf2/train_lib.py`` (``FocalLoss``, ``BoxLoss``,
``BoxIouLoss`` and ``EfficientDetNetTrain._detection_loss`` called on a stand-in ``self`` that
holds only the config fields and loss layers the method reads). ``train_lib`` imports
``neural_structured_learning`` and ``tensorflow_hub`` at module level for features not used here;
empty stand-in modules are registered for them when they are not installed.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from model.anchor_labeler import AnchorLabeler, box_per_level, cls_per_level
from model.anchors import anchor_boxes_yxyx
from model.config import get_config
from model.loss import LossConfig, detection_loss

AUTOML_ENV = "EFFDET_AUTOML_DIR"


def _efficientdet_dir() -> Path | None:
    value = os.environ.get(AUTOML_ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    for candidate in (root / "efficientdet", root):
        if (candidate / "tf2" / "train_lib.py").is_file():
            return candidate
    return None


EFFDET_DIR = _efficientdet_dir()
pytestmark = [
    pytest.mark.needs_tf, pytest.mark.slow,
    pytest.mark.skipif(EFFDET_DIR is None, reason=(
        f"set {AUTOML_ENV} to a google/automl checkout (and pip install '.[live]') to compare "
        f"anchor targets and losses with automl's own")),
]

CONFIG = get_config("efficientdet-d0", image_size=256, num_classes=6)
# Float32 rounding of sums over ~50k terms in different orders: a few ulps of the total.
LOSS_RTOL = 1e-5
# Regression targets are the same float32 ops in the same order: equal up to one ulp of log().
TARGET_ATOL = 1e-6


@pytest.fixture(scope="module")
def automl():
    from verify.tf_live import _import_tensorflow
    tf = _import_tensorflow()
    for name in ("neural_structured_learning", "tensorflow_hub"):
        if importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, types.ModuleType(name))
    if str(EFFDET_DIR) not in sys.path:
        sys.path.insert(0, str(EFFDET_DIR))
    return SimpleNamespace(tf=tf, anchors=importlib.import_module("tf2.anchors"),
                           train_lib=importlib.import_module("tf2.train_lib"))


def _automl_anchors(automl, config=CONFIG):
    height, width = config.image_size
    size = height if height == width else f"{width}x{height}"
    return automl.anchors.Anchors(config.min_level, config.max_level, config.num_scales,
                                  list(config.aspect_ratios), config.anchor_scale, size)


def _images_boxes(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image: boxes in pixels (sizes from 3 px to most of the image, overlapping) + classes."""
    rng = np.random.default_rng(seed)
    height, width = CONFIG.image_size
    out = []
    for count in (7, 1, 12):
        centre = rng.uniform(0, [height, width], size=(count, 2))
        size = np.exp(rng.uniform(np.log(3), np.log(0.8 * height), size=(count, 2)))
        boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
        boxes = np.clip(boxes, 0, [height - 1, width - 1, height - 1, width - 1]).astype(np.float32)
        classes = rng.integers(1, CONFIG.num_classes + 1, size=count).astype(np.float32)
        out.append((boxes, classes))
    return out


def test_anchors_equal_automls(automl):
    theirs = _automl_anchors(automl).boxes.numpy()
    np.testing.assert_array_equal(anchor_boxes_yxyx(CONFIG).astype(np.float32), theirs)


def _both_targets(automl, seed: int = 0):
    tf = automl.tf
    labeler_tf = automl.anchors.AnchorLabeler(_automl_anchors(automl), CONFIG.num_classes)
    labeler = AnchorLabeler(torch.from_numpy(anchor_boxes_yxyx(CONFIG)))
    ours, theirs = [], []
    for boxes, classes in _images_boxes(seed):
        ours.append(labeler.label_anchors(torch.from_numpy(boxes), torch.from_numpy(classes)))
        theirs.append(labeler_tf.label_anchors(tf.constant(boxes),
                                               tf.constant(classes.reshape(-1, 1))))
    return ours, theirs


def test_anchor_targets_equal_automls(automl):
    ours, theirs = _both_targets(automl)
    for mine, (cls_tf, box_tf, num_tf) in zip(ours, theirs):
        cls = cls_per_level(mine.cls_targets, CONFIG)
        box = box_per_level(mine.box_targets, CONFIG)
        assert float(mine.num_positives) == float(num_tf.numpy())
        assert float(mine.num_positives) > 0
        for level in cls:
            np.testing.assert_array_equal(cls[level].numpy(), cls_tf[level].numpy())
            np.testing.assert_allclose(box[level].numpy(), box_tf[level].numpy(), rtol=0,
                                       atol=TARGET_ATOL)


def _batch(automl, seed: int = 0):
    """One batch (3 images): our targets, automl's labels dict, and head outputs near them."""
    tf = automl.tf
    ours, theirs = _both_targets(automl, seed)
    cls_targets = cls_per_level(torch.stack([t.cls_targets for t in ours]), CONFIG)
    box_targets = box_per_level(torch.stack([t.box_targets for t in ours]), CONFIG)
    num_positives = torch.stack([t.num_positives for t in ours])
    # automl's labels: the batch mean of num_positives tiled over the batch (process_example).
    labels = {"mean_num_positives": tf.tile(tf.reshape(tf.reduce_mean(
        tf.stack([t[2] for t in theirs])), [1, 1]), [len(theirs), 1])}
    for level in cls_targets:
        labels[f"cls_targets_{level}"] = tf.stack([t[0][level] for t in theirs])
        labels[f"box_targets_{level}"] = tf.stack([t[1][level] for t in theirs])
    gen = torch.Generator().manual_seed(seed)
    cls_out, box_out = [], []
    for level in cls_targets:
        n, h, w, a = cls_targets[level].shape
        cls_out.append(torch.randn(n, a * CONFIG.num_classes, h, w, generator=gen) * 3 - 2)
        noise = torch.randn(n, h, w, a * 4, generator=gen) * 0.15
        box_out.append((box_targets[level] + noise).permute(0, 3, 1, 2).contiguous())
    return cls_targets, box_targets, num_positives, labels, cls_out, box_out


def _automl_loss(automl, loss_config: LossConfig, labels, cls_out, box_out):
    """automl's ``_detection_loss`` on NHWC copies of the outputs; values and output gradients."""
    tf, train_lib = automl.tf, automl.train_lib
    height, width = CONFIG.image_size
    none = tf.keras.losses.Reduction.NONE
    loss_layers = {
        "FocalLoss": train_lib.FocalLoss(loss_config.alpha, loss_config.gamma,
                                         label_smoothing=loss_config.label_smoothing,
                                         reduction=none),
        "BoxLoss": train_lib.BoxLoss(loss_config.delta, reduction=none),
        "BoxIouLoss": train_lib.BoxIouLoss(
            loss_config.iou_loss_type, CONFIG.min_level, CONFIG.max_level, CONFIG.num_scales,
            list(CONFIG.aspect_ratios), CONFIG.anchor_scale,
            height if height == width else f"{width}x{height}", reduction=none),
    }
    stand_in = SimpleNamespace(loss=loss_layers, config=SimpleNamespace(
        positives_momentum=None, min_level=CONFIG.min_level, num_classes=CONFIG.num_classes,
        data_format="channels_last", box_loss_weight=loss_config.box_loss_weight,
        iou_loss_type=loss_config.iou_loss_type, iou_loss_weight=loss_config.iou_loss_weight))
    cls_tf = [tf.Variable(c.permute(0, 2, 3, 1).numpy()) for c in cls_out]
    box_tf = [tf.Variable(b.permute(0, 2, 3, 1).numpy()) for b in box_out]
    values = {}
    with tf.GradientTape() as tape:
        total = train_lib.EfficientDetNetTrain._detection_loss(
            stand_in, cls_tf, box_tf, labels, values)
    grads = tape.gradient(total, cls_tf + box_tf)
    values = {k: float(v) for k, v in values.items()}
    return values, [g.numpy() for g in grads]


@pytest.mark.parametrize("loss_config", [
    LossConfig(),
    LossConfig(label_smoothing=0.1, alpha=0.3, gamma=2.0, delta=0.05),
    LossConfig(iou_loss_type="iou"),
    LossConfig(iou_loss_type="giou"),
    LossConfig(iou_loss_type="diou", iou_loss_weight=0.5),
    LossConfig(iou_loss_type="ciou"),
], ids=["default", "smoothing", "iou", "giou", "diou", "ciou"])
def test_losses_and_output_gradients_equal_automls(automl, loss_config):
    cls_targets, box_targets, num_positives, labels, cls_out, box_out = _batch(automl)
    theirs, their_grads = _automl_loss(automl, loss_config, labels, cls_out, box_out)
    cls_out = [c.clone().requires_grad_() for c in cls_out]
    box_out = [b.clone().requires_grad_() for b in box_out]
    ours = detection_loss(cls_out, box_out, cls_targets, box_targets, num_positives, loss_config,
                          torch.from_numpy(anchor_boxes_yxyx(CONFIG)).float())
    ours.total.backward()
    pairs = {"cls_loss": ours.cls, "box_loss": ours.box, "det_loss": ours.total}
    if loss_config.iou_loss_type:
        pairs["box_iou_loss"] = ours.box_iou
    for name, value in pairs.items():
        assert value.item() == pytest.approx(theirs[name], rel=LOSS_RTOL, abs=1e-7), name
    for ours_grad, their_grad in zip([t.grad for t in cls_out + box_out], their_grads):
        ours_nhwc = ours_grad.permute(0, 2, 3, 1).numpy()
        scale = np.abs(their_grad).max()
        np.testing.assert_allclose(ours_nhwc, their_grad, rtol=0, atol=LOSS_RTOL * scale)


# --- one whole training step ---------------------------------------------------------------------

STEP_CONFIG = get_config("efficientdet-d0", image_size=128)   # 90 classes, as the synth checkpoint
STEP_LR = 0.01
# The two networks' float32 forward passes differ by ~1e-6 of scale (README, parity table);
# through BN in train mode and the backward pass the weight updates agree to this fraction of
# each variable's largest update.
STEP_RTOL = 1e-3
STEP_ATOL = 1e-9
STEP_ULPS = 4


def _step_batch(seed: int = 0):
    """Two random normalised images with boxes, labelled by automl's labeler (both layouts)."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((2, 128, 128, 3)).astype(np.float32)
    boxes = [np.array([[10, 20, 60, 90], [70, 30, 120, 70]], np.float32),
             np.array([[5, 5, 100, 60]], np.float32)]
    classes = [np.array([3, 17], np.float32), np.array([90], np.float32)]
    return images, boxes, classes


def _automl_step(automl, prefix: Path, images, boxes, classes, model_dir: Path):
    from verify.tf_live import _automl_config, _import_automl
    tf, train_lib = automl.tf, automl.train_lib
    modules = _import_automl(EFFDET_DIR)
    tf.keras.backend.clear_session()
    tf_config = _automl_config(modules, STEP_CONFIG)
    tf_config.model_dir = str(model_dir)
    model = train_lib.EfficientDetNetTrain(config=tf_config)
    model.build((2, 128, 128, 3))
    modules.util_keras.restore_ckpt(model, str(prefix), ema_decay=0, skip_mismatch=False)
    none = tf.keras.losses.Reduction.NONE
    model.compile(optimizer=tf.keras.optimizers.SGD(STEP_LR, momentum=0.9), loss={
        "FocalLoss": train_lib.FocalLoss(0.25, 1.5, label_smoothing=0.0, reduction=none),
        "BoxLoss": train_lib.BoxLoss(0.1, reduction=none)})
    labeler = automl.anchors.AnchorLabeler(_automl_anchors(automl, STEP_CONFIG), 90)
    targets = [labeler.label_anchors(tf.constant(b), tf.constant(c.reshape(-1, 1)))
               for b, c in zip(boxes, classes)]
    labels = {"mean_num_positives": tf.fill([2, 1], tf.reduce_mean(tf.stack(
        [t[2] for t in targets])))}
    for level in range(STEP_CONFIG.min_level, STEP_CONFIG.max_level + 1):
        labels[f"cls_targets_{level}"] = tf.stack([t[0][level] for t in targets])
        labels[f"box_targets_{level}"] = tf.stack([t[1][level] for t in targets])
    before = {v.name[:-2]: v.numpy() for v in model.variables}
    values = model.train_step((tf.constant(images), labels))
    after = {v.name[:-2]: v.numpy() for v in model.variables}
    return before, after, {k: float(v) for k, v in values.items()}


def test_one_training_step_moves_the_weights_as_automls(automl, tmp_path):
    from converter.convert import convert_checkpoint
    from converter.readers import read_checkpoint
    from mappings.layouts import to_torch
    from mappings.table import table_for
    from model import EfficientDet
    from tests.helpers import synth_checkpoint
    from train.config import TrainConfig
    from train.loop import train_step
    from train.step import KerasSGD, select_parameters

    prefix = synth_checkpoint("efficientdet-d0", tmp_path, ema=False, optimizer=False)
    images, boxes, classes = _step_batch()
    before_tf, after_tf, values_tf = _automl_step(automl, prefix, images, boxes, classes,
                                                  tmp_path / "model_dir")

    state_dict, _ = convert_checkpoint(read_checkpoint(prefix), STEP_CONFIG, use_ema=False)
    model = EfficientDet(STEP_CONFIG)
    model.load_state_dict(state_dict)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trained, decayed = select_parameters(model, None)
    optimizer = KerasSGD([p for _, p in trained], lr=STEP_LR, momentum=0.9)
    labeler = AnchorLabeler(torch.from_numpy(anchor_boxes_yxyx(STEP_CONFIG)))
    targets = [labeler.label_anchors(torch.from_numpy(b), torch.from_numpy(c))
               for b, c in zip(boxes, classes)]
    batch = (torch.from_numpy(images).permute(0, 3, 1, 2),
             torch.stack([t.cls_targets for t in targets]),
             torch.stack([t.box_targets for t in targets]),
             torch.stack([t.num_positives for t in targets]))
    values, reg, finite = train_step(model, batch, [p for _, p in trained],
                                     [p for _, p in decayed], optimizer,
                                     torch.amp.GradScaler("cuda", enabled=False),
                                     TrainConfig(), use_amp=False)
    assert finite
    for name, ours in (("det_loss", values.total), ("cls_loss", values.cls),
                       ("box_loss", values.box), ("reg_l2_loss", reg)):
        assert ours.item() == pytest.approx(values_tf[name], rel=1e-4), name
    after = model.state_dict()
    worst = 0.0
    for entry in table_for(STEP_CONFIG):
        moved_tf = to_torch(np.asarray(after_tf[entry.tf_name] - before_tf[entry.tf_name]),
                            entry.layout)
        moved = (after[entry.pt_name] - before[entry.pt_name]).to(torch.float32)
        scale = float(moved_tf.abs().max())
        error = float((moved - moved_tf).abs().max())
        # Updates are differences of float32 weights: a few ulps of the weights themselves;
        # biases in front of a BN get a zero gradient in exact arithmetic (TF: 0, here ~1e-12).
        ulps = STEP_ULPS * float(np.finfo(np.float32).eps) * float(before[entry.pt_name].abs().max())
        assert error <= STEP_RTOL * scale + ulps + STEP_ATOL, (entry.pt_name, error, scale)
        if scale > 1e3 * ulps:      # updates well above the weights' rounding
            worst = max(worst, error / scale)
    print(f"worst update error / update scale: {worst:.2e}; losses "
          f"{[(k, round(values_tf[k], 6)) for k in ('det_loss', 'cls_loss', 'box_loss', 'reg_l2_loss')]} "
          f"vs {[round(v.item(), 6) for v in (values.total, values.cls, values.box, reg)]}")
    assert worst > 0   # the comparison saw real updates
