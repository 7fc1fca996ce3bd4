"""The COCO run's report: metrics next to automl's published AP, pass/fail, JSON and text table."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verify.coco.metrics import CocoMetrics
from verify.coco.model_loader import effective_score_thresh
from verify.coco.official import OFFICIAL_AP, OfficialAP
from verify.io_utils import atomic_write_text

# automl's published AP^val is on COCO val2017, which lists exactly 5000 images; only a run over
# that many images is compared against it.
VAL2017_NUM_IMAGES = 5000
# Default allowed |our AP - published AP| in AP points: the README rounds to 0.1 (+-0.05) and the
# published numbers were measured with whichever eval NMS automl defaulted to at the time (see
# OFFICIAL_AP), which may differ from the post-processing chosen for this run.
DEFAULT_TOLERANCE_AP = 0.5


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
