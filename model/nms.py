"""The two NMS flavours automl's post-processing uses, as vectorised PyTorch.

* :func:`non_max_suppression_v5` / :func:`batched_non_max_suppression_v5`: TensorFlow's
  ``tf.raw_ops.NonMaxSuppressionV5`` (the ``global`` and ``per_class`` paths). Boxes in any corner order
  (``yxyx`` in automl), plain IoU (no +1). Soft-NMS when ``soft_nms_sigma > 0``: every lower-scored
  candidate is re-scored by ``exp(-iou^2 / (2 * soft_nms_sigma))`` at *any* IoU (``iou_threshold`` is
  ignored), greedily on the decayed scores, and dropped once its score is ``<= score_threshold``.
  Hard NMS when ``soft_nms_sigma == 0``: candidates with IoU ``> iou_threshold`` are removed. Only
  scores ``> score_threshold`` are candidates; ties go to the lower index.
* :func:`nms_np` / :func:`batched_nms_np`: automl's numpy ``nms_np.nms`` (the ``pyfunc`` path).
  Boxes ``[x1, y1, x2, y2]`` with the +1 pixel convention; ``gaussian`` (``exp(-iou^2 / sigma)``),
  ``linear`` (``1 - iou`` above ``iou_thresh``), ``hard`` and ``diou``; soft methods keep a box while its
  score is ``>= score_thresh`` and emulate numpy's row swapping so ties resolve as numpy's do.

All functions run the greedy loop for many independent groups at once (one group per class and/or
image): each step selects one box per group, so per-class NMS costs as many steps as the largest
group selects, not the sum over classes. Arithmetic is float32 in the reference's operation order.

Measured against the references (tests/test_nms.py; 80 random sets of 50..49104 boxes for TF,
41k kept boxes for automl's nms_np):

* TF: identical selections (indices and order) for soft and hard NMS. TF re-scores lazily (a
  candidate multiplies the weights of the boxes selected since it was last popped, newest first);
  this module multiplies them eagerly in selection order, so a product of several weights can
  differ in the last bits: ~35% of soft-NMS scores differ by 1..6 ulp (<= 7.2e-7 relative). Hard-NMS
  output is bit-identical. The weight's ``exp`` is rounded from float64, which is what TF's C ``expf``
  returns (a lazy float32 re-implementation with this ``exp`` is bit-identical to TF).
* nms_np: bit-identical indices, order and scores for all four methods, including exact score ties,
  because the two numpy primitives that define automl's results are evaluated by numpy itself:
  the float32 ``np.exp`` of the gaussian weight (numpy's SIMD exp, up to 2 ulp from correctly
  rounded; ``torch.exp`` would change 14% of the scores by up to 19 ulp) and the unstable
  ``np.argsort`` of hard/diou NMS. These run on the CPU (a host round trip per step on CUDA).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

# The pyfunc methods automl's nms_np.nms dispatches on ('' / None also mean hard).
NP_METHODS = ("hard", "diou", "linear", "gaussian")


def iou_tf(boxes_a: Tensor, boxes_b: Tensor) -> Tensor:
    """Element-wise IoU of broadcastable ``[..., 4]`` boxes as TF's NMS kernel computes it.

    Corners are re-ordered with min/max (so ``yxyx`` and ``xyxy`` give the same value), areas use no
    +1, and a box with non-positive area has IoU 0 with everything. float32 in, float32 out.
    """
    return _iou_geometry(*box_geometry(boxes_a), *box_geometry(boxes_b))


def box_geometry(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(lo [..., 2], hi [..., 2], area [...])`` of ``[..., 4]`` boxes as :func:`iou_tf` uses them
    (computed once per candidate where the NMS loop compares one pick with many rows)."""
    lo = torch.minimum(boxes[..., :2], boxes[..., 2:])
    hi = torch.maximum(boxes[..., :2], boxes[..., 2:])
    return lo, hi, (hi[..., 0] - lo[..., 0]) * (hi[..., 1] - lo[..., 1])


