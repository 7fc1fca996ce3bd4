"""Inference kernels for ``optimize()``: a conv with its BN folded, its activation and an optional
residual add in one call, with TF 'SAME' padding fixed for one input size.

On CPU in float32 a ``FusedConv2d`` is one oneDNN primitive (``torch.ops.mkldnn`` pointwise
convolution: conv + bias + activation, or conv + bias + residual sum), which is how TF's own
graph runs these layers; activations are the biggest tensors of the network and a separate
activation pass over them costs as much as the conv. Elsewhere (CUDA, fp16/bf16, export,
``torch.compile``) it runs the same arithmetic as plain ATen ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .tf_compat import same_padding

# oneDNN post-op name and scalars of each activation module automl's act_types map to.
ONEDNN_ACTIVATIONS: dict[type, tuple[str, list[float]]] = {
    nn.SiLU: ("swish", []),
    nn.ReLU: ("relu", []),
    nn.ReLU6: ("hardtanh", [0.0, 6.0]),
}


def pad_zeros(x: torch.Tensor, pad: tuple[int, int, int, int]) -> torch.Tensor:
    """``F.pad(x, pad)`` (left, right, top, bottom; zeros) that writes every element once
    (``F.pad`` fills the whole output with zeros before copying ``x`` in), keeping the layout."""
    left, right, top, bottom = pad
    batch, channels, height, width = x.shape
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and \
        not x.is_contiguous() else torch.contiguous_format
    out = torch.empty((batch, channels, height + top + bottom, width + left + right),
                      dtype=x.dtype, device=x.device, memory_format=layout)
    out[:, :, top:top + height, left:left + width] = x
    out[:, :, :top].zero_()
    out[:, :, top + height:].zero_()
    out[:, :, top:top + height, :left].zero_()
    out[:, :, top:top + height, left + width:].zero_()
    return out


class FusedConv2d(nn.Module):
    """``act(conv(x) + bias [+ residual])`` for one input size, TF 'SAME' padding included.

    ``weight``/``bias`` are the conv's with any BN already folded in; ``padding`` is
    ``(top, bottom, left, right)``. Symmetric padding goes into the conv. With ``onednn``, 'SAME'
    padding one larger after than before (a strided conv on an even size) of a depthwise conv
    becomes a leading zero row/column of its kernel and symmetric padding: the same sums without
    a padded copy of the input (d4: 151 MB, 1.6x faster; a dense conv's extra products cost more
    than its copy). Other asymmetric padding goes into one
    ``pad_zeros`` (``F.pad`` without ``onednn``, which exporters fold into the conv) first. ``residual`` is added before the activation (MBConv blocks add it after
    BN with no activation, so they pass ``act=None``). ``act`` is used in place on the conv's
    own output. ``forward(x, weight=...)`` replaces the weight for one call (a squeeze-excite
    gate folded into the projection conv).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                 padding: tuple[int, int, int, int], groups: int = 1,
                 act: Optional[nn.Module] = None, onednn: bool = True):
        super().__init__()
        top, bottom, left, right = padding
        if onednn and groups > 1 and (bottom - top, right - left) in ((0, 1), (1, 0), (1, 1)):
            weight = F.pad(weight, (right - left, 0, bottom - top, 0))
            top, left = bottom, right
        self.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
        # Always a bias (zeros for a depthwise conv without one): an exported conv without a
        # constant bias input is not rewritten into onnxruntime's blocked (NCHWc) kernels.
        self.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype,
                                             device=weight.device) if bias is None else
                                 bias.detach().contiguous(), requires_grad=False)
        self.stride = [stride, stride]
        symmetric = top == bottom and left == right
        self.padding = [top, left] if symmetric else [0, 0]
        self.pad = None if symmetric else (left, right, top, bottom)
        self.groups = groups
        self.act = act
        if act is not None and type(act) not in ONEDNN_ACTIVATIONS:
            raise ValueError(f"no fused kernel for activation {type(act).__name__}")
        self.onednn_act = ONEDNN_ACTIVATIONS[type(act)] if act is not None else ("none", [])
        self.onednn = onednn and torch.backends.mkldnn.is_available()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, input_hw: tuple[int, int], weight: torch.Tensor,
                  bias: Optional[torch.Tensor], act: Optional[nn.Module] = None,
                  onednn: bool = True) -> FusedConv2d:
        """For ``conv`` (a ``Conv2dSame`` or plain conv) seeing ``input_hw``."""
        kernel, stride = conv.kernel_size, conv.stride
        if getattr(conv, "static_same", True):
            pad_h, pad_w = conv.padding if isinstance(conv.padding, tuple) else (0, 0)
            padding = (pad_h, pad_h, pad_w, pad_w)
        else:
            padding = (*same_padding(input_hw[0], kernel[0], stride[0]),
                       *same_padding(input_hw[1], kernel[1], stride[1]))
        if stride[0] != stride[1] or conv.dilation != (1, 1):
            raise ValueError("FusedConv2d takes square strides and no dilation")
        return cls(weight, bias, stride[0], padding, conv.groups, act, onednn)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        weight = self.weight if weight is None else weight
        onednn = self.onednn and x.device.type == "cpu" and x.dtype == torch.float32
        if self.pad is not None:
            x = pad_zeros(x, self.pad) if onednn else F.pad(x, self.pad)
        if onednn:
            attr, scalars = self.onednn_act
            if residual is None:
                return torch.ops.mkldnn._convolution_pointwise(
                    x, weight, self.bias, self.padding, self.stride, [1, 1], self.groups,
                    attr, scalars, None)
            # oneDNN takes no activation after a residual add (MBConv blocks need none).
            y = torch.ops.mkldnn._convolution_pointwise.binary(
                x, residual, weight, self.bias, self.padding, self.stride, [1, 1], self.groups,
                "add", 1.0, None, [], None)
        else:
            y = F.conv2d(x, weight, self.bias, self.stride, self.padding, 1, self.groups)
            if residual is not None:
                y += residual
        return y if self.act is None else self.act(y)
