"""The two NMS flavours automl's post-processing uses.

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

The nms_np functions run the greedy loop for many independent groups at once (vectorised PyTorch,
one group per class and/or image); the V5 functions loop over the groups. Arithmetic is float32 in
the reference's operation order.

Measured against the references (tests/test_nms.py; random, tied and saturated sets of up to 5,000
boxes for TF, 41k kept boxes for automl's nms_np):

* TF: bit-identical indices, order and scores for soft and hard NMS (tests/test_nms.py compares
  with ``tf.raw_ops.NonMaxSuppressionV5`` on random, tied and saturated inputs). The greedy loop is
  TF's own lazy one (:class:`_SuppressionV5`: a candidate applies the decays of the boxes selected
  since it was last popped, newest first), run on the host, and the weight's ``exp`` is the C
  library's ``expf`` that TF calls. It runs compiled (:mod:`model.nms_jit`, numba; d0's global
  soft-NMS over 49,104 candidates: ~0.8 ms instead of ~15 ms); :func:`select_groups_python` is its
  numpy twin, used where numba cannot be imported and as the tests' reference.
* nms_np: bit-identical indices, order and scores for all four methods, including exact score ties,
  because the two numpy primitives that define automl's results are evaluated by numpy itself:
  the float32 ``np.exp`` of the gaussian weight (numpy's SIMD exp, up to 2 ulp from correctly
  rounded; ``torch.exp`` would change 14% of the scores by up to 19 ulp) and the unstable
  ``np.argsort`` of hard/diou NMS. These run on the CPU. The greedy loops run compiled
  (:mod:`model.nms_np_jit`, on per-group ``[pick, row]`` matrices of those numbers: d0 pyfunc
  ~75 ms instead of ~550 ms); the vectorised loop (one host round trip per step on CUDA) is the
  fallback where numba cannot be imported and the tests' reference.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import heapq
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .box_coder import decode_boxes, exp_sizes
from .jit_kernels import compiled

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


class EncodedBoxes(NamedTuple):
    """Boxes still as box-head regressions: ``deltas [N, 4]`` (``ty, tx, th, tw``) on
    ``anchors [A, 4]`` (``yxyx``), row ``i`` on anchor ``i % A``.

    :func:`batched_non_max_suppression_v5` decodes only the rows its compiled loop pops, with the
    values :func:`model.box_coder.decode_boxes` gives (d0's global path: a few hundred of 49,104).
    """

    deltas: Tensor
    anchors: Tensor

    def decode(self) -> Tensor:
        """Every box, ``[N, 4]``."""
        deltas = self.deltas.reshape(-1, self.anchors.shape[0], 4)
        return decode_boxes(deltas, self.anchors).reshape(-1, 4)


# Port of TensorFlow NonMaxSuppressionV5 (CPU kernel) as called by automl
# efficientdet/tf2/postprocess.py::nms @ 6a54c87
def batched_non_max_suppression_v5(
    boxes: Tensor | EncodedBoxes,
    scores: Tensor,
    groups: Tensor | None,
    num_groups: int,
    max_output_size: int,
    iou_threshold: float = 0.5,
    score_threshold: float = -math.inf,
    soft_nms_sigma: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``NonMaxSuppressionV5`` run independently on every group of boxes.

    Args:
        boxes: ``[N, 4]`` float32 boxes (two opposite corners, e.g. ``yxyx``), or
            :class:`EncodedBoxes` for the compiled loop to decode where it needs them.
        scores: ``[N]`` float32 scores.
        groups: ``[N]`` int64 group id in ``[0, num_groups)`` (class and/or image); ``None``:
            one group (``num_groups == 1``).
        num_groups: number of groups ``G``.
        max_output_size: at most this many boxes kept per group.
        iou_threshold: hard NMS only: remove boxes with IoU ``> iou_threshold``.
        score_threshold: candidates need a score ``> score_threshold``; soft-NMS drops a box once its
            decayed score is ``<= score_threshold``.
        soft_nms_sigma: TF's sigma; ``> 0`` selects soft-NMS with weight ``exp(-iou^2 / (2*sigma))``.

    Returns:
        ``(indices [G, K] int64, scores [G, K], valid [G] int64)`` with ``K = max_output_size``,
        rows in selection order; past ``valid`` the indices are 0 and the scores 0 (TF's
        ``pad_to_max_output_size`` padding). Scores are the decayed ones (non-increasing). The
        greedy loop runs on the host (float32, compiled by numba on the first call of a process
        unless cached: ~2 s, ~0.25 s from numba's on-disk cache); the results are on the inputs'
        device.
    """
    kernels = _nms_kernels()
    if isinstance(boxes, EncodedBoxes):
        _check_encoded(boxes)
        if kernels is None:
            boxes = boxes.decode()
    _check_inputs(boxes.deltas if isinstance(boxes, EncodedBoxes) else boxes, scores, groups)
    if max_output_size < 0:
        raise ValueError(f"max_output_size must be >= 0, got {max_output_size}")
    scores_np = _host(scores, np.float32)
    if groups is None and num_groups != 1:
        raise ValueError(f"groups=None means one group, got num_groups={num_groups}")
    groups_np = (np.zeros(scores_np.size, dtype=np.int64) if groups is None
                 else _host(groups, np.int64))
    if groups is not None and groups_np.size and (groups_np.min() < 0
                                                  or groups_np.max() >= num_groups):
        raise ValueError(f"groups must lie in [0, {num_groups}), got "
                         f"[{groups_np.min()}, {groups_np.max()}]")
    picks = np.zeros((num_groups, max_output_size), dtype=np.int64)
    picked_scores = np.zeros((num_groups, max_output_size), dtype=np.float32)
    valid = np.zeros(num_groups, dtype=np.int64)
    if max_output_size:
        arguments = (scores_np, groups_np, num_groups, max_output_size,
                     *v5_parameters(iou_threshold, score_threshold, soft_nms_sigma),
                     picks, picked_scores, valid)
        if isinstance(boxes, EncodedBoxes):
            deltas = boxes.deltas.detach().cpu().float()
            kernels.select_groups_encoded(_host(deltas, np.float32), *exp_sizes(deltas),
                                          _host(boxes.anchors, np.float32), *arguments)
        else:
            select = kernels.select_groups if kernels else select_groups_python
            select(_host(boxes, np.float32), *arguments)
    device = scores.device
    return (torch.from_numpy(picks).to(device),
            torch.from_numpy(picked_scores).to(device=device, dtype=scores.dtype),
            torch.from_numpy(valid).to(device))


def v5_parameters(iou_threshold: float, score_threshold: float,
                  soft_nms_sigma: float) -> tuple[np.float32, np.float32, bool, np.float32]:
    """``(iou_threshold, score_threshold, soft, scale)`` in float32 as TF's kernel holds them;
    ``scale = -0.5 / sigma`` (the weight is ``exp(scale * iou^2)``), 0 for hard NMS."""
    soft = soft_nms_sigma > 0
    scale = np.float32(-0.5) / np.float32(soft_nms_sigma) if soft else np.float32(0)
    return np.float32(iou_threshold), np.float32(score_threshold), soft, scale


def _nms_kernels() -> Any:
    """:mod:`model.nms_jit` (numba), or None where numba cannot be imported."""
    return compiled("nms_jit")


def _host(tensor: Tensor, dtype: type) -> np.ndarray:
    """A C-contiguous numpy array of ``tensor`` in ``dtype`` on the host."""
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)


