"""``verify parity --onnx``: the d0 golden through the ONNX export, and a broken export caught."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from model import EfficientDet, flatten_outputs
from model.weights_io import save_weights
from test_parity import D0, build, d0_contents, golden  # noqa: F401 - shared fixtures
from verify.cli import main as verify_main
from verify.onnx_network import OnnxNetwork, unflatten_outputs
from verify.parity import run_parity

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("single_thread")


def test_unflatten_inverts_flatten_on_a_non_square_size():
    model = EfficientDet.from_config("efficientdet-lite0", image_size=(96, 160)).eval()
    with torch.no_grad():
        class_outputs, box_outputs = model(torch.randn(2, 3, 96, 160))
    cls_logits, box_deltas = flatten_outputs(class_outputs, box_outputs)
    for flat, levels in ((cls_logits, class_outputs), (box_deltas, box_outputs)):
        back = unflatten_outputs(flat, model.config)
        assert [b.shape for b in back] == [level.shape for level in levels]
        assert all(torch.equal(b, level) for b, level in zip(back, levels))


def test_optimized_and_onnx_together_are_a_usage_error(tmp_path):
    result = CliRunner().invoke(verify_main, ["parity", "--weights", str(tmp_path / "w.pth"),
                                              "--golden", str(D0), "--optimized", "--onnx"])
    assert result.exit_code == 2
    assert "at most one of --optimized and --onnx" in result.output


@pytest.mark.slow   # d0 ONNX export + onnxruntime: 30-90 s on a busy 2-core machine
def test_d0_golden_passes_through_onnx(d0_contents, golden):
    report = run_parity(OnnxNetwork(build(d0_contents)), golden)
    assert report.ok, report.first_divergence
    assert report.runtime == "onnx"
    head = [t.name for t in report.taps if t.name.startswith("head/")]
    assert len(head) == 10 and len(report.taps) == 11        # input/image + 5 levels x 2
    assert "backbone/stem" in report.unavailable and "fpn/cell_0/p3" in report.unavailable
    assert len(report.taps) - 1 + len(report.unavailable) == len(golden.taps)
    assert report.worst_rel < 1e-4
    assert all(d.matched == d.expected == 100 for d in report.detections)


@pytest.mark.slow   # d0 ONNX export + onnxruntime: 30-90 s on a busy 2-core machine
def test_cli_fails_on_an_onnx_export_with_a_perturbed_head_weight(d0_contents, tmp_path):
    model = build(d0_contents)
    state = model.state_dict()
    state["box_net.box_predict.pointwise.weight"][0, 0] += 0.5   # one weight of one output
    bad = save_weights(tmp_path / "bad.pth", state, {"config": model.config.to_dict()})
    result = CliRunner().invoke(verify_main, ["parity", "--weights", str(bad), "--golden",
                                              str(D0), "--onnx"])
    assert result.exit_code == 1, result.output
    assert "FAIL: first diverging tap head/box_p" in result.output
    assert "internal taps not available for runtime onnx" in result.output
