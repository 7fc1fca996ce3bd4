"""COCO inputs: the annotation file (read, checked, indexed) and the images it lists."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO

from verify.coco.errors import AnnotationsError, ImageError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def pycocotools_quiet() -> Iterator[None]:
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
    with pycocotools_quiet():
        coco.createIndex()
    return coco


def as_coco(annotations: str | os.PathLike[str] | COCO) -> COCO:
    """``annotations`` itself if already indexed, else :func:`load_annotations` of the path."""
    return annotations if isinstance(annotations, COCO) else load_annotations(annotations)


def load_image(path: Path) -> np.ndarray:
    """:func:`model.preprocess.load_image` (HWC RGB uint8), an unreadable file raised as
    :class:`ImageError`."""
    from model import preprocess   # torch: imported on use, not by `verify --help`
    try:
        return preprocess.load_image(path)
    except OSError as exc:  # includes PIL's UnidentifiedImageError
        raise ImageError(f"cannot read image {path}: {exc}") from exc
