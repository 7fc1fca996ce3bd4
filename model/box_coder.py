"""Box decoding exactly as automl applies the box head's regression outputs."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .jit_kernels import compiled


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


def decode_boxes_host(deltas: Tensor, anchors_yxyx: Tensor) -> Tensor:
    """:func:`decode_boxes` for post-processing: the same boxes bit for bit, without autograd.

    ``anchors_yxyx`` is ``[A, 4]`` with ``deltas [..., A, 4]``, or has the shape of ``deltas``. On
    the CPU in float32 the decoding runs as one compiled pass (:mod:`model.box_coder_jit`; ``exp``
    still by ``torch.exp``): ~4x faster than the chain of tensor ops on d0's 49,104 anchors.
    """
    kernel = compiled("box_coder_jit", "decode_rows")
    matching = anchors_yxyx.shape == deltas.shape or (
        anchors_yxyx.ndim == 2 and deltas.shape[-2:] == anchors_yxyx.shape)
    if (kernel is None or not matching or deltas.device.type != "cpu"
            or deltas.dtype != torch.float32):
        return decode_boxes(deltas, anchors_yxyx)
    flat = deltas.detach().reshape(-1, 4)
    anchors = anchors_yxyx.detach().to(torch.float32).reshape(-1, 4).contiguous()
    boxes = np.empty((flat.shape[0], 4), dtype=np.float32)
    kernel(flat.contiguous().numpy(), *exp_sizes(flat), anchors.numpy(), boxes)
    return torch.from_numpy(boxes).reshape(deltas.shape)


def exp_sizes(deltas: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(exp(th), exp(tw))`` of float32 CPU ``deltas [N, 4]`` as numpy arrays, computed by
    ``torch.exp`` as :func:`decode_boxes` computes them: the compiled decoders take these values,
    so their boxes are bit-identical to ``decode_boxes``'."""
    return torch.exp(deltas[:, 2]).numpy(), torch.exp(deltas[:, 3]).numpy()


# automl's FasterRcnnBoxCoder clamps sizes at this value before dividing and taking logs.
_ENCODE_EPSILON = 1e-8


# Port of automl efficientdet/object_detection/faster_rcnn_box_coder.py::FasterRcnnBoxCoder._encode
# @ 6a54c87 (scale_factors=None, as tf2/anchors.py::AnchorLabeler builds it)
def encode_boxes(boxes_yxyx: Tensor, anchors_yxyx: Tensor) -> Tensor:
    """Regression targets ``(ty, tx, th, tw)`` of boxes relative to anchors (inverse of
    :func:`decode_boxes`).

    Args:
        boxes_yxyx: ``[..., 4]`` boxes ``(ymin, xmin, ymax, xmax)`` in network-input pixels.
        anchors_yxyx: ``[..., 4]`` anchors, broadcastable against ``boxes_yxyx``.

    Returns:
        ``[..., 4]``: ``ty = (yc - yc_a) / ha``, ``tx = (xc - xc_a) / wa``, ``th = log(h / ha)``,
        ``tw = log(w / wa)``, with heights and widths clamped below at 1e-8 as automl does.
    """
    anchors = anchors_yxyx.to(device=boxes_yxyx.device, dtype=boxes_yxyx.dtype)
    ycenter_a, xcenter_a, ha, wa = _centers_and_sizes(anchors)
    ycenter, xcenter, h, w = _centers_and_sizes(boxes_yxyx)
    ha, wa = ha.clamp(min=_ENCODE_EPSILON), wa.clamp(min=_ENCODE_EPSILON)
    h, w = h.clamp(min=_ENCODE_EPSILON), w.clamp(min=_ENCODE_EPSILON)
    tx = (xcenter - xcenter_a) / wa
    ty = (ycenter - ycenter_a) / ha
    tw = torch.log(w / wa)
    th = torch.log(h / ha)
    return torch.stack([ty, tx, th, tw], dim=-1)


def _centers_and_sizes(boxes_yxyx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """automl ``BoxList.get_center_coordinates_and_sizes``: ``(yc, xc, h, w)`` in its op order."""
    ymin, xmin, ymax, xmax = boxes_yxyx.unbind(-1)
    width = xmax - xmin
    height = ymax - ymin
    return ymin + height / 2.0, xmin + width / 2.0, height, width
