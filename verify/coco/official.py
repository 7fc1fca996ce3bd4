"""automl's published COCO AP of every released checkpoint (:data:`OFFICIAL_AP`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


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
