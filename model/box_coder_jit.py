"""Box decoding compiled with numba: the fast path of :func:`model.box_coder.decode_boxes_host`.

Every value is computed with the float32 operations of :func:`model.box_coder.decode_boxes`, in its
order, except ``exp``, whose results the caller passes in (computed by ``torch.exp`` as
``decode_boxes`` computes them), so the boxes are bit-identical. Compiled on first use and cached
on disk (``cache=True``).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, error_model="numpy", inline="always")
def decode_row(deltas: np.ndarray, exp_h: np.ndarray, exp_w: np.ndarray, anchors: np.ndarray,
               row: int, anchor: int) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """Box ``(ymin, xmin, ymax, xmax)`` of regression ``deltas[row]`` on ``anchors[anchor]``."""
    two = np.float32(2)
    y_lo, x_lo = anchors[anchor, 0], anchors[anchor, 1]
    y_hi, x_hi = anchors[anchor, 2], anchors[anchor, 3]
    anchor_height, anchor_width = y_hi - y_lo, x_hi - x_lo
    height = exp_h[row] * anchor_height
    width = exp_w[row] * anchor_width
    y_center = deltas[row, 0] * anchor_height + (y_lo + y_hi) / two
    x_center = deltas[row, 1] * anchor_width + (x_lo + x_hi) / two
    return (y_center - height / two, x_center - width / two,
            y_center + height / two, x_center + width / two)


@njit(cache=True, error_model="numpy")
def decode_rows(deltas: np.ndarray, exp_h: np.ndarray, exp_w: np.ndarray, anchors: np.ndarray,
                boxes: np.ndarray) -> None:
    """``boxes[i] = decode(deltas[i], anchors[i % A])`` for ``deltas [N, 4]`` (``ty, tx, th, tw``;
    ``N`` a multiple of ``A``), ``exp_h = exp(th)``, ``exp_w = exp(tw)`` (``[N]``) and
    ``anchors [A, 4]`` (``yxyx``), all float32."""
    num_anchors = anchors.shape[0]
    for start in range(0, deltas.shape[0], num_anchors):
        for anchor in range(num_anchors):
            row = start + anchor
            boxes[row, 0], boxes[row, 1], boxes[row, 2], boxes[row, 3] = decode_row(
                deltas, exp_h, exp_w, anchors, row, anchor)
