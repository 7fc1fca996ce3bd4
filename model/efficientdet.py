"""EfficientDet: backbone -> extra levels -> BiFPN -> class/box heads, as automl's graph.

``forward`` returns raw per-level outputs; ``predict`` runs automl's whole inference
pipeline (resize-and-pad, network, box decoding, one of the three post-processing paths).
"""
from __future__ import annotations

import warnings
import weakref
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .anchors import Anchors
from .bifpn import FPNCells, ResampleFeatureMap
from .config import DetConfig, get_config
from .efficientnet import EfficientNet
from .efficientnet_config import BACKBONES
from .head import class_net, init_class_predict, box_net
from .tf_compat import SeparableConv2d, create_conv2d

if TYPE_CHECKING:
    from .labels import LabelsLike
    from .postprocess import Detections

Taps = Optional[dict[str, torch.Tensor]]
ImageInput = Union[str, PathLike, Image.Image, np.ndarray, torch.Tensor]

# model -> {input size: (parameter versions, optimized copy)} for predict(fast=True); kept
# outside the module so it is neither in state_dict nor deep-copied with the model.
_FAST_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


class EfficientDet(nn.Module):
    """automl's EfficientDetNet. Attribute paths mirror TF variable scopes (see mappings/)."""

    def __init__(self, config: DetConfig):
        super().__init__()
        if config.backbone_name not in BACKBONES:
            raise ValueError(f"unknown backbone {config.backbone_name!r}; known: {sorted(BACKBONES)}")
        self.config = config
        self.metadata: dict[str, Any] = {}    # what the weights file said (from_pretrained)
        self.backbone = EfficientNet(BACKBONES[config.backbone_name], config.act_type)
        # Backbone levels used (C3..C5 by default), then levels made by resampling.
        self.backbone_levels = list(range(config.min_level, min(config.max_level, 5) + 1))
        self.extra_levels = list(range(max(6, config.min_level), config.max_level + 1))
        channels = [self.backbone.feature_channels[level - 1] for level in self.backbone_levels]
        for level in self.extra_levels:
            self.add_module(f"resample_p{level}", ResampleFeatureMap(
                channels[-1], config.fpn_num_filters, config.apply_bn_for_resampling,
                config.conv_after_downsample))
            channels.append(config.fpn_num_filters)
        self.fpn_cells = FPNCells(channels, config)
        self.class_net = class_net(config)
        self.box_net = box_net(config)
        self.anchors = Anchors(config)

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: Union[str, DetConfig], **overrides: Any) -> "EfficientDet":
        """Builds a variant by name (``'efficientdet-d4'``) or from a DetConfig.

        ``overrides`` are automl-named config fields, e.g. ``num_classes=20`` or
        ``image_size='640x384'``.
        """
        if isinstance(config, str):
            config = get_config(config, **overrides)
        elif overrides:
            config = config.replace(**overrides)
        return cls(config)

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], map_location: str = "cpu",
                        num_classes: Optional[int] = None, **overrides: Any) -> "EfficientDet":
        """Loads a ``.pth`` / ``.safetensors`` file written by ``convert`` or
        :meth:`save_pretrained` (strictly), in eval mode.

        The file is untrusted: its config is checked field by field (types, ranges, variant ==
        config name, see ``model/config_check.py``) and every tensor must be finite; each problem
        is one ``ValueError``. ``num_classes=K`` different from the file's loads the file, then
        resets the class head for ``K`` classes (a warning says so; stored label names are
        dropped). ``overrides`` change config fields that carry no weights, e.g. ``image_size``
        (the strict load rejects any that would).
        """
        from .config_check import check_field, config_from_metadata
        from .labels import as_label_map
        from .weights_io import check_state_dict, load_weights
        state_dict, metadata = load_weights(path, map_location)
        config = config_from_metadata(metadata, str(path))
        check_state_dict(state_dict, str(path))
        if metadata.get("labels") is not None:
            try:
                as_label_map(metadata["labels"], config.num_classes)
            except ValueError as error:
                raise ValueError(f"{path}: stored labels: {error}") from None
        try:
            for field, value in overrides.items():
                check_field(field, value)
            model = cls(config.replace(**overrides) if overrides else config)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: override {error}") from None
        model.load_state_dict(state_dict, strict=True)
        model.metadata = dict(metadata)
        if num_classes is not None and num_classes != config.num_classes:
            check_field("num_classes", num_classes)
            warnings.warn(f"{path}: class head reset from {config.num_classes} to {num_classes} "
                          f"classes; the new head is untrained (fine-tune it)", stacklevel=2)
            model.reset_head(num_classes)
        return model.eval()

    def save_pretrained(self, path: Union[str, Path],
                        labels: Optional["LabelsLike"] = None) -> Path:
        """Writes the weights, config and metadata to ``path`` (``.pth`` or ``.safetensors``,
        atomically) so that :meth:`from_pretrained` rebuilds this model exactly, also after
        ``reset_head`` or fine-tuning.

        ``labels`` (``{id: name}`` or a list of names for ids 1..) are stored for ``detect`` and
        ``predict(names=True)``; by default the names this model already carries are kept.
        The conversion record (``source``) of a converted model is kept.
        """
        from ._version import __version__
        from .labels import as_label_map
        from .weights_io import save_weights
        previous = self.metadata
        metadata: dict[str, Any] = {"variant": self.config.name, "config": self.config.to_dict()}
        if "source" in previous:
            metadata["source"] = previous["source"]
        stored = labels if labels is not None else previous.get("labels")
        if stored is not None:
            label_map = as_label_map(stored, self.config.num_classes)
            metadata["labels"] = {str(k): v for k, v in sorted(label_map.items())}
        metadata["tool"] = {"name": "effdet-tf-port", "version": __version__,
                            "writer": "save_pretrained"}
        saved = save_weights(path, self.state_dict(), metadata)
        self.metadata = metadata
        return saved

    def reset_head(self, num_classes: int) -> None:
        """Replaces the class predictor for ``num_classes`` (fine-tuning); keeps all else."""
        old = self.class_net.predict
        channels = self.config.fpn_num_filters
        outputs = self.config.num_anchors * num_classes
        new = SeparableConv2d(channels, outputs) if self.config.separable_conv \
            else create_conv2d(channels, outputs, 3)
        init_class_predict(new)
        device = next(old.parameters()).device
        setattr(self.class_net, "class_predict", new.to(device))
        self.config = self.config.replace(num_classes=num_classes)
        if "labels" in self.metadata:
            self.metadata = {k: v for k, v in self.metadata.items() if k != "labels"}

    # ---------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor, taps: Taps = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``images`` [N, 3, H, W] normalised -> (class logits, box deltas) per level.

        Class outputs are [N, A*num_classes, H_l, W_l], box outputs [N, A*4, H_l, W_l],
        levels min..max. Pass a dict as ``taps`` to receive every intermediate tensor under
        the reference tap names (``backbone/block_03``, ``fpn/cell_2/p5``, ...).
        """
        reductions = self.backbone(images, taps)
        feats = [reductions[level - 1] for level in self.backbone_levels]
        if taps is not None:
            for level, feat in zip(self.backbone_levels, feats):
                taps[f"backbone/c{level}"] = feat
        for level in self.extra_levels:
            height, width = feats[-1].shape[-2:]
            feat = self.get_submodule(f"resample_p{level}")(
                feats[-1], ((height - 1) // 2 + 1, (width - 1) // 2 + 1))
            feats.append(feat)
            if taps is not None:
                taps[f"fpn/in_p{level}"] = feat
        feats = self.fpn_cells(feats, taps)
        class_outputs = self.class_net(feats)
        box_outputs = self.box_net(feats)
        if taps is not None:
            for offset, (cls_out, box_out) in enumerate(zip(class_outputs, box_outputs)):
                level = self.config.min_level + offset
                taps[f"head/class_p{level}"] = cls_out
                taps[f"head/box_p{level}"] = box_out
        return class_outputs, box_outputs

    def forward_with_taps(self, images: torch.Tensor):
        """Returns ``((class_outputs, box_outputs), taps)``; taps are NCHW tensors."""
        taps: dict[str, torch.Tensor] = {}
        outputs = self(images, taps)
        return outputs, taps

    # -------------------------------------------------------------------- inference
    @property
    def label_map(self) -> dict[int, str]:
        """``{class id: name}``: names stored with the weights (``save_pretrained(labels=...)``),
        else automl's COCO map for a 90-class model, else empty (ids are shown as numbers)."""
        from .labels import COCO_LABELS, COCO_NUM_CLASSES, as_label_map
        stored = self.metadata.get("labels")
        if stored:
            return as_label_map(stored, self.config.num_classes)
        return dict(COCO_LABELS) if self.config.num_classes == COCO_NUM_CLASSES else {}

    def optimize(self, image_size: Optional[Any] = None, channels_last: bool = True,
                 compile: bool = False, onednn: bool = True,
                 keep_host_memory: bool = True) -> nn.Module:
        """An inference-only copy for one input size (default: the config's) that returns what
        ``self(images)`` returns: BN folded into the convs, activations and residual adds fused
        into them (oneDNN on CPU float32 unless ``onednn=False``), static SAME padding,
        channels_last, optionally ``torch.compile`` (slow first call). ``keep_host_memory``
        makes glibc keep freed memory (process-wide; see :mod:`model.host_memory`).
        See :mod:`model.optimize`; ``self`` is left untouched."""
        from .optimize import optimize
        return optimize(self, image_size, channels_last=channels_last, compile=compile,
                        onednn=onednn, keep_host_memory=keep_host_memory)

    def _fast_forward(self) -> nn.Module:
        """The ``optimize()``d copy for the config's input size, built once per size and cached;
        rebuilt when a parameter or buffer changed since (``load_state_dict``, ``.to()``)."""
        size = tuple(self.config.image_size)
        version = tuple((t.data_ptr(), t._version) for t in (*self.parameters(), *self.buffers()))
        cache = _FAST_CACHE.setdefault(self, {})
        if size not in cache or cache[size][0] != version:
            cache[size] = (version, self.optimize(size))
        return cache[size][1]

    @torch.no_grad()
    def predict(self, images: Union[ImageInput, Sequence[ImageInput]], postprocess: str = "global",
                batch_size: int = 8, clip_boxes: bool = False, names: bool = False,
                fast: bool = False,
                **nms_overrides: Any) -> "Detections":
        """automl's inference pipeline on RGB images; returns one batched ``Detections``.

        Input contract (checked before the network runs; one ``ValueError``/``TypeError`` each):

        * one image or a sequence of them (a 4-D array ``[N, H, W, 3]`` / tensor ``[N, 3, H, W]``
          is a batch); at least one;
        * an image is a file path (decoded with PIL batch by batch, not all up front: 16-bit grey
          scaled to 8 bits, alpha dropped, EXIF orientation not applied, as automl), a PIL image,
          a numpy ``[H, W, 3]`` or torch ``[3, H, W]`` RGB array of dtype uint8, uint16 (scaled
          to 0..255) or float with values in 0..255 (not 0..1). Grey 2-D arrays, 4 channels,
          bool/signed-int dtypes are refused (see ``model.preprocess.check_image``).

        ``postprocess`` is ``'global'`` (automl inference), ``'per_class'`` (automl COCO
        evaluation) or ``'pyfunc'`` (automl's numpy soft-NMS); ``nms_overrides`` change
        ``nms_configs`` fields (e.g. ``method='hard'``; ``max_nms_inputs=N`` sets the pre-NMS
        top-N on every path, where the eval paths otherwise use automl's 5000). The model runs in
        eval mode (its train/eval mode is restored afterwards). ``fast=True`` runs the network through
        :meth:`optimize` (built on first use, then cached).

        Output: boxes ``[N, K, 4]`` (ymin, xmin, ymax, xmax) in original-image pixels, scores
        ``[N, K]``, integer (int64) 1-based class ids ``[N, K]``, ``valid`` ``[N]``. Boxes are
        **not** clipped to the image by default, as in automl (``global`` clips to the padded
        network frame, so a box may reach x=600 on a 512-wide image); ``clip_boxes=True`` clips
        them to each image. ``names=True`` also fills ``Detections.names``: per image, the class
        names of its ``valid`` rows from :attr:`label_map`.
        """
        from .postprocess import MAX_DETECTION_POINTS, POSTPROCESS_KINDS, Detections, \
            NmsConfig, postprocess as run_postprocess
        from .preprocess import check_image, load_image, preprocess_batch
        if postprocess not in POSTPROCESS_KINDS:
            raise ValueError(f"unknown postprocess {postprocess!r}; "
                             f"expected one of {', '.join(POSTPROCESS_KINDS)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        inputs = _as_image_list(images)
        nms = NmsConfig.from_dict({**self.config.nms_configs, **nms_overrides})
        max_nms_inputs = nms_overrides.get("max_nms_inputs", MAX_DETECTION_POINTS)

        def decode(image: ImageInput) -> Any:
            return load_image(image) if isinstance(image, (str, PathLike)) else check_image(image)

        for image in inputs:            # cheap checks first: no network run on a bad batch
            if not isinstance(image, (str, PathLike)):
                check_image(image)
        device = self.anchors.boxes_yxyx.device
        was_training = self.training
        self.eval()
        results = []
        try:
            network = self._fast_forward() if fast else self
            for start in range(0, len(inputs), batch_size):
                pixels = [decode(image) for image in inputs[start:start + batch_size]]
                batch, scales = preprocess_batch(pixels, self.config.image_size,
                                                 self.config.mean_rgb, self.config.stddev_rgb,
                                                 self.config.scale_range)
                class_outputs, box_outputs = network(batch.to(device))
                cls_logits, box_deltas = flatten_outputs(class_outputs, box_outputs)
                dets = run_postprocess(postprocess, cls_logits, box_deltas,
                                       self.anchors.boxes_yxyx, self.config.image_size,
                                       scales.to(device), nms, max_nms_inputs)
                if clip_boxes:
                    dets.boxes_yxyx = clip_to_images(dets.boxes_yxyx, [_image_hw(p) for p in pixels])
                results.append(dets)
        finally:
            self.train(was_training)
        merged = Detections(torch.cat([r.boxes_yxyx for r in results]),
                            torch.cat([r.scores for r in results]),
                            torch.cat([r.classes for r in results]),
                            torch.cat([r.valid for r in results]))
        merged.classes = merged.classes.round().long()
        if names:
            from .labels import class_name
            label_map = self.label_map
            merged.names = [[class_name(label_map, c) for c in row[:int(count)].tolist()]
                            for row, count in zip(merged.classes, merged.valid)]
        return merged


def _as_image_list(images: Any) -> list[Any]:
    """One image or a batch -> a non-empty list of images (not decoded)."""
    if isinstance(images, (str, PathLike, Image.Image)) or \
            (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim != 4):
        return [images]   # one image; a 4-D array or a sequence is a batch
    if isinstance(images, (np.ndarray, torch.Tensor)):
        inputs = list(images)
    elif isinstance(images, Sequence):
        inputs = list(images)
    else:
        raise TypeError(f"expected an image or a sequence of images, got {type(images).__name__}")
    if not inputs:
        raise ValueError("predict needs at least one image, got an empty batch")
    return inputs


def _image_hw(image: Any) -> tuple[int, int]:
    """(H, W) of a checked image: HWC numpy array or CHW tensor."""
    return tuple(image.shape[:2]) if isinstance(image, np.ndarray) else tuple(image.shape[1:])


def clip_to_images(boxes_yxyx: torch.Tensor, image_hw: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Clips ``[N, K, 4]`` (ymin, xmin, ymax, xmax) boxes to each image's ``[0, H] x [0, W]``."""
    limits = torch.tensor([[h, w, h, w] for h, w in image_hw], dtype=boxes_yxyx.dtype,
                          device=boxes_yxyx.device)[:, None, :]
    return torch.minimum(boxes_yxyx.clamp(min=0), limits)


def flatten_outputs(class_outputs: list[torch.Tensor], box_outputs: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level NCHW head outputs -> ``[N, A_total, num_classes]`` and ``[N, A_total, 4]``
    in TF's order (level, y, x, anchor), matching ``Anchors``."""
    batch = class_outputs[0].shape[0]
    num_anchors = box_outputs[0].shape[1] // 4

    def flatten(outputs: list[torch.Tensor], width: int) -> torch.Tensor:
        # Each level to [N, H * W * anchors, width] before the one concatenation: an exported
        # graph then returns the concatenation itself instead of a copy of it.
        return torch.cat([o.permute(0, 2, 3, 1).reshape(batch, -1, width) for o in outputs], 1)
    return flatten(class_outputs, class_outputs[0].shape[1] // num_anchors), flatten(box_outputs, 4)
