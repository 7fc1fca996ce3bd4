"""Box decoding and automl's three post-processing paths on hand-made heads.

The scene: a 128x128 network input, 3 anchors, 4 classes, every other logit at -20 (score 2e-9,
below the 0.001 soft-NMS threshold).
  anchor 0  [-10, -10, 30, 30]  (sticks out top-left)   class 2 logit 2.0 -> 0.8808
  anchor 1  [100, 100, 140, 140] (sticks out bottom-right) class 0 logit 1.0 -> 0.7311,
                                                        class 3 logit 0.5 -> 0.6225
  anchor 2  = anchor 1                                   class 1 logit 0.0 -> 0.5
Box deltas are zero, so decoded boxes are the anchors.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from model import box_coder
from model.box_coder import decode_boxes, decode_boxes_host
from model.postprocess import (DUMMY_DETECTION_SCORE, Detections, NmsConfig, postprocess,
                               postprocess_global, postprocess_per_class, postprocess_pyfunc,
                               pre_nms, to_coco_rows)

try:
    from helpers import REFERENCE_DIR
except ImportError:  # running without tests/ on sys.path
    REFERENCE_DIR = Path(os.environ.get(
        "EFFDET_REFERENCE", Path(__file__).resolve().parents[1].parent / "shared" / "reference"))

ANCHORS = torch.tensor([[-10, -10, 30, 30], [100, 100, 140, 140], [100, 100, 140, 140]],
                       dtype=torch.float32)
IMAGE_HW = (128, 128)


def sigmoid(x: float) -> float:
    return float(torch.sigmoid(torch.tensor(x, dtype=torch.float32)))


def scene(batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.full((batch, 3, 4), -20.0)
    logits[:, 0, 2] = 2.0
    logits[:, 1, 0] = 1.0
    logits[:, 1, 3] = 0.5
    logits[:, 2, 1] = 0.0
    return logits, torch.zeros(batch, 3, 4)


SMALL = NmsConfig(max_output_size=6)


# ------------------------------------------------------------------------------ NmsConfig


def test_nms_config_defaults_follow_automl():
    assert NmsConfig().tf_nms_args() == (0.5, 0.001, 0.25)          # sigma 0.5 passed as 0.5 / 2
    assert NmsConfig(score_thresh=0.0).tf_nms_args() == (0.5, 0.001, 0.25)
    # gaussian always uses iou 0.5 (ignored by soft-NMS anyway); sigma and threshold pass through.
    assert NmsConfig(iou_thresh=0.7, sigma=0.3, score_thresh=0.2).tf_nms_args() == (0.5, 0.2, 0.15)
    # hard: iou_thresh or 0.5, and *no* score threshold unless one is given.
    assert NmsConfig(method="hard").tf_nms_args() == (0.5, -math.inf, 0.0)
    assert NmsConfig(method=None).tf_nms_args() == (0.5, -math.inf, 0.0)
    assert NmsConfig(method="hard", iou_thresh=0.6, score_thresh=0.2).tf_nms_args() == (0.6, 0.2, 0.0)
    with pytest.raises(ValueError):
        NmsConfig(method="linear").tf_nms_args()                   # TF paths: gaussian | hard
    with pytest.raises(ValueError):
        NmsConfig(method="softer")
    # pyfunc defaults are nms_np's own (applied by model.nms): passed through untouched.
    assert NmsConfig(method="linear").np_nms_args() == {
        "method": "linear", "iou_thresh": None, "sigma": None, "score_thresh": None}


def test_nms_config_from_automl_dict():
    nms_configs = {"method": "gaussian", "iou_thresh": None, "score_thresh": 0.0, "sigma": None,
                   "pyfunc": False, "max_nms_inputs": 0, "max_output_size": 100}
    hparams = REFERENCE_DIR / "efficientdet-d0" / "hparams.json"
    if hparams.exists():
        nms_configs = json.loads(hparams.read_text())["summary"]["nms_configs"]
    config = NmsConfig.from_dict(nms_configs)
    assert config == NmsConfig(score_thresh=0.0)
    with pytest.raises(ValueError):
        NmsConfig.from_dict({"method": "gaussian", "soft": True})


# ----------------------------------------------------------------------------- box decode


def test_decode_boxes_by_hand():
    anchor = torch.tensor([10.0, 20.0, 30.0, 60.0])                 # centre (20, 40), h 20, w 40
    deltas = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [0.5, -0.25, math.log(2.0), 0.0],         # y + 10, x - 10, h x2
                           [0.0, 0.0, 10.0, -1.0]])                  # no clamp on th / tw
    boxes = decode_boxes(deltas, anchor)
    torch.testing.assert_close(boxes[0], anchor)
    torch.testing.assert_close(boxes[1], torch.tensor([10.0, 10.0, 50.0, 50.0]))
    h, w = 20 * math.exp(10.0), 40 * math.exp(-1.0)
    torch.testing.assert_close(boxes[2], torch.tensor([20 - h / 2, 40 - w / 2, 20 + h / 2, 40 + w / 2]))
    assert boxes.dtype == torch.float32


def test_decode_boxes_broadcasts_over_batch():
    deltas = torch.randn(2, 3, 4)
    boxes = decode_boxes(deltas, ANCHORS)
    torch.testing.assert_close(boxes[1], decode_boxes(deltas[1], ANCHORS), rtol=0, atol=0)


def _regressions(generator, *shape):
    """Random ``(ty, tx, th, tw)`` with overflowing, infinite and NaN rows."""
    deltas = torch.randn(*shape, 4, generator=generator) * 3
    flat = deltas.view(-1, 4)
    flat[::97] = torch.tensor([0.5, -0.5, 90.0, -104.0])           # exp overflows / underflows
    flat[1::101] = torch.tensor([math.inf, -math.inf, math.nan, 1.0])
    return deltas


def _random_anchors(generator, count):
    corner = torch.rand(count, 2, generator=generator) * 600
    return torch.cat([corner, corner + torch.rand(count, 2, generator=generator) * 300 + 1], 1)


def _same_bits(a, b):
    return a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_host_decoding_is_decode_boxes_bit_for_bit():
    generator = torch.Generator().manual_seed(5)
    anchors = _random_anchors(generator, 1000)
    deltas = _regressions(generator, 3, 1000)
    assert _same_bits(decode_boxes_host(deltas, anchors), decode_boxes(deltas, anchors))
    gathered = anchors[torch.randint(0, 1000, (3, 40), generator=generator)]
    assert _same_bits(decode_boxes_host(deltas[:, :40], gathered),
                      decode_boxes(deltas[:, :40], gathered))
    assert box_coder.compiled("box_coder_jit", "decode_rows") is not None


def test_host_decoding_comparison_sees_one_rounding():
    """Break on purpose: the same formula in float64, rounded once at the end, differs from
    float32's step-by-step rounding in some bits, so the comparison above can fail."""
    generator = torch.Generator().manual_seed(5)
    anchors, deltas = _random_anchors(generator, 1000), _regressions(generator, 1, 1000)
    wide = decode_boxes(deltas.double(), anchors.double()).float()
    assert not _same_bits(decode_boxes_host(deltas, anchors), wide)


