"""Resumable COCO inference: annotated images -> ``predict_fn`` -> a COCO results JSON file.

Finished batches go to a JSON-lines *partial* file next to the results, so an interrupted run
resumes where it stopped; the final results JSON is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from pycocotools.coco import COCO

from verify.coco.data import as_coco, load_image, run_key
from verify.coco.errors import ImageError, ResultsError, ResumeError
from verify.coco.results import (
    DetectionsLike,
    detections_to_results,
    is_result_rows,
    result_dicts,
    results_lock,
)
from verify.io_utils import atomic_write_text

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial.jsonl"
PARTIAL_FORMAT = "effdet-coco-partial/1"

PredictFn = Callable[[list[np.ndarray]], DetectionsLike]


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
    hint = "delete it or choose another results path"
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise ResumeError(f"cannot read {path}: {exc}; {hint}") from None
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
            if not (isinstance(image_id, int) and is_result_rows(rows)):
                raise TypeError("not an image's detections")
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
    """:func:`_run_inference` while holding ``<results>.lock``: a second run with the same
    results path fails with :class:`ResumeError` instead of corrupting the first one's files."""
    with results_lock(results_path):
        return _run_inference(predict_fn, image_dir, annotations, batch_size=batch_size,
                              results_path=results_path, max_images=max_images,
                              progress=progress, run_info=run_info)


def _run_inference(
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
    the run: weights hash, post-processing, ...) plus the annotation file's digest and the image
    list (:func:`~verify.coco.data.run_key`) are stored in its header and must match to resume.
    At the end the results (``[{image_id, category_id, bbox: [x, y, w, h], score}]``, ordered by
    image id) are written atomically to ``results_path`` and the partial file is removed.
    A progress bar goes to stderr when ``progress`` is true.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    coco = as_coco(annotations)
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise ImageError(f"image directory not found: {image_dir}")
    results_path = Path(results_path)
    if not results_path.parent.is_dir():
        raise ResultsError(f"directory of the results file does not exist: {results_path.parent}")
    image_ids = sorted(coco.getImgIds())[:max_images]
    run_info = {**(run_info or {}), **run_key(coco, image_ids)}
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

    results = [det for image_id in image_ids for det in result_dicts(image_id, done[image_id])]
    atomic_write_text(results_path, json.dumps(results, separators=(",", ":")))
    partial.unlink()
    logger.info("wrote %d detections for %d images to %s", len(results), len(image_ids), results_path)
    return InferenceResult(results_path, tuple(image_ids), len(results), num_resumed)


def _progress_bar(total: int) -> Any:
    return click.progressbar(length=total, label="COCO inference", file=sys.stderr,
                             show_pos=True, show_eta=True)
