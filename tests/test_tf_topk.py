"""TF's candidate order among equal scores: ``tf.math.top_k(sorted=False)`` reproduced index for
index, and the three post-processing paths fed saturated logits (many scores exactly 1.0) give
the rows TensorFlow gives. The TF side is built here from the ops automl calls (top_k, argmax,
where, NonMaxSuppressionV5); pyfunc also runs automl's own nms_np when a checkout is configured."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from model.postprocess import MAX_DETECTION_POINTS, NmsConfig, postprocess
from model import tf_topk
from model.tf_topk import tf_top_k_unsorted

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.needs_tf

NMS = NmsConfig()
IOU, SCORE_THRESHOLD, SIGMA = NMS.tf_nms_args()
IMAGE_SIDE = 320


@pytest.mark.parametrize("heap", ["compiled", "python"])
@pytest.mark.parametrize("ties", [False, True])
def test_unsorted_top_k_is_tf_index_for_index(ties, heap, monkeypatch):
    if heap == "python":
        monkeypatch.setattr(tf_topk, "_bounded_heap_compiled", lambda: None)
    rng = np.random.default_rng(int(ties))
    for _ in range(60):
        n = int(rng.integers(2, 2000))
        k = int(rng.integers(1, n + 1))
        values = (rng.integers(0, 5, n) if ties else rng.standard_normal(n)).astype(np.float32)
        want = tf.math.top_k(values[None], k=k, sorted=False).indices.numpy()[0]
        np.testing.assert_array_equal(tf_top_k_unsorted(values, k), want)


def test_unsorted_top_k_is_not_the_sorted_order():
    """The point of the module: a sorted top-k (what the port did before) differs from TF."""
    values = np.random.default_rng(3).standard_normal(500).astype(np.float32)
    ours = tf_top_k_unsorted(values, 100)
    assert set(ours) == set(np.argsort(-values)[:100])
    assert not np.array_equal(ours, np.argsort(-values, kind="stable")[:100])


def test_unsorted_top_k_rejects_bad_k():
    with pytest.raises(ValueError, match="1 <= k <= 3"):
        tf_top_k_unsorted(np.zeros(3, np.float32), 4)


def saturated_heads(seed: int, anchors: int = 600, classes: int = 6):
    """Logits where a quarter of the (anchor, class) pairs saturate (sigmoid == 1.0 exactly, with
    distinct logits) and some pairs tie exactly, over overlapping boxes."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(-2.0, 3.0, (anchors, classes)).astype(np.float32)
    saturated = rng.random((anchors, classes)) < 0.25
    logits[saturated] = rng.uniform(17.0, 30.0, saturated.sum()).astype(np.float32)
    logits[rng.random((anchors, classes)) < 0.05] = 1.5                  # exact logit ties
    centres = rng.uniform(20, 300, (anchors, 2))
    sizes = rng.uniform(10, 80, (anchors, 2))
    anchor_boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1).astype(np.float32)
    deltas = rng.normal(0, 0.2, (anchors, 4)).astype(np.float32)
    return logits, deltas, anchor_boxes


def _decode_tf(deltas, anchor_boxes):
    """automl's decode_box_outputs (ty, tx, th, tw on yxyx anchors), in TF."""
    ycenter_a = (anchor_boxes[:, 0] + anchor_boxes[:, 2]) / 2
    xcenter_a = (anchor_boxes[:, 1] + anchor_boxes[:, 3]) / 2
    ha = anchor_boxes[:, 2] - anchor_boxes[:, 0]
    wa = anchor_boxes[:, 3] - anchor_boxes[:, 1]
    ty, tx, th, tw = tf.unstack(deltas, num=4, axis=-1)
    w = tf.math.exp(tw) * wa
    h = tf.math.exp(th) * ha
    ycenter = ty * ha + ycenter_a
    xcenter = tx * wa + xcenter_a
    return tf.stack([ycenter - h / 2.0, xcenter - w / 2.0, ycenter + h / 2.0, xcenter + w / 2.0],
                    axis=-1)


def _tf_pre_nms(logits, deltas, anchor_boxes, max_nms_inputs):
    num_classes = logits.shape[1]
    if max_nms_inputs:
        _, flat = tf.math.top_k(tf.reshape(logits, [-1]), k=max_nms_inputs, sorted=False)
        index, classes = flat // num_classes, flat % num_classes
        chosen = tf.gather_nd(logits, tf.stack([index, classes], 1))
    else:
        classes = tf.math.argmax(logits, axis=-1, output_type=tf.int32)
        index = tf.range(logits.shape[0])
        chosen = tf.reduce_max(logits, -1)
    boxes = _decode_tf(tf.gather(deltas, index), tf.gather(anchor_boxes, index))
    return boxes, tf.math.sigmoid(chosen), classes


def _tf_nms(boxes, scores, padded):
    return tf.raw_ops.NonMaxSuppressionV5(
        boxes=boxes, scores=scores, max_output_size=NMS.max_output_size, iou_threshold=IOU,
        score_threshold=SCORE_THRESHOLD, soft_nms_sigma=SIGMA, pad_to_max_output_size=padded)