# -------------------------------------------------------------------------------- pre-NMS


def test_pre_nms_best_class_per_anchor_and_top_pairs():
    logits, deltas = scene()
    boxes, scores, classes = pre_nms(logits, deltas, ANCHORS, max_nms_inputs=0)
    assert classes.tolist() == [[2, 0, 1]]
    torch.testing.assert_close(scores, torch.tensor([[sigmoid(2.0), sigmoid(1.0), 0.5]]))
    _, scores, classes = pre_nms(logits, deltas, ANCHORS, max_nms_inputs=3)
    # The pairs with logits 2.0, 1.0, 0.5, in tf.math.top_k(sorted=False)'s heap order (worst first).
    assert classes.tolist() == [[3, 2, 0]]
    # Exact ties: the lower class (argmax) / the lower flat indices (top pairs) win.
    flat = torch.zeros(1, 3, 4)
    assert pre_nms(flat, deltas, ANCHORS)[2].tolist() == [[0, 0, 0]]
    assert sorted(pre_nms(flat, deltas, ANCHORS, max_nms_inputs=2)[2].tolist()[0]) == [0, 1]


def test_pre_nms_class_is_the_first_maximum_with_ties_nan_and_signed_zeros():
    logits = torch.tensor([[[1.0, 3.0, 3.0, 2.0], [-0.0, 0.0, -1.0, 0.0],
                            [1.0, math.nan, 5.0, math.nan], [30.0, 20.0, 30.0, 17.0]]])
    _, scores, classes = pre_nms(logits, torch.zeros(1, 4, 4), torch.zeros(4, 4))
    assert classes.tolist() == [[1, 0, 1, 0]] == logits.argmax(-1).tolist()
    assert math.isnan(scores[0, 2]) and scores[0, 1] == 0.5 and scores[0, 3] == 1.0


