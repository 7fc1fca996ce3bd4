"""The TF side of a parity check: taps and detections from a golden folder (or live TF).

A golden folder (``shared/reference/<variant>/``) holds ``golden.json`` + ``golden.npz`` made by
automl itself: NHWC activations at named taps (whole, or 2048 sampled values plus statistics)
and the detections of automl's three post-processing paths.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# golden.npz key prefix -> post-processing path name used by model.postprocess.
DETECTION_PATHS = {"det": "global", "det_per_class": "per_class", "det_pyfunc": "pyfunc"}


class ReferenceError(Exception):
    """A golden folder is missing or malformed."""


@dataclass
class TapRef:
    """One reference activation (NHWC): whole, or values at flat NHWC indices."""

    name: str
    shape: tuple[int, ...]
    values: np.ndarray                 # whole tensor, or the sampled values
    indices: np.ndarray | None = None  # flat NHWC indices of sampled values

    def pick(self, actual_nhwc: np.ndarray) -> np.ndarray:
        """The entries of ``actual_nhwc`` that correspond to ``values``."""
        return actual_nhwc if self.indices is None else actual_nhwc.reshape(-1)[self.indices]


@dataclass
class DetectionsRef:
    boxes_yxyx: np.ndarray   # [valid, 4] original-image pixels
    scores: np.ndarray       # [valid]
    classes: np.ndarray      # [valid] 1-based


@dataclass
class Reference:
    variant: str
    num_classes: int
    image_hw: tuple[int, int]
    image_scale_to_original: float
    taps: list[TapRef]                      # graph order
    detections: dict[str, DetectionsRef]    # by post-processing path
    input: TapRef | None = None             # preprocessed network input, if recorded
    image_file: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


def _tap(npz, name: str, shape: list[int] | None = None) -> TapRef | None:
    """A stored tap; sampled taps carry ``@shape`` (the input's shape is in golden.json)."""
    if name in npz:
        return TapRef(name, tuple(npz[name].shape), npz[name])
    if name + "@val" in npz:
        shape = npz[name + "@shape"] if name + "@shape" in npz else shape
        return TapRef(name, tuple(int(v) for v in shape), npz[name + "@val"],
                      npz[name + "@idx"].astype(np.int64))
    return None


def find_image(golden: dict, folder: Path, search: list[Path]) -> Path | None:
    """The golden's test image: its recorded repo-relative path (``shared/reference/img1.jpg``)
    resolved against the golden folder's ancestors, or its file name next to the golden, in
    an ancestor or in a ``search`` folder."""
    recorded = Path(golden.get("image", {}).get("file", "img1.jpg"))
    places = [folder, *folder.resolve().parents]
    candidates = [*(p / recorded for p in places), *(p / recorded.name for p in places),
                  *(Path(s) / recorded.name for s in search)]
    return next((c for c in candidates if c.is_file()), None)


def load_golden(folder: str | Path, stem: str = "golden", search: list[Path] = ()) -> Reference:
    """Reads ``<folder>/<stem>.json`` + ``.npz``."""
    folder = Path(folder)
    json_path, npz_path = folder / f"{stem}.json", folder / f"{stem}.npz"
    if not json_path.is_file() or not npz_path.is_file():
        raise ReferenceError(f"{folder}: no {stem}.json + {stem}.npz golden there")
    try:
        golden = json.loads(json_path.read_text())
        with np.load(npz_path, allow_pickle=False) as archive:
            npz = dict(archive)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ReferenceError(f"{folder}: unreadable golden ({error})") from None
    try:
        return _parse_golden(golden, npz, folder, npz_path, search)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
        raise ReferenceError(f"{folder}: malformed golden ({type(error).__name__}: {error})") \
            from None


def _parse_golden(golden: dict, npz: dict, folder: Path, npz_path: Path,
                  search: list[Path]) -> Reference:
    taps = []
    for entry in golden.get("taps", []):
        tap = _tap(npz, entry["name"])
        if tap is None:
            raise ReferenceError(f"{npz_path}: tap {entry['name']} listed but not stored")
        taps.append(tap)
    detections = {}
    for prefix, path in DETECTION_PATHS.items():
        if f"{prefix}/boxes" in npz:
            valid = int(np.asarray(npz[f"{prefix}/valid"]).reshape(-1)[0])
            detections[path] = DetectionsRef(npz[f"{prefix}/boxes"][:valid].reshape(-1, 4),
                                             npz[f"{prefix}/scores"].reshape(-1)[:valid],
                                             npz[f"{prefix}/classes"].reshape(-1)[:valid])
    image_input = _tap(npz, "input/image", golden["input"]["shape"])
    return Reference(
        variant=golden["variant"], num_classes=int(golden["num_classes"]),
        image_hw=tuple(golden["image_hw"]),
        image_scale_to_original=float(golden["input"]["image_scale_to_original"]),
        taps=taps, detections=detections, input=image_input,
        image_file=find_image(golden, folder, list(search)),
        info={k: golden.get(k) for k in ("seed", "ema", "manifest", "checkpoint", "image_size",
                                         "synth_recipe", "tf_version", "automl_commit")})
