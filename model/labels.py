"""Class names: automl's 90-id COCO label map, label files, and the names a model carries.

Class ids are 1-based as automl's (0 is background and never predicted). COCO ids have gaps
(12, 26, 29, 30, 45, 66, 68, 69, 71, 83): the 80 names sit at automl's ``label_util.coco`` ids.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Union

LabelMap = dict[int, str]
LabelsLike = Union[Mapping[int, str], Sequence[str]]

# automl efficientdet/tf2/label_util.py::coco @ 6a54c87 (facts: id -> name).
COCO_LABELS: LabelMap = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train",
    8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign",
    14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep",
    21: "cow", 22: "elephant", 23: "bear", 24: "zebra", 25: "giraffe", 27: "backpack",
    28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase", 34: "frisbee", 35: "skis",
    36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat", 40: "baseball glove",
    41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass",
    47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza",
    60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed",
    67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse", 75: "remote",
    76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven", 80: "toaster", 81: "sink",
    82: "refrigerator", 84: "book", 85: "clock", 86: "vase", 87: "scissors", 88: "teddy bear",
    89: "hair drier", 90: "toothbrush",
}
COCO_NUM_CLASSES = 90


def as_label_map(labels: LabelsLike, num_classes: int | None = None) -> LabelMap:
    """``{id: name}`` from a mapping (ids as ints or digit strings, as JSON stores them) or a
    sequence of names (the first is id 1). Raises ``ValueError`` for ids outside
    ``1..num_classes`` or names that are not non-empty strings."""
    if isinstance(labels, Mapping):
        items = list(labels.items())
    elif isinstance(labels, Sequence) and not isinstance(labels, str):
        items = list(enumerate(labels, start=1))
    else:
        raise ValueError(f"labels must be a mapping id -> name or a list of names, "
                         f"got {type(labels).__name__}")
    label_map: LabelMap = {}
    for key, name in items:
        try:
            class_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"label id {key!r} is not an integer") from None
        if isinstance(key, bool) or class_id < 1 or (num_classes and class_id > num_classes):
            upper = num_classes if num_classes else "num_classes"
            raise ValueError(f"label id {key!r} is outside 1..{upper}")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"label {class_id}: name must be a non-empty string, got {name!r}")
        label_map[class_id] = name.strip()
    return label_map


def read_labels(path: str | PathLike[str], num_classes: int | None = None) -> LabelMap:
    """A labels file: ``.json`` (``{"1": "person", ...}`` or a list of names), or text with one
    name per line (line 1 is id 1; blank lines and ``#`` comments skipped) or ``id: name`` lines
    (automl's YAML label maps). Raises ``ValueError`` (one line) when it cannot be read."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read labels ({error.__class__.__name__}: {error})") \
            from None
    if path.suffix.lower() == ".json":
        try:
            return as_label_map(json.loads(text), num_classes)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    pairs = [line.split(":", 1) for line in lines]
    if lines and all(len(p) == 2 and p[0].strip().isdigit() for p in pairs):
        return as_label_map({int(k): v.strip().strip("'\"") for k, v in pairs}, num_classes)
    if not lines:
        raise ValueError(f"{path}: no labels in the file")
    return as_label_map(lines, num_classes)


def class_name(label_map: Mapping[int, str], class_id: int) -> str:
    """The name of ``class_id``, or ``'class <id>'`` when the map has no name for it."""
    return label_map.get(int(class_id), f"class {int(class_id)}")
