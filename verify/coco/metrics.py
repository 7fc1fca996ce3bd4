"""COCO bbox evaluation: pycocotools ``loadRes`` / ``COCOeval('bbox')`` -> :class:`CocoMetrics`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from verify.coco.data import as_coco, pycocotools_quiet
from verify.coco.errors import ResultsError

# The 12 numbers COCOeval.summarize() computes for iouType 'bbox', in its order
# (AP over IoU .50:.95 / at .50 / at .75 / per area; AR at 1, 10, 100 detections / per area).
METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)


@dataclass(frozen=True)
class CocoMetrics:
    """The 12 COCOeval bbox numbers (fractions in [0, 1]; -1 where pycocotools has no ground truth
    for that area range) with the number of images and detections they were computed on."""

    stats: tuple[float, ...]
    num_images: int
    num_detections: int
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.stats) != len(METRIC_NAMES):
            raise ValueError(f"expected {len(METRIC_NAMES)} stats, got {len(self.stats)}")

    def __getitem__(self, name: str) -> float:
        try:
            return self.stats[METRIC_NAMES.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def as_dict(self) -> dict[str, float]:
        """Metric name -> value, in pycocotools order."""
        return dict(zip(METRIC_NAMES, self.stats))


def _check_result(det: Any, index: int) -> None:
    if not isinstance(det, Mapping):
        raise ResultsError(f"result {index} is not an object")
    missing = [k for k in ("image_id", "category_id", "bbox", "score") if k not in det]
    if missing:
        raise ResultsError(f"result {index} lacks {', '.join(missing)}")
    bbox = det["bbox"]
    if not isinstance(bbox, Sequence) or len(bbox) != 4:
        raise ResultsError(f"result {index} bbox is not [x, y, w, h]")


def _load_results(results: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | np.ndarray
                  ) -> list[dict[str, Any]]:
    """COCO results as fresh dicts (pycocotools' loadRes adds keys to the dicts it is given).

    Accepts a results JSON path, a list of result dicts, or an [M, 7] array of automl's
    ``transform_detections`` rows ``[image_id, x, y, w, h, score, class]``.
    """
    if isinstance(results, np.ndarray):
        if results.ndim != 2 or results.shape[1] != 7:
            raise ResultsError(f"results array has shape {results.shape}, expected [M, 7]")
        return [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [float(v) for v in r[1:5]],
                 "score": float(r[5])} for r in results]
    if isinstance(results, (str, os.PathLike)):
        path = Path(results)
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ResultsError(f"cannot read results file {path}: {exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ResultsError(f"results file {path} is not JSON: {exc}") from exc
        if not isinstance(results, list):
            raise ResultsError(f"results file {path} is not a JSON list of detections")
    loaded = []
    for index, det in enumerate(results):
        _check_result(det, index)
        loaded.append(dict(det))
    return loaded


def evaluate(
    annotations: str | os.PathLike[str] | COCO,
    results: str | os.PathLike[str] | Sequence[Mapping[str, Any]] | np.ndarray,
    image_ids: Iterable[int] | None = None,
) -> CocoMetrics:
    """COCO bbox metrics of ``results`` against ``annotations``.

    ``image_ids`` restricts the evaluation to those images (default: every image in the
    annotation file); pass the images that were actually run, or unrun images count as misses.
    An empty result list gives all-zero metrics with a note (pycocotools' loadRes cannot load []).
    """
    coco = as_coco(annotations)
    known = set(coco.getImgIds())
    eval_ids = sorted(known if image_ids is None else set(image_ids))
    if not eval_ids:
        raise ResultsError("no images to evaluate")
    strangers = set(eval_ids) - known
    if strangers:
        raise ResultsError(f"image ids not in the annotation file, e.g. {min(strangers)}")
    dets = _load_results(results)
    outside = {d["image_id"] for d in dets} - known
    if outside:
        raise ResultsError(f"results refer to image ids not in the annotation file, e.g. {min(outside)}")
    selected = set(eval_ids)
    in_scope = [d for d in dets if d["image_id"] in selected]
    notes = []
    category_ids = set(coco.getCatIds())
    foreign = sum(1 for d in in_scope if d["category_id"] not in category_ids)
    if foreign:
        notes.append(f"{foreign} detection(s) have category ids that are not in the annotation "
                     "file; COCOeval ignores them")
    if not in_scope:
        notes.append("no detections for the evaluated images: pycocotools cannot load an empty "
                     "result list, all metrics are reported as 0")
        return CocoMetrics(tuple(0.0 for _ in METRIC_NAMES), len(eval_ids), 0, tuple(notes))
    with pycocotools_quiet():
        coco_dt = coco.loadRes(in_scope)
        evaluator = COCOeval(coco, coco_dt, iouType="bbox")
        evaluator.params.imgIds = eval_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = tuple(float(v) for v in evaluator.stats)
    return CocoMetrics(stats, len(eval_ids), len(in_scope), tuple(notes))
