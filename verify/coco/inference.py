"""Resumable COCO inference: annotated images -> ``predict_fn`` -> a COCO results JSON file.

Finished batches go to a JSON-lines *partial* file next to the results, so an interrupted run
resumes where it stopped; the final results JSON is written atomically. Under torchrun the images
are sharded over the ranks (:mod:`verify.coco.distributed`), each rank with its own partial file.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import click
import numpy as np
from pycocotools.coco import COCO

from verify.coco.data import as_coco, load_image, run_key
from verify.coco.distributed import RankGroup
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
SINGLE_PROCESS = RankGroup()


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


def partial_path_for(results_path: str | os.PathLike[str], rank: int = 0, world_size: int = 1) -> Path:
    """The JSON-lines file that holds finished batches while ``results_path`` is being made:
    ``<results>.partial.jsonl``, or ``<results>.rank<R>-of-<W>.partial.jsonl`` for rank R of W."""
    results_path = Path(results_path)
    shard = "" if world_size == 1 else f".rank{rank}-of-{world_size}"
    return results_path.with_name(results_path.name + shard + PARTIAL_SUFFIX)


def partial_files_hint(results_path: str | os.PathLike[str], world_size: int) -> str:
    """The partial file(s) of a run with ``world_size`` ranks, for messages (a glob for several)."""
    if world_size == 1:
        return str(partial_path_for(results_path))
    return f"{results_path}.rank*-of-{world_size}{PARTIAL_SUFFIX}"


def partial_paths_of_other_runs(results_path: str | os.PathLike[str], world_size: int) -> list[Path]:
    """Existing partial files of ``results_path`` written by runs with another number of ranks."""
    results_path = Path(results_path)
    name = re.compile(re.escape(results_path.name) + r"(?:\.rank\d+-of-(\d+))?"
                      + re.escape(PARTIAL_SUFFIX))
    found = []
    for path in sorted(results_path.parent.glob(glob.escape(results_path.name) + "*" + PARTIAL_SUFFIX)):
        match = name.fullmatch(path.name)
        if match and int(match.group(1) or 1) != world_size:
            found.append(path)
    return found


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
    group: RankGroup = SINGLE_PROCESS,
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
    A progress bar goes to stderr when ``progress`` is true. This rank's partial file is locked
    for the run: a second run with the same results path fails with :class:`ResumeError`
    instead of corrupting the first one's files.

    With a distributed ``group`` every rank calls this with the same arguments: each runs its
    :meth:`~RankGroup.shard` of the images, keeps its own partial file
    (``<results>.rank<R>-of-<W>.partial.jsonl``), and agrees with the others after every batch,
    so a failure on one rank stops all of them (:class:`RanksFailed`). Rank 0 gathers the rows
    and writes ``results_path``. Partial files left by a run with another number of ranks (or
    by a single process) are read too, so a resumed run may change the number of ranks.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    results_path = Path(results_path)
    run_info = dict(run_info or {})
    partial = partial_path_for(results_path, group.rank, group.world_size)
    with contextlib.ExitStack() as held:
        with group.agreed():
            held.enter_context(results_lock(partial))
        with group.agreed():
            coco = as_coco(annotations)
            image_dir = Path(image_dir)
            if not image_dir.is_dir():
                raise ImageError(f"image directory not found: {image_dir}")
            if not results_path.parent.is_dir():
                raise ResultsError(f"directory of the results file does not exist: {results_path.parent}")
            image_ids = sorted(coco.getImgIds())[:max_images]
            run_info = {**run_info, **run_key(coco, image_ids)}
            mine = group.shard(image_ids)
            earlier_runs = partial_paths_of_other_runs(results_path, group.world_size)
            done = _resume(partial, earlier_runs, run_info, set(coco.getImgIds()))
        num_resumed = group.agree(work=sum(1 for image_id in mine if image_id in done))
        if num_resumed:
            logger.info("resuming: %d image(s) already done", num_resumed)
        todo = [image_id for image_id in mine if image_id not in done]
        batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]

        bar = _progress_bar(len(image_ids)) if progress and group.is_root else _NullProgress()
        try:
            with bar, open(partial, "a", encoding="utf-8") as out:
                bar.update(num_resumed)
                for step in itertools.count():
                    batch = batches[step] if step < len(batches) else []
                    error = None
                    try:
                        if batch:
                            images = [load_image(image_dir / coco.imgs[i]["file_name"]) for i in batch]
                            per_image = detections_to_results(predict_fn(images), batch)
                            _append(out, zip(batch, per_image))
                            done.update(zip(batch, per_image))
                    except BaseException as exc:  # noqa: BLE001 - shared with the other ranks, re-raised
                        error = exc
                    finished = group.agree(error, work=len(batch))  # images finished by all ranks
                    if not finished:
                        break
                    bar.update(finished)
        except BaseException:
            if group.is_root:
                logger.warning("stopped after %d of %d images%s; finished batches are kept in %s and a "
                               "re-run with the same results path resumes from there",
                               sum(1 for image_id in mine if image_id in done), len(mine),
                               " of rank 0's shard" if group.is_distributed else "",
                               partial_files_hint(results_path, group.world_size))
            raise

        shards = group.gather_to_root({image_id: done[image_id] for image_id in mine})
        num_detections = sum(len(done[image_id]) for image_id in mine)
        with group.agreed():
            if shards is not None:
                rows = {image_id: dets for shard in shards for image_id, dets in shard.items()}
                results = [det for image_id in image_ids for det in result_dicts(image_id, rows[image_id])]
                atomic_write_text(results_path, json.dumps(results, separators=(",", ":")))
                num_detections = len(results)
                logger.info("wrote %d detections for %d images to %s", num_detections, len(image_ids),
                            results_path)
        for path in (partial, *earlier_runs):
            path.unlink(missing_ok=True)  # several ranks may share the earlier runs' files
        return InferenceResult(results_path, tuple(image_ids), num_detections, num_resumed)


def _append(out: TextIO, finished: Iterable[tuple[int, list[list[float]]]]) -> None:
    """Append finished images to the open partial file and make them durable."""
    out.write("".join(json.dumps({"image_id": i, "dets": rows}) + "\n" for i, rows in finished))
    out.flush()
    os.fsync(out.fileno())


def _resume(partial: Path, earlier_runs: Sequence[Path], run_info: Mapping[str, Any],
            known_ids: set[int]) -> dict[int, list[list[float]]]:
    """Finished images of this rank's partial file (created with its header if missing; a torn
    last line is dropped) and of the partial files of earlier runs with other numbers of ranks."""
    done: dict[int, list[list[float]]] = {}
    if not partial.exists():
        atomic_write_text(partial, _header_line(run_info))
    for path in (*earlier_runs, partial):
        found, torn = _read_partial(path, run_info)
        unknown = set(found) - known_ids
        if unknown:
            raise ResumeError(f"{path} holds image ids that are not in the annotation file "
                              f"(e.g. {min(unknown)}); delete it or choose another results path")
        if torn and path == partial:  # rewrite without the torn last line before appending to it
            body = "".join(json.dumps({"image_id": k, "dets": v}) + "\n" for k, v in found.items())
            atomic_write_text(partial, _header_line(run_info) + body)
        done.update(found)
    return done


def _progress_bar(total: int) -> Any:
    return click.progressbar(length=total, label="COCO inference", file=sys.stderr,
                             show_pos=True, show_eta=True)
