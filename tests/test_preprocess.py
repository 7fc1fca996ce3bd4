"""Preprocessing parity: model/preprocess.py against automl's rules and the TF goldens.

Tolerance: **exact (0)** against the goldens' ``input/image``. The goldens were made from a
PIL-decoded img1.jpg (``load_image``) and ``resize_bilinear_tf`` evaluates TF's bilinear kernel
op for op, so nothing is left to tolerate (measured max abs diff 0.0 for d0, d0-600x420, lite0).
Decoding img1.jpg with ``tf.io.decode_jpeg`` instead gives pixels up to 4 grey levels apart on 65%
of the values (max abs 0.070 after normalisation); that is a decoder difference, not a port error,
and it is why the goldens are compared against the PIL decode.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.preprocess import (load_image, preprocess_batch, resize_and_pad, resize_bilinear_tf,
                              scale_factors)

try:
    from helpers import REFERENCE_DIR
except ImportError:  # running without tests/ on sys.path
    REFERENCE_DIR = Path(os.environ.get(
        "EFFDET_REFERENCE", Path(__file__).resolve().parents[1].parent / "shared" / "reference"))

IMG1 = REFERENCE_DIR / "img1.jpg"
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]

needs_reference = pytest.mark.skipif(not IMG1.exists(), reason=f"reference fixtures not at {REFERENCE_DIR}")


@needs_reference
@pytest.mark.parametrize("variant", ["efficientdet-d0", "efficientdet-d0-600x420", "efficientdet-lite0"])
def test_matches_golden_input_exactly(variant):
    folder = REFERENCE_DIR / variant
    golden = json.loads((folder / "golden.json").read_text())
    hparams = json.loads((folder / "manifest.json").read_text())["hparams"]
    expected = np.load(folder / "golden.npz")["input/image"][0]                 # NHWC -> HWC

    image, scale = resize_and_pad(load_image(IMG1), tuple(golden["image_hw"]),
                                  hparams["mean_rgb"], hparams["stddev_rgb"])

    assert image.dtype == torch.float32
    assert tuple(image.shape) == (3, *golden["image_hw"])
    torch.testing.assert_close(image.permute(1, 2, 0), torch.from_numpy(expected), rtol=0, atol=0)
    assert scale == golden["input"]["image_scale_to_original"]


@needs_reference
def test_load_image_is_rgb_uint8():
    image = load_image(IMG1)
    assert image.dtype == np.uint8 and image.shape == (636, 1024, 3)


def test_load_image_converts_grey_scale(tmp_path):
    path = tmp_path / "grey.png"
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20).save(path)
    image = load_image(path)
    assert image.shape == (3, 4, 3)
    np.testing.assert_array_equal(image[..., 0], image[..., 2])


@pytest.mark.parametrize("image_hw, target_hw, expected", [
    ((636, 1024), (512, 512), (318, 512, 0.5)),
    ((636, 1024), (420, 600), (372, 600, 0.5859375)),
    ((636, 1024), (320, 320), (198, 320, 0.3125)),
    # float32 arithmetic as in TF: 41 * float32(512/41) = 511.99997 -> int() = 511, not 512.
    ((41, 30), (512, 512), (511, 374, float(np.float32(512) / np.float32(41)))),
])
def test_scale_factors_follow_tf_float32(image_hw, target_hw, expected):
    assert scale_factors(image_hw, target_hw) == expected


def test_normalise_then_resize_then_pad():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (30, 60, 3), dtype=np.uint8)
    image, scale = resize_and_pad(raw, (40, 40), 127.0, 128.0)

    assert scale == 1.5                                                          # 1 / (40/60)
    normalised = (torch.from_numpy(raw).permute(2, 0, 1).float() - 127.0) / 128.0
    torch.testing.assert_close(image[:, :20, :], resize_bilinear_tf(normalised, (20, 40)),
                               rtol=0, atol=0)
    # Padding is 0 in normalised space (bottom rows here: the image is landscape).
    assert torch.count_nonzero(image[:, 20:, :]) == 0


def test_input_forms_and_channel_stats_agree():
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    from_numpy, scale_a = resize_and_pad(raw, (32, 48), IMAGENET_MEAN, IMAGENET_STD)
    from_tensor, scale_b = resize_and_pad(torch.from_numpy(raw).permute(2, 0, 1), (32, 48),
                                          torch.tensor(IMAGENET_MEAN), tuple(IMAGENET_STD))
    torch.testing.assert_close(from_numpy, from_tensor, rtol=0, atol=0)
    assert scale_a == scale_b

    scalar, _ = resize_and_pad(raw, (32, 48), 127.0, 128.0)
    per_channel, _ = resize_and_pad(raw, (32, 48), [127.0] * 3, [128.0] * 3)
    torch.testing.assert_close(scalar, per_channel, rtol=0, atol=0)


def test_identity_resize_is_a_copy():
    x = torch.randn(3, 8, 5)
    torch.testing.assert_close(resize_bilinear_tf(x, (8, 5)), x, rtol=0, atol=0)


def test_upscaling_clamps_at_the_edges():
    # 1 x 2 -> 1 x 4, half-pixel centres: source x = -0.25, 0.25, 0.75, 1.25 -> clamp/lerp.
    x = torch.tensor([[[0.0, 4.0]]])
    torch.testing.assert_close(resize_bilinear_tf(x, (1, 4)), torch.tensor([[[0.0, 1.0, 3.0, 4.0]]]))


def test_preprocess_batch_mixed_sizes():
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (50, 100, 3), dtype=np.uint8),
              rng.integers(0, 256, (80, 20, 3), dtype=np.uint8)]
    batch, scales = preprocess_batch(images, (64, 64), IMAGENET_MEAN, IMAGENET_STD)
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    torch.testing.assert_close(scales, torch.tensor([100 / 64, 80 / 64]))
    single, _ = resize_and_pad(images[1], (64, 64), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(batch[1], single, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 torch.zeros(4, 4, 3)])
def test_rejects_non_rgb_layouts(bad):
    with pytest.raises(ValueError):
        resize_and_pad(bad, (8, 8), 127.0, 128.0)


def test_rejects_bad_channel_stats():
    with pytest.raises(ValueError):
        resize_and_pad(np.zeros((4, 4, 3), np.uint8), (8, 8), [1.0, 2.0], 1.0)


@pytest.mark.needs_tf
def test_bilinear_is_bit_exact_against_tensorflow():
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(3)
    for in_hw, out_hw in [((636, 1024), (372, 600)), ((50, 70), (123, 171)), ((37, 91), (37, 200)),
                          ((9, 7), (2, 3)), ((1, 1), (4, 4))]:
        image = ((rng.random((*in_hw, 3)) * 255 - 120) / 57).astype(np.float32)
        expected = tf.image.resize(image, out_hw, method="bilinear").numpy()
        actual = resize_bilinear_tf(torch.from_numpy(image).permute(2, 0, 1), out_hw)
        torch.testing.assert_close(actual.permute(1, 2, 0), torch.from_numpy(expected), rtol=0, atol=0)
