"""Training targets per anchor, as automl's ``AnchorLabeler`` assigns them.

automl (``tf2/anchors.py::AnchorLabeler`` @ 6a54c87) composes three object_detection pieces:
IoU similarity (``region_similarity_calculator.IouSimilarity``), an argmax matcher with
``matched_threshold = unmatched_threshold = 0.5``, ``negatives_lower_than_unmatched=True`` and
``force_match_for_each_row=True``, and the Faster R-CNN box coder without scale factors.

Targets are flat over all anchors in :func:`model.anchors.anchor_boxes_yxyx` order (level, y, x,
anchor); :func:`cls_per_level` / :func:`box_per_level` reshape them into automl's per-level ``[H_l, W_l, A * k]`` maps.

* class target: the matched box's 1-based class minus 1 (a channel index of the class head);
  ``-1`` for unmatched and ignored anchors (automl gives both the unmatched class 0, minus 1).
  A ground-truth class of ``-1`` yields ``-2``, which the class loss masks out.
* box target: ``(ty, tx, th, tw)`` of the matched box; zeros elsewhere.
* ``num_positives``: anchors whose match is not -1 (automl counts ignored anchors too; with
  equal thresholds there are none).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .box_coder import encode_boxes
from .config import DetConfig
from .fpn_config import feat_sizes

UNMATCHED = -1
IGNORED = -2
MATCH_THRESHOLD = 0.5   # AnchorLabeler(match_threshold=0.5), used for both thresholds


@dataclass(frozen=True)
class AnchorTargets:
    """Targets of one image over all ``A_total`` anchors (flat, anchor order)."""

    cls_targets: Tensor     # [A_total] int64: class channel, -1 background, -2 not trained
    box_targets: Tensor     # [A_total, 4] float32 (ty, tx, th, tw); zeros off positives
    num_positives: Tensor   # [] float32


# Port of automl efficientdet/object_detection/region_similarity_calculator.py::iou @ 6a54c87
def iou_matrix(boxes1_yxyx: Tensor, boxes2_yxyx: Tensor) -> Tensor:
    """Pairwise IoU ``[N, M]`` of ``[N, 4]`` and ``[M, 4]`` boxes; 0 where they do not overlap."""
    ymin1, xmin1, ymax1, xmax1 = boxes1_yxyx[:, None].unbind(-1)
    ymin2, xmin2, ymax2, xmax2 = boxes2_yxyx[None].unbind(-1)
    heights = (torch.minimum(ymax1, ymax2) - torch.maximum(ymin1, ymin2)).clamp(min=0.0)
    widths = (torch.minimum(xmax1, xmax2) - torch.maximum(xmin1, xmin2)).clamp(min=0.0)
    intersections = heights * widths
    areas1 = (ymax1 - ymin1) * (xmax1 - xmin1)
    areas2 = (ymax2 - ymin2) * (xmax2 - xmin2)
    unions = areas1 + areas2 - intersections
    return torch.where(intersections == 0.0, torch.zeros_like(intersections),
                       intersections / unions)


# Port of automl efficientdet/object_detection/argmax_matcher.py::ArgMaxMatcher._match @ 6a54c87
def argmax_match(similarity: Tensor, matched_threshold: float = MATCH_THRESHOLD,
                 unmatched_threshold: float = MATCH_THRESHOLD,
                 force_match_for_each_row: bool = True) -> Tensor:
    """For each column (anchor) of ``similarity [N, M]`` the matched row (box), or -1 / -2.

    Columns whose best similarity is below ``unmatched_threshold`` are unmatched (-1); between
    the thresholds, ignored (-2) (``negatives_lower_than_unmatched=True``). With
    ``force_match_for_each_row`` every row's best column is matched to that row whatever its
    similarity; when several rows pick the same column the lowest row index wins (TF argmax).
    """
    if unmatched_threshold > matched_threshold:
        raise ValueError("unmatched_threshold must not exceed matched_threshold")
    num_rows, num_columns = similarity.shape
    if num_rows == 0:
        return torch.full((num_columns,), UNMATCHED, dtype=torch.int64, device=similarity.device)
    matched_vals, matches = similarity.max(dim=0)
    matches = torch.where(matched_vals < unmatched_threshold,
                          torch.full_like(matches, UNMATCHED), matches)
    between = (matched_vals >= unmatched_threshold) & (matched_vals < matched_threshold)
    matches = torch.where(between, torch.full_like(matches, IGNORED), matches)
    if force_match_for_each_row:
        best_columns = similarity.argmax(dim=1)                                  # [N]
        forced_row = torch.full_like(matches, num_rows)
        rows = torch.arange(num_rows, device=similarity.device)
        forced_row = forced_row.scatter_reduce(0, best_columns, rows, reduce="amin")
        matches = torch.where(forced_row < num_rows, forced_row, matches)
    return matches


class AnchorLabeler:
    """automl's ``AnchorLabeler`` for one config's anchors."""

    def __init__(self, anchors_yxyx: Tensor, match_threshold: float = MATCH_THRESHOLD):
        self.anchors_yxyx = anchors_yxyx.to(torch.float32)
        self.match_threshold = match_threshold

    # Port of automl efficientdet/tf2/anchors.py::AnchorLabeler.label_anchors @ 6a54c87
    # (target_assigner.TargetAssigner.assign with its default weights)
    def label_anchors(self, gt_boxes_yxyx: Tensor, gt_classes: Tensor) -> AnchorTargets:
        """Targets for one image.

        Args:
            gt_boxes_yxyx: ``[N, 4]`` boxes in network-input pixels (after resize and crop).
            gt_classes: ``[N]`` 1-based classes (``-1`` marks a box whose anchors are not trained).
        """
        anchors = self.anchors_yxyx.to(gt_boxes_yxyx.device)
        gt_boxes = gt_boxes_yxyx.to(torch.float32).reshape(-1, 4)
        gt_classes = gt_classes.reshape(-1).to(torch.float32)
        matches = argmax_match(iou_matrix(gt_boxes, anchors), self.match_threshold,
                               self.match_threshold)
        matched = matches >= 0
        index = matches.clamp(min=0)
        if gt_boxes.shape[0] == 0:
            box_targets = torch.zeros_like(anchors)
            cls_targets = torch.full_like(matches, UNMATCHED)
        else:
            box_targets = torch.where(matched[:, None], encode_boxes(gt_boxes[index], anchors),
                                      torch.zeros_like(anchors))
            classes = torch.where(matched, gt_classes[index], torch.zeros_like(gt_classes[index]))
            cls_targets = (classes - 1).to(torch.int64)
        num_positives = (matches != UNMATCHED).to(torch.float32).sum()
        return AnchorTargets(cls_targets, box_targets, num_positives)


def cls_per_level(cls_targets: Tensor, config: DetConfig) -> dict[int, Tensor]:
    """``[..., A_total]`` class targets -> ``{level: [..., H_l, W_l, A]}`` (automl's
    ``cls_targets_%d``)."""
    return _split_levels(cls_targets, config, trailing=0)


def box_per_level(box_targets: Tensor, config: DetConfig) -> dict[int, Tensor]:
    """``[..., A_total, 4]`` box targets -> ``{level: [..., H_l, W_l, A * 4]}`` (automl's
    ``box_targets_%d``)."""
    return _split_levels(box_targets, config, trailing=1)


def _split_levels(flat: Tensor, config: DetConfig, trailing: int) -> dict[int, Tensor]:
    sizes = feat_sizes(config.image_size, config.max_level)
    anchor_dim = flat.ndim - 1 - trailing
    lead = flat.shape[:anchor_dim]
    out, start = {}, 0
    for level in range(config.min_level, config.max_level + 1):
        height, width = sizes[level]
        count = height * width * config.num_anchors
        chunk = flat.narrow(anchor_dim, start, count)
        out[level] = chunk.reshape(*lead, height, width, -1)
        start += count
    return out
