"""automl's inference preprocessing: normalise, letterbox-resize with TF2 bilinear, pad.

Order (automl ``dataloader.InputProcessor`` as ``EfficientDetModel._preprocessing`` runs it):
cast to float32 -> ``(x - mean_rgb) / stddev_rgb`` -> scale ``min(H_t/h, W_t/w)`` -> bilinear resize to
``(int(h*scale), int(w*scale))`` -> zero-pad bottom/right to ``(H_t, W_t)`` (zero in *normalised*
space, i.e. the mean colour) -> with ``scale_range`` (AdvProp checkpoints) ``x * 2 / 255 - 1``
(dataloader.py, after the pad, so the padding becomes -1). Boxes are mapped back with
``image_scale_to_original = 1/scale``.

Measured facts this module is built on (TF 2.21, tests/test_preprocess.py):

* ``tf.image.resize(..., 'bilinear')`` (half-pixel centres, no antialias) evaluates
  ``top = tl + (tr - tl) * x_lerp``; ``bottom = ...``; ``out = top + (bottom - top) * y_lerp`` in float32.
  :func:`resize_bilinear_tf` does the same and is bit-exact against TF for down- and up-scaling.
  ``F.interpolate(mode='bilinear', align_corners=False)`` is *not*: it weights four products and
  differs by up to 1.2e-4 on noisy inputs (1.5e-7 on img1.jpg -> 512), so it is not used.
* The golden ``input/image`` tensors were made from a PIL-decoded ``img1.jpg`` and are reproduced
  bit-exactly by :func:`load_image` + :func:`resize_and_pad`. TF's own JPEG decoder
  (``tf.io.decode_image``, used by automl's COCO-eval input pipeline and ``tf2/inspector.py``) gives
  different pixels for the same file (up to 4 grey levels on 65% of img1.jpg's values);
  automl's ``tf2/infer.py`` / ``infer_lib`` and ``model_inspect.py`` decode with PIL like this module.
"""
from __future__ import annotations

from collections.abc import Sequence
from os import PathLike
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageLike = Union[np.ndarray, Tensor]
ChannelStats = Union[float, Sequence[float]]


