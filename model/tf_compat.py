"""TensorFlow numerics in PyTorch: BN constants, 'SAME' padding, separable convs, activations.

Every layer that must behave like its Keras counterpart is built here, so the rest of
``model/`` never repeats a padding formula or a BN constant.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Keras BatchNormalization(momentum=0.99, epsilon=1e-3) everywhere in automl
# (util_keras.py, efficientnet_builder.py). Keras updates ``new = 0.99*old + 0.01*batch``,
# PyTorch ``new = (1-m)*old + m*batch``, so the PyTorch momentum is 1 - 0.99.
BN_EPS = 1e-3
BN_MOMENTUM = 1.0 - 0.99

# automl's FNode.fuse_features adds this to the sum of the fast-attention weights.
FUSE_EPS = 1e-4

# tf.compat.v1.image.resize_nearest_neighbor (align_corners=False, half_pixel_centers=False)
# indexes floor(dst * in / out), which is PyTorch's legacy 'nearest' mode with an explicit size.
UPSAMPLE_MODE = "nearest"

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
}


def create_act(act_type: str) -> nn.Module:
    """The activation module automl's ``utils.activation_fn`` applies for ``act_type``."""
    try:
        return ACTIVATIONS[act_type]()
    except KeyError:
        raise ValueError(f"unknown act_type {act_type!r}; known: {sorted(ACTIVATIONS)}") from None


def batch_norm(num_features: int) -> nn.BatchNorm2d:
    """A BatchNorm2d with Keras' momentum and epsilon."""
    return nn.BatchNorm2d(num_features, eps=BN_EPS, momentum=BN_MOMENTUM)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF 'SAME' padding along one axis as (before, after); the odd pixel goes after."""
    effective = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
             value: float = 0.0) -> torch.Tensor:
    """Pads an NCHW tensor so a VALID op afterwards equals TF 'SAME'."""
    top, bottom = same_padding(x.shape[-2], kernel[0], stride[0])
    left, right = same_padding(x.shape[-1], kernel[1], stride[1])
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class Conv2dSame(nn.Conv2d):
    """nn.Conv2d with TF 'SAME' padding.

    Stride 1 with an odd kernel pads symmetrically at every input size, so that case uses
    PyTorch's own (static) padding; strided convs pad from the input size at run time,
    asymmetrically (extra row/column at the bottom/right) when TF does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, bias: bool = True):
        self.static_same = stride == 1 and kernel_size % 2 == 1
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=kernel_size // 2 if self.static_same else 0,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.static_same:
            x = pad_same(x, self.kernel_size, self.stride)
        return super().forward(x)


def create_conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                  depthwise: bool = False, bias: bool = True) -> Conv2dSame:
    """The one conv factory: Keras Conv2D / DepthwiseConv2D (multiplier 1) with 'SAME'."""
    groups = in_channels if depthwise else 1
    if depthwise and out_channels != in_channels:
        raise ValueError("depthwise convs here use depth_multiplier 1")
    return Conv2dSame(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)


class SeparableConv2d(nn.Module):
    """Keras SeparableConv2D: depthwise (no bias) -> pointwise 1x1 -> one bias after pointwise.

    TF keeps ``depthwise_kernel``, ``pointwise_kernel`` and ``bias`` in one layer; here they
    are ``depthwise.weight``, ``pointwise.weight`` and ``pointwise.bias``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.depthwise = create_conv2d(in_channels, in_channels, kernel_size, depthwise=True,
                                       bias=False)
        self.pointwise = create_conv2d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def max_pool_same(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int]
                  ) -> torch.Tensor:
    """Keras MaxPooling2D(padding='SAME'): padded cells are -inf, so they never win.

    PyTorch's own pooling pads with -inf symmetrically, and ``ceil_mode`` adds the one extra
    cell after that TF's odd total asks for; only other pads need an explicit copy.
    """
    sizes = x.shape[-2:]
    pads = [same_padding(n, k, s) for n, k, s in zip(sizes, kernel, stride)]
    ceil_mode = any(after > before for before, after in pads)
    if all(after - before in (0, 1) and 2 * before <= k and
           _torch_pool_size(n, k, s, before, ceil_mode) == math.ceil(n / s)
           for n, k, s, (before, after) in zip(sizes, kernel, stride, pads)):
        return F.max_pool2d(x, kernel, stride, padding=(pads[0][0], pads[1][0]),
                            ceil_mode=ceil_mode)
    return F.max_pool2d(pad_same(x, kernel, stride, value=float("-inf")), kernel, stride)


def _torch_pool_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of PyTorch's pooling (its rule: the last window starts inside the input or
    the left padding); 0 where PyTorch would refuse the size."""
    span = size + 2 * padding - kernel
    if span < 0:
        return 0
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def drop_connect(x: torch.Tensor, survival_prob: float, training: bool) -> torch.Tensor:
    """automl's ``utils.drop_connect``: drop whole samples of a residual branch in training."""
    if not training or not survival_prob or survival_prob >= 1.0:
        return x
    keep = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device)
    keep = torch.floor(keep.uniform_() + survival_prob)
    return x / survival_prob * keep
