"""TensorFlow's ``NonMaxSuppressionV5`` greedy loop compiled with numba (the fast path of
:func:`model.nms.batched_non_max_suppression_v5`).

The same algorithm as :class:`model.nms._SuppressionV5` (TF's lazy queue): candidates leave one
priority queue best first (score descending, ties to the lower row); a popped candidate takes the
decays of the boxes selected since it was last popped, newest first, in float32 with C's ``expf``
(the function TF's kernel calls); an unchanged score is selected, a decayed one above the
threshold re-queued. Every queue order gives the same pops because (score, row) keys are distinct.
tests/test_nms.py checks the two implementations and TensorFlow against each other bit for bit.

Compiled on first use and cached on disk by numba (``cache=True``: next to this file, or in the
user's cache directory when the package directory is read-only).
"""
from __future__ import annotations

import ctypes.util

import llvmlite.binding  # type: ignore[import-untyped]
import numpy as np
from numba import njit, types

from .box_coder_jit import decode_row

# Resolve ``expf`` from the C math library, as TF's kernel does (std::exp<float>).
llvmlite.binding.load_library_permanently(ctypes.util.find_library("m") or "libm.so.6")
_expf = types.ExternalFunction("expf", types.float32(types.float32))


@njit(cache=True, error_model="numpy", inline="always")
def _minimum(a: np.floating, b: np.floating) -> np.floating:
    """``np.minimum`` of two scalars (NaN if either is NaN)."""
    return a if a <= b or a != a else b


@njit(cache=True, error_model="numpy", inline="always")
def _maximum(a: np.floating, b: np.floating) -> np.floating:
    """``np.maximum`` of two scalars (NaN if either is NaN)."""
    return a if a >= b or a != a else b


@njit(cache=True, error_model="numpy", inline="always")
def _better(score_a: float, row_a: int, score_b: float, row_b: int) -> bool:
    """Queue order: higher score first, ties to the lower row."""
    return score_a > score_b or (score_a == score_b and row_a < row_b)


@njit(cache=True, error_model="numpy")
def _sift_down(scores: np.ndarray, rows: np.ndarray, since: np.ndarray, start: int,
               length: int) -> None:
    score, row, compared = scores[start], rows[start], since[start]
    hole = start
    while True:
        child = 2 * hole + 1
        if child >= length:
            break
        if child + 1 < length and _better(scores[child + 1], rows[child + 1], scores[child],
                                          rows[child]):
            child += 1
        if not _better(scores[child], rows[child], score, row):
            break
        scores[hole], rows[hole], since[hole] = scores[child], rows[child], since[child]
        hole = child
    scores[hole], rows[hole], since[hole] = score, row, compared


@njit(cache=True, error_model="numpy")
def _sift_up(scores: np.ndarray, rows: np.ndarray, since: np.ndarray, hole: int) -> None:
    score, row, compared = scores[hole], rows[hole], since[hole]
    while hole > 0:
        parent = (hole - 1) // 2
        if not _better(score, row, scores[parent], rows[parent]):
            break
        scores[hole], rows[hole], since[hole] = scores[parent], rows[parent], since[parent]
        hole = parent
    scores[hole], rows[hole], since[hole] = score, row, compared


# Buckets of the reserve's histogram: the top 16 bits of a score's order key.
_BUCKET_SHIFT = 16
_BUCKETS = 1 << 16


@njit(cache=True, error_model="numpy", inline="always")
def _order_key(bits: int) -> int:
    """int32 key of a float32's bits that orders as the float does (-0.0 like +0.0; no NaNs)."""
    if bits < 0:
        bits = bits ^ 0x7FFFFFFF
    return 0 if bits == -1 else bits