def tf_global(logits, deltas, anchor_boxes):
    boxes, scores, classes = _tf_pre_nms(logits, deltas, anchor_boxes, 0)
    picks, nms_scores, valid = _tf_nms(boxes, scores, True)
    valid = int(valid)
    clipped = tf.clip_by_value(tf.gather(boxes, picks), 0.0, float(IMAGE_SIDE))
    return (clipped.numpy()[:valid], nms_scores.numpy()[:valid],
            tf.gather(classes, picks).numpy()[:valid] + 1)


def tf_per_class(logits, deltas, anchor_boxes, max_nms_inputs):
    boxes, scores, classes = _tf_pre_nms(logits, deltas, anchor_boxes, max_nms_inputs)
    out_boxes, out_scores, out_classes = [], [], []
    for cid in range(logits.shape[1]):
        where = tf.where(tf.equal(classes, cid))
        if where.shape[0] == 0:
            continue
        class_boxes = tf.gather_nd(boxes, where)
        picks, nms_scores, _ = _tf_nms(class_boxes, tf.gather_nd(scores, where), False)
        out_boxes.append(tf.gather(class_boxes, picks))
        out_scores.append(nms_scores)
        out_classes.append(tf.fill(tf.shape(nms_scores), cid + 1))
    out = NMS.max_output_size
    all_scores = tf.pad(tf.concat(out_scores, 0), [[0, out]])
    _, top = tf.math.top_k(all_scores, k=out, sorted=True)
    valid = min(out, int(sum(s.shape[0] for s in out_scores)))
    pick = top.numpy()[:valid]
    return (tf.concat(out_boxes, 0).numpy()[pick], all_scores.numpy()[pick],
            tf.concat(out_classes, 0).numpy()[pick])


def ours(kind, logits, deltas, anchor_boxes, max_nms_inputs=MAX_DETECTION_POINTS):
    dets = postprocess(kind, torch.from_numpy(logits)[None], torch.from_numpy(deltas)[None],
                       torch.from_numpy(anchor_boxes), (IMAGE_SIDE, IMAGE_SIDE), None, NMS, max_nms_inputs)
    valid = int(dets.valid[0])
    return (dets.boxes_yxyx[0, :valid].numpy(), dets.scores[0, :valid].numpy(),
            dets.classes[0, :valid].numpy())


def assert_same_rows(got, want):
    boxes, scores, classes = got
    want_boxes, want_scores, want_classes = want
    assert len(scores) == len(want_scores)
    np.testing.assert_array_equal(classes, want_classes)
    np.testing.assert_allclose(boxes, want_boxes, atol=1e-4)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saturated_scores_keep_tfs_rows_on_the_tf_paths(seed):
    logits, deltas, anchor_boxes = saturated_heads(seed)
    assert (1 / (1 + np.exp(-logits.astype(np.float64))) >= 1 - 2 ** -25).sum() > 500
    assert_same_rows(ours("global", logits, deltas, anchor_boxes),
                     tf_global(logits, deltas, anchor_boxes))
    k = 2000
    assert_same_rows(ours("per_class", logits, deltas, anchor_boxes, k),
                     tf_per_class(logits, deltas, anchor_boxes, k))


def test_a_sorted_top_k_loses_tfs_rows(monkeypatch):
    """Break on purpose: candidates in sorted order (the port before) change the per_class rows."""
    import model.postprocess as post
    logits, deltas, anchor_boxes = saturated_heads(0)
    want = tf_per_class(logits, deltas, anchor_boxes, 2000)
    monkeypatch.setattr(post, "tf_top_k_unsorted",
                        lambda row, k: np.lexsort((np.arange(row.size), -row))[:k])
    boxes, _, classes = ours("per_class", logits, deltas, anchor_boxes, 2000)
    rows = {(c, *np.round(b, 3)) for b, c in zip(boxes, classes)}
    wanted = {(c, *np.round(b, 3)) for b, c in zip(want[0], want[2])}
    assert rows != wanted


def _automl_nms_np():
    root = os.environ.get("EFFDET_AUTOML_DIR")
    path = Path(root or "/nonexistent") / "efficientdet" / "nms_np.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("automl_nms_np", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(_automl_nms_np() is None,
                    reason="set EFFDET_AUTOML_DIR to a google/automl checkout for automl's nms_np")
@pytest.mark.slow
def test_saturated_scores_keep_automls_rows_on_the_pyfunc_path(seed=1):
    nms_np = _automl_nms_np()
    logits, deltas, anchor_boxes = saturated_heads(seed)
    k = 2000
    boxes, scores, classes = (t.numpy() for t in _tf_pre_nms(logits, deltas, anchor_boxes, k))
    configs = {"method": "gaussian", "iou_thresh": None, "sigma": None, "score_thresh": 0,
               "max_output_size": NMS.max_output_size}
    rows = nms_np.per_class_nms(boxes, scores, classes, np.zeros(1), np.ones(1),
                                logits.shape[1], NMS.max_output_size, configs)
    valid = rows[:, 5] > -1e4
    want = (rows[valid][:, [2, 1, 4, 3]], rows[valid][:, 5], rows[valid][:, 6])
    got_boxes, got_scores, got_classes = ours("pyfunc", logits, deltas, anchor_boxes, k)
    np.testing.assert_array_equal(got_classes, want[2])
    np.testing.assert_allclose(got_boxes, want[0], atol=1e-4)
    np.testing.assert_array_equal(got_scores, want[1])
