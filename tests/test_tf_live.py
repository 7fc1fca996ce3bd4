"""Live TF reference (verify/tf_live.py): automl run here must reproduce the d0 golden.

The live tests need a google/automl checkout: set ``EFFDET_AUTOML_DIR`` to it (the repository
root or its ``efficientdet/`` folder), with TensorFlow and, for TF >= 2.16, ``tf_keras`` and
``pyyaml`` installed. Without it they skip; the error-path tests below run everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from helpers import REFERENCE_DIR, synth_checkpoint
from model.config import get_config
from verify.reference import DetectionsRef, ReferenceError, load_golden
from verify.tf_live import LiveTFError, automl_overrides, tf_reference

D0 = "efficientdet-d0"
AUTOML_ENV = "EFFDET_AUTOML_DIR"

# Tolerances against the golden. The golden was made by the same automl code and TF version, so
# only the CPU kernels differ (oneDNN picks per-ISA kernels and summation orders): measured
# 1.2e-6 of the tap's scale on d0, first differing at block_12. 1e-5 is float32 agreement,
# far below the 1e-3 the PyTorch comparison allows.
TAP_RTOL = 1e-5
# The input is automl's preprocessing of the same PIL-decoded pixels: elementwise float32 math.
INPUT_ATOL = 1e-6
# Boxes are ~1e3 px in original-image pixels after exp() decoding: 1e-3 px is a few float32 ulps
# of the head error above (measured 3.7e-4); scores are sigmoid outputs (measured 3.3e-7).
BOX_ATOL_PX = 1e-3
SCORE_ATOL = 1e-6


def _automl_dir() -> Path | None:
    value = os.environ.get(AUTOML_ENV)
    if not value:
        return None
    root = Path(value).expanduser()
    for candidate in (root / "efficientdet", root):
        if (candidate / "tf2" / "efficientdet_keras.py").is_file():
            return root
    return None


AUTOML_DIR = _automl_dir()
needs_automl = pytest.mark.skipif(
    AUTOML_DIR is None,
    reason=f"set {AUTOML_ENV} to a google/automl checkout to run the live TF reference tests"
    + (f" ({os.environ[AUTOML_ENV]} has no efficientdet/tf2/efficientdet_keras.py)"
       if os.environ.get(AUTOML_ENV) else ""))


def _assert_one_line(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --- without automl ----------------------------------------------------------------------------


def test_missing_automl_dir_is_a_one_line_live_error(tmp_path):
    missing = tmp_path / "no-automl-here"
    with pytest.raises(LiveTFError) as excinfo:
        tf_reference(missing, tmp_path, get_config(D0))
    _assert_one_line(excinfo, str(missing), "automl")
    assert isinstance(excinfo.value, ReferenceError)  # the CLI maps both the same way


def test_folder_that_is_not_automl_is_a_one_line_live_error(tmp_path):
    (tmp_path / "efficientdet").mkdir()
    with pytest.raises(LiveTFError) as excinfo:
        tf_reference(tmp_path, tmp_path, get_config(D0))
    _assert_one_line(excinfo, "not a google/automl checkout", "tf2/efficientdet_keras.py")


def test_pre_tf2_automl_layout_asks_for_a_newer_checkout(tmp_path):
    effdet = tmp_path / "efficientdet"
    (effdet / "keras").mkdir(parents=True)
    (effdet / "hparams_config.py").write_text("")
    (effdet / "keras" / "efficientdet_keras.py").write_text("")
    with pytest.raises(LiveTFError) as excinfo:
        tf_reference(tmp_path, tmp_path, get_config(D0))
    _assert_one_line(excinfo, "tf2/", "newer")


def test_automl_overrides_use_automl_names_and_formats():
    square = automl_overrides(get_config(D0))
    assert "name" not in square
    assert square["image_size"] == 512
    assert square["fpn_num_filters"] == 64 and square["backbone_name"] == "efficientnet-b0"
    assert square["aspect_ratios"] == [1.0, 2.0, 0.5]
    assert square["mean_rgb"] == [123.675, 116.28, 103.53]
    assert square["nms_configs"]["method"] == "gaussian"
    odd = automl_overrides(get_config(D0, image_size="600x420", num_classes=20))
    assert odd["image_size"] == "600x420"  # automl's 'WxH' for (H, W) = (420, 600)
    assert odd["num_classes"] == 20
    lite = automl_overrides(get_config("efficientdet-lite0"))
    assert lite["mean_rgb"] == 127.0 and lite["act_type"] == "relu6"


# --- with automl -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def d0_checkpoint(tmp_path_factory) -> Path:
    return synth_checkpoint(D0, tmp_path_factory.mktemp("live-d0"))


@pytest.fixture(scope="module")
def live_d0(d0_checkpoint):
    pytest.importorskip("tensorflow")
    from model.preprocess import load_image
    image = load_image(REFERENCE_DIR / "img1.jpg")
    return tf_reference(AUTOML_DIR, d0_checkpoint.parent, get_config(D0), image)


@pytest.fixture(scope="module")
def golden_d0():
    return load_golden(REFERENCE_DIR / D0)


def _match(live: DetectionsRef, golden: DetectionsRef) -> int:
    """Golden rows with a distinct live row of the same class, box and score (order-free: rows
    whose scores differ by less than the tolerance may swap places)."""
    free = np.ones(len(live.scores), dtype=bool)
    matched = 0
    for box, score, cls in zip(golden.boxes_yxyx, golden.scores, golden.classes):
        ok = free & (live.classes == cls) & \
            (np.abs(live.boxes_yxyx - box).max(axis=1) <= BOX_ATOL_PX) & \
            (np.abs(live.scores - score) <= SCORE_ATOL)
        if ok.any():
            free[int(np.argmax(ok))] = False
            matched += 1
    return matched


@needs_automl
@pytest.mark.needs_tf
@pytest.mark.slow
def test_live_reference_has_the_goldens_taps_in_graph_order(live_d0, golden_d0):
    assert [t.name for t in live_d0.taps] == [t.name for t in golden_d0.taps]
    for live, golden in zip(live_d0.taps, golden_d0.taps):
        assert live.indices is None  # live taps are whole
        assert live.shape == golden.shape, live.name
    assert live_d0.variant == golden_d0.variant and live_d0.num_classes == golden_d0.num_classes
    assert tuple(live_d0.image_hw) == tuple(golden_d0.image_hw)
    assert live_d0.info["model_call_rel_diff"] <= 1e-5


@needs_automl
@pytest.mark.needs_tf
@pytest.mark.slow
def test_live_taps_equal_the_golden_at_float32_precision(live_d0, golden_d0):
    live = {t.name: t for t in live_d0.taps}
    for golden in golden_d0.taps:
        got = golden.pick(live[golden.name].values).reshape(-1).astype(np.float64)
        want = golden.values.reshape(-1).astype(np.float64)
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=TAP_RTOL * scale, err_msg=golden.name)


@needs_automl
@pytest.mark.needs_tf
@pytest.mark.slow
def test_live_input_and_detections_equal_the_golden(live_d0, golden_d0):
    assert live_d0.input.name == "input/image"
    np.testing.assert_allclose(live_d0.input.values, golden_d0.input.values, rtol=0,
                               atol=INPUT_ATOL)
    assert live_d0.image_scale_to_original == pytest.approx(golden_d0.image_scale_to_original)
    assert set(live_d0.detections) == {"global", "per_class", "pyfunc"}
    for path, golden in golden_d0.detections.items():
        live = live_d0.detections[path]
        assert len(live.scores) == len(golden.scores), path
        assert live.boxes_yxyx.shape == (len(live.scores), 4)
        assert live.classes.min() >= 1  # 1-based, padding rows dropped
        assert _match(live, golden) == len(golden.scores), path


@needs_automl
@pytest.mark.needs_tf
def test_live_missing_checkpoint_is_a_one_line_live_error(tmp_path):
    pytest.importorskip("tensorflow")
    with pytest.raises(LiveTFError) as excinfo:
        tf_reference(AUTOML_DIR, tmp_path / "nothing", get_config(D0))
    _assert_one_line(excinfo, "nothing", "not found")


@needs_automl
@pytest.mark.needs_tf
@pytest.mark.slow
def test_live_checkpoint_without_ema_names_the_fix(tmp_path):
    pytest.importorskip("tensorflow")
    prefix = synth_checkpoint(D0, tmp_path, ema=False)
    with pytest.raises(LiveTFError) as excinfo:
        tf_reference(AUTOML_DIR, prefix.parent, get_config(D0))
    _assert_one_line(excinfo, "ExponentialMovingAverage", "moving_average_decay=0")


@needs_automl
@pytest.mark.needs_tf
@pytest.mark.slow
def test_live_mode_compares_our_preprocessing_with_tfs_input(live_d0):
    """Live mode feeds the network TF's input; our preprocessing of the same image is still
    compared with it as the input/image tap."""
    import dataclasses
    from model import EfficientDet
    from verify.parity import network_input
    reference = dataclasses.replace(live_d0, image_file=REFERENCE_DIR / "img1.jpg")
    image, scale, check = network_input(EfficientDet.from_config(D0), reference)
    assert check.name == "input/image" and check.ok, check
    assert scale == reference.image_scale_to_original
    np.testing.assert_array_equal(image.permute(0, 2, 3, 1).numpy(), live_d0.input.values)
