"""``verify parity --onnx``: the model exported to ONNX and run by onnxruntime, called like
the model by :func:`verify.parity.run_parity`.

The graph is ``export_model(model, "onnx", ..., outputs="raw")``: its only outputs are the
flattened head outputs, so the head taps (``head/class_pN``, ``head/box_pN``) and the
detections are compared; the internal taps are reported as not available for this runtime.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from model.config import DetConfig
from model.efficientdet import EfficientDet
from model.fpn_config import feat_sizes

RUNTIME = "onnx"
TAP_PREFIX = "head/"     # the taps an ONNX graph with raw outputs can give


def unflatten_outputs(flat: torch.Tensor, config: DetConfig) -> list[torch.Tensor]:
    """``[N, A_total, K]`` in TF order (level, y, x, anchor) -> per level
    ``[N, anchors * K, H_l, W_l]``: the inverse of ``flatten_outputs``."""
    sizes = feat_sizes(config.image_size, config.max_level)
    channels = config.num_anchors * flat.shape[-1]
    levels, start = [], 0
    for level in range(config.min_level, config.max_level + 1):
        height, width = sizes[level]
        count = height * width * config.num_anchors
        block = flat[:, start:start + count].reshape(flat.shape[0], height, width, channels)
        levels.append(block.permute(0, 3, 1, 2))
        start += count
    return levels


class OnnxNetwork(nn.Module):
    """``model`` exported to ONNX (raw outputs, the config's input size) in a temporary
    folder and run by onnxruntime's CPU provider; ``forward_with_taps`` returns per-level
    NCHW head outputs and the head taps, as ``EfficientDet.forward_with_taps`` does."""

    runtime = RUNTIME
    tap_prefix = TAP_PREFIX

    def __init__(self, model: EfficientDet):
        super().__init__()
        import onnxruntime
        from converter.export import export_model
        self.config = model.config
        self.anchors = model.anchors
        size = tuple(model.config.image_size)
        with tempfile.TemporaryDirectory(prefix="parity-onnx-") as folder:
            path = export_model(model.cpu(), "onnx", Path(folder) / "model.onnx",
                                outputs="raw", image_size=size)
            self.session = onnxruntime.InferenceSession(str(path),
                                                        providers=["CPUExecutionProvider"])

    def forward_with_taps(self, images: torch.Tensor):
        """Returns ``((class_outputs, box_outputs), head taps)``, tensors on ``images``' device."""
        cls_logits, box_deltas = self.session.run(
            None, {"images": images.detach().cpu().float().numpy()})
        class_outputs = unflatten_outputs(
            torch.from_numpy(cls_logits).to(images.device), self.config)
        box_outputs = unflatten_outputs(
            torch.from_numpy(box_deltas).to(images.device), self.config)
        taps: dict[str, torch.Tensor] = {}
        for offset, (cls_out, box_out) in enumerate(zip(class_outputs, box_outputs)):
            level = self.config.min_level + offset
            taps[f"head/class_p{level}"] = cls_out
            taps[f"head/box_p{level}"] = box_out
        return (class_outputs, box_outputs), taps
