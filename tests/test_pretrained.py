"""``save_pretrained`` / ``from_pretrained``: round trips, head reset, and untrusted files refused
(model/efficientdet.py, model/config_check.py, model/weights_io.py)."""
from __future__ import annotations

import dataclasses
import functools
import json

import pytest
import torch

from model.config import DetConfig
from model.config_check import checked_fields
from model.efficientdet import EfficientDet
from model.weights_io import load_weights, save_weights

pytestmark = pytest.mark.usefixtures("single_thread")


def _small(num_classes: int = 90) -> EfficientDet:
    torch.manual_seed(0)
    return EfficientDet.from_config("efficientdet-lite0", image_size=128,
                                    num_classes=num_classes).eval()


def _equal_state(a: EfficientDet, b: EfficientDet) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_save_pretrained_round_trip_after_head_reset(tmp_path, suffix):
    model = _small()
    model.reset_head(3)
    path = model.save_pretrained(tmp_path / f"mine{suffix}", labels=["cat", "dog", "bird"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"mine{suffix}"]
    restored = EfficientDet.from_pretrained(path)
    assert restored.config == model.config and _equal_state(restored, model)
    assert restored.label_map == {1: "cat", 2: "dog", 3: "bird"}
    assert restored.metadata["tool"]["writer"] == "save_pretrained"
    # Saving again keeps the names without repeating them.
    again = EfficientDet.from_pretrained(restored.save_pretrained(tmp_path / f"again{suffix}"))
    assert again.label_map == restored.label_map


def test_from_pretrained_num_classes_resets_the_head_with_a_warning(tmp_path):
    model = _small()
    path = model.save_pretrained(tmp_path / "coco.pth")
    with pytest.warns(UserWarning, match="class head reset from 90 to 5 classes"):
        tuned = EfficientDet.from_pretrained(path, num_classes=5)
    assert tuned.config.num_classes == 5 and not tuned.training
    assert tuned.class_net.class_predict.pointwise.bias.shape[0] == 5 * tuned.config.num_anchors
    before, after = model.state_dict(), tuned.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()
               if not k.startswith("class_net.class_predict."))
    assert EfficientDet.from_pretrained(path, num_classes=90).config.num_classes == 90


def test_bare_torch_save_gets_a_hint(tmp_path):
    torch.save(_state(), tmp_path / "bare.pth")
    with pytest.raises(ValueError, match=r"bare state_dict.*save_pretrained"):
        EfficientDet.from_pretrained(tmp_path / "bare.pth")


@functools.lru_cache(maxsize=None)
def _reference() -> EfficientDet:
    """One read-only model for the tests that only need its state and config."""
    return _small()


def _state() -> dict:
    return dict(_reference().state_dict())


def _metadata() -> dict:
    config = _reference().config
    return {"variant": config.name, "config": config.to_dict()}


@pytest.mark.parametrize("change, message", [
    ({"image_size": [100000, 100000]}, r"image_size: 100000x100000"),
    ({"image_size": "big"}, r"image_size: expected"),
    ({"mean_rgb": "abc"}, r"mean_rgb: expected"),
    ({"stddev_rgb": [0.0, 1.0, 1.0]}, r"stddev_rgb: expected positive"),
    ({"stddev_rgb": [float("nan"), 1.0, 1.0]}, r"stddev_rgb"),
    ({"num_classes": "90"}, r"num_classes: expected an integer"),
    ({"fpn_num_filters": True}, r"fpn_num_filters"),
    ({"fpn_cell_repeats": 10 ** 6}, r"fpn_cell_repeats: expected an integer in 1\.\.32"),
    ({"separable_conv": 1}, r"separable_conv: expected true/false"),
    ({"scale_range": "yes"}, r"scale_range: expected true/false"),
    ({"backbone_name": "resnet50"}, r"backbone_name: unknown value"),
    ({"aspect_ratios": []}, r"aspect_ratios"),
    ({"nms_configs": {"method": 3}}, r"nms_configs.method"),
    ({"nms_configs": {"bogus": 1}}, r"unknown nms_configs keys"),
    ({"min_level": 5, "max_level": 4}, r"min_level is above max_level"),
    ({"surprise": 1}, r"unknown config fields"),
])
def test_untrusted_config_fields_are_refused(tmp_path, change, message):
    metadata = _metadata()
    metadata["config"].update(change)
    save_weights(tmp_path / "w.safetensors", _state(), metadata)
    with pytest.raises(ValueError, match=message):
        EfficientDet.from_pretrained(tmp_path / "w.safetensors")


def test_variant_must_match_config_name(tmp_path):
    metadata = {**_metadata(), "variant": "efficientdet-d4"}
    save_weights(tmp_path / "w.pth", _state(), metadata)
    with pytest.raises(ValueError, match="variant 'efficientdet-d4' disagrees"):
        EfficientDet.from_pretrained(tmp_path / "w.pth")


def test_metadata_must_be_a_mapping(tmp_path):
    save_weights(tmp_path / "w.pth", _state(), {"config": [1, 2]})
    with pytest.raises(ValueError, match="config metadata is a list"):
        EfficientDet.from_pretrained(tmp_path / "w.pth")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    state = dict(_state())
    key = "box_net.box_predict.pointwise.bias"
    state[key] = state[key].clone()
    state[key][0] = bad
    save_weights(tmp_path / "w.safetensors", state, _metadata())
    with pytest.raises(ValueError, match=f"{key} holds NaN or Inf"):
        EfficientDet.from_pretrained(tmp_path / "w.safetensors")


def test_stored_labels_are_checked(tmp_path):
    metadata = {**_metadata(), "labels": {"0": "background"}}
    save_weights(tmp_path / "w.pth", _state(), metadata)
    with pytest.raises(ValueError, match="stored labels: label id '0' is outside 1..90"):
        EfficientDet.from_pretrained(tmp_path / "w.pth")


def test_saved_file_reads_back_as_plain_weights(tmp_path):
    model = _small(4)
    path = model.save_pretrained(tmp_path / "w.safetensors", labels={2: "b", 1: "a"})
    _, metadata = load_weights(path)
    assert json.loads(json.dumps(metadata)) == metadata
    assert metadata["labels"] == {"1": "a", "2": "b"} and metadata["config"]["num_classes"] == 4


def test_every_config_field_has_a_validation_rule():
    assert checked_fields() == {f.name for f in dataclasses.fields(DetConfig)}

