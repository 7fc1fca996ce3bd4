"""automl's detection loss: focal class loss, Huber box loss, optional IoU box loss.

Ports of automl ``tf2/train_lib.py`` (``FocalLoss``, ``BoxLoss``, ``BoxIouLoss``,
``EfficientDetNetTrain._detection_loss``) and ``iou_utils.py`` @ 6a54c87, with the same
arithmetic order so float32 values agree with TF:

* normaliser: ``sum over the batch of num_positives + 1`` (automl sums the batch mean tiled
  ``batch`` times: that is what is computed here);
* class loss: ``alpha_t * (1 - p_t) ** gamma * CE(smoothed labels, logits) / normaliser``, summed
  over every anchor and class except those whose target is -2; ``p_t`` and ``alpha_t`` use the
  unsmoothed one-hot labels;
* box loss: Huber(delta) of each ``(ty, tx, th, tw)`` whose target is non-zero, summed and
  divided by ``4 * normaliser``;
* total: ``cls + box_loss_weight * box + iou_loss_weight * box_iou`` (IoU term only with
  ``iou_loss_type``). The L2 weight decay is added by the trainer (``train.step``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .box_coder import decode_boxes
from .loss_config import IOU_LOSS_TYPES, LossConfig

@dataclass(frozen=True)
class LossValues:
    total: Tensor      # cls + box_loss_weight * box + iou_loss_weight * box_iou
    cls: Tensor
    box: Tensor
    box_iou: Tensor    # 0 without iou_loss_type


# Port of tf.nn.sigmoid_cross_entropy_with_logits (its numerically stable form)
def sigmoid_cross_entropy(labels: Tensor, logits: Tensor) -> Tensor:
    """``max(x, 0) - x * z + log1p(exp(-|x|))``, elementwise, as TF evaluates it."""
    return torch.relu(logits) - logits * labels + torch.log1p(torch.exp(-logits.abs()))


# Port of automl efficientdet/tf2/train_lib.py::FocalLoss.call @ 6a54c87
def focal_loss(logits: Tensor, onehot: Tensor, normalizer: Tensor, config: LossConfig) -> Tensor:
    """Elementwise focal loss of ``logits`` against ``onehot`` labels (same shape)."""
    pred_prob = torch.sigmoid(logits)
    p_t = onehot * pred_prob + (1 - onehot) * (1 - pred_prob)
    alpha_factor = onehot * config.alpha + (1 - onehot) * (1 - config.alpha)
    modulating_factor = (1.0 - p_t) ** config.gamma
    smoothed = onehot * (1.0 - config.label_smoothing) + 0.5 * config.label_smoothing
    return alpha_factor * modulating_factor * sigmoid_cross_entropy(smoothed, logits) / normalizer


# Port of tf.keras.losses.Huber (reduction NONE over a trailing axis of 1)
def huber(error: Tensor, delta: float) -> Tensor:
    abs_error = error.abs()
    return torch.where(abs_error <= delta, 0.5 * error * error, delta * abs_error - 0.5 * delta ** 2)


# Port of automl efficientdet/tf2/train_lib.py::BoxLoss.call @ 6a54c87
def box_loss(box_outputs: Tensor, box_targets: Tensor, normalizer: Tensor, delta: float) -> Tensor:
    """Huber loss over the non-zero target coordinates, divided by ``4 * normalizer``."""
    mask = (box_targets != 0.0).to(box_outputs.dtype)
    loss = huber(box_outputs - box_targets, delta) * mask
    return loss.sum() / (normalizer * 4.0)


# Port of automl efficientdet/iou_utils.py::_iou_per_anchor @ 6a54c87
def iou_similarity(pred_yxyx: Tensor, target_yxyx: Tensor, iou_type: str) -> Tensor:
    """IoU / GIoU / DIoU / CIoU of matching boxes ``[..., 4]`` -> ``[...]``.

    automl's custom gradient for the CIoU aspect term ``v`` applies to the target box only
    (a constant here); towards the predictions TF differentiates ``v`` as written, as autograd
    does (the gradients agree with TF's, tests/test_train_automl_parity.py).
    """
    p_ymin, p_xmin, p_ymax, p_xmax = pred_yxyx.unbind(-1)
    t_ymin, t_xmin, t_ymax, t_xmax = target_yxyx.unbind(-1)
    p_width = (p_xmax - p_xmin).clamp(min=0.0)
    p_height = (p_ymax - p_ymin).clamp(min=0.0)
    t_width = (t_xmax - t_xmin).clamp(min=0.0)
    t_height = (t_ymax - t_ymin).clamp(min=0.0)
    p_area = p_width * p_height
    t_area = t_width * t_height
    intersect_width = (torch.minimum(p_xmax, t_xmax) - torch.maximum(p_xmin, t_xmin)).clamp(min=0.0)
    intersect_height = (torch.minimum(p_ymax, t_ymax) - torch.maximum(p_ymin, t_ymin)).clamp(min=0.0)
    intersect_area = intersect_width * intersect_height
    union_area = p_area + t_area - intersect_area
    iou = _divide_no_nan(intersect_area, union_area)
    if iou_type == "iou":
        return iou
    enclose_ymin, enclose_xmin = torch.minimum(p_ymin, t_ymin), torch.minimum(p_xmin, t_xmin)
    enclose_ymax, enclose_xmax = torch.maximum(p_ymax, t_ymax), torch.maximum(p_xmax, t_xmax)
    if iou_type == "giou":
        enclose_area = (enclose_xmax - enclose_xmin).clamp(min=0.0) * \
            (enclose_ymax - enclose_ymin).clamp(min=0.0)
        return iou - _divide_no_nan(enclose_area - union_area, enclose_area)
    centre_dy = (t_ymin + t_ymax) / 2 - (p_ymin + p_ymax) / 2
    centre_dx = (t_xmin + t_xmax) / 2 - (p_xmin + p_xmax) / 2
    euclidean = _norm(centre_dy, centre_dx)
    diag = _norm(enclose_ymax - enclose_ymin, enclose_xmax - enclose_xmin)
    diou = iou - _divide_no_nan(euclidean ** 2, diag ** 2)
    if iou_type == "diou":
        return diou
    arctan = torch.atan(_divide_no_nan(p_width, p_height)) - \
        torch.atan(_divide_no_nan(t_width, t_height))
    v = 4 * (arctan / math.pi) ** 2
    alpha = _divide_no_nan(v, (1 - iou) + v)
    return diou - alpha * v


def _norm(dy: Tensor, dx: Tensor) -> Tensor:
    """``tf.linalg.norm`` of ``(dy, dx)``; its gradient is 0 (not NaN) at the zero vector, as
    TF's is for the masked-out rows."""
    squares = dy * dy + dx * dx
    positive = squares > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, squares, 1.0)), 0.0)


