"""Box decoding exactly as automl applies the box head's regression outputs."""
from __future__ import annotations

import torch
from torch import Tensor


# Port of automl efficientdet/tf2/anchors.py::decode_box_outputs @ 6a54c87
def decode_boxes(deltas: Tensor, anchors_yxyx: Tensor) -> Tensor:
    """Apply ``(ty, tx, th, tw)`` regressions to anchors.

    Args:
        deltas: ``[..., 4]`` box-head outputs in TF channel order ``(ty, tx, th, tw)``.
        anchors_yxyx: ``[..., 4]`` anchors ``(ymin, xmin, ymax, xmax)`` in network-input pixels,
            broadcastable against ``deltas``.

    Returns:
        ``[..., 4]`` boxes ``(ymin, xmin, ymax, xmax)`` in network-input pixels, in the dtype of
        ``deltas``. Centres move by ``ty * ha`` / ``tx * wa`` and sizes scale by ``exp(th)`` /
        ``exp(tw)``; like automl there is no clamp on ``th``/``tw`` before ``exp`` and no clipping.
        The arithmetic is written in the same order as TF's so float32 rounding matches.
    """
    if deltas.shape[-1] != 4 or anchors_yxyx.shape[-1] != 4:
        raise ValueError(
            f"deltas and anchors need a trailing dim of 4, got {tuple(deltas.shape)} "
            f"and {tuple(anchors_yxyx.shape)}")
    anchors = anchors_yxyx.to(device=deltas.device, dtype=deltas.dtype)
    ycenter_a = (anchors[..., 0] + anchors[..., 2]) / 2
    xcenter_a = (anchors[..., 1] + anchors[..., 3]) / 2
    ha = anchors[..., 2] - anchors[..., 0]
    wa = anchors[..., 3] - anchors[..., 1]
    ty, tx, th, tw = deltas.unbind(-1)

    w = torch.exp(tw) * wa
    h = torch.exp(th) * ha
    ycenter = ty * ha + ycenter_a
    xcenter = tx * wa + xcenter_a
    return torch.stack(
        [ycenter - h / 2.0, xcenter - w / 2.0, ycenter + h / 2.0, xcenter + w / 2.0], dim=-1)
