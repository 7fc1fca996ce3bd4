"""Parity against the automl goldens, and proof that the check catches real mistakes."""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import REFERENCE_DIR, synth_checkpoint
from converter.convert import convert_checkpoint
from converter.detect import detect_config
from converter.readers import read_checkpoint
from model import EfficientDet, flatten_outputs, tf_compat
from model import postprocess as postprocess_module
from model.weights_io import save_weights
from verify.cli import main as verify_main
from verify import parity
from verify.parity import (CUT_ATOL, SCORE_ATOL, DetectionResult, compare_detections, match_detections,
                           network_input, run_parity)
from verify.reference import DetectionsRef, load_golden

pytestmark = [pytest.mark.needs_tf,
              pytest.mark.skipif(not (REFERENCE_DIR / "efficientdet-d0").is_dir(),
                                 reason=f"no reference folder at {REFERENCE_DIR}")]
D0 = REFERENCE_DIR / "efficientdet-d0"


@pytest.fixture(scope="module")
def d0_contents(tmp_path_factory):
    ckpt = synth_checkpoint("efficientdet-d0", tmp_path_factory.mktemp("d0"))
    return read_checkpoint(ckpt)


def build(contents, use_ema=True) -> EfficientDet:
    config = detect_config(contents.names)
    state_dict, _ = convert_checkpoint(contents, config, use_ema=use_ema)
    model = EfficientDet(config).eval()
    model.load_state_dict(state_dict)
    return model


@pytest.fixture(scope="module")
def golden():
    return load_golden(D0)


@pytest.mark.slow   # whole-d0 forward passes: 6-30 s each on a busy 2-core machine
def test_converted_d0_matches_every_tap_and_detection_path(d0_contents, golden):
    report = run_parity(build(d0_contents), golden)
    assert report.ok, report.first_divergence
    assert len(report.taps) == 48        # input/image (our preprocessing) + 47 network taps
    assert report.taps[0].name == "input/image" and report.taps[0].ok
    assert report.worst_rel < 1e-4        # d0 is far inside the tolerance
    assert {d.path for d in report.detections} == {"global", "per_class", "pyfunc"}
    assert all(d.matched == d.expected == 100 for d in report.detections)


@pytest.mark.slow   # whole-d0 forward passes: 6-30 s each on a busy 2-core machine
def test_swapped_bn_stats_fail_at_their_block(d0_contents, golden):
    model = build(d0_contents)
    bn = model.backbone.blocks[3].tpu_batch_normalization_1
    bn.running_mean, bn.running_var = bn.running_var.clone(), bn.running_mean.clone().abs()
    report = run_parity(model, golden)
    assert not report.ok
    assert report.first_divergence == "backbone/block_03"
    assert next(t for t in report.taps if t.name == "backbone/block_03").rel_max > 1e-1


@pytest.mark.slow   # whole-d0 forward passes: 6-30 s each on a busy 2-core machine
def test_symmetric_padding_fails_at_the_stem(d0_contents, golden, monkeypatch):
    model = build(d0_contents)
    tf_same = tf_compat.same_padding

    def odd_pixel_first(size, kernel, stride, dilation=1):
        before, after = tf_same(size, kernel, stride, dilation)
        return after, before    # the extra row/column on top/left, as a naive port pads

    monkeypatch.setattr(tf_compat, "same_padding", odd_pixel_first)
    report = run_parity(model, golden)
    assert report.first_divergence == "backbone/stem"


@pytest.mark.slow   # whole-d0 forward passes: 6-30 s each on a busy 2-core machine
def test_raw_weights_instead_of_ema_fail_at_the_stem(d0_contents, golden):
    report = run_parity(build(d0_contents, use_ema=False), golden)
    assert report.first_divergence == "backbone/stem"


