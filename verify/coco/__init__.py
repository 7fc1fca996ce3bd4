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
"""

from verify.coco.data import load_annotations, load_image
from verify.coco.distributed import RankGroup, RanksFailed
from verify.coco.errors import (
    AnnotationsError,
    CocoEvalError,
    ImageError,
    ModelLoadError,
    PredictionError,
    ResultsError,
    ResumeError,
)
from verify.coco.inference import (
    PARTIAL_FORMAT,
    PARTIAL_SUFFIX,
    InferenceResult,
    PredictFn,
    partial_path_for,
    run_inference,
)
from verify.coco.metrics import METRIC_NAMES, CocoMetrics, evaluate
from verify.coco.model_loader import (
    POSTPROCESS_MODES,
    LoadedModel,
    effective_score_thresh,
    load_model,
)
from verify.coco.official import OFFICIAL_AP, OfficialAP
from verify.coco.report import (
    DEFAULT_TOLERANCE_AP,
    CocoReport,
    build_report,
    format_table,
    write_report,
)
from verify.coco.results import DetectionsLike, detections_to_results

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
