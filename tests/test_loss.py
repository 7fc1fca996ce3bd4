"""Anchor labeler, losses and training-step pieces on small hand-computed cases (no TF).

tests/test_train_automl_parity.py checks the same functions against automl itself.
"""
from __future__ import annotations

import math

import pytest
import torch

from model.anchor_labeler import (AnchorLabeler, argmax_match, box_per_level, cls_per_level,
                                  iou_matrix)
from model.anchors import anchor_boxes_yxyx
from model.box_coder import decode_boxes, encode_boxes
from model.config import get_config
from model.loss import LossConfig, detection_loss, focal_loss, huber, iou_loss
from train.config import TrainConfig
from train.ema import ModelEma
from train.schedule import LrSchedule
from train.step import KerasSGD, clip_gradients, l2_regularization

SMALL = get_config("efficientdet-lite0", image_size=64, num_classes=3)


def test_iou_matrix_by_hand():
    boxes = torch.tensor([[0.0, 0, 10, 10]])
    others = torch.tensor([[5.0, 5, 15, 15], [20.0, 20, 30, 30], [0.0, 0, 10, 10]])
    torch.testing.assert_close(iou_matrix(boxes, others), torch.tensor([[25 / 175, 0.0, 1.0]]))


def test_argmax_match_thresholds_force_match_and_ties():
    similarity = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.2, 0.55, 0.1, 0.0]])
    assert argmax_match(similarity).tolist() == [0, 1, -1, -1]
    # Between the thresholds: ignored (-2); below the unmatched one: -1.
    assert argmax_match(similarity, 0.7, 0.4, force_match_for_each_row=False).tolist() \
        == [-2, -2, -1, -1]
    # A box below every threshold still gets its best anchor; two boxes wanting the same
    # anchor: the first box wins (TF argmax), the second keeps no anchor.
    weak = torch.tensor([[0.1, 0.3, 0.05], [0.0, 0.2, 0.1]])
    assert argmax_match(weak).tolist() == [-1, 0, -1]
    assert argmax_match(weak, force_match_for_each_row=False).tolist() == [-1, -1, -1]
    assert argmax_match(torch.zeros(0, 3)).tolist() == [-1, -1, -1]


def test_encode_inverts_decode():
    anchors = torch.tensor([[0.0, 0, 16, 32], [10.0, 10, 20, 20]])
    boxes = torch.tensor([[2.0, 4, 18, 30], [0.0, 5, 30, 25]])
    codes = encode_boxes(boxes, anchors)
    # By hand for the first: centres (10, 17) vs (8, 16), sizes 16x26 vs 16x32.
    torch.testing.assert_close(codes[0], torch.tensor([2 / 16, 1 / 32, 0.0, math.log(26 / 32)]))
    torch.testing.assert_close(decode_boxes(codes, anchors), boxes)


def test_labeler_marks_the_matching_anchor_and_counts_positives():
    anchors = torch.from_numpy(anchor_boxes_yxyx(SMALL)).float()
    target = anchors[5] + torch.tensor([1.0, -1.0, 1.0, -1.0])   # IoU with anchor 5 near 1
    targets = AnchorLabeler(anchors).label_anchors(target[None], torch.tensor([3]))
    positives = (targets.cls_targets >= 0).nonzero().flatten().tolist()
    assert 5 in positives
    assert targets.cls_targets[5] == 2                           # 1-based class 3 -> channel 2
    assert float(targets.num_positives) == len(positives)
    assert set(targets.cls_targets.unique().tolist()) == {-1, 2}
    torch.testing.assert_close(targets.box_targets[5], encode_boxes(target, anchors[5]))
    off = targets.cls_targets < 0
    assert torch.all(targets.box_targets[off] == 0)
    empty = AnchorLabeler(anchors).label_anchors(torch.zeros(0, 4), torch.zeros(0))
    assert float(empty.num_positives) == 0 and torch.all(empty.cls_targets == -1)


def test_per_level_layout_is_level_y_x_anchor():
    total = anchor_boxes_yxyx(SMALL).shape[0]
    cls = cls_per_level(torch.arange(total)[None], SMALL)
    box = box_per_level(torch.arange(total * 4.0).reshape(1, total, 4), SMALL)
    assert list(cls) == list(range(3, 8))
    assert cls[3].shape == (1, 8, 8, 9) and box[3].shape == (1, 8, 8, 36)
    assert cls[3][0, 0, 1, 0] == 9                      # next x position, first anchor
    assert cls[4][0, 0, 0, 0] == 8 * 8 * 9              # level 4 starts after level 3
    assert box[3][0, 0, 0, 4:8].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_focal_loss_by_hand():
    config = LossConfig(alpha=0.25, gamma=1.5)
    value = focal_loss(torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor(2.0),
                       config)
    expected_pos = 0.25 * 0.5 ** 1.5 * math.log(2) / 2
    expected_neg = 0.75 * 0.5 ** 1.5 * math.log(2) / 2
    torch.testing.assert_close(value, torch.tensor([expected_pos, expected_neg]))
    # Label smoothing changes the cross-entropy's label, not alpha_t or (1 - p_t) ** gamma.
    smoothed = focal_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor(1.0),
                          LossConfig(label_smoothing=0.2))
    p = 1 / (1 + math.exp(-2.0))
    ce = -(0.9 * math.log(p) + 0.1 * math.log(1 - p))
    torch.testing.assert_close(smoothed, torch.tensor([0.25 * (1 - p) ** 1.5 * ce]))
    # Large logits stay finite (the stable cross-entropy form).
    assert torch.isfinite(focal_loss(torch.tensor([-200.0, 200.0]), torch.tensor([1.0, 0.0]),
                                     torch.tensor(1.0), config)).all()


