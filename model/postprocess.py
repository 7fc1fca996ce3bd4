"""automl's three detection post-processing paths, from flattened head outputs to detections.

===========  ==============================  ==============================================
kind         automl entry point              used by
===========  ==============================  ==============================================
global       ``postprocess_global``          inference (``model(image)``, saved_model serve)
per_class    ``postprocess_per_class``       COCO eval default (``generate_detections``)
pyfunc       ``nms_np.per_class_nms``        COCO eval with ``nms_configs.pyfunc=True``
===========  ==============================  ==============================================

All three decode the same boxes and sigmoid scores; they differ in the pre-NMS candidates, the NMS,
the merge and the clipping (see the function docstrings and the reference README's table).

Inputs everywhere: ``cls_logits [N, A, num_classes]`` raw logits and ``box_deltas [N, A, 4]``
``(ty, tx, th, tw)``, both flattened in TF order (level by level, row-major y, x, then anchor);
``anchors_yxyx [A, 4]`` in network-input pixels; ``image_scales [N]`` = ``image_scale_to_original``
from preprocessing. Everything is computed in float32, as TF does.

Candidate order is TF's: pre-NMS ``top_k`` candidates (``max_nms_inputs > 0``) come in
``tf.math.top_k(sorted=False)``'s heap order (:mod:`model.tf_topk`), the best class per anchor is
the first maximum (``tf.math.argmax``), so exact score ties -- common once sigmoid saturates at 1.0
-- resolve as in automl (NMS prefers the earlier candidate, nms_np the first row).

Known differences from automl (beyond the NMS ones documented in ``model/nms.py``):

* ``sigmoid`` / ``exp`` are PyTorch's; TF's Eigen kernels differ by <= 2 ulp (sigmoid: max abs
  difference 1.8e-7 on [-12, 20]; both round to exactly 1.0 from logit 16.6355 up).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from .box_coder import decode_boxes_host
from .nms import (NP_METHODS, EncodedBoxes, batched_nms_np, batched_non_max_suppression_v5,
                  numpy_argsort)
from .tf_topk import tf_top_k_unsorted

# automl tf2/postprocess.py: output classes are 1-based COCO ids.
CLASS_OFFSET = 1
# automl anchors.MAX_DETECTION_POINTS: pre-NMS (anchor, class) pairs tf2/eval.py keeps.
MAX_DETECTION_POINTS = 5000
# automl nms_np._DUMMY_DETECTION_SCORE: score of the pyfunc padding rows.
DUMMY_DETECTION_SCORE = -1e5

POSTPROCESS_KINDS = ("global", "per_class", "pyfunc")

Scales = Union[Tensor, Sequence[float], float, None]


@dataclass(frozen=True)
class NmsConfig:
    """automl's ``nms_configs`` (hparams_config.py), with its defaulting rules applied lazily.

    Field values are stored as automl stores them (``None`` / 0 mean "use the default"); the
    effective parameters come from :meth:`tf_nms_args` (global, per_class) and :meth:`np_nms_args`
    (pyfunc), because automl's two NMS implementations default differently:

    =========================  ==========================  ===================================
    parameter                  TF paths (gaussian / hard)   pyfunc (gaussian, linear / hard, diou)
    =========================  ==========================  ===================================
    sigma                      ``sigma or 0.5``, given to   ``sigma or 0.5``, weight
                               TF as ``sigma / 2`` / --     ``exp(-iou^2 / sigma)`` / --
    iou_thresh                 always 0.5 (unused by soft)  ``iou_thresh or 0.3`` / ``or 0.5``
                               / ``iou_thresh or 0.5``
    score_thresh               ``or 0.001`` / ``or -inf``   ``or 0.001`` / none
    =========================  ==========================  ===================================

    ``max_output_size`` caps the detections per image (and, in per_class, per class);
    ``max_nms_inputs > 0`` switches pre-NMS selection to the top (anchor, class) pairs by logit;
    ``pyfunc`` selects the numpy path in automl's ``generate_detections``.
    """

    method: str | None = "gaussian"
    iou_thresh: float | None = None
    score_thresh: float | None = None
    sigma: float | None = None
    max_output_size: int = 100
    max_nms_inputs: int = 0
    pyfunc: bool = False

    def __post_init__(self) -> None:
        if self.method and self.method not in NP_METHODS:
            raise ValueError(f"unknown nms method {self.method!r}; expected one of {NP_METHODS}")
        if self.max_output_size < 0 or self.max_nms_inputs < 0:
            raise ValueError("max_output_size and max_nms_inputs must be >= 0")

    @classmethod
    def from_dict(cls, nms_configs: Mapping[str, Any]) -> NmsConfig:
        """Build from automl's ``nms_configs`` dict (e.g. ``hparams.json`` / ``DetConfig``)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(nms_configs) - known)
        if unknown:
            raise ValueError(f"unknown nms_configs keys: {unknown}")
        return cls(**dict(nms_configs))

    # Port of automl efficientdet/tf2/postprocess.py::nms (parameter defaults) @ 6a54c87
    def tf_nms_args(self) -> tuple[float, float, float]:
        """``(iou_threshold, score_threshold, soft_nms_sigma)`` passed to NonMaxSuppressionV5."""
        if self.method == "hard" or not self.method:
            return self.iou_thresh or 0.5, self.score_thresh or -math.inf, 0.0
        if self.method == "gaussian":
            # TF's sigma is twice the paper's (tensorflow#40253), so automl halves it.
            return 0.5, self.score_thresh or 0.001, (self.sigma or 0.5) / 2
        raise ValueError(f"the TF post-processing paths support 'gaussian' and 'hard' NMS, "
                         f"not {self.method!r} (use the pyfunc path)")

    def np_nms_args(self) -> dict[str, Any]:
        """Keyword arguments for :func:`model.nms.batched_nms_np` (nms_np applies its defaults)."""
        return {"method": self.method, "iou_thresh": self.iou_thresh, "sigma": self.sigma,
                "score_thresh": self.score_thresh}