def _iou_geometry(lo_a: Tensor, hi_a: Tensor, area_a: Tensor, lo_b: Tensor, hi_b: Tensor,
                  area_b: Tensor) -> Tensor:
    extent = (torch.minimum(hi_a, hi_b) - torch.maximum(lo_a, lo_b)).clamp(min=0.0)
    intersection = extent[..., 0] * extent[..., 1]
    iou = intersection / (area_a + area_b - intersection)
    return torch.where((area_a <= 0) | (area_b <= 0), torch.zeros_like(iou), iou)


def iou_np(boxes_a: Tensor, boxes_b: Tensor, areas_a: Tensor, areas_b: Tensor) -> Tensor:
    """Element-wise IoU of ``[x1, y1, x2, y2]`` boxes with automl nms_np's +1 pixel convention.

    ``areas_*`` are ``(x2 - x1 + 1) * (y2 - y1 + 1)`` (precomputed, as nms_np does).
    """
    extent = (torch.minimum(boxes_a[..., 2:], boxes_b[..., 2:])
              - torch.maximum(boxes_a[..., :2], boxes_b[..., :2]) + 1).clamp(min=0.0)
    intersection = extent[..., 0] * extent[..., 1]
    return intersection / (areas_a + areas_b - intersection)


def _areas_np(boxes_xyxy: Tensor) -> Tensor:
    return (boxes_xyxy[:, 2] - boxes_xyxy[:, 0] + 1) * (boxes_xyxy[:, 3] - boxes_xyxy[:, 1] + 1)


def _exp_f32(x: Tensor) -> Tensor:
    """float32 exp rounded from float64 (matches a correctly rounded C ``expf``)."""
    return torch.exp(x.double()).to(x.dtype)


def _check_inputs(boxes: Tensor, scores: Tensor, groups: Tensor | None) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must be [N] with N={boxes.shape[0]}, got {tuple(scores.shape)}")
    if groups is not None and groups.shape != scores.shape:
        raise ValueError(f"groups must be [N], got {tuple(groups.shape)}")


def _group_argbest(key: Tensor, valid: Tensor, groups: Tensor, num_groups: int,
                   order: Tensor) -> Tensor:
    """Per group, the row with the largest ``key`` among ``valid`` rows, ties to the smallest
    ``order``; ``len(key)`` (a sentinel) for groups without valid rows. Returns ``[num_groups]``."""
    n = key.numel()
    masked = torch.where(valid, key, torch.full_like(key, -math.inf))
    if num_groups == 1:    # same result with fewer ops (the global path's one group per image)
        chosen = valid & (masked == masked.max())
        sentinel = torch.iinfo(torch.int64).max
        first = torch.where(chosen, order, torch.full_like(order, sentinel)).argmin()
        return torch.where(chosen.any(), first, torch.full_like(first, n)).reshape(1)
    best = torch.full((num_groups,), -math.inf, dtype=key.dtype, device=key.device)
    best = best.scatter_reduce(0, groups, masked, "amax")
    is_best = valid & (masked == best[groups])
    sentinel = torch.iinfo(torch.int64).max
    best_order = torch.full((num_groups,), sentinel, dtype=torch.int64, device=key.device)
    best_order = best_order.scatter_reduce(
        0, groups, torch.where(is_best, order, torch.full_like(order, sentinel)), "amin")
    rows = torch.arange(n, device=key.device)
    chosen = is_best & (order == best_order[groups])
    pick = torch.full((num_groups,), n, dtype=torch.int64, device=key.device)
    chosen_rows = torch.where(chosen, rows, torch.full_like(rows, n))
    return pick.scatter_reduce(0, groups, chosen_rows, "amin")


