"""Inference-only EfficientDet for one input size (``EfficientDet.optimize()``).

Rewrites a copy of the network; the original is left untouched:

* every BatchNorm is folded into the conv before it (``W * s``, ``(b - mean) * s + beta`` with
  ``s = gamma / sqrt(var + eps)``, computed in float64); after a Keras SeparableConv2D the BN is
  folded into the pointwise conv. The heads share one tower conv across levels but keep one BN per
  level, so each level gets its own folded copy of the conv.
* the strided convs' TF 'SAME' padding is computed once for the fixed input size (symmetric
  padding goes into the conv itself, asymmetric into one constant ``F.pad``);
* weights and input in ``channels_last`` (oneDNN's native layout for the convs);
* optionally ``torch.compile`` (inductor with freezing). Its first call compiles C++ kernels:
  d0 took 630 s on the shared 2-core machine (load ~14; torch 2.13, CPU), outputs equal to
  1e-7 of scale. Too slow to start and too dependent on a C++ toolchain to be the default, so
  it is opt-in (``compile=True``); inductor caches compiled kernels on disk for later processes.

The result returns what ``model(images)`` returns (and fills ``taps`` the same way, uncompiled),
equal within float32 rounding (relative ~1e-6; see tests/test_optimize.py).
"""
from __future__ import annotations

import copy
from typing import Any, Optional, cast

import torch
import torch.nn.functional as F
from torch import nn

from .bifpn import OpAfterCombine, ResampleFeatureMap
from .efficientnet import MBConvBlock, Stem
from .head import HeadNet
from .tf_compat import Conv2dSame, SeparableConv2d, drop_connect, same_padding

Taps = Optional[dict[str, torch.Tensor]]


def fold_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Folds ``bn`` (eval statistics) into ``conv`` in place (``conv`` gains a bias if needed)."""
    weight = conv.weight.detach().double()
    bias = conv.bias.detach().double() if conv.bias is not None else \
        torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
    running_mean, running_var = cast(torch.Tensor, bn.running_mean), cast(torch.Tensor, bn.running_var)
    scale = bn.weight.detach().double() / torch.sqrt(running_var.double() + bn.eps)
    folded_weight = weight * scale.reshape(-1, 1, 1, 1)
    folded_bias = (bias - running_mean.double()) * scale + bn.bias.detach().double()
    conv.weight = nn.Parameter(folded_weight.to(conv.weight.dtype), requires_grad=False)
    conv.bias = nn.Parameter(folded_bias.to(conv.weight.dtype), requires_grad=False)


def _last_conv(conv: nn.Module) -> nn.Conv2d:
    """The conv a BN after ``conv`` folds into (the pointwise one of a separable conv)."""
    return cast(nn.Conv2d, conv.pointwise if isinstance(conv, SeparableConv2d) else conv)


def _fold_module(module: nn.Module) -> None:
    """Folds the BNs of one building block (the ones whose conv -> BN order is fixed)."""
    if isinstance(module, Stem):
        pairs = [("conv2d", "tpu_batch_normalization")]
    elif isinstance(module, MBConvBlock):
        pairs = [("conv2d", "tpu_batch_normalization"),
                 ("depthwise_conv2d", "tpu_batch_normalization_1"),
                 ("conv2d_1", "tpu_batch_normalization_2")] if module.has_expand else \
            [("depthwise_conv2d", "tpu_batch_normalization"),
             ("conv2d", "tpu_batch_normalization_1")]
    elif isinstance(module, OpAfterCombine):
        pairs = [("conv", "bn")]
    elif isinstance(module, ResampleFeatureMap):
        if module.conv2d is not None and module.bn is not None:
            fold_bn(module.conv2d, module.bn)
            module.bn = None
        return
    else:
        return
    for conv_name, bn_name in pairs:
        fold_bn(_last_conv(getattr(module, conv_name)), getattr(module, bn_name))
        setattr(module, bn_name, nn.Identity())


class FoldedHead(nn.Module):
    """A ``HeadNet`` with each level's BN folded into its own copy of the shared tower conv."""

    def __init__(self, head: HeadNet):
        super().__init__()
        self.act = head.act
        self.survival_prob = head.survival_prob
        self.towers = nn.ModuleList()
        for level in head.levels:
            convs = nn.ModuleList()
            for i in range(head.repeats):
                conv = copy.deepcopy(head.get_submodule(f"{head.prefix}_{i}"))
                bn = cast(nn.BatchNorm2d, head.get_submodule(f"{head.prefix}_{i}_bn_{level}"))
                fold_bn(_last_conv(conv), bn)
                convs.append(conv)
            self.towers.append(convs)
        self.predict = head.predict

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        outputs = []
        for tower, x in zip(self.towers, feats):
            for i, conv in enumerate(cast(nn.ModuleList, tower)):
                shortcut = x
                x = self.act(conv(x))
                if i > 0 and self.survival_prob:
                    x = drop_connect(x, self.survival_prob, self.training) + shortcut
            outputs.append(self.predict(x))
        return outputs


