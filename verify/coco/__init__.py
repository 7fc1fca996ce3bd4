"""COCO bbox mAP evaluation of a converted EfficientDet.

Independent parts, so that each can be tested without the others:

* :mod:`~verify.coco.data`: the annotation file (checked) and its images.
* :mod:`~verify.coco.results`: ``Detections`` -> COCO results rows.
* :mod:`~verify.coco.inference` (:func:`run_inference`): annotated images -> a COCO results file,
  through any ``predict_fn(list of HWC RGB uint8 arrays) -> Detections``; resumable.
* :mod:`~verify.coco.metrics` (:func:`evaluate`): pycocotools ``COCOeval('bbox')`` ->
  :class:`CocoMetrics` (the 12 standard numbers with their names).
* :mod:`~verify.coco.report` (:class:`CocoReport`): the run's identity (variant, weights sha256,
  image size, post-processing, score threshold) next to automl's published AP
  (:data:`~verify.coco.official.OFFICIAL_AP`).
* :mod:`~verify.coco.model_loader` (:func:`load_model`): converted weights -> a predictor.
* :mod:`~verify.coco.distributed` (:class:`RankGroup`): torchrun ranks, image sharding, agreement
  on failure, gathering on rank 0; :func:`run_inference` takes a ``group``.

Errors in the inputs raise subclasses of :class:`CocoEvalError` (:mod:`~verify.coco.errors`);
the CLI turns them into one-line messages.

Names are imported on first use (PEP 562), so that ``verify --help`` and ``verify coco``'s option
defaults do not load torch.
"""

import importlib
from typing import Any

_LAZY = {
    "load_annotations": "verify.coco.data",
    "load_image": "verify.coco.data",
    "RankGroup": "verify.coco.distributed",
    "RanksFailed": "verify.coco.distributed",
    "AnnotationsError": "verify.coco.errors",
    "CocoEvalError": "verify.coco.errors",
    "ImageError": "verify.coco.errors",
    "ModelLoadError": "verify.coco.errors",
    "PredictionError": "verify.coco.errors",
    "ResultsError": "verify.coco.errors",
    "ResumeError": "verify.coco.errors",
    "PARTIAL_FORMAT": "verify.coco.inference",
    "PARTIAL_SUFFIX": "verify.coco.inference",
    "InferenceResult": "verify.coco.inference",
    "PredictFn": "verify.coco.inference",
    "partial_path_for": "verify.coco.inference",
    "run_inference": "verify.coco.inference",
    "METRIC_NAMES": "verify.coco.metrics",
    "CocoMetrics": "verify.coco.metrics",
    "evaluate": "verify.coco.metrics",
    "POSTPROCESS_MODES": "verify.coco.model_loader",
    "LoadedModel": "verify.coco.model_loader",
    "effective_score_thresh": "verify.coco.model_loader",
    "load_model": "verify.coco.model_loader",
    "OFFICIAL_AP": "verify.coco.official",
    "OfficialAP": "verify.coco.official",
    "DEFAULT_TOLERANCE_AP": "verify.coco.report",
    "CocoReport": "verify.coco.report",
    "build_report": "verify.coco.report",
    "format_table": "verify.coco.report",
    "write_report": "verify.coco.report",
    "DetectionsLike": "verify.coco.results",
    "detections_to_results": "verify.coco.results",
}

__all__ = [
    "AnnotationsError", "CocoEvalError", "ImageError", "ModelLoadError", "PredictionError",
    "ResultsError", "ResumeError",
    "OFFICIAL_AP", "OfficialAP",
    "RankGroup", "RanksFailed",
    "load_annotations", "load_image",
    "DetectionsLike", "detections_to_results",
    "PARTIAL_FORMAT", "PARTIAL_SUFFIX", "InferenceResult", "PredictFn", "partial_path_for",
    "run_inference",
    "METRIC_NAMES", "CocoMetrics", "evaluate",
    "POSTPROCESS_MODES", "LoadedModel", "effective_score_thresh", "load_model",
    "DEFAULT_TOLERANCE_AP", "CocoReport", "build_report", "format_table", "write_report",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'verify.coco' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
