"""Every EfficientDet variant and every checkpoint automl publishes, as data, in one place.

* :data:`VARIANTS` — per architecture, the config fields that differ from automl's
  ``default_detection_configs`` (hparams_config.py ``efficientdet_model_param_dict`` and
  ``efficientdet_lite_param_dict`` @ 6a54c87).
* :data:`RELEASES` — per release name, the variant it is, where its archive lies below
  :data:`BUCKET_URL`, the config fields the checkpoint was trained and evaluated with when they
  differ from its variant's (input size, input normalisation), the COCO AP automl publishes for
  it, and the archive's sha256 where a digest is published.

``model.config.get_config`` / ``release_config``, ``converter.download`` and
``verify.coco.official`` read these tables; nothing else lists variant or release names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

BUCKET_URL = "https://storage.googleapis.com/cloud-tpu-checkpoints/efficientdet/"

# Input normalisation (x - mean_rgb) / stddev_rgb (dataloader.py InputProcessor.normalize_image).
LITE_MEAN_RGB = 127.0                           # hparams_config.py lite_common_param
LITE_STDDEV_RGB = 128.0
# Det-AdvProp.md: "here we scale the input to the range of [-1, 1]"; its tutorial evaluates with
# --hparams="mean_rgb=0.0,stddev_rgb=1.0,scale_range=True", i.e. dataloader.py's
# ``image * 2.0 / 255 - 1.0`` after resize and zero-pad (the padding becomes -1).
ADVPROP_NORMALISATION: Mapping[str, Any] = {"mean_rgb": 0.0, "stddev_rgb": 1.0,
                                            "scale_range": True}

_LITE = dict(act_type="relu6", fpn_weight_method="sum", mean_rgb=LITE_MEAN_RGB,
             stddev_rgb=LITE_STDDEV_RGB)

VARIANTS: Mapping[str, Mapping[str, Any]] = {
    "efficientdet-d0": dict(backbone_name="efficientnet-b0", image_size=512, fpn_num_filters=64,
                            fpn_cell_repeats=3, box_class_repeats=3),
    "efficientdet-d1": dict(backbone_name="efficientnet-b1", image_size=640, fpn_num_filters=88,
                            fpn_cell_repeats=4, box_class_repeats=3),
    "efficientdet-d2": dict(backbone_name="efficientnet-b2", image_size=768, fpn_num_filters=112,
                            fpn_cell_repeats=5, box_class_repeats=3),
    "efficientdet-d3": dict(backbone_name="efficientnet-b3", image_size=896, fpn_num_filters=160,
                            fpn_cell_repeats=6, box_class_repeats=4),
    "efficientdet-d4": dict(backbone_name="efficientnet-b4", image_size=1024, fpn_num_filters=224,
                            fpn_cell_repeats=7, box_class_repeats=4),
    "efficientdet-d5": dict(backbone_name="efficientnet-b5", image_size=1280, fpn_num_filters=288,
                            fpn_cell_repeats=7, box_class_repeats=4),
    "efficientdet-d6": dict(backbone_name="efficientnet-b6", image_size=1280, fpn_num_filters=384,
                            fpn_cell_repeats=8, box_class_repeats=5, fpn_weight_method="sum"),
    "efficientdet-d7": dict(backbone_name="efficientnet-b6", image_size=1536, fpn_num_filters=384,
                            fpn_cell_repeats=8, box_class_repeats=5, anchor_scale=5.0,
                            fpn_weight_method="sum"),
    "efficientdet-d7x": dict(backbone_name="efficientnet-b7", image_size=1536, fpn_num_filters=384,
                             fpn_cell_repeats=8, box_class_repeats=5, anchor_scale=4.0,
                             max_level=8, fpn_weight_method="sum"),
    "efficientdet-lite0": dict(backbone_name="efficientnet-lite0", image_size=320,
                               fpn_num_filters=64, fpn_cell_repeats=3, box_class_repeats=3,
                               anchor_scale=3.0, **_LITE),
    "efficientdet-lite1": dict(backbone_name="efficientnet-lite1", image_size=384,
                               fpn_num_filters=88, fpn_cell_repeats=4, box_class_repeats=3,
                               anchor_scale=3.0, **_LITE),
    "efficientdet-lite2": dict(backbone_name="efficientnet-lite2", image_size=448,
                               fpn_num_filters=112, fpn_cell_repeats=5, box_class_repeats=3,
                               anchor_scale=3.0, **_LITE),
    "efficientdet-lite3": dict(backbone_name="efficientnet-lite3", image_size=512,
                               fpn_num_filters=160, fpn_cell_repeats=6, box_class_repeats=4,
                               **_LITE),
    "efficientdet-lite3x": dict(backbone_name="efficientnet-lite3", image_size=640,
                                fpn_num_filters=200, fpn_cell_repeats=6, box_class_repeats=4,
                                anchor_scale=3.0, **_LITE),
    "efficientdet-lite4": dict(backbone_name="efficientnet-lite4", image_size=640,
                               fpn_num_filters=224, fpn_cell_repeats=7, box_class_repeats=4,
                               **_LITE),
}


@dataclass(frozen=True)
class PublishedAP:
    """One COCO AP@[.50:.95] automl publishes for a release, in percent as printed.

    ``eval_nms`` is the post-processing (this project's ``postprocess`` names) automl's COCO
    evaluation used by default at the commit that published the number: until 8ddaeaf
    (2020-11-19) ``nms_configs`` had no 'pyfunc' key and det_model_fn's metric_fn defaulted to
    the numpy soft-NMS (``pyfunc``); from then on TF per-class soft-NMS (``per_class``).
    ``published_in`` is that commit; ``source`` the automl document and table column.
    """

    ap: float
    split: str
    eval_nms: str
    published_in: str
    source: str


@dataclass(frozen=True)
class Release:
    """A checkpoint archive automl publishes."""

    name: str
    variant: str                       # key of VARIANTS
    archive: str                       # path below BUCKET_URL
    ap: PublishedAP
    config: Mapping[str, Any] = field(default_factory=dict)   # fields that differ from variant's
    sha256: str | None = None          # of the archive, where a digest is published


_README = "efficientdet/README.md"
_COCO2_SOURCE = _README + " checkpoint table, column AP^val"
_PYFUNC_ERA = "2f93d04 (2020-07-27)"


def _coco2(tag: str, ap: float, eval_nms: str, published_in: str,
           sha256: str | None = None) -> Release:
    name = f"efficientdet-{tag}"
    return Release(name, name, f"coco2/{name}.tar.gz",
                   PublishedAP(ap, "val2017", eval_nms, published_in, _COCO2_SOURCE),
                   sha256=sha256)


def _lite(tag: str, ap: float) -> Release:
    # The lite table ("mAP (float)") does not name its split; val2017, the split of automl's
    # eval instructions, is assumed.
    name = f"efficientdet-{tag}"
    return Release(name, name, f"coco/{name}.tgz",
                   PublishedAP(ap, "val2017 (assumed)", "per_class", "8ca79e3 (2021-05-11)",
                               _README + " lite table, column mAP (float)"))


def _fixed640(tag: str, ap: float) -> Release:
    # "models trained with fixed 640x640 image sizes"; the table's "mAP" names no split.
    variant = f"efficientdet-{tag}"
    name = f"{variant}-640"
    return Release(name, variant, f"coco640/{name}.tar.gz",
                   PublishedAP(ap, "val2017 (assumed)", "pyfunc", _PYFUNC_ERA,
                               _README + " fixed 640x640 table, column mAP"),
                   config={"image_size": 640})


def _advprop(tag: str, ap: float) -> Release:
    variant = f"efficientdet-{tag}"
    return Release(f"{variant}-advprop", variant, f"advprop/{variant}.tar.gz",
                   PublishedAP(ap, "val2017", "per_class", "5c04e0f (2021-03-26)",
                               "efficientdet/Det-AdvProp.md table 1, column AP^val"),
                   config=ADVPROP_NORMALISATION)


# Sources: google/automl efficientdet/README.md and Det-AdvProp.md at 6a54c87. efficientdet/tf2/
# README.md at the same commit prints D2 AP^val as 43.1 (main README: 43.5). sha256:
# openvinotoolkit/open_model_zoo models/public/efficientdet-d{0,1}-tf/model.yml (28828936 and
# 48828228 bytes).
RELEASES: Mapping[str, Release] = {release.name: release for release in (
    _coco2("d0", 34.3, "pyfunc", _PYFUNC_ERA,
           "74794c937aa1fa2f559c2393d22b251b1f7135a49b108bd0414bc4f4800ca15d"),
    _coco2("d1", 40.2, "pyfunc", _PYFUNC_ERA,
           "31d8741da9840ab8bddfaa041d395d84a8c1e4e54db01cf8d277471afad5d6e0"),
    _coco2("d2", 43.5, "per_class", "5c04e0f (2021-03-26)"),
    _coco2("d3", 46.8, "per_class", "5c04e0f (2021-03-26)"),
    _coco2("d4", 49.3, "pyfunc", _PYFUNC_ERA),
    _coco2("d5", 51.2, "pyfunc", _PYFUNC_ERA),
    _coco2("d6", 52.1, "pyfunc", _PYFUNC_ERA),
    _coco2("d7", 53.4, "pyfunc", "33a01e0 (2020-07-20)"),
    _coco2("d7x", 54.4, "pyfunc", "33a01e0 (2020-07-20)"),
    _lite("lite0", 26.41),
    _lite("lite1", 31.50),
    _lite("lite2", 35.06),
    _lite("lite3", 38.77),
    _lite("lite3x", 42.64),
    _lite("lite4", 43.18),
    _fixed640("d2", 41.7),
    _fixed640("d3", 44.0),
    _fixed640("d4", 45.7),
    _fixed640("d5", 46.6),
    _fixed640("d6", 47.9),
    _advprop("d0", 35.1),
    _advprop("d1", 40.8),
    _advprop("d2", 44.3),
    _advprop("d3", 47.7),
    _advprop("d4", 50.4),
    _advprop("d5", 52.2),
)}