def _divide_no_nan(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``tf.math.divide_no_nan``: 0 where the denominator is 0."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)


# Port of automl efficientdet/iou_utils.py::iou_loss @ 6a54c87 (one box per row)
def iou_loss(pred_yxyx: Tensor, target_yxyx: Tensor, iou_type: str) -> Tensor:
    """``1 - IoU-variant`` per row, 0 where the target box is empty."""
    t_ymin, t_xmin, t_ymax, t_xmax = target_yxyx.unbind(-1)
    mask = ((t_ymax > t_ymin) & (t_xmax > t_xmin)).to(target_yxyx.dtype)
    pred = pred_yxyx * mask[..., None]
    target = target_yxyx * mask[..., None]
    return mask * (1 - iou_similarity(pred, target, iou_type))


# Port of automl efficientdet/tf2/train_lib.py::BoxIouLoss.call @ 6a54c87
def box_iou_loss(box_outputs: list[Tensor], box_targets: list[Tensor], anchors_yxyx: Tensor,
                 normalizer: Tensor, iou_type: str) -> Tensor:
    """IoU loss of decoded boxes, summed and divided by ``4 * normalizer``.

    ``box_outputs`` / ``box_targets`` are per level ``[N, H_l, W_l, A * 4]``. automl flattens
    them level by level (level, batch, y, x, anchor) but tiles the anchors per image (batch,
    level, ...), so for a batch of more than one image row ``i`` is decoded with anchor
    ``i mod A_total``; this reproduces that pairing exactly.
    """
    outputs = torch.cat([v.reshape(-1, 4) for v in box_outputs])
    targets = torch.cat([v.reshape(-1, 4) for v in box_targets])
    anchors = anchors_yxyx.to(outputs).repeat(outputs.shape[0] // anchors_yxyx.shape[0], 1)
    mask = (targets != 0.0).to(outputs.dtype)
    decoded_outputs = decode_boxes(outputs, anchors) * mask
    decoded_targets = decode_boxes(targets, anchors) * mask
    return iou_loss(decoded_outputs, decoded_targets, iou_type).sum() / (normalizer * 4.0)


def _channels_last(output: Tensor) -> Tensor:
    """``[N, C, H, W]`` head output -> ``[N, H, W, C]`` (TF layout, channel = anchor * k + j)."""
    return output.permute(0, 2, 3, 1)


# Port of automl efficientdet/tf2/train_lib.py::EfficientDetNetTrain._detection_loss @ 6a54c87
def detection_loss(class_outputs: list[Tensor], box_outputs: list[Tensor],
                   cls_targets: dict[int, Tensor], box_targets: dict[int, Tensor],
                   num_positives: Tensor, config: LossConfig,
                   anchors_yxyx: Optional[Tensor] = None) -> LossValues:
    """automl's detection loss of one batch.

    Args:
        class_outputs, box_outputs: the model's per-level outputs, ``[N, A*C, H_l, W_l]`` and
            ``[N, A*4, H_l, W_l]``, levels min..max.
        cls_targets: ``{level: [N, H_l, W_l, A]}`` int class channels (-1 background, -2 masked),
            from :func:`model.anchor_labeler.cls_per_level`.
        box_targets: ``{level: [N, H_l, W_l, A * 4]}`` float (``box_per_level``).
        num_positives: ``[N]`` positives per image.
        anchors_yxyx: ``[A_total, 4]`` anchors; needed only with ``config.iou_loss_type``.
    """
    dtype = class_outputs[0].dtype
    batch = num_positives.shape[0]
    normalizer = (num_positives.to(torch.float32).mean().expand(batch).sum() + 1.0).to(dtype)
    levels = sorted(cls_targets)
    if len(levels) != len(class_outputs):
        raise ValueError(f"{len(class_outputs)} output levels but targets for levels {levels}")
    cls_losses, box_losses, box_outputs_nhwc = [], [], []
    for level, cls_out, box_out in zip(levels, class_outputs, box_outputs):
        logits = _channels_last(cls_out)
        targets = cls_targets[level].to(logits.device)
        num_classes = logits.shape[-1] // targets.shape[-1]
        onehot = torch.nn.functional.one_hot(targets.clamp(min=0), num_classes).to(dtype)
        onehot = onehot * (targets >= 0).to(dtype)[..., None]     # tf.one_hot(-1 / -2) = zeros
        loss = focal_loss(logits, onehot.reshape(logits.shape), normalizer, config)
        loss = loss.reshape(onehot.shape) * (targets != -2).to(dtype)[..., None]
        cls_losses.append(loss.sum())
        box_nhwc = _channels_last(box_out)
        box_outputs_nhwc.append(box_nhwc)
        if config.box_loss_weight:
            box_losses.append(box_loss(box_nhwc, box_targets[level].to(box_nhwc), normalizer,
                                       config.delta))
    zero = class_outputs[0].new_zeros(())
    cls = torch.stack(cls_losses).sum()
    box = torch.stack(box_losses).sum() if box_losses else zero
    box_iou = zero
    if config.iou_loss_type:
        if anchors_yxyx is None:
            raise ValueError("iou_loss_type needs the anchors")
        box_iou = box_iou_loss(box_outputs_nhwc, [box_targets[level] for level in levels],
                               anchors_yxyx, normalizer, config.iou_loss_type)
    total = cls + config.box_loss_weight * box + config.iou_loss_weight * box_iou
    return LossValues(total, cls, box, box_iou)