@pytest.mark.slow   # whole-d0 forward passes: 6-30 s each on a busy 2-core machine
def test_raw_weights_match_the_no_ema_golden(d0_contents):
    report = run_parity(build(d0_contents, use_ema=False), load_golden(D0, "golden_noema"))
    assert report.ok, report.first_divergence


@pytest.mark.slow   # whole-d0 forward passes: 6-30 s each on a busy 2-core machine
def test_cli_writes_report_and_plot_and_fails_on_a_broken_model(d0_contents, tmp_path):
    model = build(d0_contents)
    good = save_weights(tmp_path / "good.pth", model.state_dict(),
                        {"config": model.config.to_dict()})
    runner = CliRunner()
    result = runner.invoke(verify_main, ["parity", "--weights", str(good), "--golden", str(D0),
                                         "--report", str(tmp_path / "r.json"),
                                         "--plot", str(tmp_path / "r.png")])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output and "head/box_p7" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["first_divergence"] is None
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"

    state = model.state_dict()
    # Switch off one fusion weight of cell 1's top-down P4 node; P3 (fed by it) is the first
    # output of that cell in graph order.
    state["fpn_cells.cell_1.fnode2.WSM"] = torch.tensor(-1.0)
    bad = save_weights(tmp_path / "bad.pth", state, {"config": model.config.to_dict()})
    result = runner.invoke(verify_main, ["parity", "--weights", str(bad), "--golden", str(D0)])
    assert result.exit_code == 1
    assert "first diverging tap: fpn/cell_1/p3" in result.output
    assert result.output.splitlines()[-1].startswith(
        "FAIL: first diverging tap fpn/cell_1/p3 (") and "hint: raw vs EMA" in result.output


def test_cli_refuses_weights_of_another_variant(tmp_path):
    model = EfficientDet.from_config("efficientdet-lite0")
    weights = save_weights(tmp_path / "lite0.pth", model.state_dict(),
                           {"config": model.config.to_dict()})
    result = CliRunner().invoke(verify_main, ["parity", "--weights", str(weights),
                                              "--golden", str(D0)])
    assert result.exit_code == 1
    assert "reference is efficientdet-d0, weights are efficientdet-lite0" in result.output


def test_cli_missing_golden_is_a_one_line_error(tmp_path, d0_contents):
    model = build(d0_contents)
    weights = save_weights(tmp_path / "w.pth", model.state_dict(),
                           {"config": model.config.to_dict()})
    result = CliRunner().invoke(verify_main, ["parity", "--weights", str(weights),
                                              "--golden", str(tmp_path)])
    assert result.exit_code == 3
    assert "no golden.json" in result.output and "Traceback" not in result.output


def test_detection_matching_is_one_to_one():
    ref = DetectionsRef(np.array([[0, 0, 10, 10], [0, 0, 10, 10.]]), np.array([0.9, 0.5]),
                        np.array([1.0, 1.0]))
    same = match_detections("global", ref, ref.boxes_yxyx, ref.scores, ref.classes)
    assert same == DetectionResult("global", 2, 2, 2, 0, 0, 0, 0.0, 0.0, 0.0, CUT_ATOL, True)
    # One produced row cannot serve two reference rows.
    one = match_detections("global", ref, ref.boxes_yxyx[:1], ref.scores[:1], ref.classes[:1])
    assert (one.matched, one.ok) == (1, False)
    wrong_class = match_detections("global", ref, ref.boxes_yxyx, ref.scores, ref.classes + 1)
    assert (wrong_class.matched, wrong_class.ok) == (0, False)