@dataclass
class Detections:
    """Batched detections, ``K = max_output_size`` rows per image, best first.

    Attributes:
        boxes_yxyx: ``[N, K, 4]`` float32 (ymin, xmin, ymax, xmax) in original-image pixels.
        scores: ``[N, K]`` float32 (soft-NMS: decayed scores).
        classes: ``[N, K]`` 1-based class ids: float32 as automl's graph gives them, int64 from
            ``EfficientDet.predict``.
        valid: ``[N]`` int64, number of real rows; rows past it are padding, laid out as automl
            lays them out: global -> copies of pre-NMS candidate 0 (its clipped, scaled box and its
            class) with score 0 (TF pads the NMS indices with 0); per_class -> all zeros;
            pyfunc -> zero box, score ``DUMMY_DETECTION_SCORE`` (-1e5), class 0.
        names: per image, the class names of its ``valid`` rows (``predict(names=True)``), else
            None.
    """

    boxes_yxyx: Tensor
    scores: Tensor
    classes: Tensor
    valid: Tensor
    names: list[list[str]] | None = None


def _check_heads(cls_logits: Tensor, box_deltas: Tensor, anchors_yxyx: Tensor) -> None:
    if cls_logits.ndim != 3:
        raise ValueError(f"cls_logits must be [N, A, num_classes], got {tuple(cls_logits.shape)}")
    batch, num_anchors, _ = cls_logits.shape
    if tuple(box_deltas.shape) != (batch, num_anchors, 4):
        raise ValueError(
            f"box_deltas must be [{batch}, {num_anchors}, 4], got {tuple(box_deltas.shape)}")
    if tuple(anchors_yxyx.shape) != (num_anchors, 4):
        raise ValueError(
            f"anchors_yxyx must be [{num_anchors}, 4], got {tuple(anchors_yxyx.shape)}")


def _scales_tensor(image_scales: Scales, batch: int, like: Tensor) -> Tensor:
    """``image_scales`` as float32 ``[N]`` (``None`` -> no rescaling, i.e. 1)."""
    if image_scales is None:
        return torch.ones(batch, dtype=torch.float32, device=like.device)
    scales = torch.as_tensor(image_scales, dtype=torch.float32, device=like.device).reshape(-1)
    if scales.numel() == 1:
        scales = scales.expand(batch)
    if scales.numel() != batch:
        raise ValueError(f"image_scales must have {batch} values, got {scales.numel()}")
    return scales


def _top_flat_indices(flat: Tensor, k: int) -> Tensor:
    """Per row, the ``k`` largest entries of ``flat [N, M]`` in ``tf.math.top_k(sorted=False)``
    order (TF's heap layout, :mod:`model.tf_topk`); computed on the CPU."""
    rows = flat.detach().cpu().numpy()
    index = np.stack([tf_top_k_unsorted(row, k) for row in rows])
    return torch.from_numpy(index).to(flat.device)


