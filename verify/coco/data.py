"""COCO inputs: the annotation file (read, checked, indexed) and the images it lists."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
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


def _inside_images(file_name: str) -> bool:
    """True for a relative path that stays inside the image directory (no ``..``, no drive)."""
    parts = file_name.replace("\\", "/").split("/")
    return bool(file_name) and "\0" not in file_name and not file_name.startswith(("/", "\\")) \
        and ".." not in parts


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        raw = path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
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
        _require(_inside_images(image["file_name"]), path,
                 f"images[{index}] file_name {image['file_name']!r} leaves the image directory")
        _require(image["id"] not in image_ids, path, f"duplicate image id {image['id']}")
        image_ids.add(image["id"])
    for index, category in enumerate(data["categories"]):
        _require(isinstance(category, dict) and isinstance(category.get("id"), int), path,
                 f"categories[{index}] needs an int 'id'")
    annotation_ids: set[int] = set()
    for index, ann in enumerate(data["annotations"]):
        _require(isinstance(ann, dict), path, f"annotations[{index}] is not an object")
        missing = [k for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
                   if k not in ann]
        _require(not missing, path, f"annotations[{index}] lacks {', '.join(missing)}")
        _require(isinstance(ann["id"], int) and ann["id"] not in annotation_ids, path,
                 f"annotations[{index}] id {ann['id']!r} is not a unique int")
        annotation_ids.add(ann["id"])
        _require(isinstance(ann["image_id"], int) and ann["image_id"] in image_ids, path,
                 f"annotations[{index}] refers to unknown image id {ann['image_id']!r}")
        _require(isinstance(ann["category_id"], int), path,
                 f"annotations[{index}] category_id {ann['category_id']!r} is not an int")
        bbox = ann["bbox"]
        _require(isinstance(bbox, list) and len(bbox) == 4 and all(map(_is_number, bbox)), path,
                 f"annotations[{index}] bbox is not [x, y, w, h] of finite numbers")
        _require(_is_number(ann["area"]) and ann["iscrowd"] in (0, 1), path,
                 f"annotations[{index}] area must be a number and iscrowd 0 or 1")
    coco = COCO()
    coco.dataset = data
    coco.source_sha256 = hashlib.sha256(raw).hexdigest()
    with pycocotools_quiet():
        coco.createIndex()
    return coco


def run_key(coco: COCO, image_ids: list[int]) -> dict[str, str]:
    """What partial results are only valid for: the annotations (sha256 of the file, or of
    the dataset for an in-memory ``COCO``) and the images run over (ids and file names)."""
    annotations = getattr(coco, "source_sha256", None) or hashlib.sha256(
        json.dumps(coco.dataset, sort_keys=True).encode("utf-8")).hexdigest()
    images = hashlib.sha256("".join(
        f"{i}\t{coco.imgs[i]['file_name']}\n" for i in image_ids).encode("utf-8")).hexdigest()
    return {"annotations_sha256": annotations, "images_sha256": images}


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
