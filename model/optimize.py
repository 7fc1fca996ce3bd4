"""Inference-only EfficientDet for one input size (``EfficientDet.optimize()``).

Rewrites a copy of the network into ``model.fused_ops.FusedConv2d`` layers; the original is left
untouched:

* every BatchNorm is folded into the conv before it (``W * s``, ``(b - mean) * s + beta`` with
  ``s = gamma / sqrt(var + eps)``, computed in float64); after a Keras SeparableConv2D the BN is
  folded into the pointwise conv. The heads share one tower conv across levels but keep one BN per
  level, so each level gets its own folded copy of the pointwise conv;
* the activation after a conv and an MBConv block's residual add run inside the conv (one
  oneDNN primitive on CPU float32); a squeeze-excite gate is folded into the projection conv's
  weight for batch 1 instead of scaling the expanded activation;
* the strided convs' TF 'SAME' padding is computed once for the fixed input size (symmetric
  padding goes into the conv itself; asymmetric padding of a depthwise conv into a zero-extended
  kernel with symmetric padding, otherwise into one ``pad_zeros``);
* BiFPN fusion weights are normalised once (``w_i / (sum + eps)``, softmax) into coefficients,
  applied with one multiply-add pass per input (exports keep Mul + Add);
* weights and input in ``channels_last`` (oneDNN's native layout for the convs);
* on CPU, glibc keeps freed memory in the process (``model.host_memory``) so that each call does
  not page-fault its activations in again;
* optionally ``torch.compile`` (inductor with freezing) over plain ATen ops. Its first call
  compiles C++ kernels: d0 took 77 s with an empty cache on the 2-core machine (shared with a
  test run; 630 s under load ~14 before), outputs within 1.1e-6 of scale. It needs a C++
  toolchain, so it is opt-in (``compile=True``); inductor caches compiled kernels on disk.

The result returns what ``model(images)`` returns (and fills ``taps`` the same way, uncompiled),
equal within float32 rounding (relative ~1e-6; see tests/test_optimize.py).
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Optional, Union, cast

import torch
from torch import nn

from .bifpn import FNode, OpAfterCombine, ResampleFeatureMap
from .efficientnet import MBConvBlock, SqueezeExcite, Stem
from .fused_ops import FusedConv2d
from .head import HeadNet
from .tf_compat import FUSE_EPS, Conv2dSame, SeparableConv2d

if TYPE_CHECKING:
    from .efficientdet import EfficientDet

Taps = Optional[dict[str, torch.Tensor]]


def fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weight, bias)`` of a conv followed by ``bn`` (eval statistics) as one conv."""
    scale = bn.weight.detach().double() / torch.sqrt(
        cast(torch.Tensor, bn.running_var).double() + bn.eps)
    folded_bias = torch.zeros_like(scale) if bias is None else bias.detach().double()
    folded_bias = (folded_bias - cast(torch.Tensor, bn.running_mean).double()) * scale + \
        bn.bias.detach().double()
    folded_weight = weight.detach().double() * scale.reshape(-1, 1, 1, 1)
    return folded_weight.to(weight.dtype), folded_bias.to(weight.dtype)


def _inplace(act: nn.Module) -> nn.Module:
    """A fresh in-place copy of an activation module (it only ever sees a conv's new output)."""
    return type(act)(inplace=True)


def _conv_input_sizes(model: nn.Module, image_hw: tuple[int, int]) -> dict[str, tuple[int, int]]:
    """Runs ``model`` once at ``image_hw``; the input size each strided 'SAME' conv sees."""
    sizes: dict[str, set] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Conv2dSame) and not module.static_same:
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: sizes.setdefault(name, set()).add(
                    tuple(args[0].shape[-2:]))))
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, *image_hw, device=device))
    finally:
        for handle in handles:
            handle.remove()
    if any(len(seen) != 1 for seen in sizes.values()):
        raise ValueError("a strided conv sees several input sizes; cannot fix its padding")
    return {name: next(iter(seen)) for name, seen in sizes.items()}


