"""Parity against the automl goldens, and proof that the check catches real mistakes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from helpers import REFERENCE_DIR, synth_checkpoint
from converter.convert import convert_checkpoint
from converter.detect import detect_config
from converter.readers import read_checkpoint
from model import EfficientDet, tf_compat
from model.weights_io import save_weights
from verify.cli import main as verify_main
from verify.parity import DetectionResult, match_detections, run_parity
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
    assert len(report.taps) == 47
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
    assert same == DetectionResult("global", 2, 2, 2, 0, 0, 0.0, 0.0, True)
    # One produced row cannot serve two reference rows.
    one = match_detections("global", ref, ref.boxes_yxyx[:1], ref.scores[:1], ref.classes[:1])
    assert (one.matched, one.ok) == (1, False)
    wrong_class = match_detections("global", ref, ref.boxes_yxyx, ref.scores, ref.classes + 1)
    assert (wrong_class.matched, wrong_class.ok) == (0, False)
    # The last row may differ when its score ties with another candidate's at the cut ...
    swapped = match_detections("global", ref, np.array([[0, 0, 10, 10], [50, 50, 60, 60.]]),
                               np.array([0.9, 0.5001]), np.array([1.0, 1.0]))
    assert (swapped.matched, swapped.at_cut, swapped.ok) == (1, 1, True)
    # Two boxes of one class with near-equal scores: the greedy order may flip, so each comes
    # out with the other's score -- the same set of scores per class is accepted ...
    pair = DetectionsRef(np.array([[0, 0, 10, 10], [20, 20, 30, 30.]]), np.array([0.46, 0.45]),
                         np.array([3.0, 3.0]))
    flipped = match_detections("pyfunc", pair, pair.boxes_yxyx, pair.scores[::-1].copy(),
                               pair.classes)
    assert (flipped.matched, flipped.swapped, flipped.ok) == (0, 2, True)
    # ... other scores are not.
    off = match_detections("pyfunc", pair, pair.boxes_yxyx, np.array([0.40, 0.45]), pair.classes)
    assert (off.matched, off.swapped, off.ok) == (1, 0, False)
    # ... but not when it is well above the cut.
    higher = DetectionsRef(ref.boxes_yxyx, np.array([0.9, 0.5]), np.array([1.0, 2.0]))
    missing = match_detections("global", higher, ref.boxes_yxyx, ref.scores, np.array([2.0, 2.0]))
    assert (missing.matched, missing.ok) == (1, False)


def test_detection_matching_is_maximal_not_greedy():
    # ref 0 fits both produced rows, ref 1 only the first: a greedy pass gives ref 0 the
    # first row and strands ref 1.
    ref = DetectionsRef(np.array([[0, 0, 10, 10], [0, 0, 10, 10.1]]), np.array([0.5, 0.5]),
                        np.array([1.0, 1.0]))
    ours = np.array([[0, 0, 10, 10.05], [0, 0, 10, 9.95]])
    result = match_detections("global", ref, ours, np.array([0.5, 0.5]), np.array([1.0, 1.0]))
    assert (result.matched, result.ok) == (2, True)


def test_clipped_boxes_are_judged_on_the_image_scale():
    # A box clipped to the border hides its decoded size; its error follows that size.
    ref = DetectionsRef(np.array([[0, 0, 0, 55.76], [5, 5, 20, 20]]), np.array([0.97, 0.5]),
                        np.array([23.0, 23.0]))
    ours = np.array([[0, 0, 0, 56.04], [5, 5, 20, 20]])
    args = ("global", ref, ours, np.array([0.97, 0.5]), np.array([23.0, 23.0]))
    assert not match_detections(*args).ok
    assert match_detections(*args, image_extent=1024.0).ok