# Port of automl efficientdet/tf2/postprocess.py::pre_nms (+ topk_class_boxes) @ 6a54c87
def pre_nms(
    cls_logits: Tensor, box_deltas: Tensor, anchors_yxyx: Tensor, max_nms_inputs: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pre-NMS candidates: decoded boxes, sigmoid scores and 0-based classes.

    ``max_nms_inputs == 0``: every anchor once, with its max logit and argmax class (ties to the
    lower class id). ``> 0``: the ``max_nms_inputs`` best (anchor, class) pairs by logit over all
    anchors and classes, so one anchor can appear under several classes, in the order
    ``tf.math.top_k(sorted=False)`` returns them (which decides exact score ties downstream).

    Returns:
        ``(boxes_yxyx [N, K, 4], scores [N, K], classes [N, K] int64)`` in network-input pixels,
        ``K = A`` or ``max_nms_inputs``.
    """
    _check_heads(cls_logits, box_deltas, anchors_yxyx)
    cls_logits = cls_logits.float()
    box_deltas = box_deltas.float()
    anchors = anchors_yxyx.to(device=cls_logits.device, dtype=torch.float32)
    batch, num_anchors, num_classes = cls_logits.shape
    if max_nms_inputs > 0:
        k = min(max_nms_inputs, num_anchors * num_classes)
        flat_index = _top_flat_indices(cls_logits.reshape(batch, -1), k)
        anchor_index = flat_index // num_classes
        classes = flat_index % num_classes
        logits = torch.gather(cls_logits.reshape(batch, -1), 1, flat_index)
        deltas = torch.gather(box_deltas, 1, anchor_index[..., None].expand(-1, -1, 4))
        boxes = decode_boxes_host(deltas, anchors[anchor_index])
    else:
        # torch.max's indices and tf.math.argmax are both the first maximum.
        logits, classes = cls_logits.max(dim=-1)
        boxes = decode_boxes_host(box_deltas, anchors)
    return boxes, torch.sigmoid(logits), classes


def _first_max_class(cls_logits: Tensor, anchor_index: Tensor) -> Tensor:
    """``argmax`` over the classes of the anchors ``anchor_index [N, K]`` (first maximum)."""
    num_classes = cls_logits.shape[-1]
    rows = torch.gather(cls_logits, 1, anchor_index[..., None].expand(-1, -1, num_classes))
    return rows.float().argmax(dim=-1)


# Port of automl efficientdet/tf2/postprocess.py::postprocess_global @ 6a54c87
def postprocess_global(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors_yxyx: Tensor,
    image_hw: tuple[int, int],
    image_scales: Scales,
    nms: NmsConfig = NmsConfig(),
) -> Detections:
    """automl's inference post-processing (``model(image)``, ``post_mode='global'``).

    Each anchor's best class (or the top ``nms.max_nms_inputs`` pairs), one class-agnostic TF NMS
    per image over all candidates (soft by default), classes + 1, boxes clipped to the padded network
    input ``[0, H] x [0, W]`` and then multiplied by ``image_scales``.
    """
    if nms.max_nms_inputs > 0:
        boxes, scores, classes = pre_nms(cls_logits, box_deltas, anchors_yxyx, nms.max_nms_inputs)
        candidates: Tensor | EncodedBoxes = boxes.reshape(-1, 4)
    else:
        # Each anchor's best logit (the class only for the selected rows: _first_max_class); the
        # NMS decodes only the boxes it looks at.
        _check_heads(cls_logits, box_deltas, anchors_yxyx)
        scores = torch.sigmoid(cls_logits.float().amax(dim=-1))
        anchors = anchors_yxyx.to(device=box_deltas.device, dtype=torch.float32)
        box_deltas = box_deltas.float()
        candidates = EncodedBoxes(box_deltas.reshape(-1, 4), anchors)
    batch, num = scores.shape
    iou_threshold, score_threshold, sigma = nms.tf_nms_args()
    groups = (None if batch == 1 else
              torch.arange(batch, device=scores.device)[:, None].expand(batch, num).reshape(-1))
    picks, nms_scores, valid = batched_non_max_suppression_v5(
        candidates, scores.reshape(-1), groups, batch, nms.max_output_size,
        iou_threshold, score_threshold, sigma)
    # Flat candidate index -> index within the image (padding rows: 0, candidate 0 as in TF).
    picks = picks % num
    if nms.max_nms_inputs > 0:
        nms_boxes = torch.gather(boxes, 1, picks[..., None].expand(-1, -1, 4))
        picked_classes = torch.gather(classes, 1, picks)
    else:
        deltas = torch.gather(box_deltas, 1, picks[..., None].expand(-1, -1, 4))
        nms_boxes = decode_boxes_host(deltas, anchors[picks])
        picked_classes = _first_max_class(cls_logits, picks)
    nms_classes = (picked_classes + CLASS_OFFSET).float()
    height, width = image_hw
    upper = torch.tensor([height, width, height, width], dtype=torch.float32,
                         device=nms_boxes.device)
    nms_boxes = torch.minimum(nms_boxes, upper).clamp(min=0.0)                # tf.clip_by_value
    nms_boxes = nms_boxes * _scales_tensor(image_scales, batch, nms_boxes)[:, None, None]
    return Detections(nms_boxes, nms_scores, nms_classes, valid)


def _resolve_inputs(max_nms_inputs: int | None, nms: NmsConfig) -> int:
    return nms.max_nms_inputs if max_nms_inputs is None else max_nms_inputs


# Port of automl efficientdet/tf2/postprocess.py::postprocess_per_class (+ per_class_nms) @ 6a54c87
def postprocess_per_class(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors_yxyx: Tensor,
    image_scales: Scales,
    nms: NmsConfig = NmsConfig(),
    max_nms_inputs: int | None = MAX_DETECTION_POINTS,
) -> Detections:
    """automl's COCO-eval post-processing (``generate_detections`` with ``pyfunc`` False).

    The top ``max_nms_inputs`` (anchor, class) pairs by logit (tf2/eval.py sets
    ``nms_configs.max_nms_inputs = MAX_DETECTION_POINTS = 5000``; ``None`` uses
    ``nms.max_nms_inputs``, 0 keeps each anchor's best class), TF NMS per class keeping up to
    ``max_output_size`` per class, all classes merged (class order) and the best ``max_output_size``
    rows by score kept (stable: ties to the earlier class / selection). Boxes are scaled but **not**
    clipped; padding rows are zeros.
    """
    boxes, scores, classes = pre_nms(cls_logits, box_deltas, anchors_yxyx,
                                     _resolve_inputs(max_nms_inputs, nms))
    batch, num = scores.shape
    num_classes = cls_logits.shape[-1]
    out = nms.max_output_size
    iou_threshold, score_threshold, sigma = nms.tf_nms_args()
    image = torch.arange(batch, device=scores.device)[:, None]
    groups = (image * num_classes + classes).reshape(-1)
    picks, nms_scores, valid = batched_non_max_suppression_v5(
        boxes.reshape(-1, 4), scores.reshape(-1), groups, batch * num_classes, out,
        iou_threshold, score_threshold, sigma)
    # [N, C * K] in concatenation order (class-major, then selection order).
    picks = picks.reshape(batch, num_classes * out)
    nms_scores = nms_scores.reshape(batch, num_classes * out)
    real = (torch.arange(out, device=valid.device)[None, :] < valid[:, None]).reshape(batch, -1)
    # top_k(sorted=True) over the concatenation: score descending, ties to the earlier row; rows
    # that are not selections go last (TF appends them as zero padding after every real row).
    key = torch.where(real, nms_scores, torch.full_like(nms_scores, -math.inf))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :out]
    picks = torch.gather(picks, 1, order)
    det_scores = torch.gather(nms_scores, 1, order)
    total = valid.reshape(batch, num_classes).sum(dim=1).clamp(max=out)
    keep = torch.arange(out, device=total.device)[None, :] < total[:, None]
    candidate = (picks - image * num).clamp(min=0, max=num - 1)              # index within image
    det_boxes = torch.gather(boxes, 1, candidate[..., None].expand(-1, -1, 4))
    det_classes = (torch.gather(classes, 1, candidate) + CLASS_OFFSET).float()
    det_boxes = torch.where(keep[..., None], det_boxes, torch.zeros_like(det_boxes))
    det_scores = torch.where(keep, det_scores, torch.zeros_like(det_scores))
    det_classes = torch.where(keep, det_classes, torch.zeros_like(det_classes))
    det_boxes = det_boxes * _scales_tensor(image_scales, batch, boxes)[:, None, None]
    return Detections(det_boxes, det_scores, det_classes, total)


# Port of automl efficientdet/tf2/postprocess.py::generate_detections (pyfunc branch)
# and efficientdet/nms_np.py::per_class_nms @ 6a54c87
def postprocess_pyfunc(
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors_yxyx: Tensor,
    image_scales: Scales,
    nms: NmsConfig = NmsConfig(),
    max_nms_inputs: int | None = MAX_DETECTION_POINTS,
) -> Detections:
    """automl's numpy COCO-eval post-processing (``nms_configs.pyfunc=True``).

    Same candidates as :func:`postprocess_per_class`; per class, automl's numpy NMS
    (:func:`model.nms.batched_nms_np`: ``[x1, y1, x2, y2]`` in network-input pixels, +1 convention,
    no per-class cap); all classes merged in class order, ordered by ``np.argsort(-score)``
    (numpy's own unstable sort, run by numpy), the first ``max_output_size`` kept; boxes scaled
    after NMS, not clipped. Padding rows: zero box, score -1e5, class 0.
    """
    boxes, scores, classes = pre_nms(cls_logits, box_deltas, anchors_yxyx,
                                     _resolve_inputs(max_nms_inputs, nms))
    batch, num = scores.shape
    num_classes = cls_logits.shape[-1]
    out = nms.max_output_size
    device = scores.device
    groups = (torch.arange(batch, device=device)[:, None] * num_classes + classes).reshape(-1)
    boxes_xyxy = boxes.reshape(-1, 4)[:, [1, 0, 3, 2]]
    kept, kept_scores = batched_nms_np(boxes_xyxy, scores.reshape(-1), groups, batch * num_classes,
                                       **nms.np_nms_args())
    image_of = kept // num                                                     # kept is image-major
    det_boxes = boxes.new_zeros((batch, out, 4))
    det_scores = scores.new_full((batch, out), DUMMY_DETECTION_SCORE)
    det_classes = scores.new_zeros((batch, out))
    valid = torch.zeros(batch, dtype=torch.int64, device=device)
    for b in range(batch):
        rows = kept[image_of == b]
        row_scores = kept_scores[image_of == b]
        # automl sorts the float64 detections array: np.argsort(-detections[:, -2]).
        order = numpy_argsort(-row_scores.double())[:out]
        count = order.numel()
        rows = rows[order]
        det_boxes[b, :count] = boxes.reshape(-1, 4)[rows]
        det_scores[b, :count] = row_scores[order]
        det_classes[b, :count] = (classes.reshape(-1)[rows] + CLASS_OFFSET).float()
        valid[b] = count
    det_boxes = det_boxes * _scales_tensor(image_scales, batch, boxes)[:, None, None]
    return Detections(det_boxes, det_scores, det_classes, valid)


def postprocess(
    kind: str,
    cls_logits: Tensor,
    box_deltas: Tensor,
    anchors_yxyx: Tensor,
    image_hw: tuple[int, int],
    image_scales: Scales,
    nms: NmsConfig = NmsConfig(),
    max_nms_inputs: int | None = MAX_DETECTION_POINTS,
) -> Detections:
    """Run one of automl's post-processing paths: ``'global'``, ``'per_class'`` or ``'pyfunc'``.

    ``image_hw`` (network input) is used by ``global`` only (clipping); ``max_nms_inputs`` by the two
    eval paths only (``global`` takes ``nms.max_nms_inputs``, automl's inference setting).
    """
    if kind == "global":
        return postprocess_global(cls_logits, box_deltas, anchors_yxyx, image_hw, image_scales, nms)
    if kind == "per_class":
        return postprocess_per_class(cls_logits, box_deltas, anchors_yxyx, image_scales, nms,
                                     max_nms_inputs)
    if kind == "pyfunc":
        return postprocess_pyfunc(cls_logits, box_deltas, anchors_yxyx, image_scales, nms,
                                  max_nms_inputs)
    raise ValueError(f"unknown post-processing kind {kind!r}; expected one of {POSTPROCESS_KINDS}")


# Port of automl efficientdet/tf2/postprocess.py::generate_detections_from_nms_output
# + transform_detections @ 6a54c87
def to_coco_rows(dets: Detections, image_ids: Sequence[int] | Tensor | np.ndarray) -> np.ndarray:
    """COCO rows ``[image_id, x, y, width, height, score, class]`` as automl's eval builds them.

    Returns a float32 ``[N * K, 7]`` array with every row of every image, padding rows included
    (automl hands all of them to its evaluator, which only drops class -1), image-major.
    ``width = xmax - xmin`` and ``height = ymax - ymin`` are computed in float32 like TF.
    """
    boxes = dets.boxes_yxyx.detach().float().cpu()
    batch, rows, _ = boxes.shape
    ids = torch.as_tensor(np.asarray(image_ids), dtype=torch.float32).reshape(-1)
    if ids.numel() != batch:
        raise ValueError(f"need {batch} image ids, got {ids.numel()}")
    ymin, xmin, ymax, xmax = boxes.unbind(-1)
    table = torch.stack([
        ids[:, None].expand(batch, rows), xmin, ymin, xmax - xmin, ymax - ymin,
        dets.scores.detach().float().cpu(), dets.classes.detach().float().cpu(),
    ], dim=-1)
    return table.reshape(batch * rows, 7).numpy()