class _Builder:
    """Makes the fused layers of one network copy (input sizes recorded at ``image_hw``)."""

    def __init__(self, net: nn.Module, image_hw: tuple[int, int], onednn: bool):
        self.names = {module: name for name, module in net.named_modules()}
        self.sizes = _conv_input_sizes(net, image_hw)
        self.onednn = onednn

    def conv(self, conv: nn.Module, bn: Optional[nn.BatchNorm2d] = None,
             act: Optional[nn.Module] = None) -> nn.Module:
        """``act(bn(conv(x)))`` as fused layers: one, or depthwise + pointwise when separable."""
        if isinstance(conv, SeparableConv2d):
            return nn.Sequential(self.conv(conv.depthwise), self.conv(conv.pointwise, bn, act))
        conv = cast(nn.Conv2d, conv)
        weight, bias = conv.weight, conv.bias
        if bn is not None:
            weight, bias = fold_bn(weight, bias, bn)
        input_hw = self.sizes.get(self.names[conv], (0, 0))
        return FusedConv2d.from_conv(conv, input_hw, weight, bias,
                                     None if act is None else _inplace(act), self.onednn)

    def fold_resample(self, resample: ResampleFeatureMap) -> None:
        """Its 1x1 conv + BN (if any) becomes one fused conv, in place."""
        if resample.conv2d is not None:
            resample.conv2d = self.conv(resample.conv2d, resample.bn)  # type: ignore[assignment]
            resample.bn = None


