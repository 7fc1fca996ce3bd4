"""The layout transforms of ``Layout``: TF array -> PyTorch tensor, PyTorch tensor -> TF array, and
the shapes both ways."""
from __future__ import annotations

import numpy as np
import torch

from .rules import Layout

# Axis permutation applied to the TF array.
_PERMUTATIONS = {
    Layout.CONV2D_HWIO_TO_OIHW: (3, 2, 0, 1),     # [kh, kw, in, out] -> [out, in, kh, kw]
    Layout.DEPTHWISE_HWCM_TO_OIHW: (2, 3, 0, 1),  # [kh, kw, C, 1] -> [C, 1, kh, kw]
}


def to_torch(array: np.ndarray, layout: Layout) -> torch.Tensor:
    """A tensor in PyTorch layout sharing the TF array's memory (a strided view, not a copy:
    ``load_state_dict`` copies into the parameters anyway, and ``torch.save`` keeps strides)."""
    permutation = _PERMUTATIONS.get(layout)
    if permutation is not None:
        array = np.transpose(array, permutation)
    return torch.from_numpy(array)


def to_tf(tensor: torch.Tensor, layout: Layout) -> np.ndarray:
    """The inverse of ``to_torch``: a C-contiguous float array in TF layout (a copy, so the
    bytes written are the TF layout's, whatever the tensor's strides)."""
    array = tensor.detach().cpu().numpy()
    permutation = _PERMUTATIONS.get(layout)
    if permutation is not None:
        array = np.transpose(array, np.argsort(permutation))
    return np.array(array, order="C", copy=True)


def pt_shape(tf_shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    """The PyTorch shape of a TF shape; a shape of another rank than the layout's is returned
    unchanged (it then cannot match)."""
    permutation = _PERMUTATIONS.get(layout)
    if not permutation or len(tf_shape) != len(permutation):
        return tuple(tf_shape)
    return tuple(tf_shape[i] for i in permutation)


def tf_shape(torch_shape: tuple[int, ...], layout: Layout) -> tuple[int, ...]:
    permutation = _PERMUTATIONS.get(layout)
    if not permutation:
        return tuple(torch_shape)
    shape = [0] * len(permutation)
    for pt_axis, tf_axis in enumerate(permutation):
        shape[tf_axis] = torch_shape[pt_axis]
    return tuple(shape)