def _saturated_heads(rng, batch, anchors, classes):
    logits = rng.normal(-3.0, 3.0, (batch, anchors, classes)).astype(np.float32)
    saturated = rng.random(logits.shape) < 0.2
    logits[saturated] = rng.uniform(17.0, 30.0, saturated.sum())
    logits[rng.random(logits.shape) < 0.1] = 2.5                    # ties across classes
    logits[rng.random(logits.shape) < 0.05] = -0.0
    centres = rng.uniform(0, 200, (anchors, 2))
    sizes = rng.uniform(10, 60, (anchors, 2))
    anchor_boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1)
    deltas = rng.normal(0.0, 0.3, (batch, anchors, 4))
    return (torch.from_numpy(logits), torch.from_numpy(deltas.astype(np.float32)),
            torch.from_numpy(anchor_boxes.astype(np.float32)))


@pytest.mark.parametrize("method", ["gaussian", "hard"])
def test_global_classes_of_the_selected_rows_are_pre_nms_classes(method):
    """The global path takes each anchor's max logit and only the selected rows' classes; the
    detections must be those of pre_nms's full argmax followed by the same NMS."""
    from model.nms import batched_non_max_suppression_v5
    logits, deltas, anchor_boxes = _saturated_heads(np.random.default_rng(5), 2, 800, 7)
    nms = NmsConfig(method=method, max_output_size=300)
    dets = postprocess_global(logits, deltas, anchor_boxes, (200, 200), None, nms)
    boxes, scores, classes = pre_nms(logits, deltas, anchor_boxes)
    picks, picked_scores, valid = batched_non_max_suppression_v5(
        boxes.reshape(-1, 4), scores.reshape(-1), torch.arange(2).repeat_interleave(800), 2,
        300, *nms.tf_nms_args())
    real = torch.arange(300)[None, :] < valid[:, None]
    rows = torch.where(real, picks - torch.tensor([[0], [800]]), torch.zeros_like(picks))
    assert dets.valid.tolist() == valid.tolist() and bool((valid > 100).all())
    assert dets.scores.numpy().tobytes() == picked_scores.numpy().tobytes()
    assert (dets.classes == (torch.gather(classes, 1, rows) + 1).float()).all()
    assert torch.gather(classes, 1, rows).unique().numel() > 3


# ------------------------------------------------------------------------------ the paths


def test_global_is_class_agnostic_clipped_and_padded_like_tf():
    logits, deltas = scene()
    dets = postprocess_global(logits, deltas, ANCHORS, IMAGE_HW, torch.tensor([2.0]), SMALL)
    assert dets.valid.tolist() == [3]
    # anchor 2 duplicates anchor 1 and is decayed by exp(-2) although its class differs.
    torch.testing.assert_close(dets.scores[0, :3], torch.tensor(
        [sigmoid(2.0), sigmoid(1.0), 0.5 * math.exp(-2.0)]), rtol=1e-6, atol=0)
    assert dets.classes[0, :3].tolist() == [3.0, 1.0, 2.0]           # 1-based
    # Clipped to the 128x128 input *before* scaling by 2.
    torch.testing.assert_close(dets.boxes_yxyx[0, :3], torch.tensor(
        [[0, 0, 60, 60], [200, 200, 256, 256], [200, 200, 256, 256]], dtype=torch.float32))
    # Padding rows: TF pads the NMS indices with 0 -> candidate 0's box and class, score 0.
    torch.testing.assert_close(dets.scores[0, 3:], torch.zeros(3))
    assert dets.classes[0, 3:].tolist() == [3.0] * 3
    torch.testing.assert_close(dets.boxes_yxyx[0, 3:], torch.tensor([[0.0, 0, 60, 60]] * 3))