def _check_encoded(boxes: EncodedBoxes) -> None:
    if boxes.anchors.ndim != 2 or boxes.anchors.shape[1] != 4 or not boxes.anchors.shape[0]:
        raise ValueError(f"anchors must be [A, 4], got {tuple(boxes.anchors.shape)}")
    if boxes.deltas.ndim != 2 or boxes.deltas.shape[0] % boxes.anchors.shape[0]:
        raise ValueError(f"deltas must be [k * {boxes.anchors.shape[0]}, 4], "
                         f"got {tuple(boxes.deltas.shape)}")


def select_groups_python(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                         num_groups: int, max_output_size: int, iou_threshold: np.float32,
                         score_threshold: np.float32, soft: bool, scale: np.float32,
                         picks: np.ndarray, picked_scores: np.ndarray, valid: np.ndarray) -> None:
    """The reference (pure numpy) twin of :func:`model.nms_jit.select_groups`, same arguments:
    fills ``picks [G, K]``, ``picked_scores [G, K]`` and ``valid [G]`` in place."""
    kernel = _SuppressionV5(iou_threshold, score_threshold, soft, scale)
    # Only scores > score_threshold are candidates; a group's rows keep their order (tie rule).
    candidates = np.flatnonzero(scores > score_threshold)
    candidates = candidates[np.argsort(groups[candidates], kind="stable")]
    starts = np.flatnonzero(np.diff(groups[candidates])) + 1
    for rows in np.split(candidates, starts) if candidates.size else ():
        group = groups[rows[0]]
        kept, kept_scores = kernel.select(boxes[rows], scores[rows], max_output_size)
        valid[group] = len(kept)
        picks[group, :len(kept)] = rows[kept]
        picked_scores[group, :len(kept)] = kept_scores


