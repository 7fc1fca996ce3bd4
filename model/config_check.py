"""Validation of a config read from a weights file, before a model is built from it.

A weights file is untrusted input: its config decides how much memory the model asks for
(image size, channels, repeats) and what the preprocessing does (mean/std). Every field is
checked for type and range here, one ``ValueError`` naming the field; the limits are generous
bounds around automl's released variants, not tuning choices.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Callable

from .config import FUSION_METHODS, DetConfig, parse_image_size
from .efficientnet_config import BACKBONES
from .postprocess import NmsConfig
from .tf_compat import ACTIVATIONS

MAX_IMAGE_SIDE = 4096    # d7/d7x use 1536; 4096x4096 already needs GiBs of activations
INT_RANGES: dict[str, tuple[int, int]] = {
    "num_classes": (1, 10_000),
    "min_level": (3, 10),
    "max_level": (3, 10),
    "fpn_num_filters": (1, 2048),
    "fpn_cell_repeats": (1, 32),
    "box_class_repeats": (1, 32),
    "num_scales": (1, 16),
}
BOOL_FIELDS = ("separable_conv", "apply_bn_for_resampling", "conv_after_downsample",
               "conv_bn_act_pattern", "scale_range")
CHOICES: dict[str, tuple[str, ...]] = {
    "backbone_name": tuple(BACKBONES),
    "fpn_name": ("bifpn",),
    "fpn_weight_method": FUSION_METHODS,
    "act_type": tuple(ACTIVATIONS),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_numbers(field: str, value: Any, count: int | None = None) -> None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if count is not None and isinstance(value, (list, tuple)) and len(values) != count:
        raise ValueError(f"config {field}: expected a number or {count} numbers, got {value!r}")
    if not values or not all(_is_number(v) and v > 0 for v in values):
        raise ValueError(f"config {field}: expected positive finite numbers, got {value!r}")


def _check_image_size(value: Any) -> None:
    if isinstance(value, (list, tuple)) and not all(isinstance(v, int) for v in value):
        raise ValueError(f"config image_size: expected integers, got {value!r}")
    try:
        height, width = parse_image_size(value)
    except (TypeError, ValueError):
        raise ValueError(f"config image_size: expected an int, 'WxH' or [H, W], "
                         f"got {value!r}") from None
    if not (1 <= height <= MAX_IMAGE_SIDE and 1 <= width <= MAX_IMAGE_SIDE):
        raise ValueError(f"config image_size: {height}x{width} (HxW) is outside "
                         f"1..{MAX_IMAGE_SIDE} per side")


def _check_mean(value: Any) -> None:
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values or len(values) not in (1, 3) or not all(_is_number(v) for v in values):
        raise ValueError(f"config mean_rgb: expected a number or 3 finite numbers, got {value!r}")


def _check_aspect_ratios(value: Any) -> None:
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"config aspect_ratios: expected a non-empty list, got {value!r}")
    for ratio in value:
        _positive_numbers("aspect_ratios", ratio, count=2)


def _check_nms(value: Any) -> None:
    if not isinstance(value, Mapping):
        raise ValueError(f"config nms_configs: expected a mapping, got {type(value).__name__}")
    for key, item in value.items():
        if key == "method":
            ok = item is None or isinstance(item, str)
        elif key == "pyfunc":
            ok = isinstance(item, bool)
        else:
            ok = item is None or _is_number(item)
        if not ok:
            raise ValueError(f"config nms_configs.{key}: invalid value {item!r}")
    try:
        NmsConfig.from_dict(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config nms_configs: {error}") from None


def _check_fraction(field: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not (_is_number(value) and 0 <= value <= 1):
        raise ValueError(f"config {field}: expected a number in 0..1, got {value!r}")


SPECIAL: dict[str, Callable[[Any], None]] = {
    "image_size": _check_image_size,
    "mean_rgb": _check_mean,
    "stddev_rgb": lambda v: _positive_numbers("stddev_rgb", v, count=3),
    "aspect_ratios": _check_aspect_ratios,
    "anchor_scale": lambda v: _positive_numbers("anchor_scale", v),
    "nms_configs": _check_nms,
    "survival_prob": lambda v: _check_fraction("survival_prob", v, optional=True),
    "moving_average_decay": lambda v: _check_fraction("moving_average_decay", v),
}


def checked_fields() -> set[str]:
    """The config fields :func:`check_field` has a rule for (a test keeps it equal to DetConfig's)."""
    return {*INT_RANGES, *BOOL_FIELDS, *CHOICES, *SPECIAL, "name"}


def check_field(field: str, value: Any) -> None:
    """Raises ``ValueError`` naming ``field`` when ``value`` has the wrong type or range."""
    if field in INT_RANGES:
        low, high = INT_RANGES[field]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"config {field}: expected an integer in {low}..{high}, "
                             f"got {value!r}")
    elif field in BOOL_FIELDS:
        if not isinstance(value, bool):
            raise ValueError(f"config {field}: expected true/false, got {value!r}")
    elif field in CHOICES:
        if value not in CHOICES[field]:
            raise ValueError(f"config {field}: unknown value {value!r}")
    elif field in SPECIAL:
        SPECIAL[field](value)
    elif field == "name":
        if not isinstance(value, str) or not value:
            raise ValueError(f"config name: expected a non-empty string, got {value!r}")


def config_from_metadata(metadata: Mapping[str, Any], source: str) -> DetConfig:
    """The ``DetConfig`` stored in a weights file's metadata, every field checked first.

    ``metadata['variant']``, when present, must equal ``config.name``. Raises ``ValueError``
    starting with ``source`` (the file name) for the first problem found.
    """
    if not isinstance(metadata, Mapping):
        raise ValueError(f"{source}: metadata is a {type(metadata).__name__}, not a mapping")
    values = metadata.get("config")
    if values is None:
        raise ValueError(f"{source}: weights carry no config metadata")
    if not isinstance(values, Mapping):
        raise ValueError(f"{source}: config metadata is a {type(values).__name__}, not a mapping")
    try:
        for field, value in values.items():
            check_field(str(field), value)
        if values.get("min_level", 3) > values.get("max_level", 7):
            raise ValueError("config min_level is above max_level")
        config = DetConfig.from_dict(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from None
    variant = metadata.get("variant")
    if variant is not None and variant != config.name:
        raise ValueError(f"{source}: metadata variant {variant!r} disagrees with config name "
                         f"{config.name!r}")
    return config