# Port of TensorFlow NonMaxSuppressionV5 (CPU kernel) as called by automl
# efficientdet/tf2/postprocess.py::nms @ 6a54c87
def batched_non_max_suppression_v5(
    boxes: Tensor,
    scores: Tensor,
    groups: Tensor,
    num_groups: int,
    max_output_size: int,
    iou_threshold: float = 0.5,
    score_threshold: float = -math.inf,
    soft_nms_sigma: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``NonMaxSuppressionV5`` run independently on every group of boxes.

    Args:
        boxes: ``[N, 4]`` float32 boxes (two opposite corners, e.g. ``yxyx``).
        scores: ``[N]`` float32 scores.
        groups: ``[N]`` int64 group id in ``[0, num_groups)`` (class and/or image).
        num_groups: number of groups ``G``.
        max_output_size: at most this many boxes kept per group.
        iou_threshold: hard NMS only: remove boxes with IoU ``> iou_threshold``.
        score_threshold: candidates need a score ``> score_threshold``; soft-NMS drops a box once its
            decayed score is ``<= score_threshold``.
        soft_nms_sigma: TF's sigma; ``> 0`` selects soft-NMS with weight ``exp(-iou^2 / (2*sigma))``.

    Returns:
        ``(indices [G, K] int64, scores [G, K], valid [G] int64)`` with ``K = max_output_size``,
        rows in selection order; past ``valid`` the indices are 0 and the scores 0 (TF's
        ``pad_to_max_output_size`` padding). Scores are the decayed ones (non-increasing).
    """
    _check_inputs(boxes, scores, groups)
    groups = groups.long()
    if max_output_size < 0:
        raise ValueError(f"max_output_size must be >= 0, got {max_output_size}")
    device, dtype = scores.device, scores.dtype
    n = scores.numel()
    # Thresholds are compared in float32, as TF's kernel holds them.
    threshold = torch.tensor(score_threshold, dtype=dtype, device=device)
    iou_limit = torch.tensor(iou_threshold, dtype=dtype, device=device)
    soft = soft_nms_sigma > 0
    # TF: scale = -0.5 / soft_nms_sigma in the scores' dtype; weight = exp(scale * iou * iou).
    scale = 0.0
    if soft:
        scale = (torch.tensor(-0.5, dtype=dtype) / torch.tensor(soft_nms_sigma, dtype=dtype)).item()

    picks = torch.zeros((num_groups, max_output_size), dtype=torch.int64, device=device)
    picked_scores = scores.new_zeros((num_groups, max_output_size))
    valid = torch.zeros(num_groups, dtype=torch.int64, device=device)
    # Candidates sorted by score (ties: lower index first), then a sentinel row (zero box, never
    # alive) that absorbs the updates of groups without a pick.
    candidates = torch.nonzero(scores > threshold).squeeze(1)
    candidates = candidates[torch.sort(scores[candidates], descending=True, stable=True).indices]
    num = candidates.numel()
    if num == 0 or max_output_size == 0:
        return picks, picked_scores, valid
    index = torch.cat([candidates, candidates.new_full((1,), n)])
    box = torch.cat([boxes[candidates], boxes.new_zeros(1, 4)])
    group = torch.cat([groups[candidates], groups.new_zeros(1)])
    initial = scores[candidates]
    current = torch.cat([initial, scores.new_zeros(1)])
    alive = torch.ones(num + 1, dtype=torch.bool, device=device)
    alive[num] = False
    geometry = box_geometry(box)

    def suppress(lo: int, hi: int, pick: Tensor) -> None:
        """Apply the selection ``pick`` ([G] rows) to the sorted rows ``lo:hi``."""
        rows = slice(lo, hi)
        picked = [part[pick] for part in geometry]
        if num_groups > 1:      # one group: its pick broadcasts over the rows
            picked = [part[group[rows]] for part in picked]
        iou = _iou_geometry(*(part[rows] for part in geometry), *picked)
        if soft:
            decayed = current[rows] * _exp_f32(scale * iou * iou)
            current[rows] = torch.where(alive[rows], decayed, current[rows])
            alive[rows] &= current[rows] > threshold
        else:
            alive[rows] &= ~(iou > iou_limit)

    # Only the best `width` candidates are searched. A group's winner there is its winner overall
    # when it beats every undecayed score left outside; otherwise the window grows and the new
    # rows catch up on the selections made so far, in the same order (so results are identical).
    width = min(num, _NMS_WINDOW)
    history: list[Tensor] = []
    outside_best = _outside_best(initial, group, width, num_groups)
    step = 0
    while step < max_output_size:
        pick = _group_argbest(current[:width], alive[:width], group[:width], num_groups,
                              index[:width])
        pick = torch.where(pick == width, num, pick)
        best = torch.where(pick < num, current[pick], torch.full_like(current[pick], -math.inf))
        if width < num and bool(((best <= outside_best) & (outside_best > -math.inf)).any()):
            new_width = min(num, 4 * width)
            for past in history:
                suppress(width, new_width, past)
            width = new_width
            outside_best = _outside_best(initial, group, width, num_groups)
            continue
        if not bool((pick < num).any()):
            break
        picks[:, step] = index[pick]
        picked_scores[:, step] = current[pick]
        valid += (pick < num).long()
        alive[pick] = False
        alive[num] = False
        suppress(0, width, pick)
        history.append(pick)
        step += 1
    # TF pads with index 0 / score 0; rows of a group past its last pick are padding.
    padding = torch.arange(max_output_size, device=device)[None, :] >= valid[:, None]
    picks = picks.masked_fill(padding, 0)
    picked_scores = picked_scores.masked_fill(padding, 0.0)
    return picks, picked_scores, valid


# Initial search window of batched_non_max_suppression_v5 (grows x4 when too small).
_NMS_WINDOW = 2048


def _outside_best(initial: Tensor, group: Tensor, width: int, num_groups: int) -> Tensor:
    """Per group, the best (undecayed) score among sorted candidates ``width:`` (-inf if none)."""
    best = torch.full((num_groups,), -math.inf, dtype=initial.dtype, device=initial.device)
    return best.scatter_reduce(0, group[width:initial.numel()], initial[width:], "amax")


def non_max_suppression_v5(
    boxes: Tensor,
    scores: Tensor,
    max_output_size: int,
    iou_threshold: float = 0.5,
    score_threshold: float = -math.inf,
    soft_nms_sigma: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``tf.raw_ops.NonMaxSuppressionV5`` on one set of boxes (unpadded).

    Returns ``(selected_indices [k] int64, selected_scores [k])``, ``k <= max_output_size``, in
    selection order; see :func:`batched_non_max_suppression_v5` for the arguments.
    """
    _check_inputs(boxes, scores, None)
    groups = torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    picks, picked_scores, valid = batched_non_max_suppression_v5(
        boxes, scores, groups, 1, max_output_size, iou_threshold, score_threshold, soft_nms_sigma)
    k = int(valid[0])
    return picks[0, :k], picked_scores[0, :k]


def _resolve_np_method(method: str | None) -> str:
    method = method or "hard"
    if method not in NP_METHODS:
        raise ValueError(f"unknown NMS method {method!r}; nms_np supports {NP_METHODS}")
    return method


# Port of automl efficientdet/nms_np.py::nms (soft_nms, hard_nms, diou_nms) @ 6a54c87
def batched_nms_np(
    boxes_xyxy: Tensor,
    scores: Tensor,
    groups: Tensor,
    num_groups: int,
    method: str | None = "gaussian",
    iou_thresh: float | None = None,
    sigma: float | None = None,
    score_thresh: float | None = None,
) -> tuple[Tensor, Tensor]:
    """automl's numpy NMS run independently on every group, as ``per_class_nms`` chains it.

    Args:
        boxes_xyxy: ``[N, 4]`` float32 ``[x1, y1, x2, y2]`` (pixels; the +1 convention assumes it).
        scores: ``[N]`` float32.
        groups: ``[N]`` int64 group ids in ``[0, num_groups)``; the order of a group's rows is the row
            order numpy would see (it decides exact ties).
        method: ``gaussian`` | ``linear`` (soft), ``hard`` | ``diou`` (``None``/'' mean hard).
        iou_thresh, sigma, score_thresh: automl's ``nms_configs`` values; ``None``/0 take nms_np's
            defaults: soft methods ``sigma or 0.5``, ``iou_thresh or 0.3``, ``score_thresh or 0.001``;
            hard/diou ``iou_thresh or 0.5`` and no score threshold.

    Returns:
        ``(indices [R] int64, scores [R])``: the kept rows grouped by ascending group id, each group
        in numpy's keep order; soft methods return the decayed scores. Unbounded (no per-group cap).
    """
    _check_inputs(boxes_xyxy, scores, groups)
    groups = groups.long()
    method = _resolve_np_method(method)
    if method in ("hard", "diou"):
        return _np_hard(boxes_xyxy, scores, groups, num_groups, iou_thresh or 0.5, method == "diou")
    return _np_soft(boxes_xyxy, scores, groups, num_groups, method,
                    iou_thresh or 0.3, sigma or 0.5, score_thresh or 0.001)


def nms_np(
    boxes_xyxy: Tensor,
    scores: Tensor,
    method: str | None = "gaussian",
    iou_thresh: float | None = None,
    sigma: float | None = None,
    score_thresh: float | None = None,
) -> tuple[Tensor, Tensor]:
    """automl ``nms_np.nms`` on one set of ``[x1, y1, x2, y2]`` boxes; see :func:`batched_nms_np`."""
    groups = torch.zeros(scores.shape, dtype=torch.int64, device=scores.device)
    return batched_nms_np(boxes_xyxy, scores, groups, 1, method, iou_thresh, sigma, score_thresh)


def _collect(picks: list[Tensor], values: list[Tensor], n: int,
             like: Tensor) -> tuple[Tensor, Tensor]:
    """Stack per-step picks ``[G]`` and order the kept rows group-major, step-minor."""
    if not picks:
        return torch.zeros(0, dtype=torch.int64, device=like.device), like.new_zeros(0)
    pick = torch.stack(picks, dim=1).reshape(-1)            # [G * steps], group-major
    value = torch.stack(values, dim=1).reshape(-1)
    keep = pick < n
    return pick[keep], value[keep]


def numpy_exp_f32(x: Tensor) -> Tensor:
    """``np.exp`` of a float32 tensor, on the tensor's device.

    nms_np's gaussian weights are numpy's SIMD float32 ``exp`` (up to 2 ulp from correctly
    rounded; ``torch.exp`` is not the same function). Evaluating it with numpy keeps the pyfunc
    scores bit-identical to automl's on the same machine; with ``torch.exp`` 14% of them differ
    (by up to 19 ulp after compounding).
    """
    return torch.from_numpy(np.exp(x.detach().cpu().numpy())).to(x.device)


def numpy_argsort(values: Tensor) -> Tensor:
    """``np.argsort(values)`` (numpy's default, unstable ``quicksort``) on the tensor's device.

    automl orders by ``np.argsort``; for exact ties its order is numpy's (SIMD introsort), which no
    torch sort reproduces, so the sort itself is numpy's.
    """
    order = np.argsort(values.detach().cpu().numpy())
    return torch.from_numpy(order.astype(np.int64)).to(values.device)


def _np_soft(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int, method: str,
             iou_thresh: float, sigma: float, score_thresh: float) -> tuple[Tensor, Tensor]:
    """nms_np.soft_nms: argmax, swap into row 0, keep it, decay the rest, drop ``< score_thresh``.

    The first box of a group is kept even when its score is below ``score_thresh`` (nms_np only
    filters after a decay).
    """
    n = scores.numel()
    device, dtype = scores.device, scores.dtype
    threshold = torch.tensor(score_thresh, dtype=dtype, device=device)
    boxes_pad = torch.cat([boxes, boxes.new_zeros(1, 4)])
    areas = _areas_np(boxes_pad)
    current = torch.cat([scores, scores.new_zeros(1)])
    alive = torch.ones(n + 1, dtype=torch.bool, device=device)
    alive[n] = False
    groups_pad = torch.cat([groups, groups.new_zeros(1)])
    # position[r]: where row r currently sits in its group's (shrinking, swapped) numpy array.
    position = torch.arange(n + 1, device=device)
    picks: list[Tensor] = []
    values: list[Tensor] = []
    while bool(alive.any()):
        # np.argmax: first maximum in the current row order. The padded row n is never alive, so
        # the "no row" sentinel n + 1 maps onto it.
        pick = _group_argbest(current, alive, groups_pad, num_groups, position).clamp(max=n)
        first = _group_argbest(-position.to(torch.float64), alive, groups_pad, num_groups,
                               position).clamp(max=n)
        # dets[[0, max_idx]] = dets[[max_idx, 0]]: the first row moves to the picked row's slot.
        position[first], position[pick] = position[pick], position[first]
        picks.append(pick)
        values.append(current[pick])
        alive[pick] = False
        alive[n] = False
        iou = iou_np(boxes_pad, boxes_pad[pick][groups_pad], areas, areas[pick][groups_pad])
        if method == "gaussian":
            weight = numpy_exp_f32(-(iou * iou) / sigma)
        else:  # linear
            weight = torch.where(iou > iou_thresh, 1 - iou, torch.ones_like(iou))
        current = torch.where(alive, current * weight, current)
        alive &= current >= threshold
    return _collect(picks, values, n, scores)


def _np_descending_rank(scores: Tensor, groups: Tensor) -> Tensor:
    """Position of every row in its group's ``scores.argsort()[::-1]``, sorted by numpy itself."""
    scores_np = scores.detach().cpu().numpy()
    groups_np = groups.detach().cpu().numpy()
    rank = np.empty(scores_np.shape[0], dtype=np.int64)
    by_group = np.argsort(groups_np, kind="stable")       # a group's rows keep their order
    bounds = np.flatnonzero(np.diff(groups_np[by_group])) + 1
    for rows in np.split(by_group, bounds):
        order = rows[np.argsort(scores_np[rows])[::-1]]
        rank[order] = np.arange(rows.size)
    return torch.from_numpy(rank).to(scores.device)


def _np_hard(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int, iou_thresh: float,
             diou: bool) -> tuple[Tensor, Tensor]:
    """nms_np.hard_nms / diou_nms: visit boxes by descending score, drop overlaps ``> iou_thresh``.

    No score threshold; kept scores are the input scores.
    """
    n = scores.numel()
    device = scores.device
    rank = torch.cat([_np_descending_rank(scores, groups), torch.full((1,), n, device=device)])
    boxes_pad = torch.cat([boxes, boxes.new_zeros(1, 4)])
    scores_pad = torch.cat([scores, scores.new_zeros(1)])
    areas = _areas_np(boxes_pad)
    centres = (boxes_pad[:, :2] + boxes_pad[:, 2:]) / 2
    alive = torch.ones(n + 1, dtype=torch.bool, device=device)
    alive[n] = False
    groups_pad = torch.cat([groups, groups.new_zeros(1)])
    picks: list[Tensor] = []
    values: list[Tensor] = []
    while bool(alive.any()):
        pick = _group_argbest(-rank.to(torch.float64), alive, groups_pad, num_groups,
                              rank).clamp(max=n)
        picks.append(pick)
        values.append(scores_pad[pick])
        alive[pick] = False
        alive[n] = False
        other = boxes_pad[pick][groups_pad]
        overlap = iou_np(boxes_pad, other, areas, areas[pick][groups_pad])
        if diou:
            # diou = iou - |centre distance|^2 / (|enclosing box diagonal|^2 + 1e-10)
            enclosing = (torch.maximum(boxes_pad[:, 2:], other[:, 2:])
                         - torch.minimum(boxes_pad[:, :2], other[:, :2]))
            diagonal = enclosing[:, 0] ** 2 + enclosing[:, 1] ** 2
            offset = centres - centres[pick][groups_pad]
            distance = offset[:, 0] ** 2 + offset[:, 1] ** 2
            overlap = overlap - distance / (diagonal + 1e-10)
        alive &= overlap <= iou_thresh
    return _collect(picks, values, n, scores)
