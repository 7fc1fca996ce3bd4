"""``EfficientDet.predict``'s input contract and outputs (model/efficientdet.py, model/preprocess.py).

A small random lite0 (128 px) stands in for a converted model: the contract is about what goes
in and comes out, not about the weights.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import model.preprocess as preprocess
from model.efficientdet import EfficientDet
from model.labels import COCO_LABELS
from model.preprocess import check_image, load_image

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def model() -> EfficientDet:
    torch.manual_seed(0)
    return EfficientDet.from_config("efficientdet-lite0", image_size=128, num_classes=90).eval()


@pytest.fixture
def forward_calls(model):
    calls: list[int] = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    yield calls
    handle.remove()


def _photo(height: int = 60, width: int = 90) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _same(a, b) -> None:
    for name in ("boxes_yxyx", "scores", "classes", "valid"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-4)


def test_every_accepted_form_gives_the_same_detections(model, tmp_path):
    pixels = _photo()
    Image.fromarray(pixels).save(tmp_path / "x.png")
    reference = model.predict(pixels, score_thresh=0.0)
    assert reference.classes.dtype == torch.int64
    _same(model.predict(str(tmp_path / "x.png")), reference)
    _same(model.predict(tmp_path / "x.png"), reference)
    _same(model.predict(Image.fromarray(pixels)), reference)
    _same(model.predict(pixels.astype(np.float32)), reference)
    _same(model.predict(pixels.astype(np.uint16) * 257), reference)          # 16-bit scaled
    _same(model.predict(torch.from_numpy(pixels).permute(2, 0, 1)), reference)  # CHW tensor
    both = model.predict(np.stack([pixels, pixels]))                         # NHWC batch
    assert both.scores.shape[0] == 2
    torch.testing.assert_close(both.scores[1], reference.scores[0], rtol=0, atol=1e-4)


def test_16_bit_grey_png_is_scaled_not_saturated(tmp_path):
    grey16 = (np.linspace(0, 65535, 40 * 50).reshape(40, 50)).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    decoded = load_image(tmp_path / "g16.png")
    assert decoded.shape == (40, 50, 3) and decoded.dtype == np.uint8
    expected = np.rint(grey16 / 257.0).astype(np.uint8)
    assert np.array_equal(decoded[..., 0], expected) and np.array_equal(decoded[..., 2], expected)
    assert 100 < decoded.mean() < 155          # saturating at 255 was the defect


def test_alpha_is_dropped(tmp_path):
    rgba = np.concatenate([_photo(), np.full((60, 90, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), rgba[..., :3])


@pytest.mark.parametrize("image, message", [
    (np.zeros((60, 90), np.uint8), r"shape \(60, 90\).*grey"),
    (np.zeros((60, 90, 4), np.uint8), r"shape \(60, 90, 4\).*alpha"),
    (np.zeros((60, 90, 3), bool), r"dtype bool"),
    (np.zeros((60, 90, 3), np.int8), r"dtype int8"),
    (np.full((60, 90, 3), 0.5, np.float32), r"0\.\.1 image"),
    (np.full((60, 90, 3), 300.0, np.float32), r"0\.\.255"),
    (np.full((60, 90, 3), np.nan, np.float32), r"NaN"),
    (torch.zeros(60, 90, 3), r"\[3, H, W\].*\(60, 90, 3\)"),
    (np.zeros((0, 90, 3), np.uint8), r"empty image"),
])
def test_refused_inputs_name_shape_or_dtype_before_the_network_runs(model, forward_calls, image,
                                                                    message):
    with pytest.raises(ValueError, match=message):
        model.predict([_photo(), image])
    assert forward_calls == []


def test_refused_arguments_fail_up_front(model, forward_calls):
    with pytest.raises(ValueError, match="at least one image"):
        model.predict([])
    for size in (0, -1, 1.5):
        with pytest.raises(ValueError, match="batch_size"):
            model.predict(_photo(), batch_size=size)
    with pytest.raises(ValueError, match="unknown postprocess 'nms'"):
        model.predict(_photo(), postprocess="nms")
    with pytest.raises(TypeError, match="got int"):
        model.predict([_photo(), 3])
    assert forward_calls == []


def test_paths_are_decoded_batch_by_batch(model, forward_calls, tmp_path, monkeypatch):
    events: list[str] = []
    paths = []
    for index in range(3):
        Image.fromarray(_photo()).save(tmp_path / f"{index}.png")
        paths.append(tmp_path / f"{index}.png")
    real = preprocess.load_image
    monkeypatch.setattr(preprocess, "load_image", lambda p: events.append("decode") or real(p))
    hook = model.register_forward_hook(lambda *_: events.append("forward"))
    try:
        model.predict(paths, batch_size=2)
    finally:
        hook.remove()
    assert events == ["decode", "decode", "forward", "decode", "forward"]


def test_runs_in_eval_mode_and_restores_train_mode(model):
    expected = model.predict(_photo())
    model.train()
    try:
        _same(model.predict(_photo()), expected)
        assert model.training and model.backbone.training
    finally:
        model.eval()


def test_clip_boxes_and_names(model):
    pixels = _photo(40, 120)
    raw = model.predict(pixels, score_thresh=0.0)
    clipped = model.predict(pixels, clip_boxes=True, names=True, score_thresh=0.0)
    limits = torch.tensor([40.0, 120.0, 40.0, 120.0])
    torch.testing.assert_close(clipped.boxes_yxyx, torch.minimum(raw.boxes_yxyx.clamp(min=0), limits))
    assert raw.boxes_yxyx[..., 2].max() > 40       # automl's default leaves the padded frame
    assert raw.names is None and len(clipped.names[0]) == int(clipped.valid[0]) > 0
    assert clipped.names[0] == [COCO_LABELS.get(c, f"class {c}")
                                for c in clipped.classes[0, :int(clipped.valid[0])].tolist()]


def test_check_image_passes_uint8_through_unchanged():
    pixels = _photo()
    assert check_image(pixels) is pixels