def test_a_row_at_the_cut_may_be_another_candidate_tied_with_it():
    ref = DetectionsRef(np.array([[0, 0, 10, 10], [0, 0, 10, 10.]]), np.array([0.9, 0.5]),
                        np.array([1.0, 1.0]))
    other = np.array([[0, 0, 10, 10], [50, 50, 60, 60.]])
    tied = match_detections("global", ref, other, np.array([0.9, 0.5001]), np.array([1.0, 2.0]),
                            max_output_size=2)
    assert (tied.matched, tied.at_cut, tied.ok) == (1, 1, True)
    # Fewer rows than max_output_size: nothing was cut, so nothing may be replaced.
    assert not match_detections("global", ref, other, np.array([0.9, 0.5001]),
                                np.array([1.0, 2.0])).ok
    # Both sides must sit at the cut: a substitute scored above it, or a missing row above it ...
    above = match_detections("global", ref, other, np.array([0.9, 0.5 + 2 * CUT_ATOL]),
                             np.array([1.0, 2.0]), max_output_size=2)
    assert (above.at_cut, above.ok) == (0, False)
    higher = DetectionsRef(ref.boxes_yxyx, np.array([0.9, 0.5]), np.array([1.0, 2.0]))
    missing = match_detections("global", higher, ref.boxes_yxyx, ref.scores, np.array([2.0, 2.0]),
                               max_output_size=2)
    assert (missing.matched, missing.ok) == (1, False)


PAIR = DetectionsRef(np.array([[0, 0, 10, 10], [0, 5, 10, 15.]]), np.array([0.46, 0.45]),
                     np.array([3.0, 3.0]))


def test_overlapping_same_class_boxes_may_exchange_near_equal_scores():
    # IoU 1/3: the first box decays the second by exp(-2/9) = 0.80, so an order flip by noise
    # exchanges their scores.
    flipped = match_detections("pyfunc", PAIR, PAIR.boxes_yxyx, PAIR.scores[::-1].copy(),
                               PAIR.classes)
    assert (flipped.matched, flipped.swapped, flipped.ok) == (0, 2, True)
    # ... other scores are not accepted.
    off = match_detections("pyfunc", PAIR, PAIR.boxes_yxyx, np.array([0.40, 0.45]), PAIR.classes)
    assert (off.matched, off.swapped, off.ok) == (1, 0, False)


def test_no_swap_between_disjoint_boxes_or_far_apart_scores():
    disjoint = DetectionsRef(np.array([[0, 0, 10, 10], [20, 20, 30, 30.]]), PAIR.scores,
                             PAIR.classes)
    result = match_detections("global", disjoint, disjoint.boxes_yxyx,
                              disjoint.scores[::-1].copy(), disjoint.classes)
    assert (result.swapped, result.ok) == (0, False)
    # Overlapping, but the gap (0.9 vs 0.3) is more than one decay at IoU 1/3 can explain.
    far = DetectionsRef(PAIR.boxes_yxyx, np.array([0.9, 0.3]), PAIR.classes)
    result = match_detections("global", far, far.boxes_yxyx, far.scores[::-1].copy(), far.classes)
    assert (result.swapped, result.ok) == (0, False)


def test_detection_matching_is_maximal_not_greedy():
    # ref 0 fits both produced rows, ref 1 only the first: a greedy pass gives ref 0 the
    # first row and strands ref 1.
    ref = DetectionsRef(np.array([[0, 0, 10, 10], [0, 0, 10, 10.1]]), np.array([0.5, 0.5]),
                        np.array([1.0, 1.0]))
    ours = np.array([[0, 0, 10, 10.05], [0, 0, 10, 9.95]])
    result = match_detections("global", ref, ours, np.array([0.5, 0.5]), np.array([1.0, 1.0]))
    assert (result.matched, result.ok) == (2, True)


