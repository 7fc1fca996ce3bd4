"""EfficientDet: backbone -> extra levels -> BiFPN -> class/box heads, as automl's graph.

``forward`` returns raw per-level outputs; ``predict`` runs automl's whole inference
pipeline (resize-and-pad, network, box decoding, one of the three post-processing paths).
"""
from __future__ import annotations

import dataclasses
import weakref
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from .anchors import Anchors
from .bifpn import FPNCells, ResampleFeatureMap
from .config import DetConfig, get_config
from .efficientnet import EfficientNet
from .efficientnet_config import BACKBONES
from .head import class_net, init_class_predict, box_net
from .tf_compat import SeparableConv2d, create_conv2d

Taps = Optional[dict[str, torch.Tensor]]
ImageInput = Union[str, Path, np.ndarray, torch.Tensor]

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
                        **overrides: Any) -> "EfficientDet":
        """Loads a ``.pth`` / ``.safetensors`` file written by ``convert`` (strictly).

        ``overrides`` change config fields that carry no weights, e.g. ``image_size`` (the
        strict load rejects any that would).
        """
        from .weights_io import load_weights
        state_dict, metadata = load_weights(path, map_location)
        if "config" not in metadata:
            raise ValueError(f"{path}: weights carry no config metadata")
        config = DetConfig.from_dict(metadata["config"])
        model = cls(config.replace(**overrides) if overrides else config)
        model.load_state_dict(state_dict, strict=True)
        model.metadata = metadata
        return model.eval()

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
            feat = self._modules[f"resample_p{level}"](
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
    def optimize(self, image_size: Optional[Any] = None, channels_last: bool = True,
                 compile: bool = False) -> nn.Module:
        """An inference-only copy for one input size (default: the config's) that returns what
        ``self(images)`` returns: BN folded into the convs, static SAME padding, channels_last,
        optionally ``torch.compile`` (slow first call; see :mod:`model.optimize`). ``self`` is
        left untouched."""
        from .optimize import optimize
        return optimize(self, image_size, channels_last=channels_last, compile=compile)

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
                batch_size: int = 8, fast: bool = False, **nms_overrides: Any):
        """automl's inference pipeline on RGB images (paths, HWC uint8 arrays or tensors).

        ``postprocess`` is ``'global'`` (automl inference), ``'per_class'`` (automl COCO
        evaluation) or ``'pyfunc'`` (automl's numpy soft-NMS); ``nms_overrides`` change
        ``nms_configs`` fields (e.g. ``method='hard'``; ``max_nms_inputs=N`` sets the pre-NMS
        top-N on every path, where the eval paths otherwise use automl's 5000). ``fast=True``
        runs the network through :meth:`optimize` (built on first use, then cached). Returns one
        batched ``Detections`` with boxes in original-image pixels.
        """
        from .postprocess import (MAX_DETECTION_POINTS, Detections, NmsConfig,
                                  postprocess as run_postprocess)
        from .preprocess import load_image, preprocess_batch
        if isinstance(images, (str, Path)) or \
                (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 3):
            images = [images]   # one image; a 4-D array or a sequence is a batch
        images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
        nms = NmsConfig.from_dict({**self.config.nms_configs, **nms_overrides})
        max_nms_inputs = nms_overrides.get("max_nms_inputs", MAX_DETECTION_POINTS)
        device = self.anchors.boxes_yxyx.device
        network = self._fast_forward() if fast and not self.training else self
        results = []
        for start in range(0, len(images), batch_size):
            batch, scales = preprocess_batch(images[start:start + batch_size],
                                             self.config.image_size, self.config.mean_rgb,
                                             self.config.stddev_rgb, self.config.scale_range)
            class_outputs, box_outputs = network(batch.to(device))
            cls_logits, box_deltas = flatten_outputs(class_outputs, box_outputs)
            results.append(run_postprocess(postprocess, cls_logits, box_deltas,
                                           self.anchors.boxes_yxyx, self.config.image_size,
                                           scales.to(device), nms, max_nms_inputs))
        if len(results) == 1:
            return results[0]
        return Detections(*(torch.cat([getattr(r, f.name) for r in results])
                            for f in dataclasses.fields(Detections)))


def flatten_outputs(class_outputs: list[torch.Tensor], box_outputs: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-level NCHW head outputs -> ``[N, A_total, num_classes]`` and ``[N, A_total, 4]``
    in TF's order (level, y, x, anchor), matching ``Anchors``."""
    batch = class_outputs[0].shape[0]
    cls = torch.cat([c.permute(0, 2, 3, 1).reshape(batch, -1, c.shape[1]) for c in class_outputs], 1)
    box = torch.cat([b.permute(0, 2, 3, 1).reshape(batch, -1, b.shape[1]) for b in box_outputs], 1)
    num_anchors = box.shape[-1] // 4
    return cls.reshape(batch, -1, cls.shape[-1] // num_anchors), box.reshape(batch, -1, 4)