def test_huber_by_hand():
    torch.testing.assert_close(huber(torch.tensor([0.05, -0.3]), 0.1),
                               torch.tensor([0.5 * 0.05 ** 2, 0.1 * 0.3 - 0.5 * 0.1 ** 2]))


def _one_level_outputs(logit: float, box: float, classes: int = 2):
    """One level of 1x1 cells with one anchor: NCHW outputs for a batch of one."""
    cls_out = torch.full((1, classes, 1, 1), logit)
    box_out = torch.full((1, 4, 1, 1), box)
    return [cls_out], [box_out]


def test_detection_loss_normalises_by_positives_plus_one_and_masks():
    cls_out, box_out = _one_level_outputs(0.0, 0.2)
    box_targets = {3: torch.tensor([[[[0.1, 0.0, 0.1, 0.1]]]])}
    config = LossConfig()
    values = detection_loss(cls_out, box_out, {3: torch.tensor([[[[1]]]])}, box_targets,
                            torch.tensor([1.0]), config)
    normalizer = 2.0                                             # 1 positive + 1
    pos = 0.25 * 0.5 ** 1.5 * math.log(2)
    neg = 0.75 * 0.5 ** 1.5 * math.log(2)
    torch.testing.assert_close(values.cls, torch.tensor((pos + neg) / normalizer))
    # The zero target coordinate is masked; three Huber terms of error 0.1.
    torch.testing.assert_close(values.box, torch.tensor(3 * 0.5 * 0.01 / (4 * normalizer)))
    torch.testing.assert_close(values.total, values.cls + 50.0 * values.box)
    ignored = detection_loss(cls_out, box_out, {3: torch.tensor([[[[-2]]]])},
                             {3: torch.zeros(1, 1, 1, 4)}, torch.tensor([0.0]), config)
    assert float(ignored.total) == 0.0
    background = detection_loss(cls_out, box_out, {3: torch.tensor([[[[-1]]]])},
                                {3: torch.zeros(1, 1, 1, 4)}, torch.tensor([0.0]), config)
    torch.testing.assert_close(background.cls, torch.tensor(2 * neg))


@pytest.mark.parametrize("iou_type", ["iou", "giou", "diou", "ciou"])
def test_iou_losses_by_hand(iou_type):
    box = torch.tensor([[0.0, 0, 10, 10]])
    assert float(iou_loss(box, box, iou_type)) == pytest.approx(0.0, abs=1e-6)
    half = torch.tensor([[0.0, 5, 10, 15]])                      # IoU 50 / 150
    expected = {"iou": 1 - 1 / 3, "giou": 1 - 1 / 3,  # enclosing box == union
                "diou": 1 - 1 / 3 + 25 / 325, "ciou": 1 - 1 / 3 + 25 / 325}[iou_type]
    assert float(iou_loss(half, box, iou_type)) == pytest.approx(expected, rel=1e-5)
    assert float(iou_loss(half, torch.zeros(1, 4), iou_type)) == 0.0   # empty target: masked


def test_cosine_schedule_warms_up_then_follows_automls_formula():
    config = TrainConfig(batch_size=8, num_epochs=10, learning_rate=0.08, lr_warmup_init=0.008)
    schedule = LrSchedule.from_config(config, steps_per_epoch=4)
    assert schedule.adjusted_lr == pytest.approx(0.01)           # 0.08 * 8 / 64
    assert schedule(0) == pytest.approx(0.008)
    assert schedule(2) == pytest.approx(0.008 + 0.5 * (0.01 - 0.008))
    # automl divides the whole step count by (total - warm-up): cos(pi * 4 / 36).
    assert schedule(4) == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * 4 / 36)))
    stepwise = LrSchedule.from_config(config.replace(lr_decay_method="stepwise",
                                                     first_lr_drop_epoch=5,
                                                     second_lr_drop_epoch=8), 4)
    assert [stepwise(s) for s in (4, 20, 32)] == pytest.approx([0.01, 0.001, 0.0001])


def test_clipping_per_tensor_then_global():
    grads = [torch.tensor([30.0, 40.0]), torch.tensor([3.0, 4.0])]
    clipped = clip_gradients(grads, 10.0)
    # First: 50 -> 10 (direction kept); second: 5 stays; global sqrt(125) -> 10.
    scale = 10.0 / math.sqrt(125.0)
    torch.testing.assert_close(clipped[0], torch.tensor([6.0, 8.0]) * scale)
    torch.testing.assert_close(clipped[1], torch.tensor([3.0, 4.0]) * scale)


def test_l2_regularization_is_half_sum_of_squares():
    assert float(l2_regularization([torch.tensor([1.0, 2.0]), torch.tensor([3.0])], 0.1)) \
        == pytest.approx(0.1 * (1 + 4 + 9) / 2)


def test_keras_sgd_puts_the_learning_rate_into_the_velocity():
    param = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = KerasSGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.tensor([1.0])
    optimizer.step()                                             # m = -0.1
    assert param.item() == pytest.approx(0.9)
    optimizer.param_groups[0]["lr"] = 0.5
    optimizer.step()                                             # m = 0.9 * -0.1 - 0.5
    assert param.item() == pytest.approx(0.9 - 0.59)


def test_ema_uses_tfa_dynamic_decay():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = ModelEma(model, decay=0.9998, trained_names={"weight"})
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)                                            # decay min(0.9998, 1/10)
    assert float(ema.module.weight) == pytest.approx(0.9)
    ema.update(model)                                            # decay 2/11
    assert float(ema.module.weight) == pytest.approx(0.9 + 0.1 * (1 - 2 / 11))
