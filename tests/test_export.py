"""``converter.export``: each format run by its own runtime against the PyTorch graph.

lite0 at 128x128 with random BN statistics and amplified predictors (distinct scores, so NMS
picks do not hinge on float ties). Exports take 10-90 s on a shared 2-core machine: slow.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from converter.cli import main as convert_main
from converter.export import (EXPORT_FORMATS, EXPORT_SUFFIXES, ExportError, build_graph,
                              export_model, postprocess_raw)
from model import EfficientDet, flatten_outputs
from model.postprocess import NmsConfig, postprocess
from model.weights_io import save_weights
from test_optimize import randomize_bn

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 128
# The exported graphs are the optimize()d network: float32 rounding only.
RTOL = 1e-5


@functools.lru_cache(maxsize=None)
def _model() -> EfficientDet:
    torch.manual_seed(0)
    model = randomize_bn(EfficientDet.from_config("efficientdet-lite0", image_size=SIZE)).eval()
    with torch.no_grad():
        for head in (model.class_net, model.box_net):
            head.predict.pointwise.weight.mul_(30.0)
    return model


def _images(batch: int) -> torch.Tensor:
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def _expected(outputs: str, images: torch.Tensor):
    graph, _ = build_graph(_model(), None, outputs)
    with torch.no_grad():
        result = graph(images)
    return result if isinstance(result, tuple) else (result,)


def _assert_close(actual, expected) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        a = torch.as_tensor(np.asarray(a))
        assert a.shape == e.shape
        assert (a - e).abs().max() <= RTOL * max(e.abs().max(), 1.0)


def test_format_table_and_suffixes():
    assert set(EXPORT_SUFFIXES.values()) <= set(EXPORT_FORMATS)
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(_model(), "tflite", "x.tflite")


def test_nms_rejected_where_unsupported(tmp_path):
    with pytest.raises(ExportError, match="ONNX only"):
        export_model(_model(), "torchscript", tmp_path / "m.ts", outputs="nms")
    with pytest.raises(ExportError, match="unknown outputs"):
        export_model(_model(), "onnx", tmp_path / "m.onnx", outputs="boxes")
    assert not list(tmp_path.iterdir())


def test_postprocess_raw_is_the_model_postprocess():
    images = _images(1)
    with torch.no_grad():
        cls_logits, box_deltas = flatten_outputs(*_model()(images))
    nms = NmsConfig.from_dict(_model().config.nms_configs)
    expected = postprocess("global", cls_logits, box_deltas, _model().anchors.boxes_yxyx,
                           (SIZE, SIZE), 2.0, nms)
    actual = postprocess_raw(_model().config, cls_logits.numpy(), box_deltas.numpy(),
                             "global", 2.0)
    assert torch.equal(actual.boxes_yxyx, expected.boxes_yxyx)
    assert torch.equal(actual.scores, expected.scores)
    assert int(actual.valid[0]) > 0


@pytest.mark.slow
def test_torchscript_runs_and_matches(tmp_path):
    path = export_model(_model(), "torchscript", tmp_path / "m.ts", outputs="decoded")
    images = _images(2)
    _assert_close(torch.jit.load(str(path))(images), _expected("decoded", images))


@pytest.mark.slow
def test_torch_export_dynamic_batch_runs_and_matches(tmp_path):
    path = export_model(_model(), "torch-export", tmp_path / "m.pt2", dynamic_batch=True)
    images = _images(3)
    _assert_close(torch.export.load(str(path)).module()(images), _expected("raw", images))


@pytest.mark.slow
def test_onnx_raw_dynamic_batch_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_model(_model(), "onnx", tmp_path / "m.onnx", dynamic_batch=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _images(3)
    outputs = session.run(None, {"images": images.numpy()})
    _assert_close(outputs, _expected("raw", images))
    # The host step on the runtime's outputs equals the PyTorch model's global path.
    dets = postprocess_raw(_model().config, outputs[0], outputs[1], "global")
    expected = _model().predict(np.zeros((SIZE, SIZE, 3), np.uint8))   # shape check only
    assert dets.boxes_yxyx.shape[1:] == expected.boxes_yxyx.shape[1:]


@pytest.mark.slow
def test_exports_of_a_squeeze_excite_model_run_at_other_batch_sizes(tmp_path):
    """d0 has squeeze-excite blocks, whose gate optimize() folds into the projection weight for
    a batch of one: a traced graph (example batch 1) and a dynamic-batch ONNX graph must not."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = randomize_bn(EfficientDet.from_config("efficientdet-d0", image_size=SIZE)).eval()
    images = _images(2)
    with torch.no_grad():
        expected = flatten_outputs(*model(images))
    traced = torch.jit.load(str(export_model(model, "torchscript", tmp_path / "m.ts")))
    _assert_close(traced(images), expected)
    path = export_model(model, "onnx", tmp_path / "m.onnx", dynamic_batch=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (images[:1], images):
        with torch.no_grad():
            expected = flatten_outputs(*model(batch))
        _assert_close(session.run(None, {"images": batch.numpy()}), expected)


@pytest.mark.slow
def test_onnx_hard_nms_in_graph_matches_pytorch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_model(_model(), "onnx", tmp_path / "m.onnx", outputs="nms")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = _images(1)
    (detections,) = session.run(None, {"images": images.numpy()})
    (expected,) = _expected("nms", images)
    assert len(expected) == _model().config.nms_configs.get("max_output_size", 100)
    _assert_close([detections], [expected])
    # ... and equals the model's own global post-processing with hard NMS.
    with torch.no_grad():
        cls_logits, box_deltas = flatten_outputs(*_model()(images))
    dets = postprocess_raw(_model().config, cls_logits, box_deltas, "global", method="hard")
    assert np.allclose(detections[:, 1:5], dets.boxes_yxyx[0].numpy(), atol=1e-3)
    assert np.allclose(detections[:, 6], dets.classes[0].numpy())


@pytest.mark.slow
def test_convert_to_torchscript_cli(tmp_path):
    weights = tmp_path / "w.pth"
    model = _model()
    save_weights(weights, model.state_dict(), {"config": model.config.to_dict()})
    runner = CliRunner()
    out = tmp_path / "m.ts"
    result = runner.invoke(convert_main, ["--ckpt", str(weights), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    images = _images(1)
    _assert_close(torch.jit.load(str(out))(images), _expected("raw", images))
    again = runner.invoke(convert_main, ["--ckpt", str(weights), "--out", str(out)])
    assert again.exit_code == 6 and "exists" in again.output


def test_convert_to_rejects_a_tf_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    result = CliRunner().invoke(convert_main, ["--ckpt", str(tmp_path / "ckpt"), "--to", "onnx",
                                               "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 3 and "needs PyTorch weights" in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_format_names_without_torch_list_every_exporter():
    from converter.export_formats import FORMAT_NAMES, GRAPH_FORMATS
    assert tuple(EXPORT_FORMATS) == FORMAT_NAMES
    assert set(GRAPH_FORMATS) <= set(FORMAT_NAMES)
    assert set(EXPORT_SUFFIXES.values()) <= set(GRAPH_FORMATS)


@pytest.mark.slow
def test_onnx_levels_are_the_network_outputs_and_post_process_like_raw(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_model(_model(), "onnx", tmp_path / "m.onnx", outputs="levels")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == (
        [f"cls_level_{level}" for level in range(3, 8)]
        + [f"box_level_{level}" for level in range(3, 8)])
    images = _images(1)
    outputs = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        class_outputs, box_outputs = _model()(images)
    _assert_close(outputs, (*class_outputs, *box_outputs))
    dets = postprocess_raw(_model().config, outputs[:5], outputs[5:], "global", 2.0)
    cls_logits, box_deltas = flatten_outputs([torch.from_numpy(o) for o in outputs[:5]],
                                             [torch.from_numpy(o) for o in outputs[5:]])
    expected = postprocess_raw(_model().config, cls_logits, box_deltas, "global", 2.0)
    assert int(dets.valid[0]) > 0
    for field in ("boxes_yxyx", "scores", "classes", "valid"):
        assert torch.equal(getattr(dets, field), getattr(expected, field))
