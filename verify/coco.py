"""COCO bbox mAP evaluation of a converted EfficientDet.

Three independent parts, so that each can be tested without the others:

* inference (:func:`run_inference`): images listed in a COCO annotation file -> a COCO results
  file, through any ``predict_fn(list of HWC RGB uint8 arrays) -> Detections``. Finished batches
  go to a JSON-lines *partial* file next to the results, so an interrupted run resumes where it
  stopped; the final results JSON is written atomically.
* evaluation (:func:`evaluate`): pycocotools ``COCO`` / ``loadRes`` / ``COCOeval('bbox')`` ->
  :class:`CocoMetrics` (the 12 standard numbers with their names).
* reporting (:class:`CocoReport`): the run's identity (variant, weights sha256, image size,
  post-processing, score threshold) next to automl's published AP (:data:`OFFICIAL_AP`).

Box formats: the model gives ``boxes_yxyx`` (ymin, xmin, ymax, xmax) in original-image pixels;
COCO results use ``bbox = [x, y, width, height]`` in the same pixels. Errors in the inputs raise
subclasses of :class:`CocoEvalError`; the CLI turns them into one-line messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click
import numpy as np
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from verify.io_utils import atomic_write_text

logger = logging.getLogger(__name__)

# The 12 numbers COCOeval.summarize() computes for iouType 'bbox', in its order
# (AP over IoU .50:.95 / at .50 / at .75 / per area; AR at 1, 10, 100 detections / per area).
METRIC_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)
POSTPROCESS_MODES: tuple[str, ...] = ("per_class", "global", "pyfunc")
# automl's published AP^val is on COCO val2017, which lists exactly 5000 images; only a run over
# that many images is compared against it.
VAL2017_NUM_IMAGES = 5000
# Default allowed |our AP - published AP| in AP points: the README rounds to 0.1 (+-0.05) and the
# published numbers were measured with whichever eval NMS automl defaulted to at the time (see
# OFFICIAL_AP), which may differ from the post-processing chosen for this run.
DEFAULT_TOLERANCE_AP = 0.5
PARTIAL_SUFFIX = ".partial.jsonl"
PARTIAL_FORMAT = "effdet-coco-partial/1"


class CocoEvalError(Exception):
    """Base class of the errors this module raises for bad inputs."""


class AnnotationsError(CocoEvalError):
    """The annotation file is missing, unreadable, or not COCO instances JSON."""


class ImageError(CocoEvalError):
    """The image directory or an image listed in the annotations cannot be read."""


class ResultsError(CocoEvalError):
    """A results file/list is not in COCO results format or does not fit the annotations."""


class ResumeError(CocoEvalError):
    """A partial results file exists but belongs to another run or is corrupt."""


class PredictionError(CocoEvalError):
    """``predict_fn`` returned something that does not have the Detections layout."""


class ModelLoadError(CocoEvalError):
    """The weights cannot be loaded into the PyTorch EfficientDet."""


# --------------------------------------------------------------------------------------------
# Published numbers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OfficialAP:
    """One published COCO AP@[.50:.95] of an automl checkpoint.

    ``ap`` is in percent exactly as printed in the README. ``eval_nms`` names the automl
    post-processing (this project's ``postprocess`` names) that automl's COCO evaluation used by
    default at the commit that published the number; automl does not state it next to the table.
    """

    variant: str
    ap: float
    split: str
    checkpoint: str
    eval_nms: str
    published_in: str


_COCO2 = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco2/{}.tar.gz"
_LITE = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/coco/{}.tgz"


def _coco2(tag: str, ap: float, eval_nms: str, published_in: str) -> OfficialAP:
    variant = f"efficientdet-{tag}"
    return OfficialAP(variant, ap, "val2017", _COCO2.format(variant), eval_nms, published_in)


def _lite(tag: str, ap: float) -> OfficialAP:
    variant = f"efficientdet-{tag}"
    return OfficialAP(variant, ap, "val2017 (assumed)", _LITE.format(variant), "per_class",
                      "58b4df7 (2021-05-13)")


# Source: google/automl efficientdet/README.md at 6a54c8741e7c (2025-03-01, the commit the
# reference fixtures were made with), section "2. Pretrained EfficientDet Checkpoints":
#   * D0-D7x: column AP^val ("validation accuracy", COCO val2017) of the `coco2` checkpoints
#     (the same table's AP^test column is test-dev2017 and is not used here).
#   * lite0-4: column "mAP (float)" of the lite table (`coco/efficientdet-liteN.tgz`); the README
#     does not name the split; val2017 (the split of automl's eval instructions) is assumed.
#   * efficientdet/tf2/README.md at the same commit prints D2 AP^val as 43.1 (main README: 43.5).
# `published_in` = the automl commit from which the README row has had this value. `eval_nms` =
# automl's eval default at that commit: until 8ddaeaf (2020-11-19) hparams_config.nms_configs had
# no 'pyfunc' key and det_model_fn's metric_fn used `nms_configs.get('pyfunc', True)`, i.e. the
# numpy soft-NMS (`pyfunc`); from then on 'pyfunc': False -> TF per-class soft-NMS (`per_class`).
OFFICIAL_AP: Mapping[str, OfficialAP] = {
    entry.variant: entry
    for entry in (
        _coco2("d0", 34.3, "pyfunc", "2f93d04 (2020-07-27)"),
        _coco2("d1", 40.2, "pyfunc", "2f93d04 (2020-07-27)"),
        _coco2("d2", 43.5, "per_class", "5c04e0f (2021-03-26)"),
        _coco2("d3", 46.8, "per_class", "5c04e0f (2021-03-26)"),
        _coco2("d4", 49.3, "pyfunc", "2f93d04 (2020-07-27)"),
        _coco2("d5", 51.2, "pyfunc", "2f93d04 (2020-07-27)"),
        _coco2("d6", 52.1, "pyfunc", "2f93d04 (2020-07-27)"),
        _coco2("d7", 53.4, "pyfunc", "33a01e0 (2020-07-20)"),
        _coco2("d7x", 54.4, "pyfunc", "33a01e0 (2020-07-20)"),
        _lite("lite0", 26.41),
        _lite("lite1", 31.50),
        _lite("lite2", 35.06),
        _lite("lite3", 38.77),
        _lite("lite4", 43.18),
    )
}


# --------------------------------------------------------------------------------------------
# Annotations and images
# --------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _pycocotools_quiet() -> Iterator[None]:
    """pycocotools prints progress to stdout; keep stdout for data and log it at DEBUG instead."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        yield
    for line in buffer.getvalue().splitlines():
        if line.strip():
            logger.debug("pycocotools: %s", line)


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise AnnotationsError(f"{path}: {message}")


def load_annotations(path: str | os.PathLike[str]) -> COCO:
    """Read and check a COCO instances annotation file; returns an indexed pycocotools ``COCO``.

    Checks what COCOeval relies on: ``images`` (unique int ``id``, str ``file_name``),
    ``annotations`` (``image_id`` of a listed image, ``category_id``, ``bbox`` of 4 numbers,
    ``area``, ``iscrowd``) and ``categories`` (``id``).
    """
    path = Path(path)
    if not path.is_file():
        raise AnnotationsError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise AnnotationsError(f"cannot read annotation file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise AnnotationsError(f"{path} is not JSON ({exc.msg} at line {exc.lineno})") from exc
    _require(isinstance(data, dict), path, "not a COCO annotation file (top level is not an object)")
    for key in ("images", "annotations", "categories"):
        _require(isinstance(data.get(key), list), path,
                 f"not a COCO instances annotation file (no '{key}' list)")
    image_ids: set[int] = set()
    for index, image in enumerate(data["images"]):
        _require(isinstance(image, dict) and isinstance(image.get("id"), int)
                 and isinstance(image.get("file_name"), str), path,
                 f"images[{index}] needs an int 'id' and a str 'file_name'")
        _require(image["id"] not in image_ids, path, f"duplicate image id {image['id']}")
        image_ids.add(image["id"])
    for index, category in enumerate(data["categories"]):
        _require(isinstance(category, dict) and isinstance(category.get("id"), int), path,
                 f"categories[{index}] needs an int 'id'")
    for index, ann in enumerate(data["annotations"]):
        _require(isinstance(ann, dict), path, f"annotations[{index}] is not an object")
        missing = [k for k in ("image_id", "category_id", "bbox", "area", "iscrowd") if k not in ann]
        _require(not missing, path, f"annotations[{index}] lacks {', '.join(missing)}")
        _require(ann["image_id"] in image_ids, path,
                 f"annotations[{index}] refers to unknown image id {ann['image_id']}")
        bbox = ann["bbox"]
        _require(isinstance(bbox, list) and len(bbox) == 4, path,
                 f"annotations[{index}] bbox is not [x, y, w, h]")
    coco = COCO()
    coco.dataset = data
    with _pycocotools_quiet():
        coco.createIndex()
    return coco


def _as_coco(annotations: str | os.PathLike[str] | COCO) -> COCO:
    return annotations if isinstance(annotations, COCO) else load_annotations(annotations)


def load_image(path: Path) -> np.ndarray:
    """Decode one image as an HWC RGB uint8 array (grayscale / RGBA / palette are converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageError(f"cannot read image {path}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Detections -> COCO results
# --------------------------------------------------------------------------------------------

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


PredictFn = Callable[[list[np.ndarray]], DetectionsLike]


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def detections_to_results(dets: DetectionsLike, image_ids: Sequence[int]) -> list[list[list[float]]]:
    """Per image, its detections as rows ``[category_id, x, y, w, h, score]``.

    Only the first ``valid[i]`` rows of image ``i`` are kept; padding rows are dropped (automl's
    evaluator passes them on as class 0, which COCOeval ignores since 0 is not a category, so
    the metrics are the same). ``w = xmax - xmin`` and ``h = ymax - ymin`` are computed in the
    boxes' own dtype, as automl's ``transform_detections`` does, and not clipped.
    """
    boxes = _to_numpy(dets.boxes_yxyx)
    scores = _to_numpy(dets.scores)
    classes = _to_numpy(dets.classes)
    valid = _to_numpy(dets.valid).reshape(-1)
    n = len(image_ids)
    if boxes.ndim != 3 or boxes.shape[0] != n or boxes.shape[2] != 4:
        raise PredictionError(f"boxes_yxyx has shape {boxes.shape}, expected [{n}, K, 4]")
    if scores.shape != boxes.shape[:2] or classes.shape != boxes.shape[:2] or valid.shape != (n,):
        raise PredictionError(
            f"scores {scores.shape} / classes {classes.shape} / valid {valid.shape} do not fit "
            f"boxes_yxyx {boxes.shape}")
    per_image = []
    for i in range(n):
        count = int(valid[i])
        if not 0 <= count <= boxes.shape[1]:
            raise PredictionError(f"valid[{i}] = {count} is outside [0, {boxes.shape[1]}]")
        if not (np.isfinite(boxes[i, :count]).all() and np.isfinite(scores[i, :count]).all()):
            raise PredictionError(f"non-finite boxes or scores for image id {image_ids[i]}")
        ymin, xmin, ymax, xmax = (boxes[i, :count, j] for j in range(4))
        columns = (np.rint(classes[i, :count]), xmin, ymin, xmax - xmin, ymax - ymin, scores[i, :count])
        rows = [[int(c), *map(float, rest)] for c, *rest in zip(*(col.tolist() for col in columns))]
        per_image.append(rows)
    return per_image


def _result_dicts(image_id: int, rows: Iterable[Sequence[float]]) -> list[dict[str, Any]]:
    return [{"image_id": image_id, "category_id": int(row[0]), "bbox": list(row[1:5]), "score": row[5]}
            for row in rows]


# --------------------------------------------------------------------------------------------
# Inference with resume
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InferenceResult:
    """What :func:`run_inference` did: the results file and the images it covers (sorted ids)."""

    results_path: Path
    image_ids: tuple[int, ...]
    num_detections: int
    num_resumed: int


class _NullProgress:
    def __enter__(self) -> _NullProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def partial_path_for(results_path: str | os.PathLike[str]) -> Path:
    """The JSON-lines file that holds finished batches while ``results_path`` is being made."""
    results_path = Path(results_path)
    return results_path.with_name(results_path.name + PARTIAL_SUFFIX)


def _header_line(run_info: Mapping[str, Any]) -> str:
    return json.dumps({"format": PARTIAL_FORMAT, "run": dict(run_info)}, sort_keys=True) + "\n"


def _read_partial(path: Path, run_info: Mapping[str, Any]) -> tuple[dict[int, list[list[float]]], bool]:
    """Finished images from a partial file, and whether a torn last line had to be dropped."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    hint = "delete it or choose another results path"
    try:
        header = json.loads(lines[0]) if lines else None
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != PARTIAL_FORMAT:
        raise ResumeError(f"{path} is not a partial results file of this tool; {hint}")
    expected = json.loads(json.dumps(dict(run_info)))  # the JSON round trip the header went through
    if header.get("run") != expected:
        old = header.get("run") or {}
        differing = sorted(k for k in set(old) | set(expected) if old.get(k) != expected.get(k))
        raise ResumeError(f"{path} was written by a different run (differs in: "
                          f"{', '.join(differing)}); {hint}")
    done: dict[int, list[list[float]]] = {}
    torn = False
    for number, line in enumerate(lines[1:], start=2):
        last = number == len(lines)
        try:
            record = json.loads(line)
            image_id, rows = record["image_id"], record["dets"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if last:  # killed while writing this line: the batch was not finished
                torn = True
                continue
            raise ResumeError(f"{path} line {number} is corrupt; {hint}") from None
        if last and not line.endswith("\n"):
            torn = True
            continue
        done[int(image_id)] = rows
    return done, torn


def run_inference(
    predict_fn: PredictFn,
    image_dir: str | os.PathLike[str],
    annotations: str | os.PathLike[str] | COCO,
    *,
    batch_size: int,
    results_path: str | os.PathLike[str],
    max_images: int | None = None,
    progress: bool = True,
    run_info: Mapping[str, Any] | None = None,
) -> InferenceResult:
    """Run ``predict_fn`` over the annotated images and write COCO results JSON.

    Images are the annotation file's ``images`` sorted by id (the first ``max_images`` of them),
    read from ``image_dir / file_name`` as HWC RGB uint8 arrays and passed ``batch_size`` at a time.
    ``predict_fn`` must return Detections for them in order (see :class:`DetectionsLike`).

    Each finished batch is appended (flushed and fsync'ed) to ``<results>.partial.jsonl``. If that
    file exists when the run starts, its images are skipped; ``run_info`` (JSON-able identity of
    the run: weights hash, post-processing, ...) is stored in its header and must match to resume.
    At the end the results (``[{image_id, category_id, bbox: [x, y, w, h], score}]``, ordered by
    image id) are written atomically to ``results_path`` and the partial file is removed.
    A progress bar goes to stderr when ``progress`` is true.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    coco = _as_coco(annotations)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ImageError(f"image directory not found: {image_dir}")
    results_path = Path(results_path)
    if not results_path.parent.is_dir():
        raise ResultsError(f"directory of the results file does not exist: {results_path.parent}")
    run_info = dict(run_info or {})
    image_ids = sorted(coco.getImgIds())[:max_images]
    partial = partial_path_for(results_path)

    done: dict[int, list[list[float]]] = {}
    if partial.exists():
        done, torn = _read_partial(partial, run_info)
        unknown = set(done) - set(coco.getImgIds())
        if unknown:
            raise ResumeError(f"{partial} holds image ids that are not in the annotation file "
                              f"(e.g. {min(unknown)}); delete it or choose another results path")
        if torn:  # rewrite without the torn last line before appending to it
            body = "".join(json.dumps({"image_id": k, "dets": v}) + "\n" for k, v in done.items())
            atomic_write_text(partial, _header_line(run_info) + body)
        logger.info("resuming from %s: %d image(s) already done", partial, len(done))
    else:
        atomic_write_text(partial, _header_line(run_info))
    selected = set(image_ids)
    num_resumed = sum(1 for image_id in done if image_id in selected)
    todo = [image_id for image_id in image_ids if image_id not in done]

    bar = (_progress_bar(len(image_ids)) if progress else _NullProgress())
    try:
        with bar, open(partial, "a", encoding="utf-8") as out:
            bar.update(num_resumed)
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                images = [load_image(image_dir / coco.imgs[i]["file_name"]) for i in batch]
                per_image = detections_to_results(predict_fn(images), batch)
                out.write("".join(json.dumps({"image_id": i, "dets": rows}) + "\n"
                                  for i, rows in zip(batch, per_image)))
                out.flush()
                os.fsync(out.fileno())
                done.update(zip(batch, per_image))
                bar.update(len(batch))
    except BaseException:
        finished = sum(1 for image_id in image_ids if image_id in done)
        logger.warning("stopped after %d of %d images; finished batches are kept in %s and a "
                       "re-run with the same results path resumes from there",
                       finished, len(image_ids), partial)
        raise

    results = [det for image_id in image_ids for det in _result_dicts(image_id, done[image_id])]
    atomic_write_text(results_path, json.dumps(results, separators=(",", ":")))
    partial.unlink()
    logger.info("wrote %d detections for %d images to %s", len(results), len(image_ids), results_path)
    return InferenceResult(results_path, tuple(image_ids), len(results), num_resumed)


def _progress_bar(total: int) -> Any:
    return click.progressbar(length=total, label="COCO inference", file=sys.stderr,
                             show_pos=True, show_eta=True)


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

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
    coco = _as_coco(annotations)
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
    with _pycocotools_quiet():
        coco_dt = coco.loadRes(in_scope)
        evaluator = COCOeval(coco, coco_dt, iouType="bbox")
        evaluator.params.imgIds = eval_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = tuple(float(v) for v in evaluator.stats)
    return CocoMetrics(stats, len(eval_ids), len(in_scope), tuple(notes))


# --------------------------------------------------------------------------------------------
# Model loading (thin; the CLI calls it through this module so tests can replace it)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadedModel:
    """A model ready for :func:`run_inference`, with the facts the report records."""

    variant: str
    image_size: tuple[int, int]          # (H, W) of the network input
    nms_configs: Mapping[str, Any]       # automl-named eval NMS settings of the model config
    predict: PredictFn


def effective_score_thresh(nms_configs: Mapping[str, Any]) -> float | None:
    """The score threshold automl's NMS actually applies for these ``nms_configs``.

    automl resolves an unset threshold per method: gaussian soft-NMS uses ``score_thresh or
    0.001``, hard NMS ``score_thresh or -inf`` (reported as None here).
    """
    # Port of automl efficientdet/tf2/postprocess.py::nms (score_thresh defaults) @ 6a54c87
    method = nms_configs.get("method") or "hard"
    configured = nms_configs.get("score_thresh")
    if method == "gaussian":
        return float(configured or 0.001)
    return float(configured) if configured else None


def load_model(weights: str | os.PathLike[str], *, postprocess: str, device: str | None = None
               ) -> LoadedModel:
    """Load converted weights into ``model.EfficientDet`` on ``device`` (None: cuda if available).

    Any failure to import the model package or to read the weights becomes :class:`ModelLoadError`.
    """
    if postprocess not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}")
    weights = Path(weights)
    if not weights.is_file():
        raise ModelLoadError(f"weights file not found: {weights}")
    try:
        import torch

        from model import EfficientDet
    except ImportError as exc:
        raise ModelLoadError(f"cannot import the PyTorch EfficientDet: {exc}") from exc
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda was requested but CUDA is not available")
    try:
        model = EfficientDet.from_pretrained(weights)
    except Exception as exc:  # noqa: BLE001 - any loader failure is reported as bad weights
        raise ModelLoadError(f"cannot load weights {weights}: {type(exc).__name__}: {exc}") from exc
    model = model.to(device).eval()
    config = model.config

    def predict(images: list[np.ndarray]) -> DetectionsLike:
        with torch.inference_mode():
            return model.predict(images, postprocess=postprocess, batch_size=len(images))

    return LoadedModel(config.name, tuple(config.image_size), dict(config.nms_configs), predict)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CocoReport:
    """One COCO run next to automl's published AP. Owns the exit code of the ``coco`` command.

    ``comparison`` is ``"pass"`` / ``"fail"`` when the run covers a whole val2017-sized annotation
    file and the variant has a published AP, otherwise ``"not compared"`` (reason in ``notes``).
    AP values in ``ap_percent`` / ``official`` / ``delta_ap`` are in AP points (percent);
    ``metrics`` keeps pycocotools' fractions.
    """

    variant: str
    weights: str
    weights_sha256: str
    image_size: tuple[int, int]
    postprocess: str
    score_thresh: float | None
    nms_configs: Mapping[str, Any]
    annotations: str
    results: str
    num_images: int
    num_images_in_annotations: int
    num_detections: int
    metrics: Mapping[str, float]
    official: OfficialAP | None
    ap_percent: float
    delta_ap: float | None
    tolerance_ap: float
    comparison: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def exit_code(self) -> int:
        """0 unless a comparable run missed the published AP by more than the tolerance (1)."""
        return 1 if self.comparison == "fail" else 0

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        data["nms_configs"] = dict(self.nms_configs)
        data["metrics"] = dict(self.metrics)
        data["notes"] = list(self.notes)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def build_report(
    metrics: CocoMetrics,
    *,
    variant: str,
    weights: str | os.PathLike[str],
    weights_sha256: str,
    image_size: Sequence[int],
    postprocess: str,
    nms_configs: Mapping[str, Any],
    annotations: str | os.PathLike[str],
    results: str | os.PathLike[str],
    num_images_in_annotations: int,
    tolerance_ap: float = DEFAULT_TOLERANCE_AP,
) -> CocoReport:
    """Put ``metrics`` next to :data:`OFFICIAL_AP` for ``variant`` and decide pass/fail."""
    official = OFFICIAL_AP.get(variant)
    ap_percent = round(100.0 * metrics["AP"], 3)
    notes = list(metrics.notes)
    delta = None if official is None else round(ap_percent - official.ap, 3)
    reason = None
    if official is None:
        reason = f"no published AP for {variant!r}"
    elif metrics.num_images != num_images_in_annotations:
        reason = (f"subset: {metrics.num_images} of {num_images_in_annotations} annotated images "
                  "were evaluated")
    elif num_images_in_annotations != VAL2017_NUM_IMAGES:
        reason = (f"the annotation file lists {num_images_in_annotations} images; the published AP "
                  f"is on val2017 ({VAL2017_NUM_IMAGES} images)")
    if reason is not None:
        comparison = "not compared"
        notes.append(f"not compared with the published AP: {reason}")
    else:
        comparison = "pass" if abs(delta) <= tolerance_ap else "fail"
    if official is not None and official.eval_nms != postprocess:
        notes.append(f"the published AP was measured with automl's {official.eval_nms!r} "
                     f"post-processing, this run used {postprocess!r}")
    return CocoReport(
        variant=variant,
        weights=str(weights),
        weights_sha256=weights_sha256,
        image_size=(int(image_size[0]), int(image_size[1])),
        postprocess=postprocess,
        score_thresh=effective_score_thresh(nms_configs),
        nms_configs=dict(nms_configs),
        annotations=str(annotations),
        results=str(results),
        num_images=metrics.num_images,
        num_images_in_annotations=num_images_in_annotations,
        num_detections=metrics.num_detections,
        metrics=metrics.as_dict(),
        official=official,
        ap_percent=ap_percent,
        delta_ap=delta,
        tolerance_ap=tolerance_ap,
        comparison=comparison,
        notes=tuple(notes),
    )


def write_report(path: str | os.PathLike[str], report: CocoReport) -> Path:
    """Write the report as JSON, atomically."""
    return atomic_write_text(path, report.to_json())


def format_table(report: CocoReport) -> str:
    """The 12 metrics (in AP points) as a text table, with the published AP beside ours."""
    official = report.official
    lines = [
        f"{report.variant}  postprocess={report.postprocess}  images={report.num_images}  "
        f"detections={report.num_detections}  weights sha256={report.weights_sha256[:12]}",
        f"{'metric':<7}{'value':>8}{'official':>10}{'delta':>9}",
    ]
    for name, value in report.metrics.items():
        shown = "n/a" if value < 0 or math.isnan(value) else f"{100.0 * value:.2f}"
        row = f"{name:<7}{shown:>8}"
        if name == "AP" and official is not None:
            row += f"{official.ap:>10.2f}{report.delta_ap:>+9.2f}"
        lines.append(row)
    if official is not None:
        lines.append(f"official: automl README, {official.split}, {official.checkpoint}, "
                     f"eval NMS {official.eval_nms}")
    verdict = report.comparison
    if verdict != "not compared":
        verdict += f" (|delta| <= {report.tolerance_ap:g} AP)"
    lines.append(f"comparison: {verdict}")
    return "\n".join(lines) + "\n"
