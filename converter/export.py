"""``convert --to FORMAT``: a PyTorch EfficientDet written in another format, through one table.

``EXPORT_FORMATS`` maps a format name to its exporter ``(model, path, force=False, **options)
-> Path`` (the path written); ``export_model(model, fmt, path, **options)`` dispatches through it.
Weights formats: ``tf-ckpt`` (automl TF1 checkpoint, ``converter.to_tf``) and ``effdet``
(rwightman's effdet state_dict, ``converter.to_effdet``). Graph formats (``GRAPH_FORMATS``):
ONNX, TorchScript and torch.export, each written atomically (a temporary file renamed over
``path``).

What a graph returns (input ``images [N, 3, H, W]``, normalised as ``preprocess_batch`` does):

=============  ==================================================  ==========================
``outputs``    graph outputs                                       then on the host
=============  ==================================================  ==========================
``raw``        ``cls_logits [N, A, C]``, ``box_deltas [N, A, 4]``  :func:`postprocess_raw`:
               (``flatten_outputs``' TF order)                     any automl path (soft-NMS)
``levels``     what ``model(images)`` returns: ``cls_level_L``     :func:`postprocess_raw`
               ``[N, anchors * C, H_L, W_L]`` for each level L,    with the two lists
               then ``box_level_L`` ``[N, anchors * 4, H_L,
               W_L]`` (NCHW; the least work in the graph: d4 in
               onnxruntime 6% faster than ``raw``)
``decoded``    ``boxes_yxyx [N, A, 4]`` (network-input pixels),    your own NMS
               ``scores [N, A, C]`` (sigmoid)
``nms``        ``detections [K, 7]``: image index, ymin, xmin,     multiply boxes by the
(ONNX only)    ymax, xmax, score, class (1-based); automl's        image's scale
               global path with ``method='hard'`` (ONNX
               NonMaxSuppression, IoU 0.5, ``max_output_size``
               per image), boxes clipped to the input
=============  ==================================================  ==========================

automl's default soft-NMS (gaussian) has no ONNX/TorchScript op: export ``raw`` and run
:func:`postprocess_raw` on the runtime's outputs (it is ``model.postprocess`` on numpy or torch
inputs). A graph is made for one input size (``image_size``, default the config's): SAME padding,
the resampling between levels and the anchors all follow from it (``torch.export`` with free
height and width did not finish in 10 minutes on lite0), so export one graph per size;
``dynamic_batch=True`` keeps the batch dimension free. TorchScript is traced
(``torch.jit.trace``): scripting the model's Python (dict taps, f-string module names, config
dataclasses) is not supported.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Union

import numpy as np
import torch
from torch import nn

from model.box_coder import decode_boxes
from model.config import parse_image_size
from model.efficientdet import EfficientDet, flatten_outputs
from model.weights_io import atomic_path

from .errors import ConversionError, OutputError
from .export_formats import EXPORT_SUFFIXES, FORMAT_NAMES, GRAPH_FORMATS, OUTPUT_KINDS
from .to_tf import tf_tensors, write_tf_checkpoint

OUTPUT_NAMES = {"raw": ["cls_logits", "box_deltas"], "decoded": ["boxes_yxyx", "scores"],
                "nms": ["detections"]}

# ONNX opset: 18 is onnxruntime's long-supported default for torch.onnx's exporter.
ONNX_OPSET = 18


def output_names(outputs: str, config: Any) -> list[str]:
    """The graph's output names (``levels``: one per head and level of ``config``)."""
    if outputs != "levels":
        return OUTPUT_NAMES[outputs]
    levels = range(config.min_level, config.max_level + 1)
    return [f"{head}_level_{level}" for head in ("cls", "box") for level in levels]


class ExportError(ConversionError, ValueError):
    """The model cannot be exported with these options (exit code 1)."""


