"""Detector configuration: automl's ``default_detection_configs`` plus per-variant deltas.

Field names are automl's (hparams_config.py), so a value can be checked against an automl
config or a reference manifest by name. Only what differs from the default is written per
variant (``model.registry.VARIANTS``), as in automl's ``efficientdet_model_param_dict``, and per
release (``model.registry.RELEASES``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence, Union

from .registry import RELEASES, VARIANTS

ImageSize = Union[int, str, Sequence[int]]
AspectRatio = Union[float, tuple[float, float]]

IMAGENET_MEAN_RGB = (123.675, 116.28, 103.53)   # 255 * (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (58.395, 57.12, 57.375)   # 255 * (0.229, 0.224, 0.225)

FUSION_METHODS = ("fastattn", "attn", "sum", "channel_attn", "channel_fastattn")


def parse_image_size(image_size: ImageSize) -> tuple[int, int]:
    """automl ``utils.parse_image_size``: int -> square, 'WxH' -> (H, W); returns (H, W)."""
    if isinstance(image_size, bool):
        raise ValueError(f"invalid image_size {image_size!r}")
    if isinstance(image_size, int):
        return image_size, image_size
    if isinstance(image_size, str):
        try:
            width, height = (int(v) for v in image_size.lower().split("x"))
        except ValueError:
            raise ValueError(f"image_size {image_size!r} is not an int or a 'WxH' string") from None
        return height, width
    height, width = (int(v) for v in image_size)
    return height, width


def build_from_fields(cls: Any, values: Mapping[str, Any], what: str) -> Any:
    """``cls(**values)`` for a dataclass, refusing names that are not its fields."""
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what} fields: {unknown}")
    return cls(**values)


@dataclass(frozen=True)
class DetConfig:
    """One EfficientDet model. Defaults are automl's ``default_detection_configs``."""

    name: str = "efficientdet-d1"
    image_size: tuple[int, int] = (640, 640)       # (H, W) of the network input
    num_classes: int = 90
    backbone_name: str = "efficientnet-b1"
    # Feature network.
    min_level: int = 3
    max_level: int = 7
    fpn_name: str = "bifpn"
    fpn_weight_method: str = "fastattn"
    fpn_num_filters: int = 88
    fpn_cell_repeats: int = 4
    separable_conv: bool = True
    apply_bn_for_resampling: bool = True
    conv_after_downsample: bool = False
    conv_bn_act_pattern: bool = False
    # Heads.
    box_class_repeats: int = 3
    survival_prob: float | None = None              # head residual + drop-connect; off in releases
    act_type: str = "swish"
    # Anchors: floats use automl's sqrt form; (x, y) pairs give the pre-2020-09 tuple form.
    num_scales: int = 3
    aspect_ratios: tuple[AspectRatio, ...] = (1.0, 2.0, 0.5)
    anchor_scale: float = 4.0
    # Input normalisation (dataloader.py): (x - mean_rgb) / stddev_rgb.
    mean_rgb: tuple[float, ...] | float = IMAGENET_MEAN_RGB
    stddev_rgb: tuple[float, ...] | float = IMAGENET_STDDEV_RGB
    scale_range: bool = False                       # then x * 2 / 255 - 1 after the zero-pad
    # Evaluation NMS (hparams_config.py nms_configs); see model.postprocess.NmsConfig.
    nms_configs: Mapping[str, Any] = field(default_factory=lambda: {
        "method": "gaussian", "iou_thresh": None, "score_thresh": 0.0, "sigma": None,
        "pyfunc": False, "max_nms_inputs": 0, "max_output_size": 100})
    moving_average_decay: float = 0.9998

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", parse_image_size(self.image_size))
        ratios = tuple(tuple(float(v) for v in r) if isinstance(r, (list, tuple)) else float(r)
                       for r in self.aspect_ratios)
        object.__setattr__(self, "aspect_ratios", ratios)
        for name in ("mean_rgb", "stddev_rgb"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(float(v) for v in value))
        object.__setattr__(self, "nms_configs", dict(self.nms_configs))
        if self.fpn_weight_method not in FUSION_METHODS:
            raise ValueError(f"unknown fpn_weight_method {self.fpn_weight_method!r}; "
                             f"known: {FUSION_METHODS}")
        if self.fpn_name != "bifpn":
            raise ValueError(f"fpn_name {self.fpn_name!r} is not supported (only 'bifpn')")
        if not 3 <= self.min_level <= self.max_level:
            raise ValueError("need 3 <= min_level <= max_level")
        if self.num_classes < 1:
            raise ValueError("num_classes must be positive")

    @property
    def num_levels(self) -> int:
        return self.max_level - self.min_level + 1

    @property
    def num_anchors(self) -> int:
        """Anchors per location (num_scales * len(aspect_ratios))."""
        return self.num_scales * len(self.aspect_ratios)

    def replace(self, **changes: Any) -> "DetConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict that ``DetConfig.from_dict`` reads back."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DetConfig":
        return build_from_fields(cls, values, "config")


def get_config(name: str, **overrides: Any) -> DetConfig:
    """The config of a released variant, with automl-named fields overridden.

    ``image_size`` may be an int, ``(H, W)`` or automl's ``'WxH'`` string.
    """
    try:
        deltas = VARIANTS[name]
    except KeyError:
        raise KeyError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}") from None
    return DetConfig(name=name, **{**deltas, **overrides})


def release_config(release: str, **overrides: Any) -> DetConfig:
    """The config a published checkpoint was trained and evaluated with (its variant's, plus
    the release's own input size and normalisation), with automl-named fields overridden."""
    try:
        entry = RELEASES[release]
    except KeyError:
        raise KeyError(f"unknown release {release!r}; known: {', '.join(RELEASES)}") from None
    return get_config(entry.variant, **{**entry.config, **overrides})