def test_per_class_keeps_one_box_under_two_classes_and_does_not_clip():
    logits, deltas = scene()
    dets = postprocess_per_class(logits, deltas, ANCHORS, torch.tensor([2.0]), SMALL)
    assert dets.valid.tolist() == [4]
    torch.testing.assert_close(dets.scores[0, :4], torch.tensor(
        [sigmoid(2.0), sigmoid(1.0), sigmoid(0.5), 0.5]), rtol=1e-6, atol=0)
    assert dets.classes[0].tolist() == [3.0, 1.0, 4.0, 2.0, 0.0, 0.0]
    torch.testing.assert_close(dets.boxes_yxyx[0, :4], torch.tensor(
        [[-20, -20, 60, 60], [200, 200, 280, 280], [200, 200, 280, 280], [200, 200, 280, 280]],
        dtype=torch.float32))
    # Padding rows are all zeros.
    assert torch.count_nonzero(dets.boxes_yxyx[0, 4:]) == 0
    assert torch.count_nonzero(dets.scores[0, 4:]) == 0


def test_pyfunc_padding_rows_and_no_clip():
    logits, deltas = scene()
    dets = postprocess_pyfunc(logits, deltas, ANCHORS, torch.tensor([2.0]), SMALL)
    per_class = postprocess_per_class(logits, deltas, ANCHORS, torch.tensor([2.0]), SMALL)
    assert dets.valid.tolist() == [4]
    for a, b in [(dets.boxes_yxyx, per_class.boxes_yxyx), (dets.scores, per_class.scores),
                 (dets.classes, per_class.classes)]:
        torch.testing.assert_close(a[0, :4], b[0, :4], rtol=0, atol=0)
    assert dets.scores[0, 4:].tolist() == [DUMMY_DETECTION_SCORE] * 2
    assert dets.classes[0, 4:].tolist() == [0.0, 0.0]
    assert torch.count_nonzero(dets.boxes_yxyx[0, 4:]) == 0


def test_per_class_caps_candidates_with_max_nms_inputs():
    logits, deltas = scene()
    dets = postprocess_per_class(logits, deltas, ANCHORS, None, SMALL, max_nms_inputs=2)
    assert dets.valid.tolist() == [2] and dets.classes[0, :2].tolist() == [3.0, 1.0]
    # None defers to the config (0: each anchor's best class, as automl's post_mode='per_class').
    dets = postprocess_per_class(logits, deltas, ANCHORS, None, SMALL, max_nms_inputs=None)
    assert dets.valid.tolist() == [3] and dets.classes[0, :3].tolist() == [3.0, 1.0, 2.0]


def test_pyfunc_runs_numpy_nms_in_network_pixels():
    # Two boxes of one class, 10x10 and 10x6 at the input: plain IoU 0.6, +1 IoU 77/121.
    anchors = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 6]], dtype=torch.float32)
    logits = torch.tensor([[[2.0], [1.0]]])
    deltas = torch.zeros(1, 2, 4)
    scale = torch.tensor([3.0])                                     # NMS must not see scaled boxes
    pyfunc = postprocess_pyfunc(logits, deltas, anchors, scale, SMALL)
    per_class = postprocess_per_class(logits, deltas, anchors, scale, SMALL)
    torch.testing.assert_close(pyfunc.scores[0, 1] / sigmoid(1.0), torch.tensor(0.4449), rtol=0, atol=5e-5)
    torch.testing.assert_close(per_class.scores[0, 1] / sigmoid(1.0), torch.tensor(0.4868), rtol=0, atol=5e-5)
    torch.testing.assert_close(pyfunc.boxes_yxyx[0, 1], torch.tensor([0.0, 0, 30, 18]))