# 16-bit grey PIL modes; Pillow reduces 16-bit RGB(A)/LA PNGs to 8 bits itself, but converts
# these to RGB by clipping at 255 (a 16-bit grey PNG would come out almost all white).
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_UINT16_TO_8 = 257.0   # 65535 / 255


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as an RGB ``uint8`` array ``[H, W, 3]``: grey, palette, CMYK and RGBA are
    converted with PIL (alpha dropped), 16-bit grey is scaled by 255/65535 and rounded.

    Raises ``ValueError`` for 32-bit float images (mode ``F``) and integer images outside 16 bits.
    """
    if image.mode in _GREY16_MODES:
        grey = np.asarray(image)
        if grey.size and (grey.min() < 0 or grey.max() > 65535):
            raise ValueError(f"image mode {image.mode!r} holds values outside 0..65535")
        grey8 = np.rint(grey.astype(np.float64) / _UINT16_TO_8).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise ValueError("32-bit float images (PIL mode 'F') are not supported; "
                         "convert them to 8-bit RGB first")
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(path: str | PathLike[str]) -> np.ndarray:
    """Decode an image file to an RGB ``uint8`` array ``[H, W, 3]`` with PIL.

    This is what automl's TF2 inference entry points do (``np.array(Image.open(f))``); PIL's JPEG
    decoder differs from ``tf.io.decode_image`` (see the module docstring). Grey-scale, palette,
    16-bit and RGBA files are converted to RGB as :func:`pil_to_rgb` says; EXIF orientation is
    *not* applied (automl does not apply it). Raises ``OSError`` for a missing or undecodable file.
    """
    with Image.open(path) as image:
        return pil_to_rgb(image)


def check_image(image: object) -> ImageLike:
    """Enforce the input contract of :func:`resize_and_pad` / ``EfficientDet.predict``; returns
    the image as an array or tensor the pipeline takes (PIL images decoded, uint16 scaled).

    Accepted: a PIL image; a numpy ``[H, W, 3]`` RGB array of dtype uint8 (0..255), uint16
    (0..65535, scaled to 0..255) or float (values in 0..255, as automl feeds them); a torch
    ``[3, H, W]`` tensor with the same dtypes. Refused with a ``ValueError`` / ``TypeError`` naming
    the shape and dtype: grey ``[H, W]`` or 4-channel arrays, bool / signed-int / complex dtypes,
    non-finite floats, floats outside 0..255, and non-zero floats whose maximum is at most 1 (a
    0..1 image: multiply it by 255).
    """
    if isinstance(image, Image.Image):
        return pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        layout, shape, dtype = "[H, W, 3]", image.shape, image.dtype
        channels_ok = image.ndim == 3 and image.shape[2] == 3
        kind = "numpy array"
    elif isinstance(image, Tensor):
        layout, shape, dtype = "[3, H, W]", tuple(image.shape), image.dtype
        channels_ok = image.ndim == 3 and image.shape[0] == 3
        kind = "tensor"
    else:
        raise TypeError(f"expected an image path, a PIL image, a numpy array or a torch tensor, "
                        f"got {type(image).__name__}")
    if not channels_ok:
        hint = " (grey? stack it to 3 channels)" if len(shape) == 2 else \
            " (RGBA? drop the alpha channel)" if 4 in shape[-1:] + shape[:1] else ""
        raise ValueError(f"expected an RGB {kind} {layout}, got shape {tuple(shape)}{hint}")
    if any(side == 0 for side in shape):
        raise ValueError(f"empty image of shape {tuple(shape)}")
    name = str(dtype).replace("torch.", "")
    if name == "uint8":
        return image
    if name == "uint16":
        return image.astype(np.float32) / np.float32(_UINT16_TO_8) if isinstance(image, np.ndarray) \
            else image.to(torch.float32) / _UINT16_TO_8
    if name not in ("float16", "bfloat16", "float32", "float64"):
        raise ValueError(f"unsupported image dtype {name} (shape {tuple(shape)}); "
                         f"use uint8 (0..255), uint16 or float in 0..255")
    values = torch.as_tensor(image) if isinstance(image, np.ndarray) else image
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"float image {tuple(shape)} holds NaN or Inf")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 255.0:
        raise ValueError(f"float image values must lie in 0..255, got {low:g}..{high:g}")
    if 0.0 < high <= 1.0:
        raise ValueError(f"float image values lie in 0..{high:g}: scale a 0..1 image to 0..255 "
                         f"(automl feeds raw pixel values)")
    return image


def _to_chw_float32(image: ImageLike) -> Tensor:
    """``[H, W, 3]`` numpy array or ``[3, H, W]`` tensor (checked by :func:`check_image`) ->
    float32 ``[3, H, W]`` tensor."""
    image = check_image(image)
    if isinstance(image, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
    return image.to(torch.float32)


def _channel_tensor(stats: ChannelStats, like: Tensor, name: str) -> Tensor:
    """mean/std (scalar or one value per channel) as float32 ``[3, 1, 1]`` (TF ``shape=(1, 1, 3)``)."""
    values = torch.as_tensor(stats, dtype=torch.float32, device=like.device).reshape(-1)
    if values.numel() == 1:
        values = values.expand(3)
    if values.numel() != 3:
        raise ValueError(f"{name} must be a scalar or 3 values, got {stats!r}")
    return values.reshape(3, 1, 1)


# Port of automl efficientdet/dataloader.py::InputProcessor.normalize_image @ 6a54c87
def normalize(image: Tensor, mean_rgb: ChannelStats, stddev_rgb: ChannelStats) -> Tensor:
    """``(x - mean_rgb) / stddev_rgb`` of a float ``[3, H, W]`` tensor (per channel or scalar)."""
    mean = _channel_tensor(mean_rgb, image, "mean_rgb")
    stddev = _channel_tensor(stddev_rgb, image, "stddev_rgb")
    return (image - mean) / stddev


# Port of automl efficientdet/dataloader.py::InputProcessor.set_scale_factors_to_output_size @ 6a54c87
def scale_factors(image_hw: tuple[int, int], target_hw: tuple[int, int]) -> tuple[int, int, float]:
    """Resized ``(height, width)`` and the float32 ``image_scale`` automl computes.

    TF does this arithmetic in float32: ``scale = min(H_t/h, W_t/w)`` and ``int(h*scale)`` truncated,
    so e.g. 1024x636 -> 512 gives 318 rows. Returns ``(scaled_h, scaled_w, scale)``.
    """
    height, width = (np.float32(v) for v in image_hw)
    scale = min(np.float32(target_hw[0]) / height, np.float32(target_hw[1]) / width)
    scaled_h, scaled_w = int(height * scale), int(width * scale)
    if scaled_h < 1 or scaled_w < 1:
        raise ValueError(f"image of size {image_hw} resizes to an empty image for {target_hw}")
    return scaled_h, scaled_w, float(scale)


def _tf_half_pixel_taps(in_size: int, out_size: int,
                        device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Lower/upper source indices and float32 lerp weights of TF's half-pixel bilinear resize."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = (torch.arange(out_size, dtype=torch.float32) + 0.5) * scale - 0.5
    floor = torch.floor(src)
    lower = floor.clamp(min=0).long()
    upper = torch.ceil(src).clamp(max=in_size - 1).long()
    lerp = src - floor
    return lower.to(device), upper.to(device), lerp.to(device)


# Port of TF2 tf.image.resize(method='bilinear', antialias=False) as used by automl
# efficientdet/dataloader.py::InputProcessor.resize_and_crop_image @ 6a54c87
def resize_bilinear_tf(image: Tensor, size_hw: tuple[int, int]) -> Tensor:
    """Bilinear resize of a float ``[C, H, W]`` tensor exactly like TF2 ``tf.image.resize``.

    Half-pixel centres, no antialiasing, edge taps clamped; the interpolation is evaluated as two
    horizontal lerps followed by one vertical lerp in float32, as TF's kernel does, which makes the
    result bit-identical to TF (``F.interpolate`` is not; see the module docstring).
    """
    if image.ndim != 3:
        raise ValueError(f"expected [C, H, W], got shape {tuple(image.shape)}")
    out_h, out_w = size_hw
    _, in_h, in_w = image.shape
    y_lo, y_hi, y_lerp = _tf_half_pixel_taps(in_h, out_h, image.device)
    x_lo, x_hi, x_lerp = _tf_half_pixel_taps(in_w, out_w, image.device)
    rows_lo, rows_hi = image[:, y_lo], image[:, y_hi]                     # [C, out_h, W]
    x_lerp = x_lerp.to(image.dtype).view(1, 1, -1)
    top = rows_lo[..., x_lo] + (rows_lo[..., x_hi] - rows_lo[..., x_lo]) * x_lerp
    bottom = rows_hi[..., x_lo] + (rows_hi[..., x_hi] - rows_hi[..., x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp.to(image.dtype).view(1, -1, 1)


# Port of automl efficientdet/tf2/efficientdet_keras.py::EfficientDetModel._preprocessing @ 6a54c87
# (dataloader.py::InputProcessor normalize_image / resize_and_crop_image, eval mode: no crop)
def resize_and_pad(
    image: ImageLike,
    target_hw: tuple[int, int],
    mean_rgb: ChannelStats,
    stddev_rgb: ChannelStats,
    scale_range: bool = False,
) -> tuple[Tensor, float]:
    """Preprocess one RGB image for the network the way automl's inference does.

    Args:
        image: RGB ``[H, W, 3]`` numpy array or ``[3, H, W]`` tensor (any device; the result
            stays on that device), or a PIL image; dtypes as :func:`check_image` accepts them.
        target_hw: network input ``(H_t, W_t)``.
        mean_rgb, stddev_rgb: a scalar (lite: 127.0 / 128.0) or one value per RGB channel
            (imagenet: ``[123.675, 116.28, 103.53]`` / ``[58.395, 57.12, 57.375]``).
        scale_range: automl's ``scale_range`` hparam: map the padded result to ``x * 2 / 255 - 1``
            (AdvProp checkpoints, with mean 0 and stddev 1: pixels to [-1, 1]).

    Returns:
        ``(tensor, image_scale_to_original)``: float32 ``[3, H_t, W_t]`` normalised, resized and
        zero-padded at the bottom/right; and ``1/scale`` (float32 value), the factor that maps
        network-input pixels back to original-image pixels.
    """
    x = normalize(_to_chw_float32(image), mean_rgb, stddev_rgb)
    scaled_h, scaled_w, scale = scale_factors((x.shape[1], x.shape[2]), target_hw)
    resized = resize_bilinear_tf(x, (scaled_h, scaled_w))
    # pad_to_bounding_box(scaled, 0, 0, H_t, W_t); a scaled size never exceeds the target.
    out = x.new_zeros((3, target_hw[0], target_hw[1]))
    out[:, :scaled_h, :scaled_w] = resized
    if scale_range:
        # Port of automl efficientdet/dataloader.py::InputReader.dataset_parser @ 6a54c87
        out = out * 2.0 / 255 - 1.0
    image_scale_to_original = float(np.float32(1.0) / np.float32(scale))
    return out, image_scale_to_original


def preprocess_batch(
    images: Sequence[ImageLike],
    target_hw: tuple[int, int],
    mean_rgb: ChannelStats,
    stddev_rgb: ChannelStats,
    scale_range: bool = False,
) -> tuple[Tensor, Tensor]:
    """:func:`resize_and_pad` for several images of any sizes.

    Returns:
        ``(images [N, 3, H_t, W_t] float32, image_scales [N] float32)`` where ``image_scales`` are the
        ``image_scale_to_original`` factors the post-processing multiplies boxes by.
    """
    if len(images) == 0:
        raise ValueError("preprocess_batch needs at least one image")
    outputs = [resize_and_pad(image, target_hw, mean_rgb, stddev_rgb, scale_range)
               for image in images]
    batch = torch.stack([tensor for tensor, _ in outputs])
    scales = torch.tensor([scale for _, scale in outputs], dtype=torch.float32, device=batch.device)
    return batch, scales