class StaticSameConv2d(nn.Conv2d):
    """A ``Conv2dSame`` whose TF 'SAME' padding was computed for one input size."""

    def __init__(self, conv: Conv2dSame, input_hw: tuple[int, int]):
        top, bottom = same_padding(input_hw[0], conv.kernel_size[0], conv.stride[0])
        left, right = same_padding(input_hw[1], conv.kernel_size[1], conv.stride[1])
        symmetric = top == bottom and left == right
        kernel = cast(tuple[int, int], tuple(conv.kernel_size))
        stride = cast(tuple[int, int], tuple(conv.stride))
        super().__init__(conv.in_channels, conv.out_channels, kernel, stride,
                         padding=(top, left) if symmetric else 0, groups=conv.groups,
                         bias=conv.bias is not None, device=conv.weight.device,
                         dtype=conv.weight.dtype)
        self.input_hw = tuple(input_hw)
        self.pad = None if symmetric else (left, right, top, bottom)
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return super().forward(x)


class PointwiseLinear(nn.Module):
    """A 1x1 stride-1 conv on a channels_last tensor as one matrix multiply over the NHWC view.

    PyTorch runs small-batch 1x1 convs through its im2col fallback (not oneDNN) on one thread,
    converting channels_last inputs to NCHW and back; ``F.linear`` reads the NHWC memory as is.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1).clone(),
                                   requires_grad=False)
        self.bias = None if conv.bias is None else \
            nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)


def _is_pointwise(module: nn.Module) -> bool:
    if type(module) not in (nn.Conv2d, Conv2dSame):
        return False
    conv = cast(nn.Conv2d, module)
    return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and \
        conv.padding in ((0, 0), "valid")


def _conv_input_sizes(model: nn.Module, image_hw: tuple[int, int]) -> dict[str, set]:
    """Runs ``model`` once at ``image_hw`` and records the input sizes each dynamic conv sees."""
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
    return sizes


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


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


def optimize(model: nn.Module, image_size: Optional[tuple[int, int]] = None,
             channels_last: bool = True, compile: bool = False) -> nn.Module:
    """The inference module of :mod:`model.optimize` for ``image_size`` (H, W; default: the
    config's). ``compile=True`` wraps it in ``torch.compile(inductor, freezing)``: minutes on
    the first call (see the module doc), then faster; calls with taps are not compiled."""
    from .config import parse_image_size
    config: Any = model.config
    size: tuple[int, int] = parse_image_size(image_size) if image_size is not None else \
        (int(config.image_size[0]), int(config.image_size[1]))
    net = copy.deepcopy(model).eval()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    sizes = _conv_input_sizes(net, size)
    for name, seen in sizes.items():
        if len(seen) == 1:
            conv = cast(Conv2dSame, net.get_submodule(name))
            _set_module(net, name, StaticSameConv2d(conv, next(iter(seen))))
    for module in list(net.modules()):
        _fold_module(module)
    net.class_net = FoldedHead(cast(HeadNet, net.class_net))
    net.box_net = FoldedHead(cast(HeadNet, net.box_net))
    if channels_last:
        for name, module in list(net.named_modules()):
            if _is_pointwise(module):
                _set_module(net, name, PointwiseLinear(module))
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
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