class _SuppressionV5:
    """TF's NonMaxSuppressionV5 greedy loop on one set of boxes, as lazy as TF's kernel.

    Candidates leave a priority queue best first (score descending, ties to the lower position).
    A popped candidate takes only the decays of the boxes selected since it was last popped, newest
    first: hard NMS drops it at IoU ``> iou_threshold``; soft-NMS multiplies its score by each
    weight ``exp(scale * iou * iou)`` (float32, C's ``expf``: :func:`_expf`) and drops it at
    ``<= score_threshold``. An unchanged score is selected, a decayed one re-queued.

    Only the best candidates are ever popped, so they are sorted a chunk at a time
    (:class:`_Window`). Each selection computes its weights for the window's slots at once
    (vectorised, one row of a ``[selection, slot]`` matrix; hard NMS: 0 or 1); a pop multiplies
    the ones of its column that are not exactly 1, in TF's order. For d0's 49,104
    candidates and 100 outputs only a few thousand slots are ever touched.
    """

    def __init__(self, iou_threshold: np.float32, score_threshold: np.float32, soft: bool,
                 scale: np.float32) -> None:
        self.iou_threshold = iou_threshold
        self.score_threshold = score_threshold
        self.soft = soft
        self.scale = scale

    def select(self, boxes: np.ndarray, scores: np.ndarray,
               max_output_size: int) -> tuple[list[int], list[np.float32]]:
        """Positions and final scores of the selected boxes, in selection order.

        ``boxes [n, 4]`` / ``scores [n]`` float32, every score ``> score_threshold``.
        """
        window = _Window(self, boxes, scores, max_output_size)
        kept: list[int] = []
        kept_scores: list[np.float32] = []
        requeued: list[tuple[float, int, int, int]] = []   # heap: -score, position, slot, compared
        fresh = 0                                          # next never-popped slot
        while len(kept) < max_output_size:
            if fresh >= 0 and not window.reach(fresh):
                fresh = -1
            if requeued and (fresh < 0 or (-requeued[0][0], -requeued[0][1])
                             > (window.scores[fresh], -window.positions[fresh])):
                negated, _, slot, compared = heapq.heappop(requeued)
                score = np.float32(-negated)
            elif fresh >= 0:
                slot, score, compared = fresh, np.float32(window.scores[fresh]), 0
                fresh += 1
            else:
                break
            weights = window.pending(slot, compared)
            if not self.soft:
                if not weights:                            # no selection suppresses it
                    kept.append(window.positions[slot])
                    kept_scores.append(score)
                    window.record_selection(slot)
                continue
            decayed = score
            for weight in reversed(weights):               # newest selection first
                decayed = decayed * weight                 # float32 product
            if decayed == score:
                kept.append(window.positions[slot])
                kept_scores.append(decayed)
                window.record_selection(slot)
            elif decayed > self.score_threshold:
                heapq.heappush(requeued,
                               (-float(decayed), window.positions[slot], slot, len(kept)))
        return kept, kept_scores

    def weights(self, candidates: _Geometry, picked: _Geometry) -> np.ndarray:
        """float32 suppression weights of the selected boxes ``picked`` on ``candidates``
        (broadcast; IoU as TF's kernel: corners re-ordered, no +1, 0 when either area is 0);
        hard NMS: 1 (kept) or 0 (suppressed)."""
        extent = np.maximum(np.minimum(candidates.hi, picked.hi)
                            - np.maximum(candidates.lo, picked.lo), np.float32(0))
        intersection = extent[..., 0] * extent[..., 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = intersection / (candidates.area + picked.area - intersection)
        iou[(candidates.area <= 0) | (picked.area <= 0)] = 0
        if not self.soft:
            return (iou <= self.iou_threshold).astype(np.float32)
        weights = np.ones_like(iou)
        overlapping = iou != 0                          # exp(scale * 0 * 0) is exactly 1
        iou = iou[overlapping]
        weights[overlapping] = _expf(self.scale * iou * iou)
        return weights


def _load_libm() -> ctypes.CDLL:
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    libm.expf.restype = ctypes.c_float
    libm.expf.argtypes = [ctypes.c_float]
    return libm


# The C library TF's kernel takes ``expf`` from (Eigen::numext::exp<float> is std::exp).
_LIBM = _load_libm()


def _expf(x: np.ndarray) -> np.ndarray:
    """C ``expf`` of float32 ``x``, as TF's NMS kernel calls it (glibc's is not always correctly
    rounded: measured 16 of 50,000 arguments differ from the correctly rounded value).

    Vectorised as float64 ``exp`` rounded to float32, which agrees with any ``expf`` accurate to
    0.502 ulp (glibc's bound) unless the float64 value lies within 2^-30 (relative, 1/64 ulp or
    less) of a float32 rounding boundary; those few arguments are passed to ``expf`` itself.
    """
    wide = np.exp(x.astype(np.float64))
    result = (wide * (1 + _EXPF_MARGIN)).astype(np.float32)
    unsure = result != (wide * (1 - _EXPF_MARGIN)).astype(np.float32)
    if unsure.any():
        result[unsure] = [_LIBM.expf(value) for value in x[unsure].tolist()]
    return result


# Relative distance from a float32 rounding boundary below which _expf asks C's expf.
_EXPF_MARGIN = 2.0 ** -30


class _Geometry(NamedTuple):
    """Boxes as TF's IoU uses them: ``lo``/``hi`` corners ``[..., 2]`` and ``area [...]``."""
    lo: np.ndarray
    hi: np.ndarray
    area: np.ndarray

    @classmethod
    def of(cls, boxes: np.ndarray) -> _Geometry:
        lo = np.minimum(boxes[..., :2], boxes[..., 2:])
        hi = np.maximum(boxes[..., :2], boxes[..., 2:])
        return cls(lo, hi, (hi[..., 0] - lo[..., 0]) * (hi[..., 1] - lo[..., 1]))

    def take(self, index: Any) -> _Geometry:
        return _Geometry(self.lo[index], self.hi[index], self.area[index])


# Candidates a _Window sorts at a time (the first chunk; doubles with every further chunk) and
# files at a time (the block). Groups of at most _PAIRWISE candidates (e.g. per-class NMS) get all
# their weights in one matrix.
_WINDOW_CHUNK = 1024
_WINDOW_BLOCK = 256
_PAIRWISE = 256


class _Window:
    """The best candidates of one NMS call in queue order (score descending, ties to the lower
    position) with the weights every selection puts on them (``[selection, slot]``).

    Slots below the horizon have their weights filled in; the horizon moves a block at a time,
    ahead of the first pops, so the candidates that are never popped cost nothing.
    """

    def __init__(self, kernel: _SuppressionV5, boxes: np.ndarray, scores: np.ndarray,
                 max_output_size: int) -> None:
        self._kernel = kernel
        self._boxes = boxes
        self._all_scores = scores
        self._rest = np.arange(scores.size)
        self._chunk = _WINDOW_CHUNK
        self._geometry = _Geometry.of(boxes[:0])      # per slot
        self._pairwise: np.ndarray | None = None       # [slot picked, slot] weights
        self._weights = np.ones((max_output_size, 0), dtype=np.float32)
        self._selected: list[int] = []                 # slots
        self._horizon = 0
        self.positions: list[int] = []
        self.scores: list[float] = []

    def reach(self, slot: int) -> bool:
        """Fill in the weights up to ``slot`` (sorting more candidates if needed); False when
        there are fewer candidates."""
        while slot >= self._horizon:
            if self._horizon == len(self.positions) and not self._sort_next_chunk():
                return False
            block = slice(self._horizon, min(len(self.positions), self._horizon + _WINDOW_BLOCK))
            if self._selected:                          # catch up
                self._weights[:len(self._selected), block] = self._compute(self._selected, block)
            self._horizon = block.stop
        return True

    def record_selection(self, slot: int) -> None:
        row = len(self._selected)
        self._selected.append(slot)
        self._weights[row, :self._horizon] = self._compute([slot], slice(0, self._horizon))

    def pending(self, slot: int, since: int) -> list[float]:
        """Weights != 1 of the selections from number ``since`` on, in selection order (hard NMS:
        0 if a selection suppresses it)."""
        column = self._weights[since:len(self._selected), slot]
        return column[column != 1].tolist()

    def _sort_next_chunk(self) -> bool:
        if not self._rest.size:
            return False
        values = self._all_scores[self._rest]
        take = np.ones(values.size, dtype=bool)
        if values.size > self._chunk:
            cut = values.size - self._chunk
            take = values >= np.partition(values, cut)[cut]    # every tie of the cut value
        chunk = self._rest[take]
        chunk = chunk[np.lexsort((chunk, -self._all_scores[chunk]))]
        self._rest = self._rest[~take]
        self._chunk *= 2
        added = _Geometry.of(self._boxes[chunk])
        self._geometry = _Geometry(*(np.concatenate(pair) for pair in zip(self._geometry, added)))
        if not self.positions and not self._rest.size and chunk.size <= _PAIRWISE:
            self._pairwise = self._kernel.weights(
                self._geometry.take(np.newaxis), self._geometry.take((slice(None), np.newaxis)))
        self._weights = np.concatenate(
            [self._weights, np.ones((self._weights.shape[0], chunk.size), dtype=np.float32)], 1)
        self.positions += chunk.tolist()
        self.scores += self._all_scores[chunk].tolist()
        return True

    def _compute(self, picked: list[int], slots: slice) -> np.ndarray:
        """``[len(picked), slots]`` weights of the selected slots ``picked`` on ``slots``."""
        if self._pairwise is not None:
            return self._pairwise[picked, slots]
        picked_geometry = self._geometry.take((picked, np.newaxis))
        return self._kernel.weights(self._geometry.take((np.newaxis, slots)), picked_geometry)


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
    hard = method in ("hard", "diou")
    params = _NpParams(method, iou_thresh or (0.5 if hard else 0.3), sigma or 0.5,
                       score_thresh or 0.001)
    if (_np_kernels_compiled() is not None and boxes_xyxy.dtype == torch.float32
            and scores.dtype == torch.float32):
        return _np_compiled(boxes_xyxy, scores, groups, params)
    if hard:
        return _np_hard(boxes_xyxy, scores, groups, num_groups, params)
    return _np_soft(boxes_xyxy, scores, groups, num_groups, params)


class _NpParams(NamedTuple):
    """nms_np's effective parameters (defaults applied); soft methods use ``sigma`` (gaussian),
    ``iou_thresh`` (linear) and ``score_thresh``, hard/diou only ``iou_thresh``."""
    method: str
    iou_thresh: float
    sigma: float
    score_thresh: float


def _np_pair_weights(boxes_rows: Tensor, boxes_picks: Tensor, areas_rows: Tensor,
                     areas_picks: Tensor, params: _NpParams) -> Tensor:
    """The soft decay a picked box puts on a row (broadcast): gaussian ``np.exp(-iou^2 / sigma)``,
    linear ``1 - iou`` above ``iou_thresh`` (else 1)."""
    iou = iou_np(boxes_rows, boxes_picks, areas_rows, areas_picks)
    if params.method == "gaussian":
        return numpy_exp_f32(-(iou * iou) / params.sigma)
    return torch.where(iou > params.iou_thresh, 1 - iou, torch.ones_like(iou))


def _np_pair_keeps(boxes_rows: Tensor, boxes_picks: Tensor, areas_rows: Tensor,
                   areas_picks: Tensor, params: _NpParams) -> Tensor:
    """Whether a row survives a picked box in hard/diou NMS (broadcast): overlap
    ``<= iou_thresh``, the overlap being IoU or diou = IoU - centre distance^2 / (enclosing
    diagonal^2 + 1e-10)."""
    overlap = iou_np(boxes_rows, boxes_picks, areas_rows, areas_picks)
    if params.method == "diou":
        enclosing = (torch.maximum(boxes_rows[..., 2:], boxes_picks[..., 2:])
                     - torch.minimum(boxes_rows[..., :2], boxes_picks[..., :2]))
        diagonal = enclosing[..., 0] ** 2 + enclosing[..., 1] ** 2
        offset = _centres(boxes_rows) - _centres(boxes_picks)
        distance = offset[..., 0] ** 2 + offset[..., 1] ** 2
        overlap = overlap - distance / (diagonal + 1e-10)
    return overlap <= params.iou_thresh


def _centres(boxes_xyxy: Tensor) -> Tensor:
    return (boxes_xyxy[..., :2] + boxes_xyxy[..., 2:]) / 2


def _np_kernels_compiled() -> Any:
    """:mod:`model.nms_np_jit` (numba), or None where numba cannot be imported."""
    return compiled("nms_np_jit")


# Pair-matrix entries the compiled nms_np path builds at a time (a larger single group gets its
# own batch) and picks per torch evaluation (bounds the temporaries).
_NP_PAIRS_PER_BATCH = 1 << 24
_NP_PICKS_PER_BLOCK = 256


def _np_compiled(boxes: Tensor, scores: Tensor, groups: Tensor,
                 params: _NpParams) -> tuple[Tensor, Tensor]:
    """:func:`batched_nms_np` with the greedy loops compiled (:mod:`model.nms_np_jit`).

    Per group, every number the loop needs is computed up front as a ``[pick, row]`` matrix by
    :func:`_np_pair_weights` / :func:`_np_pair_keeps` (the vectorised path's own expressions, so
    the values are the same); groups are batched so the matrices stay under
    ``_NP_PAIRS_PER_BATCH`` entries.
    """
    kernels = _np_kernels_compiled()
    hard = params.method in ("hard", "diou")
    device = scores.device
    boxes_cpu = boxes.detach().cpu()
    scores_cpu = scores.detach().cpu()
    groups_np = groups.detach().cpu().numpy()
    by_group = np.argsort(groups_np, kind="stable")        # a group's rows keep their order
    sizes = np.unique(groups_np[by_group], return_counts=True)[1] if by_group.size else by_group
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    kept_parts: list[np.ndarray] = []
    score_parts: list[np.ndarray] = []
    first = 0
    while first < sizes.size:
        last = first + 1
        while last < sizes.size and int((sizes[first:last + 1] ** 2).sum()) <= _NP_PAIRS_PER_BATCH:
            last += 1
        rows = by_group[starts[first]:starts[last]]
        batch_starts = starts[first:last + 1] - starts[first]
        matrices = [_np_pair_matrix(boxes_cpu[rows[lo:hi]], params, hard)
                    for lo, hi in zip(batch_starts[:-1], batch_starts[1:])]
        flat = np.concatenate([matrix.reshape(-1) for matrix in matrices])
        matrix_starts = np.concatenate([[0], np.cumsum(sizes[first:last] ** 2)]).astype(np.int64)
        batch_scores = scores_cpu[rows].numpy()
        kept = np.empty(rows.size, dtype=np.int64)
        if hard:
            orders = np.concatenate([np.argsort(batch_scores[lo:hi])[::-1] for lo, hi in
                                     zip(batch_starts[:-1], batch_starts[1:])]).astype(np.int64)
            count = kernels.hard_groups(batch_starts, orders, flat, matrix_starts, kept)
            kept_scores = batch_scores[kept[:count]]
        else:
            kept_scores = np.empty(rows.size, dtype=batch_scores.dtype)
            count = kernels.soft_groups(batch_scores, batch_starts, flat, matrix_starts,
                                        batch_scores.dtype.type(params.score_thresh), kept,
                                        kept_scores)
            kept_scores = kept_scores[:count]
        kept_parts.append(rows[kept[:count]])
        score_parts.append(kept_scores)
        first = last
    if not kept_parts:
        return torch.zeros(0, dtype=torch.int64, device=device), scores.new_zeros(0)
    return (torch.from_numpy(np.concatenate(kept_parts)).to(device),
            torch.from_numpy(np.concatenate(score_parts)).to(device=device, dtype=scores.dtype))


def _np_pair_matrix(boxes: Tensor, params: _NpParams, hard: bool) -> np.ndarray:
    """``[pick, row]`` weights (soft) or keeps (hard/diou) of one group, computed
    ``_NP_PICKS_PER_BLOCK`` picks at a time."""
    areas = _areas_np(boxes)
    pair = _np_pair_keeps if hard else _np_pair_weights
    blocks = [pair(boxes[None, :], boxes[lo:lo + _NP_PICKS_PER_BLOCK, None],
                   areas[None, :], areas[lo:lo + _NP_PICKS_PER_BLOCK, None], params)
              for lo in range(0, boxes.shape[0], _NP_PICKS_PER_BLOCK)]
    return torch.cat(blocks).numpy()


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


def _np_soft(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int,
             params: _NpParams) -> tuple[Tensor, Tensor]:
    """nms_np.soft_nms: argmax, swap into row 0, keep it, decay the rest, drop ``< score_thresh``.

    The first box of a group is kept even when its score is below ``score_thresh`` (nms_np only
    filters after a decay).
    """
    n = scores.numel()
    device, dtype = scores.device, scores.dtype
    threshold = torch.tensor(params.score_thresh, dtype=dtype, device=device)
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
        weight = _np_pair_weights(boxes_pad, boxes_pad[pick][groups_pad], areas,
                                  areas[pick][groups_pad], params)
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


def _np_hard(boxes: Tensor, scores: Tensor, groups: Tensor, num_groups: int,
             params: _NpParams) -> tuple[Tensor, Tensor]:
    """nms_np.hard_nms / diou_nms: visit boxes by descending score, drop overlaps ``> iou_thresh``.

    No score threshold; kept scores are the input scores.
    """
    n = scores.numel()
    device = scores.device
    rank = torch.cat([_np_descending_rank(scores, groups), torch.full((1,), n, device=device)])
    boxes_pad = torch.cat([boxes, boxes.new_zeros(1, 4)])
    scores_pad = torch.cat([scores, scores.new_zeros(1)])
    areas = _areas_np(boxes_pad)
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
        alive &= _np_pair_keeps(boxes_pad, boxes_pad[pick][groups_pad], areas,
                                areas[pick][groups_pad], params)
    return _collect(picks, values, n, scores)