def test_hard_nms_in_the_tf_paths():
    logits, deltas = scene()
    hard = NmsConfig(method="hard", max_output_size=6)
    dets = postprocess_global(logits, deltas, ANCHORS, IMAGE_HW, None, hard)
    assert dets.valid.tolist() == [2]                                # duplicate anchor 2 removed
    torch.testing.assert_close(dets.scores[0, :2], torch.tensor([sigmoid(2.0), sigmoid(1.0)]))
    # No score threshold by default in hard mode: 2e-9 scores are detections too.
    dets = postprocess_per_class(logits, deltas, ANCHORS, None, hard, max_nms_inputs=12)
    assert dets.valid.tolist() == [6]
    assert float(dets.scores[0, -1]) == pytest.approx(sigmoid(-20.0))


def test_batch_images_are_independent():
    logits, deltas = scene(batch=2)
    logits[1, 0, 2] = -20.0                                          # image 1 loses anchor 0
    scales = torch.tensor([1.0, 0.5])
    for kind in ("global", "per_class", "pyfunc"):
        both = postprocess(kind, logits, deltas, ANCHORS, IMAGE_HW, scales, SMALL)
        for i in range(2):
            one = postprocess(kind, logits[i:i + 1], deltas[i:i + 1], ANCHORS, IMAGE_HW,
                              scales[i:i + 1], SMALL)
            for a, b in [(both.boxes_yxyx, one.boxes_yxyx), (both.scores, one.scores),
                         (both.classes, one.classes), (both.valid, one.valid)]:
                torch.testing.assert_close(a[i], b[0], rtol=0, atol=0)


def test_dispatcher_and_input_checks():
    logits, deltas = scene()
    via = postprocess("global", logits, deltas, ANCHORS, IMAGE_HW, [2.0], SMALL)
    direct = postprocess_global(logits, deltas, ANCHORS, IMAGE_HW, [2.0], SMALL)
    torch.testing.assert_close(via.boxes_yxyx, direct.boxes_yxyx, rtol=0, atol=0)
    with pytest.raises(ValueError):
        postprocess("combined", logits, deltas, ANCHORS, IMAGE_HW, None)
    with pytest.raises(ValueError):
        postprocess_global(logits, deltas[:, :2], ANCHORS, IMAGE_HW, None)
    with pytest.raises(ValueError):
        postprocess_global(logits, deltas, ANCHORS[:2], IMAGE_HW, None)
    with pytest.raises(ValueError):
        postprocess_global(logits, deltas, ANCHORS, IMAGE_HW, [1.0, 2.0])


def test_float32_out_for_float64_in():
    logits, deltas = scene()
    dets = postprocess_per_class(logits.double(), deltas.double(), ANCHORS.double(), None, SMALL)
    assert dets.boxes_yxyx.dtype == dets.scores.dtype == dets.classes.dtype == torch.float32


# ------------------------------------------------------------------------------ COCO rows


def test_to_coco_rows_layout():
    dets = Detections(
        boxes_yxyx=torch.tensor([[[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 0.0, 0.0]],
                                 [[1.0, 2.0, 3.0, 5.0], [4.0, 4.0, 6.0, 9.0]]]),
        scores=torch.tensor([[0.9, 0.0], [0.8, 0.7]]),
        classes=torch.tensor([[3.0, 0.0], [1.0, 90.0]]),
        valid=torch.tensor([1, 2]))
    rows = to_coco_rows(dets, [42, 7])
    assert rows.dtype == np.float32 and rows.shape == (4, 7)
    np.testing.assert_array_equal(rows, np.array([
        [42, 20, 10, 60, 40, 0.9, 3],                               # [id, x, y, w, h, score, class]
        [42, 0, 0, 0, 0, 0.0, 0],                                    # padding rows are kept
        [7, 2, 1, 3, 2, 0.8, 1],
        [7, 4, 4, 5, 2, 0.7, 90]], dtype=np.float32))
    with pytest.raises(ValueError):
        to_coco_rows(dets, [1])
