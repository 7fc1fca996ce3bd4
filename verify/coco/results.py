"""Model detections -> COCO results rows and dicts.

Box formats: the model gives ``boxes_yxyx`` (ymin, xmin, ymax, xmax) in original-image pixels;
COCO results use ``bbox = [x, y, width, height]`` in the same pixels.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from converter.locking import LockBusy, file_lock
from model.postprocess import Detections, to_coco_rows
from verify.coco.errors import PredictionError, ResumeError


class DetectionsLike(Protocol):
    """What :func:`detections_to_results` reads from ``model.postprocess.Detections``.

    ``boxes_yxyx`` [N, K, 4] (ymin, xmin, ymax, xmax, original-image pixels), ``scores`` [N, K],
    ``classes`` [N, K] (float, 1-based COCO ids), ``valid`` [N] (rows past it are padding).
    numpy arrays or torch tensors.
    """

    boxes_yxyx: Any
    scores: Any
    classes: Any
    valid: Any


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def detections_to_results(dets: DetectionsLike, image_ids: Sequence[int]) -> list[list[list[float]]]:
    """Per image, its detections as rows ``[category_id, x, y, w, h, score]``.

    The rows are :func:`model.postprocess.to_coco_rows` (automl's float32 ``transform_detections``:
    ``w = xmax - xmin``, ``h = ymax - ymin``, not clipped) with the class rounded to an int.
    Only the first ``valid[i]`` rows of image ``i`` are kept; padding rows are dropped (automl's
    evaluator passes them on as class 0, which COCOeval ignores since 0 is not a category, so
    the metrics are the same).
    """
    boxes, scores, classes = (_to_numpy(v) for v in (dets.boxes_yxyx, dets.scores, dets.classes))
    valid = _to_numpy(dets.valid).reshape(-1)
    n = len(image_ids)
    if boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
        raise PredictionError(f"boxes_yxyx has shape {boxes.shape}, expected [{n}, K, 4]")
    if scores.shape != boxes.shape[:2] or classes.shape != boxes.shape[:2] or valid.shape != (n,):
        raise PredictionError(
            f"scores {scores.shape} / classes {classes.shape} / valid {valid.shape} do not fit "
            f"boxes_yxyx {boxes.shape}")
    counts = [int(count) for count in valid]
    for i, count in enumerate(counts):
        if not 0 <= count <= boxes.shape[1]:
            raise PredictionError(f"valid[{i}] = {count} is outside [0, {boxes.shape[1]}]")
        if not (np.isfinite(boxes[i, :count]).all() and np.isfinite(scores[i, :count]).all()):
            raise PredictionError(f"non-finite boxes or scores for image id {image_ids[i]}")
    # np.array copies: torch.from_numpy takes neither negative strides nor read-only arrays
    tensors = (torch.from_numpy(np.array(a)) for a in (boxes, scores, classes, valid))
    table = to_coco_rows(Detections(*tensors), image_ids).reshape(n, boxes.shape[1], 7)
    return [[[round(c), x, y, w, h, s] for _, x, y, w, h, s, c in table[i, :count].tolist()]
            for i, count in enumerate(counts)]


def result_dicts(image_id: int, rows: Iterable[Sequence[float]]) -> list[dict[str, Any]]:
    """COCO results dicts of one image from its :func:`detections_to_results` rows."""
    return [{"image_id": image_id, "category_id": int(row[0]), "bbox": list(row[1:5]), "score": row[5]}
            for row in rows]


def is_result_rows(rows: object) -> bool:
    """True for a list of :func:`detections_to_results` rows: ``[category_id, x, y, w, h,
    score]``, six finite numbers each (what a partial results file must hold)."""
    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)
    return isinstance(rows, list) and all(
        isinstance(row, list) and len(row) == 6 and all(map(number, row)) for row in rows)


@contextlib.contextmanager
def results_lock(partial_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``<partial>.lock`` for the block, so two runs never write one partial results file
    (and the results made from it) at once.

    Raises:
        ResumeError: another run holds it.
    """
    partial_path = Path(partial_path)
    lock = partial_path.with_name(partial_path.name + ".lock")
    try:
        with file_lock(lock, wait=False):
            yield
    except LockBusy:
        raise ResumeError(f"another run is writing {partial_path} (it holds {lock}); wait for "
                          "it or choose another --results") from None
