"""automl's numpy NMS loops (``nms_np.soft_nms`` / ``hard_nms`` / ``diou_nms``) compiled with numba:
the fast path of :func:`model.nms.batched_nms_np`.

The loops only decide; every number they use comes from a per-group ``[pick, row]`` matrix that
:mod:`model.nms` computes with the same torch expressions and numpy's own ``np.exp`` as the
vectorised implementation (soft methods: the weight a pick puts on a row; hard/diou: whether the row survives the
pick). A group's rows are given in its row order (the order numpy would
see). tests/test_nms.py checks both implementations against each other on random, tied and
saturated groups. Compiled on first use and cached on disk (``cache=True``).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, error_model="numpy")
def soft_groups(scores: np.ndarray, starts: np.ndarray, weights: np.ndarray,
                weight_starts: np.ndarray, score_thresh: np.float32, kept: np.ndarray,
                kept_scores: np.ndarray) -> int:
    """``nms_np.soft_nms`` on every group: rows ``starts[g]:starts[g + 1]`` of ``scores``, whose
    weights ``[m, m]`` (pick, row) lie flat at ``weights[weight_starts[g]:]``. Writes the kept rows
    and their decayed scores group by group in keep order; returns how many."""
    count = 0
    for group in range(starts.size - 1):
        first = starts[group]
        size = starts[group + 1] - first
        matrix = weights[weight_starts[group]:weight_starts[group] + size * size].reshape(
            (size, size))
        current = scores[first:first + size].copy()
        layout = np.arange(size)                     # the rows of nms_np's ``dets``, in order
        alive = size
        while alive > 0:
            best = 0                                 # np.argmax: the first maximum
            for slot in range(1, alive):
                if current[layout[slot]] > current[layout[best]]:
                    best = slot
            layout[0], layout[best] = layout[best], layout[0]
            pick = layout[0]
            kept[count] = first + pick
            kept_scores[count] = current[pick]
            count += 1
            survivors = 0                            # dets = dets[where(score >= thresh) + 1]
            for slot in range(1, alive):
                row = layout[slot]
                current[row] = current[row] * matrix[pick, row]
                if current[row] >= score_thresh:
                    layout[survivors] = row
                    survivors += 1
            alive = survivors
    return count


@njit(cache=True, error_model="numpy")
def hard_groups(starts: np.ndarray, orders: np.ndarray, keeps: np.ndarray,
                keep_starts: np.ndarray, kept: np.ndarray) -> int:
    """``nms_np.hard_nms`` / ``diou_nms`` on every group: visit the group's rows in ``orders``
    (numpy's ``argsort()[::-1]``, positions within the group), keep one, drop every later row
    that the ``[m, m]`` (pick, row) matrix at ``keeps[keep_starts[g]:]`` says it does not
    survive. Writes the kept rows; returns how many."""
    count = 0
    for group in range(starts.size - 1):
        first = starts[group]
        size = starts[group + 1] - first
        matrix = keeps[keep_starts[group]:keep_starts[group] + size * size].reshape((size, size))
        order = orders[first:first + size].copy()
        alive = size
        while alive > 0:
            pick = order[0]
            kept[count] = first + pick
            count += 1
            survivors = 0                            # order = order[where(survives) + 1]
            for slot in range(1, alive):
                if matrix[pick, order[slot]]:
                    order[survivors] = order[slot]
                    survivors += 1
            alive = survivors
    return count