def test_only_clipped_boxes_are_judged_on_the_image_scale():
    # A box clipped to the border hides its decoded size; its error follows that size.
    ref = DetectionsRef(np.array([[0, 0, 0, 55.76], [5, 5, 20, 20]]), np.array([0.97, 0.5]),
                        np.array([23.0, 23.0]))
    ours = np.array([[0, 0, 0, 56.36], [5, 5, 20, 20]])
    args = ("global", ref, ours, np.array([0.97, 0.5]), np.array([23.0, 23.0]))
    assert not match_detections(*args).ok
    accepted = match_detections(*args, clip_hw=(636.0, 1024.0))
    assert (accepted.ok, accepted.image_floor) == (True, 1)
    # An unclipped box keeps its own scale: 0.3 px off on a 15-px box fails with the window too.
    inner = np.array([[0, 0, 0, 55.76], [5.3, 5, 20.3, 20]])
    assert not match_detections("global", ref, inner, ref.scores, ref.classes,
                                clip_hw=(636.0, 1024.0)).ok


# ------------------------------------------------------- break on purpose, at the detection level

@pytest.fixture(scope="module")
def d0_heads(d0_contents, golden):
    """The converted d0, its flattened head outputs on the golden's input and the input scale."""
    model = build(d0_contents)
    image, scale, _ = network_input(model, golden)
    with torch.no_grad():
        cls_logits, box_deltas = flatten_outputs(*model(image))
    return model, cls_logits, box_deltas, scale


def detection_verdicts(d0_heads, reference) -> dict[str, DetectionResult]:
    model, cls_logits, box_deltas, scale = d0_heads
    return {d.path: d for d in compare_detections(model, reference, cls_logits, box_deltas, scale)}


def with_detections(golden, change) -> object:
    """The golden with ``change(path, DetectionsRef) -> DetectionsRef`` applied to every path."""
    return dataclasses.replace(golden, detections={
        path: change(path, ref) for path, ref in golden.detections.items()})


def test_d0_detections_match_row_for_row(d0_heads, golden):
    results = detection_verdicts(d0_heads, golden)
    assert all(d.ok and d.matched == d.expected == 100 for d in results.values())
    assert all(d.swapped == d.at_cut == d.image_floor == 0 for d in results.values())
    assert max(d.max_box_err for d in results.values()) < 0.02


def test_half_pixel_anchor_offset_fails_every_path(d0_heads, golden):
    anchors = d0_heads[0].anchors
    original = anchors.boxes_yxyx
    anchors.boxes_yxyx = original + 0.5
    try:
        results = detection_verdicts(d0_heads, golden)
    finally:
        anchors.boxes_yxyx = original
    assert not any(d.ok for d in results.values()), results


def test_garbage_in_place_of_the_lowest_rows_fails(d0_heads, golden):
    rng = np.random.default_rng(0)

    def garbage(path, ref):
        boxes, classes = ref.boxes_yxyx.copy(), ref.classes.copy()
        low = np.argsort(ref.scores, kind="stable")[:10]
        corner = rng.uniform(0, 500, (len(low), 2))
        boxes[low] = np.concatenate([corner, corner + rng.uniform(5, 100, (len(low), 2))], 1)
        classes[low] = rng.integers(1, 91, len(low))
        return dataclasses.replace(ref, boxes_yxyx=boxes, classes=classes)

    results = detection_verdicts(d0_heads, with_detections(golden, garbage))
    assert not any(d.ok for d in results.values()), results


def test_scores_swapped_between_disjoint_boxes_fail(d0_heads, golden):
    def swap_disjoint(path, ref):
        best = None
        for a in range(len(ref.scores)):
            for b in range(a + 1, len(ref.scores)):
                if ref.classes[a] != ref.classes[b] or \
                        abs(ref.scores[a] - ref.scores[b]) <= SCORE_ATOL:
                    continue
                (ya, xa, ya2, xa2), (yb, xb, yb2, xb2) = ref.boxes_yxyx[a], ref.boxes_yxyx[b]
                if min(ya2, yb2) <= max(ya, yb) + 2 or min(xa2, xb2) <= max(xa, xb) + 2:
                    gap = abs(ref.scores[a] - ref.scores[b])
                    best = min(best or (gap, a, b), (gap, a, b))
        assert best is not None, f"{path}: no disjoint same-class pair"
        scores = ref.scores.copy()
        _, a, b = best
        scores[[a, b]] = scores[[b, a]]
        return dataclasses.replace(ref, scores=scores)

    results = detection_verdicts(d0_heads, with_detections(golden, swap_disjoint))
    assert not any(d.ok for d in results.values()), results
    assert all(d.swapped == 0 for d in results.values())