@njit(cache=True, error_model="numpy")
def _load_reserve(reserve_scores: np.ndarray, reserve_rows: np.ndarray, reserve_size: int,
                  heap_scores: np.ndarray, heap_rows: np.ndarray, heap_since: np.ndarray,
                  size: int, wanted: int) -> tuple[int, int, int]:
    """Move at least ``wanted`` of the reserve's best candidates (whole histogram buckets) into
    the heap; returns ``(heap size, reserve size, cut_key)``."""
    keys = reserve_scores[:reserve_size].view(np.int32)
    counts = np.zeros(_BUCKETS, dtype=np.int32)
    for slot in range(reserve_size):
        counts[(_order_key(keys[slot]) >> _BUCKET_SHIFT) + _BUCKETS // 2] += 1
    bucket = _BUCKETS - 1
    taken = counts[bucket]
    while taken < wanted and bucket > 0:
        bucket -= 1
        taken += counts[bucket]
    cut_key = (bucket - _BUCKETS // 2) << _BUCKET_SHIFT
    kept = 0
    for slot in range(reserve_size):
        if _order_key(keys[slot]) >= cut_key:
            heap_scores[size], heap_rows[size], heap_since[size] = (
                reserve_scores[slot], reserve_rows[slot], 0)
            _sift_up(heap_scores, heap_rows, heap_since, size)
            size += 1
        else:
            reserve_scores[kept], reserve_rows[kept] = reserve_scores[slot], reserve_rows[slot]
            kept += 1
    return size, kept, cut_key


@njit(cache=True, error_model="numpy", inline="always")
def _box(boxes: np.ndarray, deltas: np.ndarray, exp_h: np.ndarray, exp_w: np.ndarray,
         anchors: np.ndarray, row: int) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """Box ``row``: read from ``boxes``, or decoded from its regression when ``anchors`` is
    non-empty (:func:`select_groups_encoded`)."""
    if anchors.shape[0] == 0:
        return boxes[row, 0], boxes[row, 1], boxes[row, 2], boxes[row, 3]
    return decode_row(deltas, exp_h, exp_w, anchors, row, row % anchors.shape[0])


@njit(cache=True, error_model="numpy")
def _select_group(boxes: np.ndarray, deltas: np.ndarray, exp_h: np.ndarray, exp_w: np.ndarray,
                  anchors: np.ndarray, scores: np.ndarray, members: np.ndarray,
                  max_output_size: int,
                  iou_threshold: np.float32, score_threshold: np.float32, soft: bool,
                  scale: np.float32, first_chunk: int, picks: np.ndarray,
                  picked_scores: np.ndarray) -> int:
    """Greedy V5 selection among the rows ``members`` (ascending); writes ``picks`` /
    ``picked_scores`` in selection order and returns how many were selected.

    The queue is a binary heap (``queue_*[:size]``). A group of more than ``2 * first_chunk``
    candidates starts it with about ``first_chunk`` of the best and keeps the others in a reserve
    (``reserve_*[:reserve_size]``) whose order keys are all below ``cut_key``: the heap's best
    entry is the queue's best while its key is ``>= cut_key``; otherwise the reserve's next chunk
    (twice the last) moves into the heap first."""
    total = members.size
    queue_scores = np.empty(total, dtype=np.float32)
    queue_rows = np.empty(total, dtype=np.int64)
    queue_since = np.empty(total, dtype=np.int64)   # selections already applied to the entry
    reserve_scores = scores[members]
    reserve_rows = members.copy()
    reserve_size = total
    size = 0
    cut_key = 0
    chunk = first_chunk
    if total <= 2 * first_chunk:                    # one heap of everything
        queue_scores[:], queue_rows[:], queue_since[:] = reserve_scores, reserve_rows, 0
        size, reserve_size = total, 0
        for start in range((size - 2) // 2, -1, -1):
            _sift_down(queue_scores, queue_rows, queue_since, start, size)
    probe = np.empty(1, dtype=np.float32)
    probe_bits = probe.view(np.int32)
    zero = np.float32(0)
    # The selected boxes' geometry (one array per coordinate, so the IoU loop vectorises) and
    # one popped candidate's IoUs with them.
    selected_y_lo = np.empty(max_output_size, dtype=np.float32)
    selected_x_lo = np.empty(max_output_size, dtype=np.float32)
    selected_y_hi = np.empty(max_output_size, dtype=np.float32)
    selected_x_hi = np.empty(max_output_size, dtype=np.float32)
    selected_area = np.empty(max_output_size, dtype=np.float32)
    ious = np.empty(max_output_size, dtype=np.float32)
    selected = 0
    while selected < max_output_size:
        while reserve_size > 0:
            if size > 0:
                probe[0] = queue_scores[0]
                if _order_key(probe_bits[0]) >= cut_key:
                    break
            size, reserve_size, cut_key = _load_reserve(
                reserve_scores, reserve_rows, reserve_size, queue_scores, queue_rows, queue_since,
                size, chunk)
            chunk *= 2
        if size == 0:
            break
        score, row, since = queue_scores[0], queue_rows[0], queue_since[0]
        size -= 1
        if size > 0:
            queue_scores[0], queue_rows[0], queue_since[0] = (
                queue_scores[size], queue_rows[size], queue_since[size])
            _sift_down(queue_scores, queue_rows, queue_since, 0, size)
        y_a, x_a, y_b, x_b = _box(boxes, deltas, exp_h, exp_w, anchors, row)
        y_lo, x_lo = _minimum(y_a, y_b), _minimum(x_a, x_b)
        y_hi, x_hi = _maximum(y_a, y_b), _maximum(x_a, x_b)
        row_area = (y_hi - y_lo) * (x_hi - x_lo)
        for j in range(since, selected):
            height = _maximum(_minimum(y_hi, selected_y_hi[j])
                              - _maximum(y_lo, selected_y_lo[j]), zero)
            width = _maximum(_minimum(x_hi, selected_x_hi[j])
                             - _maximum(x_lo, selected_x_lo[j]), zero)
            intersection = height * width
            iou = intersection / (row_area + selected_area[j] - intersection)
            ious[j] = zero if row_area <= zero or selected_area[j] <= zero else iou
        decayed = score
        suppressed = False
        for j in range(selected - 1, since - 1, -1):         # newest selection first
            iou = ious[j]
            if soft:
                if iou != zero:                                # exp(scale * 0 * 0) is exactly 1
                    decayed = decayed * _expf(scale * iou * iou)
            elif not iou <= iou_threshold:
                suppressed = True
                break
        if suppressed:
            continue
        if decayed == score:
            picks[selected] = row
            picked_scores[selected] = decayed
            selected_y_lo[selected], selected_x_lo[selected] = y_lo, x_lo
            selected_y_hi[selected], selected_x_hi[selected] = y_hi, x_hi
            selected_area[selected] = row_area
            selected += 1
        elif decayed > score_threshold:
            queue_scores[size], queue_rows[size], queue_since[size] = decayed, row, selected
            _sift_up(queue_scores, queue_rows, queue_since, size)
            size += 1
    return selected


@njit(cache=True, error_model="numpy")
def select_groups(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, num_groups: int,
                  max_output_size: int, iou_threshold: np.float32, score_threshold: np.float32,
                  soft: bool, scale: np.float32, picks: np.ndarray, picked_scores: np.ndarray,
                  valid: np.ndarray, first_chunk: int = 4096) -> None:
    """V5 on every group: ``boxes [N, 4]`` / ``scores [N]`` float32, ``groups [N]`` int64 in
    ``[0, num_groups)``; fills ``picks [G, K]`` (rows), ``picked_scores [G, K]`` and ``valid [G]``.
    Candidates are the rows with a score ``> score_threshold``. A group of more than
    ``2 * first_chunk`` candidates (d0's global path: 49,104) heaps about ``first_chunk`` at a
    time (the queue's order, so the result, is the same for any value)."""
    no_anchors, no_exps = np.empty((0, 4), dtype=np.float32), np.empty(0, dtype=np.float32)
    _select_groups(boxes, no_anchors, no_exps, no_exps, no_anchors, scores, groups, num_groups,
                   max_output_size, iou_threshold, score_threshold, soft, scale, picks,
                   picked_scores, valid, first_chunk)


@njit(cache=True, error_model="numpy")
def select_groups_encoded(deltas: np.ndarray, exp_h: np.ndarray, exp_w: np.ndarray,
                          anchors: np.ndarray, scores: np.ndarray, groups: np.ndarray,
                          num_groups: int, max_output_size: int, iou_threshold: np.float32,
                          score_threshold: np.float32, soft: bool, scale: np.float32,
                          picks: np.ndarray, picked_scores: np.ndarray, valid: np.ndarray,
                          first_chunk: int = 4096) -> None:
    """:func:`select_groups` on the boxes that ``deltas [N, 4]`` encode on ``anchors [A, 4]``
    (row ``i`` on anchor ``i % A``; ``exp_h`` / ``exp_w`` ``[N]``: ``exp`` of ``th`` / ``tw``),
    decoding only the rows the loop pops, with :func:`model.box_coder_jit.decode_row`'s float32
    arithmetic (so the result equals decoding every box first)."""
    _select_groups(np.empty((0, 4), dtype=np.float32), deltas, exp_h, exp_w, anchors, scores,
                   groups, num_groups, max_output_size, iou_threshold, score_threshold, soft,
                   scale, picks, picked_scores, valid, first_chunk)


@njit(cache=True, error_model="numpy")
def _select_groups(boxes: np.ndarray, deltas: np.ndarray, exp_h: np.ndarray, exp_w: np.ndarray,
                   anchors: np.ndarray, scores: np.ndarray, groups: np.ndarray, num_groups: int,
                   max_output_size: int, iou_threshold: np.float32, score_threshold: np.float32,
                   soft: bool, scale: np.float32, picks: np.ndarray, picked_scores: np.ndarray,
                   valid: np.ndarray, first_chunk: int) -> None:
    if num_groups == 1:                                  # d0's global path: one pass
        members = np.flatnonzero(scores > score_threshold)
        counts = np.array([0, members.size])
    else:
        counts = np.zeros(num_groups + 1, dtype=np.int64)
        for row in range(scores.size):
            if scores[row] > score_threshold:
                counts[groups[row] + 1] += 1
        for group in range(num_groups):
            counts[group + 1] += counts[group]
        members = np.empty(counts[num_groups], dtype=np.int64)
        filled = counts[:num_groups].copy()
        for row in range(scores.size):                   # ascending rows within each group
            if scores[row] > score_threshold:
                members[filled[groups[row]]] = row
                filled[groups[row]] += 1
    for group in range(num_groups):
        if counts[group + 1] > counts[group]:
            valid[group] = _select_group(
                boxes, deltas, exp_h, exp_w, anchors, scores,
                members[counts[group]:counts[group + 1]], max_output_size, iou_threshold,
                score_threshold, soft, scale, first_chunk, picks[group], picked_scores[group])