class FusedStem(nn.Module):
    def __init__(self, stem: Stem, build: _Builder):
        super().__init__()
        self.conv = build.conv(stem.conv2d, stem.tpu_batch_normalization, stem.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _is_one(batch: Any) -> bool:
    """A batch of one that stays one: not a symbolic batch (a dynamic export) and not a
    ``torch.jit.trace`` (a traced graph is run at other batch sizes)."""
    return not isinstance(batch, torch.SymInt) and not torch.jit.is_tracing() and batch == 1


class FusedMBConvBlock(nn.Module):
    """``MBConvBlock`` with BN, activations and the residual add inside its convs."""

    def __init__(self, block: MBConvBlock, build: _Builder):
        super().__init__()
        if block.has_expand:
            self.expand: Optional[nn.Module] = build.conv(
                block.conv2d, block.tpu_batch_normalization, block.act)
            depthwise_bn, project, project_bn = (block.tpu_batch_normalization_1,
                                                  block.conv2d_1, block.tpu_batch_normalization_2)
        else:
            self.expand = None
            depthwise_bn, project, project_bn = (block.tpu_batch_normalization, block.conv2d,
                                                  block.tpu_batch_normalization_1)
        self.depthwise = build.conv(block.depthwise_conv2d, depthwise_bn, block.act)
        self.se: Optional[SqueezeExcite] = block.se
        self.project = cast(FusedConv2d, build.conv(project, project_bn))
        self.residual = block.residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        if self.expand is not None:
            x = self.expand(x)
        x = self.depthwise(x)
        weight = None
        if self.se is not None:
            se = self.se
            gate = torch.sigmoid(se.conv2d_1(se.act(se.conv2d(x.mean((2, 3), keepdim=True)))))
            if _is_one(x.shape[0]):   # conv(x * g) == conv_{W * g}(x): no pass over x
                weight = self.project.weight * gate.reshape(1, -1, 1, 1)
            else:
                x = x * gate
        return self.project(x, shortcut if self.residual else None, weight)


def fusion_coefficients(node: FNode, channels: int) -> Optional[list[torch.Tensor]]:
    """The constant factor of each input of a BiFPN node (``None``: plain sum), per channel
    (``[1, C, 1, 1]``) for every method: onnxruntime turns a per-channel constant multiply into
    a blocked depthwise conv and fuses the sum into it, where a scalar multiply runs unblocked."""
    if node.weight_method == "sum":
        return None
    weights = [getattr(node, name).detach() for name in node.weight_names]
    if node.weight_method.endswith("fastattn"):
        weights = [torch.relu(w) for w in weights]
        total = torch.stack(weights).sum(0) + FUSE_EPS
        factors = [w / total for w in weights]
    else:
        factors = list(torch.softmax(torch.stack(weights), dim=0))
    return [(f * torch.ones(channels, dtype=f.dtype, device=f.device)).reshape(1, -1, 1, 1)
            for f in factors]


class FusedFNode(nn.Module):
    """``FNode``: resample every input edge, weighted sum with constant factors, then the
    op after combine (act -> separable conv with folded BN, or conv -> BN -> act)."""

    def __init__(self, node: FNode, build: _Builder):
        super().__init__()
        self.level_index = node.level_index
        self.inputs_offsets = node.inputs_offsets
        self.resamples = nn.ModuleList()
        for name in node.resample_names:
            resample = cast(ResampleFeatureMap, node.get_submodule(name))
            build.fold_resample(resample)
            self.resamples.append(resample)
        op = cast(OpAfterCombine, node.get_submodule(node.op_name))
        factors = fusion_coefficients(node, op.bn.num_features)
        self.factors = None if factors is None else nn.ParameterList(
            [nn.Parameter(f, requires_grad=False) for f in factors])
        self.act_first = None if op.conv_bn_act else _inplace(op.act)
        self.conv = build.conv(op.conv, op.bn, op.act if op.conv_bn_act else None)
        # One pass per input (x += node * factor) except for export (onednn=False), whose graphs
        # keep Mul + Add: onnxruntime turns them into a blocked depthwise conv with the sum fused.
        self.multiply_add = build.onednn

    def forward(self, feats: list[torch.Tensor], level_sizes: list[tuple[int, int]]) -> torch.Tensor:
        target = level_sizes[self.level_index]
        nodes = [resample(feats[offset], target)
                 for resample, offset in zip(self.resamples, self.inputs_offsets)]
        if self.factors is None:
            x = nodes[0] + nodes[1]
            for node in nodes[2:]:
                x += node
        else:
            x = nodes[0] * self.factors[0]
            for node, factor in zip(nodes[1:], list(self.factors)[1:]):
                if self.multiply_add:
                    x.addcmul_(node, factor)
                else:
                    x = x + node * factor
        if self.act_first is not None:
            x = self.act_first(x)
        return self.conv(x)


class FusedHead(nn.Module):
    """A ``HeadNet`` whose tower convs carry each level's folded BN and the activation."""

    def __init__(self, head: HeadNet, build: _Builder):
        super().__init__()
        self.survival_prob = head.survival_prob
        self.towers = nn.ModuleList()
        for level in head.levels:
            self.towers.append(nn.ModuleList([
                build.conv(head.get_submodule(f"{head.prefix}_{i}"),
                           cast(nn.BatchNorm2d, head.get_submodule(f"{head.prefix}_{i}_bn_{level}")),
                           head.act)
                for i in range(head.repeats)]))
        self.predict = build.conv(head.predict)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for tower, x in zip(self.towers, feats):
            for i, conv in enumerate(cast(nn.ModuleList, tower)):
                shortcut = x
                x = conv(x)
                if i > 0 and self.survival_prob:   # drop_connect is the identity at inference
                    x = x + shortcut
            outputs.append(self.predict(x))
        return outputs


def _fuse_network(net: EfficientDet, image_hw: tuple[int, int], onednn: bool) -> None:
    """Replaces, in place, every block of ``net`` (an ``EfficientDet`` copy) by its fused form."""
    build = _Builder(net, image_hw, onednn)
    backbone = net.backbone
    backbone.stem = FusedStem(backbone.stem, build)  # type: ignore[assignment]
    blocks = cast(nn.ModuleList, backbone.blocks)
    for index, block in enumerate(list(blocks)):
        blocks[index] = FusedMBConvBlock(cast(MBConvBlock, block), build)
    for level in net.extra_levels:
        build.fold_resample(cast(ResampleFeatureMap, net.get_submodule(f"resample_p{level}")))
    for cell in net.fpn_cells.children():
        for name, node in list(cell.named_children()):
            setattr(cell, name, FusedFNode(cast(FNode, node), build))
    net.class_net = FusedHead(net.class_net, build)  # type: ignore[assignment]
    net.box_net = FusedHead(net.box_net, build)  # type: ignore[assignment]


class OptimizedEfficientDet(nn.Module):
    """A folded, fixed-size copy of an ``EfficientDet``; call it like the model.

    ``forward(images, taps=None)`` takes ``[N, 3, H, W]`` at exactly ``image_size`` and returns
    ``(class_outputs, box_outputs)`` per level as ``EfficientDet.forward`` does (in
    ``channels_last`` memory format when built with it; the values are what matter).
    """

    def __init__(self, net: nn.Module, image_size: tuple[int, int], channels_last: bool):
        super().__init__()
        self.net = net
        self.image_size: tuple[int, int] = (int(image_size[0]), int(image_size[1]))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    @property
    def config(self):
        return self.net.config

    @property
    def anchors(self):
        return self.net.anchors

    def forward(self, images: torch.Tensor, taps: Taps = None):
        if tuple(images.shape[-2:]) != self.image_size:
            raise ValueError(f"this optimized model takes {self.image_size[0]}x"
                             f"{self.image_size[1]} inputs (H x W), got "
                             f"{tuple(images.shape[-2:])}; call optimize() for that size")
        return self.net(images.contiguous(memory_format=self.memory_format), taps)

    def forward_with_taps(self, images: torch.Tensor):
        taps: dict[str, torch.Tensor] = {}
        return self(images, taps), taps


def optimize(model: nn.Module, image_size: Optional[Union[tuple[int, int], Any]] = None,
             channels_last: bool = True, compile: bool = False, onednn: bool = True,
             keep_host_memory: bool = True) -> nn.Module:
    """The inference module of :mod:`model.optimize` for ``image_size`` (H, W; default: the
    config's). ``onednn=False`` keeps plain ATen ops (export); ``compile=True`` wraps the ATen
    form in ``torch.compile(inductor, freezing)``: minutes on the first call (see the module doc),
    then faster; calls with taps are not compiled. ``keep_host_memory`` applies
    :func:`model.host_memory.keep_freed_memory` (process-wide) when the model is on the CPU."""
    from .config import parse_image_size
    from .host_memory import keep_freed_memory
    config: Any = model.config
    size: tuple[int, int] = parse_image_size(image_size) if image_size is not None else \
        (int(config.image_size[0]), int(config.image_size[1]))
    net = copy.deepcopy(model).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    _fuse_network(cast("EfficientDet", net), size, onednn and not compile)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    if keep_host_memory and next(net.parameters()).device.type == "cpu":
        keep_freed_memory()
    optimized = OptimizedEfficientDet(net, size, channels_last)
    if compile:
        return CompiledEfficientDet(optimized)
    return optimized


class CompiledEfficientDet(nn.Module):
    """``torch.compile``s the taps-free call of an ``OptimizedEfficientDet``; taps run eagerly."""

    def __init__(self, optimized: OptimizedEfficientDet):
        super().__init__()
        self.optimized = optimized
        self.compiled = torch.compile(optimized, options={"freezing": True})

    @property
    def config(self):
        return self.optimized.config

    @property
    def anchors(self):
        return self.optimized.anchors

    @property
    def image_size(self) -> tuple[int, int]:
        return self.optimized.image_size

    def forward(self, images: torch.Tensor, taps: Taps = None):
        if taps is not None:
            return self.optimized(images, taps)
        with torch.no_grad():
            return self.compiled(images)

    def forward_with_taps(self, images: torch.Tensor):
        return self.optimized.forward_with_taps(images)