class ExportGraph(nn.Module):
    """The network plus the in-graph part of post-processing chosen by ``outputs``."""

    def __init__(self, network: nn.Module, anchors_yxyx: torch.Tensor, image_hw: tuple[int, int],
                 outputs: str, max_output_size: int, iou_threshold: float):
        super().__init__()
        self.network = network
        self.outputs = outputs
        self.register_buffer("anchors_yxyx", anchors_yxyx.clone(), persistent=False)
        self.image_hw = image_hw
        self.max_output_size = max_output_size
        self.iou_threshold = iou_threshold

    def forward(self, images: torch.Tensor):
        if self.outputs == "levels":
            class_outputs, box_outputs = self.network(images)
            return (*class_outputs, *box_outputs)
        cls_logits, box_deltas = flatten_outputs(*self.network(images))
        if self.outputs == "raw":
            return cls_logits, box_deltas
        boxes = decode_boxes(box_deltas, self.anchors_yxyx)
        scores = torch.sigmoid(cls_logits)
        if self.outputs == "decoded":
            return boxes, scores
        return self._hard_nms(boxes, scores)

    def _hard_nms(self, boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """automl's global path with hard NMS: each anchor's best class, one class-agnostic NMS."""
        best, classes = scores.max(dim=-1)                                     # [N, A]
        picks = onnx_nms(boxes, best[:, None, :], self.max_output_size, self.iou_threshold)
        image, anchor = picks[:, 0], picks[:, 2]
        height, width = self.image_hw
        upper = torch.tensor([height, width, height, width], dtype=boxes.dtype)
        kept = torch.minimum(boxes[image, anchor], upper).clamp(min=0.0)
        return torch.cat([image[:, None].to(boxes.dtype), kept, best[image, anchor][:, None],
                          (classes[image, anchor] + 1)[:, None].to(boxes.dtype)], dim=1)


# ---------------------------------------------------------------------------- in-graph NMS
@torch.library.custom_op("effdet_export::nms", mutates_args=())
def onnx_nms(boxes: torch.Tensor, scores: torch.Tensor, max_output: int,
             iou_threshold: float) -> torch.Tensor:
    """ONNX NonMaxSuppression (``center_point_box=0``, boxes ``[N, A, 4]`` yxyx, scores
    ``[N, C, A]``, no score threshold) -> ``[K, 3]`` int64 (image, class, box), per image and
    class in selection order. Eagerly it is TF's hard NMS (:mod:`model.nms`), as automl runs it."""
    from model.nms import batched_non_max_suppression_v5
    batch, num_classes, num_boxes = scores.shape
    groups = torch.arange(batch * num_classes).repeat_interleave(num_boxes)
    picks, _, valid = batched_non_max_suppression_v5(
        boxes[:, None].expand(-1, num_classes, -1, -1).reshape(-1, 4), scores.reshape(-1),
        groups, batch * num_classes, max_output, iou_threshold, -math.inf, 0.0)
    real = torch.arange(max_output)[None, :] < valid[:, None]               # [N*C, max_output]
    group = torch.arange(batch * num_classes)[:, None].expand_as(picks)[real]
    return torch.stack([group // num_classes, group % num_classes, picks[real] % num_boxes], 1)


@onnx_nms.register_fake
def _(boxes, scores, max_output, iou_threshold):
    count = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((count, 3), dtype=torch.int64)


def _onnx_nms_translation(boxes, scores, max_output: int, iou_threshold: float):
    from onnxscript import opset18 as op
    return op.NonMaxSuppression(boxes, scores, op.Constant(value_ints=[max_output]),
                                op.Constant(value_floats=[iou_threshold]), center_point_box=0)


# ------------------------------------------------------------------------------ building
def build_graph(model: EfficientDet, image_size: Any = None, outputs: str = "raw"
                ) -> tuple[ExportGraph, tuple[int, int]]:
    """The module to export and its input size (H, W): the network through ``optimize()`` for
    that size (folded BN, static padding, NCHW) plus the in-graph post-processing."""
    if outputs not in OUTPUT_KINDS:
        raise ExportError(f"unknown outputs {outputs!r}; expected one of {OUTPUT_KINDS}")
    config = model.config
    size = parse_image_size(image_size) if image_size is not None else tuple(config.image_size)
    if size != tuple(config.image_size):
        resized = EfficientDet(config.replace(image_size=size))
        resized.load_state_dict(model.state_dict())
        model = resized
    network = model.optimize(size, channels_last=False, onednn=False,
                             keep_host_memory=False).net   # its size check stays outside
    from model.postprocess import NmsConfig
    nms = NmsConfig.from_dict(config.nms_configs)
    iou = nms.iou_thresh or 0.5
    return ExportGraph(network, model.anchors.boxes_yxyx, size, outputs, nms.max_output_size,
                       iou).eval(), size


def _example(size: tuple[int, int], batch_size: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))


Exporter = Callable[..., Path]


def _check_target(path: Union[str, Path], force: bool) -> None:
    path = Path(path)
    if path.exists() and not force:
        raise OutputError(f"{path} exists; pass --force to overwrite")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name")


def _source_step(metadata: dict) -> int:
    """The ``global_step`` ``convert`` recorded from the TF checkpoint, else 0."""
    source = metadata.get("source")
    step = source.get("global_step") if isinstance(source, dict) else None
    return step if isinstance(step, int) and step >= 0 else 0


def export_tf_ckpt(model: EfficientDet, path: Path, raw_model: EfficientDet | None = None,
                   global_step: int | None = None, force: bool = False) -> Path:
    """automl TF1 name-based checkpoint folder (``converter.to_tf``); ``model``'s weights are
    the EMA shadows, ``raw_model``'s (default: the same) the raw variables. ``global_step``
    defaults to the step the weights were converted from (0 if unknown)."""
    if global_step is None:
        global_step = _source_step(getattr(model, "metadata", {}))
    raw = None if raw_model is None else raw_model.state_dict()
    tensors = tf_tensors(model.state_dict(), model.config, raw, global_step)
    return write_tf_checkpoint(tensors, path, force=force)


def export_effdet(model: EfficientDet, path: Path, force: bool = False) -> Path:
    """A state_dict rwightman's effdet loads strictly (``converter.to_effdet``)."""
    from .to_effdet import save_effdet
    return save_effdet(model, path, force=force)


# torch.onnx logs a warning per torchvision op it cannot register when torchvision is absent
# (this project does not use torchvision); keep `convert --to onnx` output to our own lines.
_ONNX_REGISTRATION_LOG = "torch.onnx._internal.exporter._registration"


def export_onnx(model: EfficientDet, path: Union[str, Path], image_size: Any = None,
                batch_size: int = 1, dynamic_batch: bool = False, outputs: str = "raw",
                opset: int = ONNX_OPSET, force: bool = False) -> Path:
    """ONNX through ``torch.onnx.export(dynamo=True)``; run it with onnxruntime."""
    _check_target(path, force)
    graph, size = build_graph(model, image_size, outputs)
    dims = {0: torch.export.Dim("batch", min=1)} if dynamic_batch else {}
    logging.getLogger(_ONNX_REGISTRATION_LOG).setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings(), \
            atomic_path(path, overwrite=force) as tmp_name:
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, (_example(size, max(batch_size, 2 if dynamic_batch else 1)),), None,
            input_names=["images"], output_names=output_names(outputs, model.config),
            opset_version=opset,
            dynamo=True, external_data=False, dynamic_shapes=({**dims},) if dims else None,
            custom_translation_table={torch.ops.effdet_export.nms.default: _onnx_nms_translation},
            verbose=False, optimize=False)
        program.save(tmp_name, external_data=False)
    return Path(path)


def _refuse_in_graph_nms(outputs: str) -> None:
    if outputs == "nms":
        raise ExportError("in-graph NMS is ONNX only; export outputs='raw' and run "
                          "postprocess_raw, or outputs='decoded' and your own NMS")


def export_torchscript(model: EfficientDet, path: Union[str, Path], image_size: Any = None,
                       batch_size: int = 1, dynamic_batch: bool = False, outputs: str = "raw",
                       force: bool = False) -> Path:
    """TorchScript by ``torch.jit.trace`` (scripting is unsupported; see the module doc)."""
    _check_target(path, force)
    _refuse_in_graph_nms(outputs)
    graph, size = build_graph(model, image_size, outputs)
    with torch.no_grad(), warnings.catch_warnings(), \
            atomic_path(path, overwrite=force) as tmp_name:
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(graph, (_example(size, batch_size),), check_trace=False)
        torch.jit.save(torch.jit.freeze(traced), tmp_name)
    return Path(path)


def export_program(model: EfficientDet, path: Union[str, Path], image_size: Any = None,
                   batch_size: int = 1, dynamic_batch: bool = False, outputs: str = "raw",
                   force: bool = False) -> Path:
    """``torch.export`` ExportedProgram (``.pt2``); run ``torch.export.load(path).module()``."""
    _check_target(path, force)
    _refuse_in_graph_nms(outputs)
    graph, size = build_graph(model, image_size, outputs)
    dims = {0: torch.export.Dim("batch", min=1)} if dynamic_batch else {}
    with torch.no_grad():
        program = torch.export.export(
            graph, (_example(size, max(batch_size, 2 if dynamic_batch else 1)),),
            dynamic_shapes=({**dims},) if dims else None)
    with atomic_path(path, overwrite=force) as tmp_name:
        torch.export.save(program, tmp_name)
    return Path(path)


EXPORT_FORMATS: dict[str, Exporter] = {
    "tf-ckpt": export_tf_ckpt,
    "effdet": export_effdet,
    "onnx": export_onnx,
    "torchscript": export_torchscript,
    "torch-export": export_program,
}


def export_model(model: EfficientDet, fmt: str, path: Union[str, Path], **options: Any) -> Path:
    """Writes ``model`` as ``fmt`` (a key of ``EXPORT_FORMATS``) to ``path``; returns the path
    written. Torch / ONNX failures become one-line ``ExportError``s."""
    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; known: {', '.join(EXPORT_FORMATS)}")
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputError(f"{path}: output folder {path.parent} does not exist")
    try:
        return EXPORT_FORMATS[fmt](model.eval(), path, **options)
    except ConversionError:
        raise
    except OSError as error:           # model.weights_io.DestinationError and write failures
        raise OutputError(f"{path}: {error}") from None
    except ImportError as error:
        raise ExportError(f"{fmt} export needs {error.name} (pip install "
                          f"'effdet-tf-port[export]')") from None
    except (RuntimeError, ValueError, TypeError) as error:   # torch.export / ONNX failures
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"{fmt} export failed: {first_line}") from None


# ------------------------------------------------------------------------- host-side step
def postprocess_raw(config, cls_logits, box_deltas, kind: str = "global",
                    image_scales: Any = None, image_size: Any = None, **nms_overrides: Any):
    """automl post-processing on a ``raw`` export's outputs (numpy or torch), or on a ``levels``
    export's two lists of per-level outputs: the host step for the soft-NMS paths. ``config`` is
    the model's ``DetConfig`` (``model.config``); ``image_size`` the input size the graph ran at
    (default: the config's)."""
    from model.anchors import Anchors
    from model.postprocess import NmsConfig, postprocess
    if image_size is not None:
        config = config.replace(image_size=parse_image_size(image_size))
    nms = NmsConfig.from_dict({**config.nms_configs, **nms_overrides})
    if isinstance(cls_logits, (list, tuple)):
        cls_logits, box_deltas = flatten_outputs([_host_tensor(c) for c in cls_logits],
                                                 [_host_tensor(b) for b in box_deltas])
    cls_logits, box_deltas = _host_tensor(cls_logits), _host_tensor(box_deltas)
    return postprocess(kind, cls_logits, box_deltas, Anchors(config).boxes_yxyx,
                       tuple(config.image_size), image_scales, nms)


def _host_tensor(array: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array))