def tf_per_class_reference(d0_heads, logit_shift) -> DetectionsRef:
    """TF's own ops (automl's per_class path, top 5000 pairs) on d0's logits + ``logit_shift``
    (a number, or one per class)."""
    from test_tf_topk import tf_per_class
    model, cls_logits, box_deltas, _ = d0_heads
    boxes, scores, classes = tf_per_class(cls_logits[0].numpy() + np.float32(logit_shift),
                                          box_deltas[0].numpy(), model.anchors.boxes_yxyx.numpy(),
                                          5000)
    return DetectionsRef(boxes.astype(np.float64), scores, classes.astype(np.float64))


def per_class_verdict(d0_heads, reference, logit_shift, **options) -> DetectionResult:
    model, cls_logits, box_deltas, _ = d0_heads
    dets = postprocess_module.postprocess(
        "per_class", cls_logits + torch.as_tensor(np.float32(logit_shift)), box_deltas, model.anchors.boxes_yxyx,
        model.config.image_size, None, **options)
    return match_detections("per_class", reference, dets.boxes_yxyx[0].numpy(),
                            dets.scores[0].numpy(), dets.classes[0].numpy())


def test_max_nms_inputs_500_fails_where_more_pairs_compete(d0_heads):
    """On the d0 golden only 290 pairs score above the per_class cut, so 500 and 5000 candidates
    give the same rows (no check can tell them apart there). Raise class 1's logits by 6 (no
    score saturates; thousands of its pairs compete) and take TF's rows."""
    shift = np.zeros(d0_heads[1].shape[-1], dtype=np.float32)
    shift[0] = 6.0
    reference = tf_per_class_reference(d0_heads, shift)
    assert (reference.scores < 1.0).all()
    assert per_class_verdict(d0_heads, reference, shift).ok
    assert not per_class_verdict(d0_heads, reference, shift, max_nms_inputs=500).ok


def test_saturated_scores_in_another_tie_order_fail(d0_heads, monkeypatch):
    """Saturate d0's scores (logits + 20: thousands of pairs score exactly 1.0); TF's own ops give
    the reference rows. The port's TF order matches them; a sorted top-k (ties to the lower flat
    index, as the port did before) keeps other boxes and must fail."""
    reference = tf_per_class_reference(d0_heads, 20.0)
    assert (reference.scores == 1.0).sum() == 100
    assert per_class_verdict(d0_heads, reference, 20.0).ok
    monkeypatch.setattr(postprocess_module, "tf_top_k_unsorted",
                        lambda row, k: np.lexsort((np.arange(row.size), -row))[:k])
    assert not per_class_verdict(d0_heads, reference, 20.0).ok


def test_our_preprocessing_is_compared_with_the_reference_input(d0_heads, golden, monkeypatch):
    """The network runs on the golden's input, and this project's preprocessing of the golden's
    image is still checked against it (in live TF mode too): a wrong normalisation fails there."""
    from model import preprocess
    model = d0_heads[0]
    image, scale, check = network_input(model, golden)
    assert check.name == "input/image" and check.ok and check.rel_max < 1e-5
    assert torch.equal(image, torch.from_numpy(golden.input.values).permute(0, 3, 1, 2))
    true_batch = preprocess.preprocess_batch

    def off_by_one_level(images, size, mean, std, *rest):
        return true_batch(images, size, [m + 1.0 for m in mean], std, *rest)  # mean off by 1

    monkeypatch.setattr(preprocess, "preprocess_batch", off_by_one_level)
    _, _, broken = network_input(model, golden)
    assert broken.name == "input/image" and not broken.ok
