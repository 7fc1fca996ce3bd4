"""Converted weights -> a predictor for :func:`verify.coco.run_inference`.

Thin on purpose: the CLI looks :func:`load_model` up through the ``verify.coco`` package at call
time, so tests can replace it with a fake model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verify.coco.errors import ModelLoadError

if TYPE_CHECKING:   # torch and the model are imported in load_model (fast `verify --help`)
    import numpy as np

    from verify.coco.inference import PredictFn
    from verify.coco.results import DetectionsLike

POSTPROCESS_MODES: tuple[str, ...] = ("per_class", "global", "pyfunc")


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for :func:`run_inference`, with the facts the report records."""

    variant: str                         # the release name the weights record, else the variant
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

    A missing or unreadable weights file or an unavailable device becomes :class:`ModelLoadError`.
    """
    import torch

    from model import EfficientDet
    if postprocess not in POSTPROCESS_MODES:
        raise ValueError(f"postprocess must be one of {POSTPROCESS_MODES}, got {postprocess!r}")
    weights = Path(weights)
    if not weights.is_file():
        raise ModelLoadError(f"weights file not found: {weights}")
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

    # An AdvProp or fixed-640 release shares its variant's config name but not its published AP.
    name = model.metadata.get("release") or config.name
    return LoadedModel(name, tuple(config.image_size), dict(config.nms_configs), predict)
